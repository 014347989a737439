"""Kernel launches of one causal call of a recipe's GPU form, counted on a CPU.

The Triton backend runs under ``TRITON_INTERPRET=1``; each Triton kernel launch counts one,
each aten op outside a Triton kernel counts one, except views and plain allocations (which
launch nothing on a GPU): :class:`attncompose.eval.interpreter.LaunchCounter`. It is an
estimate of what ``torch.profiler`` counts on CUDA (``bench_gpu.py``'s ``launches``): there, a
sort or a ``cat`` may launch more than one kernel.
What it shows without a GPU is how the count grows with the causal splitter's levels (which
packs them on a GPU, so here too: ``causal_split.PACK_DEVICES``): the
recipes run at leaves of 128 (``out.min_seq_len``), blocks and samples of 64, d=16, H=2,
for n = 512 ... 4096 (2 to 5 levels; the paper's knobs at 128k have 5: leaves of 4096), and
at lengths whose leaves do not pack (1000 = 125 * 8, 3600 halves to an odd 225: run as the
first rows of a square that does, ``padded_to``).
Writes ``benchmarks/results/launch_count.json`` (device, versions, commit, date).

    python benchmarks/launch_count.py [--recipes hyperattention,lsh-only] [--seq-lens 512,4096]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch

import attncompose as ac
from attncompose.eval.interpreter import LaunchCounter
from attncompose.eval.timing import write_results
from attncompose.primitives import causal_split
from attncompose.primitives.causal_split import square_of

RESULTS = Path(__file__).resolve().parent / "results"
LEAF = 128
KNOBS = {"out.min_seq_len": LEAF, "diag.block_size": 64, "residual.sample_size": 64}


def count(recipe_name: str, n: int) -> dict:
    with causal_split.packing_on({"cpu"}):  # the splitter as on a GPU
        return _count(recipe_name, n)


def _count(recipe_name: str, n: int) -> dict:
    recipe = ac.load_recipe(recipe_name)
    recipe = recipe.with_knobs({k: v for k, v in KNOBS.items() if k.split(".")[0] in recipe.steps})
    attn = ac.compile(recipe, backend="triton")
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    attn(q, k, v, is_causal=True)  # first call: plans, caches
    counter = LaunchCounter()
    with counter:
        attn(q, k, v, is_causal=True)
    quantum = attn.pipeline.pack_quantum[recipe.steps[recipe.output_id].body]
    shape = square_of(n, LEAF, quantum)  # padded: run as the first rows of one that packs
    square, levels = (n, None) if shape is None else (shape[0] << shape[1], shape[1])
    return {
        "recipe": recipe_name,
        "seq_len": n,
        "padded_to": square,
        "causal": True,
        "levels": levels,
        "triton_launches": counter.triton,
        "aten_ops": counter.aten,
        "launches": counter.launches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default="hyperattention,lsh-only,hyperattention-sinks")
    parser.add_argument("--seq-lens", default="512,1024,2048,4096,1000,3600")
    parser.add_argument("--out", type=Path, default=RESULTS / "launch_count.json")
    args = parser.parse_args()
    rows = [
        count(name, int(n)) for name in args.recipes.split(",") for n in args.seq_lens.split(",")
    ]
    for row in rows:
        print(
            f"{row['recipe']:22s} n={row['seq_len']:5d} (as {row['padded_to']:5d}) "
            f"levels {row['levels']}  "
            f"launches {row['launches']:4d} (triton {row['triton_launches']}, "
            f"aten {row['aten_ops']})"
        )
    record = {"knobs": KNOBS, "head_dim": 16, "heads": 2, "dtype": "float32", "rows": rows}
    write_results(args.out, record, device="cpu")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
