"""The causal splitter's two forms on a CPU: every level packed into one body call, or level
by level (stacked per level where the body is offset-free, else one call per rectangle).

A GPU call's time is largely its kernel launches, which packing makes independent of the
number of levels (``launch_count.py``); a CPU has no launch cost, and a packed call copies
every level's rows of q, k and v, which the level-by-level form reads as views. This times
both forms of one causal call (torch backend, default knobs, B=1, H=4, d=64, fp32) in
interleaved rounds, per recipe whose body packs, and writes
``benchmarks/results/splitter_cpu.json`` (device, versions, commit, date): the evidence
behind ``causal_split.PACK_DEVICES`` (packing on CUDA only).

    python benchmarks/splitter_cpu.py [--recipes hyperattention,...] [--seq-len 16384]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import attncompose as ac
from attncompose.eval.timing import measure_rounds, median_ratio, write_results
from attncompose.primitives import causal_split

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = "hyperattention,lsh-only,hyperattention-sinks,hyperattention-aligned"


def compare(name: str, n: int, repeats: int) -> dict:
    attn = ac.compile(ac.load_recipe(name), backend="torch")
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 4, n, 64, generator=g) for _ in range(3))

    def call(packed: bool):
        def run():
            with causal_split.packing_on({"cpu"} if packed else set()):
                attn(q, k, v, is_causal=True)

        return run

    t = measure_rounds({"packed": call(True), "levels": call(False)}, repeats=repeats)
    return {
        "recipe": name,
        "seq_len": n,
        "causal": True,
        "packed_ms": t["packed"].median_ms,
        "levels_ms": t["levels"].median_ms,
        "packed_over_levels": median_ratio(t["packed"], t["levels"]),
        "samples_ms": {form: list(t[form].samples_ms) for form in t},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default=RECIPES)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "splitter_cpu.json")
    args = parser.parse_args()
    rows = [compare(name, args.seq_len, args.repeats) for name in args.recipes.split(",")]
    for row in rows:
        print(
            f"{row['recipe']:22s} n={row['seq_len']} causal: packed {row['packed_ms']:.1f} ms, "
            f"level by level {row['levels_ms']:.1f} ms, packed/levels "
            f"{row['packed_over_levels']:.3f} (median of per-round ratios)"
        )
    record = {"batch": 1, "heads": 4, "head_dim": 64, "dtype": "float32", "rows": rows}
    write_results(args.out, record, device="cpu")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
