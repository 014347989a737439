"""Where a recipe's CPU time goes: PyTorch's fused attention kernel against everything else.

Runs the recipe (torch backend, default knobs) under ``torch.profiler`` at one length,
causal and non-causal, B=1, H=4 (``--kv-heads``: grouped), d=64, fp32, and sums the self
CPU time of each aten op over ``--repeats`` calls. The time spent inside
``aten::_scaled_dot_product_flash_attention_for_cpu`` (the exact leaves and the tile kernel
both run in it) is separated from the rest (hashing, sorting, gathers, masks, scatters,
Python). SDPA and the recipe are timed unprofiled in the
same run (interleaved rounds), and

    bound_free_overhead = speedup * profiled_ms / attention_kernel_ms

is the speedup the recipe would reach if everything outside the attention kernel were free
(the kernel's share of the profiled wall time applied to the measured speedup): with the
products the knobs ask for, no faster use of SDPA's kernel gets past it. Writes
``benchmarks/results/profile_cpu.json`` (device, versions, commit, date).

    python benchmarks/profile_cpu.py [--recipe hyperattention] [--seq-len 16384]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch.nn.functional as F
from bench_cpu import RESULTS, cpu_arguments, inputs, write_cpu_results  # this folder's
from torch.profiler import ProfilerActivity, profile

import attncompose as ac
from attncompose.eval.timing import measure_rounds, median_ratio

ATTENTION_KERNEL = "aten::_scaled_dot_product_flash_attention_for_cpu"


def op_times(fn, repeats: int) -> tuple[float, dict[str, float]]:
    """Wall milliseconds of a profiled call and self CPU milliseconds per aten op, both
    averaged over ``repeats`` profiled calls."""
    fn()  # warm-up, unprofiled
    wall = 0.0
    totals: dict[str, float] = defaultdict(float)
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            fn()
            wall += (time.perf_counter() - t0) * 1e3 / repeats
        for event in prof.key_averages():
            if event.key.startswith("aten::"):
                totals[event.key] += event.self_cpu_time_total / 1e3 / repeats
    return wall, dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def profile_rows(
    recipe: str, n: int, heads: int, dim: int, repeats: int, kv_heads=None
) -> list[dict]:
    attn = ac.compile(recipe, backend="torch")
    q, k, v = inputs(n, heads, kv_heads, dim)
    gqa = k.shape[1] != heads
    rows = []
    for causal in (False, True):
        fns = {
            "sdpa": lambda c=causal: F.scaled_dot_product_attention(
                q, k, v, is_causal=c, enable_gqa=gqa
            ),
            "recipe": lambda c=causal: attn(q, k, v, is_causal=c),
        }
        t = measure_rounds(fns, repeats=repeats)
        wall, ops = op_times(fns["recipe"], repeats)
        kernel = ops.get(ATTENTION_KERNEL, 0.0)
        speedup = median_ratio(t["sdpa"], t["recipe"])
        row = {
            "n": n,
            "causal": causal,
            "sdpa_ms": t["sdpa"].median_ms,
            "recipe_ms": t["recipe"].median_ms,
            "speedup": speedup,
            "profiled_ms": wall,  # wall time of a profiled call of the recipe
            "attention_kernel_ms": kernel,  # its self time inside SDPA's CPU kernel
            "other_ms": wall - kernel,  # everything else: other ops, Python, profiler
            "bound_free_overhead": speedup * wall / kernel if kernel else None,
            "ops_ms": {name: ms for name, ms in ops.items() if ms >= 0.05},
        }
        rows.append(row)
        top = ", ".join(f"{name[6:]} {ms:.1f}" for name, ms in list(row["ops_ms"].items())[1:6])
        print(
            f"n={n} {'causal    ' if causal else 'non-causal'} recipe {row['recipe_ms']:.1f} ms "
            f"(sdpa {row['sdpa_ms']:.1f}, {row['speedup']:.2f}x): profiled {wall:.1f} ms: "
            f"attention kernel {kernel:.1f} ms, the rest {wall - kernel:.1f} ms [{top}]; "
            f"were the rest free: {row['bound_free_overhead']:.2f}x",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpu_arguments(parser, repeats=5)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=RESULTS / "profile_cpu.json")
    args = parser.parse_args()
    rows = profile_rows(
        args.recipe, args.seq_len, args.heads, args.dim, args.repeats, args.kv_heads
    )
    write_cpu_results(args.out, "profile_cpu", args, rows)


if __name__ == "__main__":
    main()
