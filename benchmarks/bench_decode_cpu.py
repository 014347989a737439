"""CPU speed of one decode step with grouped-query heads: each recipe against PyTorch SDPA.

One query per head after n keys (causal, bottom-right: the query sees every key), with
SmolLM2-135M's heads: B=1, 9 query heads sharing 3 key/value heads, d=64, fp32, torch
backend, default knobs, against ``scaled_dot_product_attention(..., enable_gqa=True)`` timed
in the same run, in interleaved rounds (speedup: median of per-round SDPA / recipe). frac:
share of exact attention's query-key products the recipe computes. ``unchecked``: the module
compiled with ``check_finite=False`` (no NaN/Inf pass over every key and value, which a
decode step otherwise reads whole). A step of a model's decode loop makes this call once per
layer. A decode loop's key length is rarely a multiple of the recipes' key blocks: 32769 is
timed beside 32768 (block-plan steps copied every key into a padded layout there until
that copy went). Writes ``benchmarks/results/bench_decode_cpu.json`` (device, versions,
commit, date).

    python benchmarks/bench_decode_cpu.py [--recipes exact,streaming] [--seq-lens 8192,32768]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import attncompose as ac
from attncompose.eval.products import products_fraction
from attncompose.eval.timing import measure_rounds, median_ratio, write_results
from attncompose.spec.recipe import builtin_recipes

RESULTS = Path(__file__).parent / "results"
HEADS, KV_HEADS, DIM = 9, 3, 64  # SmolLM2-135M's attention


def bench(recipes: list[str], seq_lens: list[int], repeats: int) -> list[dict]:
    rows = []
    for n in seq_lens:
        g = torch.Generator().manual_seed(n)
        q = torch.randn(1, HEADS, 1, DIM, generator=g)
        k, v = (torch.randn(1, KV_HEADS, n, DIM, generator=g) for _ in range(2))
        for name in recipes:
            attn = ac.compile(name, backend="torch")
            unchecked = ac.compile(name, backend="torch", check_finite=False)
            t = measure_rounds(calls(attn, unchecked, q, k, v), repeats=repeats)
            row = {
                "recipe": name,
                "n": n,
                "causal": True,  # bottom-right: the query after every key
                "recipe_ms": t["recipe"].median_ms,
                "sdpa_ms": t["sdpa"].median_ms,
                "speedup": median_ratio(t["sdpa"], t["recipe"]),
                "unchecked_ms": t["unchecked"].median_ms,
                "unchecked_speedup": median_ratio(t["sdpa"], t["unchecked"]),
                "frac": products_fraction(attn, q, k, v, True),
                "recipe_samples_ms": t["recipe"].samples_ms,
                "unchecked_samples_ms": t["unchecked"].samples_ms,
                "sdpa_samples_ms": t["sdpa"].samples_ms,
            }
            rows.append(row)
            print(
                f"n={n:6d} {name:24s} {row['recipe_ms']:8.2f} ms (unchecked "
                f"{row['unchecked_ms']:7.2f})  sdpa {row['sdpa_ms']:6.2f} ms  speedup "
                f"{row['speedup']:5.2f}x ({row['unchecked_speedup']:5.2f}x)  "
                f"frac {row['frac']:.4f}",
                flush=True,
            )
    return rows


def calls(attn, unchecked, q, k, v) -> dict:
    """The timed callables, measured in interleaved rounds (drifts hit all alike). SDPA
    aligns is_causal top-left (the query would see key 0 alone): a query after every key
    is its non-causal call."""
    return {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "recipe": lambda: attn(q, k, v, is_causal=True),
        "unchecked": lambda: unchecked(q, k, v, is_causal=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(builtin_recipes()))
    parser.add_argument("--seq-lens", default="8192,32768,32769")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_decode_cpu.json")
    args = parser.parse_args()
    rows = bench(args.recipes.split(","), [int(x) for x in args.seq_lens.split(",")], args.repeats)
    record = {
        "benchmark": "bench_decode_cpu",
        "batch": 1,
        "heads": HEADS,
        "kv_heads": KV_HEADS,
        "head_dim": DIM,
        "query_len": 1,
        "dtype": "float32",
        "backend": "torch",
        "rows": rows,
    }
    write_results(args.out, record, "cpu")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
