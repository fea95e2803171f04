"""How a token's logits depend on what else is in its decode, for each KV cache type (see the README's Determinism).

With a sequence holding 30 to 2,000 tokens, one token is decoded alone, then beside another sequence's token, then
with 3 drafted tokens after it, and (as the last of a chunk of its own sequence) in a 63- and in a 64-token chunk;
the report gives the largest difference of its logits from decoded alone (0.0: bit-identical).

    python examples/determinism.py f16 q8_0 q4_0 [--model FILE.gguf]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import lllms  # noqa: E402

LENGTHS = (30, 100, 200, 250, 300, 600, 2000)


def measure(path: str, kv: str) -> dict[int, dict[str, float]]:
    config = lllms.ModelConfig(task="text-completion", file=path)
    model = lllms._LlamaModel(lc, config, path)
    ctx, batch = model.context(4096, 512, 3, kv=kv), lllms._Batch(lc, 512)
    memory = lc.llama_get_memory(ctx)
    mine = model.tokenize((ROOT / "README.md").read_text())[: max(LENGTHS) + 8]
    other = model.tokenize((ROOT / "lllms.py").read_text()[:40000])[: max(LENGTHS) + 8]

    def run(items: list[tuple[int, int, int, bool]]) -> list[Any]:
        batch.clear()
        rows = [batch.add(*item) for item in items]
        model.decode(ctx, batch.ptr)
        return [np.array(model.logits(ctx, r)) if item[3] else None for r, item in zip(rows, items, strict=True)]

    def cut(seq: int, n: int) -> None:
        lc.llama_memory_seq_rm(memory, seq, n, -1)

    out = {}
    for n in LENGTHS:
        cut(0, 0), cut(1, 0)
        for seq, tokens in ((0, mine[:n]), (1, other[:n])):
            for i in range(0, n, 32):
                run([(t, p, seq, False) for p, t in enumerate(tokens[i : i + 32], i)])
        alone = run([(mine[n], n, 0, True)])[0]
        cut(0, n)
        beside = run([(mine[n], n, 0, True), (other[n], n, 1, True)])[0]
        cut(0, n), cut(1, n)
        drafts = run([(mine[n + i], n + i, 0, True) for i in range(4)])[0]
        cut(0, n)
        row = {"beside": float(abs(alone - beside).max()), "3 drafts": float(abs(alone - drafts).max())}
        if n >= 64:
            chunks = []
            for size in (63, 64):
                cut(0, n + 1 - size)
                chunks.append(run([(mine[p], p, 0, p == n) for p in range(n + 1 - size, n + 1)])[-1])
            row["63 vs 64 chunk"] = float(abs(chunks[0] - chunks[1]).max())
        out[n] = row
    batch.free()
    lc.llama_free(ctx)
    lc.llama_model_free(model.ptr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("types", nargs="+", choices=["f16", "q8_0", "q4_0"])
    ap.add_argument("--model", help="a GGUF (default: SmolLM2-135M-Instruct)")
    args = ap.parse_args()
    path = args.model or lllms._find_default_model()
    for kv in args.types:
        for n, row in measure(path, kv).items():
            print(f"{kv:>5} {n:>5} tokens held: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
