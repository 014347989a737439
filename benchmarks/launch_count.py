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

``--calls`` counts instead, for every built-in recipe (the same knobs, 4 query and 2
key/value heads, d=16, n = 2048: past the window's width, whose band then stops changing
with the length, and a length whose splitter levels pack), what one call launches and how
often it would make the host wait for the device
(:class:`attncompose.eval.interpreter.DeviceWaits`, generator draws apart: an eager call
draws without waiting) in the calls a model makes: a causal prefill and a decode step (one
query after n keys) at a length called before, and a decode step at a new length, n + 1,
as every step of a decode loop is (a plan per length is built anew there, once for all the
layers of a step). Each recipe runs in a fresh process: the static parts one process keeps
across calls (plans, states, layouts) start empty, as nothing another recipe made is there.
Writes ``benchmarks/results/launch_count_calls.json``.

    python benchmarks/launch_count.py [--recipes hyperattention,lsh-only] [--seq-lens 512,4096]
    python benchmarks/launch_count.py --calls [--recipes topp,streaming]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch

import attncompose as ac
from attncompose.eval.interpreter import DeviceWaits, LaunchCounter
from attncompose.eval.timing import write_results
from attncompose.primitives import causal_split
from attncompose.primitives.causal_split import square_of
from attncompose.spec.recipe import builtin_recipes

RESULTS = Path(__file__).resolve().parent / "results"
LEAF = 128
KNOBS = {"out.min_seq_len": LEAF, "diag.block_size": 64, "residual.sample_size": 64}
CALLS_LENGTH = 2048  # --calls: past streaming's window (1024), a length whose splitter levels pack


def count(recipe_name: str, n: int) -> dict:
    with causal_split.packing_on({"cpu"}):  # the splitter as on a GPU
        return _count(recipe_name, n)


def _sized(recipe_name: str):
    """The built-in recipe with this script's knobs (those it has)."""
    recipe = ac.load_recipe(recipe_name)
    return recipe.with_knobs({k: v for k, v in KNOBS.items() if k in recipe.knob_values()})


def _count(recipe_name: str, n: int) -> dict:
    recipe = _sized(recipe_name)
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


def calls(recipe_name: str, n: int) -> list[dict]:
    """Launches and host waits of a prefill, a decode step at a length called before and one
    at a new length (see the module doc), each after a first call at n."""
    with causal_split.packing_on({"cpu"}):
        attn = ac.compile(_sized(recipe_name), backend="triton", check_finite=False)
        g = torch.Generator().manual_seed(n)
        k, v = (torch.randn(1, 2, n + 1, 16, generator=g) for _ in range(2))
        q = torch.randn(1, 4, n, 16, generator=g)
        cases = {  # (q, keys, first call's keys: the length called before)
            "prefill": (q, n, n),
            "decode": (q[:, :, -1:], n, n),
            "decode, new length": (q[:, :, -1:], n + 1, n),
        }
        rows = []
        for call, (x, lk, before) in cases.items():
            with torch.no_grad():
                attn(x, k[:, :, :before], v[:, :, :before], is_causal=True)
                counter, waits = LaunchCounter(), DeviceWaits(draws=False)
                with counter, waits:
                    attn(x, k[:, :, :lk], v[:, :, :lk], is_causal=True)
            rows.append(
                {
                    "recipe": recipe_name,
                    "call": call,
                    "q_len": x.shape[2],
                    "seq_len": lk,
                    "causal": True,
                    "triton_launches": counter.triton,
                    "aten_ops": counter.aten,
                    "launches": counter.launches,
                    "waits": len(waits.seen),
                    "wait_ops": sorted(set(waits.seen)),
                }
            )
        return rows


def main_calls(args) -> None:
    names = args.recipes.split(",") if args.recipes else builtin_recipes()
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as fresh:
        counted = [fresh.submit(calls, name, args.seq_len) for name in names]
        rows = [row for future in counted for row in future.result()]
    for row in rows:
        print(
            f"{row['recipe']:22s} {row['call']:19s} launches {row['launches']:4d} "
            f"(triton {row['triton_launches']}, aten {row['aten_ops']})  waits {row['waits']}"
        )
    record = {"knobs": KNOBS, "head_dim": 16, "heads": 4, "kv_heads": 2, "dtype": "float32"}
    record["seq_len"] = args.seq_len
    out = args.out or RESULTS / "launch_count_calls.json"
    write_results(out, {**record, "rows": rows}, device="cpu")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--recipes", help="default: hyperattention,lsh-only,hyperattention-sinks (--calls: all)"
    )
    parser.add_argument("--seq-lens", default="512,1024,2048,4096,1000,3600")
    parser.add_argument("--calls", action="store_true", help="prefill and decode calls")
    parser.add_argument("--seq-len", type=int, default=CALLS_LENGTH, help="--calls: n")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.calls:
        return main_calls(args)
    args.recipes = args.recipes or "hyperattention,lsh-only,hyperattention-sinks"
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
    out = args.out or RESULTS / "launch_count.json"
    write_results(out, record, device="cpu")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
