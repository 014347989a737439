"""Every built-in recipe on the GPU against dense attention and FlexAttention, one process.

B=1, H=32, bf16, d in {64, 128}, n = 4k..128k, causal, non-causal and decode (Lq=1, Lk=n),
forward. Per point: cuDNN and flash SDPA (the exact baselines; decode runs them without a
mask: its one query sees every key), then each recipe at its default knobs through
attncompose's dispatch (``impl: attncompose``) and, where every block step is a block plan,
the same plan through FlexAttention (``impl: flex``, compiled once with dynamic shapes).
The built-in ``exact`` recipe is the tuned fallback (what a tuned file runs where exact
attention wins): its rows say how close dispatch's exact attention comes to the baselines.
Each row: impl, recipe (null for dense), seq_len, q_len, causal, head_dim, median_ms
(``attncompose.eval.timing.measure``: do_bench on CUDA), frac (share of exact attention's
products, counted by the plans or, for tile-path recipes, by the torch backend on the first
two heads), speedup_vs_best_exact (faster of cuDNN/flash in the same run / this),
efficiency (= speedup x frac: speed per product against the best dense kernel), launches
(kernel launches per call), gpu_ms and top_kernels (its kernels' device time, the largest
by name: ``attncompose.eval.timing.profile_call``), graph_captured (impl
"attncompose-graphs": whether the CUDA graph was captured, else it ran eagerly),
peak_mem_mb and ideal_speedup (1 / frac: the speedup were the recipe as fast per product
as dense attention). The record also keeps ``ATTNCOMPOSE_TMA`` and ``tuned``: the config
each Triton autotuner chose per key (tiles, warps, stages, and whether it loads through
tensor descriptors). Writes
``benchmarks/results/bench_gpu_<device>.json`` (device, versions, commit, date) after every
point, so a run stopped by a time limit keeps what it measured (the issues' target points
and recipes run first), and prints a table last. Between points the compiled modules drop
their buffers and graphs (``Attention.release_memory``).

    python benchmarks/bench_gpu.py                         # the grid (needs CUDA)
    python benchmarks/bench_gpu.py --dims 128 --lengths 32768,131072 --recipes streaming,topp
    python benchmarks/bench_gpu.py --cpu-smoke             # tiny sizes on CPU (torch, flex)
    python benchmarks/bench_gpu.py --levels --copies --dims 128 --lengths 32768,131072 \
        --recipes hyperattention,hyperattention-sinks --modes causal

``--levels`` adds, for causal calls of recipes whose splitter packs its levels on a GPU,
the same recipe with the levels run one by one (``impl: attncompose-levels``), so one run
says whether packing pays (``causal_split.PACK_DEVICES``). ``--copies`` adds, for recipes
with tile passes (sortLSH's buckets and samples), the same recipe with each tile pass copying
q, k and v in tile order (``impl: attncompose-copies``) instead of its kernel reading them
through row maps (``attncompose.primitives.block.contiguous.copying_rows``). ``--pointers``
adds every recipe with its Triton kernels reading rows through pointers only
(``ATTNCOMPOSE_TMA=off``, impl ``attncompose-pointers``): by default a Hopper GPU's
autotuner times tensor-descriptor (TMA) loads against them where the rows allow.
``--triton-exact`` adds the exact recipe and, causal, every recipe with a causal splitter on
the Triton backend (impl ``attncompose-triton``): its exact attention (the fallback, the
diagonal leaves) in the Triton kernel, where ``auto`` gives it to cuDNN.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import warnings
from pathlib import Path

import torch

import attncompose as ac
from attncompose.eval.bench import random_qkv, sdpa_call
from attncompose.eval.products import products_fraction
from attncompose.eval.timing import (
    measure,
    peak_memory_mb,
    profile_call,
    write_results,
)
from attncompose.primitives import causal_split
from attncompose.primitives.block import contiguous
from attncompose.runtime.compiler import Pipeline
from attncompose.runtime.naming import device_name

RESULTS = Path(__file__).parent / "results"
GPU_GRID = {
    "lengths": [4096, 8192, 16384, 32768, 65536, 131072],
    "dims": [64, 128],
    "heads": 32,
    "modes": ["causal", "non-causal", "decode"],
}
SMOKE_GRID = {
    "lengths": [256],
    "dims": [16],
    "heads": 2,
    "modes": ["causal", "non-causal", "decode"],
}
FRAC_HEADS = 2  # heads a tile-path recipe's frac is counted on (torch backend)
# the issues' targets (head dim, mode, n) and recipes, measured first: a run cut by the
# device's time limit keeps them
TARGET_POINTS = [
    (128, "causal", 32768),
    (128, "causal", 131072),
    (128, "non-causal", 131072),
    (128, "causal", 8192),
]
TARGET_RECIPES = ["hyperattention", "streaming", "block-topk", "topp", "power"]


def points(grid: dict) -> list[tuple[int, str, int]]:
    """The grid's (head dim, mode, n), the issues' targets first, then in grid order."""
    every = [(d, m, n) for d in grid["dims"] for m in grid["modes"] for n in grid["lengths"]]
    first = [p for p in TARGET_POINTS if p in every]
    return first + [p for p in every if p not in first]


def dense_backends(device: torch.device) -> dict[str, object]:
    """The exact baselines: cuDNN and flash SDPA on CUDA; the CPU's flash kernel in a smoke."""
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    return {"flash": SDPBackend.FLASH_ATTENTION}


def planned(recipe) -> bool:
    """Whether every block step of ``recipe`` runs as a block plan (FlexAttention can run it)."""
    pipeline = Pipeline(recipe, backend="torch")
    blocks = [node for node in pipeline.nodes.values() if node.op == "block"]
    return bool(blocks) and all(node.planned for node in blocks)


def splits(recipe) -> bool:
    """Whether ``recipe`` ends in a causal splitter (exact attention on its diagonal)."""
    return recipe.steps[recipe.output_id].op == "causal_split"


def packs(recipe) -> bool:
    """Whether ``recipe``'s causal splitter packs every level into one body call (on the
    devices of ``causal_split.PACK_DEVICES``)."""
    pipeline = Pipeline(recipe, backend="torch")
    return splits(recipe) and pipeline.pack_quantum[recipe.steps[recipe.output_id].body] is not None


@contextlib.contextmanager
def pointer_loads():
    """Inside, attncompose's Triton kernels read rows through pointers, never through tensor
    descriptors (``ATTNCOMPOSE_TMA=off``)."""
    before = os.environ.get("ATTNCOMPOSE_TMA")
    os.environ["ATTNCOMPOSE_TMA"] = "off"
    try:
        yield
    finally:
        if before is None:
            del os.environ["ATTNCOMPOSE_TMA"]
        else:
            os.environ["ATTNCOMPOSE_TMA"] = before


# impls that run a compiled recipe inside a context: its splitter level by level, its tile
# passes copying their rows, its kernels loading through pointers only
CONTEXTS = {
    "attncompose-levels": lambda: causal_split.packing_on(set()),
    "attncompose-copies": contiguous.copying_rows,
    "attncompose-pointers": pointer_loads,
}


class Inside:
    """A compiled recipe called inside a context: e.g. ``causal_split.packing_on(set())``
    (its splitter's levels one by one on every device) or ``contiguous.copying_rows()``."""

    def __init__(self, attn, context):
        self.attn = attn
        self.context = context

    def __call__(self, *args, **kwargs):
        with self.context():
            return self.attn(*args, **kwargs)

    def release_memory(self) -> None:
        self.attn.release_memory()


TUNERS = {
    "exact": ("attncompose.primitives.exact.triton", "_exact_tuned"),
    "plan": ("attncompose.primitives.block.plan_triton", "_plan_tuned"),
    "tiles": ("attncompose.primitives.block.triton", "_block_tuned"),
}


def tuned_configs() -> list[dict]:
    """What each attention kernel's autotuner chose so far, per autotune key (none where
    Triton never ran the kernel)."""
    import importlib

    rows = []
    for name, (module, attr) in TUNERS.items():
        try:
            tuner = getattr(importlib.import_module(module), attr)
        except ImportError:  # no Triton here
            continue
        for key, config in tuner.cache.items():
            rows.append(
                {"kernel": name, "key": [str(x) for x in key], **config.kwargs}
                | {"num_warps": config.num_warps, "num_stages": config.num_stages}
            )
    return rows


def frac_of(attn, recipe, q, k, v, causal: bool, torch_backend) -> float:
    """Share of exact attention's products: the plans count theirs on any backend; a recipe
    with tile-path steps is counted by the torch backend on the first heads."""
    if planned(recipe):
        return products_fraction(attn, q, k, v, causal)
    heads = slice(0, FRAC_HEADS)
    return products_fraction(torch_backend, q[:, heads], k[:, heads], v[:, heads], causal)


class Fracs:
    """frac per (recipe, n, q_len, causal), counted once (on the first head dim measured:
    which products a recipe computes does not depend on the head dim beyond the data)."""

    def __init__(self) -> None:
        self.seen: dict[tuple, tuple[float, int]] = {}

    def __call__(self, attn, recipe, q, k, v, causal, torch_backend) -> tuple[float, int]:
        key = (recipe.name, k.shape[2], q.shape[2], causal)
        if key not in self.seen:
            frac = frac_of(attn, recipe, q, k, v, causal, torch_backend)
            self.seen[key] = (frac, q.shape[-1])
        return self.seen[key]


def run_grid(
    grid: dict,
    recipes: list[str],
    device,
    dtype,
    backends: tuple[str, str],
    save,
    graphs=False,
    levels=False,
    copies=False,
    pointers=False,
    triton_exact=False,
):
    """Every point of ``grid``; ``save(rows)`` after each one (``graphs``: also each recipe
    replayed from a CUDA graph, impl "attncompose-graphs"; ``levels``: also, causal, each
    recipe whose splitter packs, with its levels one by one, impl "attncompose-levels";
    ``copies``: also each recipe with tile passes copying their rows, impl
    "attncompose-copies"; ``pointers``: also each recipe with kernels loading through
    pointers only, impl "attncompose-pointers"; ``triton_exact``: also the exact recipe and,
    causal, each recipe with a causal splitter on the Triton backend, its exact attention in
    the Triton kernel instead of cuDNN, impl "attncompose-triton")."""
    impl_backend, flex_backend = backends
    exact_backend = "triton" if device.type == "cuda" else impl_backend  # the CPU smoke: torch
    compiled = {}
    fracs = Fracs()
    rows: list[dict] = []
    for d, mode, n in points(grid):
        causal = mode != "non-causal"
        q, k, v = random_qkv(1, grid["heads"], n, d, dtype, device)
        if mode == "decode":
            q = q[:, :, -1:].contiguous()
        point = {"seq_len": n, "q_len": q.shape[2], "causal": causal, "head_dim": d}
        dense = _dense_rows(q, k, v, causal and mode != "decode", device, point)
        best = min((r["median_ms"] for r in dense if r["median_ms"]), default=None)
        rows += dense
        for name in recipes:
            recipe = ac.load_recipe(name)
            impls = {"attncompose": impl_backend}
            if name != "exact":  # exact: the tuned fallback as dispatch runs it, no variants
                if planned(recipe):
                    impls["flex"] = flex_backend
                if graphs:
                    impls["attncompose-graphs"] = impl_backend
                if levels and causal and packs(recipe):
                    impls["attncompose-levels"] = impl_backend
                if copies and not planned(recipe):
                    impls["attncompose-copies"] = impl_backend
                if pointers:
                    impls["attncompose-pointers"] = impl_backend
            if triton_exact and (name == "exact" or (causal and splits(recipe))):
                impls["attncompose-triton"] = exact_backend
            for impl, backend in impls.items():
                key = (name, impl)
                if key not in compiled:
                    compiled[key] = ac.compile(
                        recipe, backend=backend, cuda_graphs=impl.endswith("graphs")
                    )
                    if impl in CONTEXTS:
                        compiled[key] = Inside(compiled[key], CONTEXTS[impl])
                if ("torch", name) not in compiled:
                    compiled["torch", name] = ac.compile(recipe, backend="torch")
                row = _recipe_row(
                    compiled[key], recipe, q, k, v, causal, device, best,
                    lambda *a, ref=compiled["torch", name]: fracs(*a, ref),
                    {**point, "impl": impl, "recipe": name},
                )  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
        save(rows)
        del q, k, v
        for attn in compiled.values():  # buffers and graphs of this point's shapes: a dozen
            attn.release_memory()  # recipes' at 128k would fill the GPU
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _dense_rows(q, k, v, causal: bool, device, point: dict) -> list[dict]:
    rows = []
    for impl, backend in dense_backends(device).items():
        row = {**point, "impl": impl, "recipe": None, "frac": 1.0}
        try:
            call = sdpa_call(q, k, v, causal, backend)
            row["median_ms"] = measure(call, device).median_ms
            row |= profile_call(call, device) or {"launches": None}
            row["peak_mem_mb"] = peak_memory_mb(call, device)
        except RuntimeError as err:  # backend not built / not for this shape
            row |= {"median_ms": None, "note": str(err).strip().splitlines()[0][:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _recipe_row(attn, recipe, q, k, v, causal, device, best, frac, row: dict) -> dict:
    call = lambda: attn(q, k, v, is_causal=causal)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager FlexAttention on CPU says it is unfused
            started = time.perf_counter()
            ms = measure(call, device).median_ms
            row["first_call_s"] = time.perf_counter() - started  # includes compile/autotune
            row["median_ms"] = ms
            row["frac"], row["frac_head_dim"] = frac(attn, recipe, q, k, v, causal)
            row |= profile_call(call, device) or {"launches": None}
            row["peak_mem_mb"] = peak_memory_mb(call, device)
            graphs = getattr(attn, "graphs", None)
            if graphs is not None:  # a capture that failed runs eagerly: say so
                row["graph_captured"] = all(g is not None for g in graphs.graphs.values())
    except (RuntimeError, ValueError) as err:  # e.g. out of memory at 128k: say so, go on
        row |= {"median_ms": None, "note": str(err).strip().splitlines()[0][:200]}
        return row
    row["ideal_speedup"] = 1 / row["frac"]  # FLOP-ideal: exact's products / the recipe's
    if best:
        row["speedup_vs_best_exact"] = best / ms
        row["efficiency"] = row["speedup_vs_best_exact"] * row["frac"]
    return row


def table(rows: list[dict]) -> str:
    """A short text table: per point, the best dense time and each recipe's speedup/eff."""
    lines = [
        f"{'d':>4} {'mode':>10} {'n':>7}  {'impl':<20}{'recipe':<24}{'ms':>9}  speedup  eff"
        f"  {'gpu ms':>8}  launches"
    ]
    for r in rows:
        if r["recipe"] is None or r.get("median_ms") is None:
            continue
        mode = "decode" if r["q_len"] == 1 else ("causal" if r["causal"] else "non-causal")
        lines.append(
            f"{r['head_dim']:>4} {mode:>10} {r['seq_len']:>7}  {r['impl']:<20}{r['recipe']:<24}"
            f"{r['median_ms']:>9.3f}  {r.get('speedup_vs_best_exact', 0):6.2f}x"
            f"  {r.get('efficiency', 0):.2f}"
            f"  {r['gpu_ms'] if r.get('gpu_ms') is not None else float('nan'):8.3f}"
            f"  {r.get('launches')}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU")
    parser.add_argument("--lengths", help="comma-separated n (default: the grid's)")
    parser.add_argument("--dims", help="comma-separated head dims (default: the grid's)")
    parser.add_argument("--modes", help="causal,non-causal,decode (default: all)")
    parser.add_argument("--recipes", help="comma-separated built-in recipes (default: all)")
    parser.add_argument("--graphs", action="store_true", help="also time CUDA graph replays")
    parser.add_argument(
        "--levels", action="store_true", help="also time packing splitters level by level"
    )
    parser.add_argument(
        "--copies", action="store_true", help="also time tile passes that copy their rows"
    )
    parser.add_argument(
        "--pointers", action="store_true", help="also time kernels loading through pointers only"
    )
    parser.add_argument(
        "--triton-exact", action="store_true", help="also time exact attention in Triton, not cuDNN"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.cpu_smoke:
        device, dtype, grid = torch.device("cpu"), torch.float32, SMOKE_GRID
        backends = ("torch", "flex")
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --cpu-smoke to check the script on CPU")
        device, dtype, grid = torch.device("cuda"), torch.bfloat16, GPU_GRID
        backends = ("auto", "flex")
    grid = dict(grid)
    for key, given in (("lengths", args.lengths), ("dims", args.dims)):
        if given:
            grid[key] = [int(x) for x in given.split(",")]
    if args.modes:
        grid["modes"] = args.modes.split(",")
    recipes = args.recipes.split(",") if args.recipes else ac.builtin_recipes()
    recipes.sort(key=lambda r: TARGET_RECIPES.index(r) if r in TARGET_RECIPES else 99)
    slug = "cpu-smoke" if args.cpu_smoke else device_name(device).replace(" ", "_")
    out = args.out or RESULTS / f"bench_gpu_{slug}.json"

    def save(rows: list[dict]) -> None:
        record = {
            "benchmark": "bench_gpu",
            "dtype": str(dtype).removeprefix("torch."),
            "batch": 1,
            "heads": grid["heads"],
            "grid": grid,
            "recipes": recipes,
            "backends": {"attncompose": backends[0], "flex": backends[1]},
            "tma": os.environ.get("ATTNCOMPOSE_TMA", "auto"),
            "tuned": tuned_configs(),
            "rows": rows,
        }
        write_results(out, record, device)

    flags = args.graphs, args.levels, args.copies, args.pointers, args.triton_exact
    rows = run_grid(grid, recipes, device, dtype, backends, save, *flags)
    print(table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
