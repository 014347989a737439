"""Every Triton kernel variant the built-in recipes launch, compiled for Hopper on a CPU.

Each recipe's GPU form (``backend="triton"``, the causal splitter packed as on CUDA) runs
once per mode (causal, non-causal, decode, and causal with grouped-query heads) under
``TRITON_INTERPRET=1`` in float16 (the interpreter runs no bfloat16) while
:class:`attncompose.eval.aot.LaunchRecorder` keeps each distinct kernel variant; then every
variant is compiled for sm_90 in bfloat16 with every autotune config its pruning keeps
(block sizes as on the GPU: LSH blocks and samples of 128, leaves of 256, n=1024, B=1, H=2
and 1 key/value head when grouped, d=128), specialized as the JIT specializes the recorded
launch (unit strides as constants, 16-divisible sizes and aligned pointers). No GPU is needed:
Triton's compiler and the ptxas it ships run here. Per compile: whether it worked (else the
error), seconds, shared memory, registers and spilled bytes per thread, and the tensor-core
(wgmma / mma.sync) and asynchronous-copy (cp.async / TMA) instructions in its PTX. Writes
``benchmarks/results/compile_gpu.json`` (device, versions, commit, date) and prints failures
and the largest register counts. What it cannot say: speed, and whether the compiled code is
right (the compiled GPU tests do).

    python benchmarks/compile_gpu.py [--recipes hyperattention,topp] [--head-dim 128]
    pip install --target /tmp/t36 --no-deps triton==3.6.0     # the GPU image's Triton
    python benchmarks/compile_gpu.py --triton-path /tmp/t36 --out /tmp/compile_gpu_t36.json

``--triton-path`` compiles with the Triton installed there (the kernels are still recorded
by this environment's interpreter); each row and the record name the version that compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch

import attncompose as ac
from attncompose.eval.aot import TARGET, LaunchRecorder, compile_variants
from attncompose.eval.timing import write_results
from attncompose.primitives import causal_split
from attncompose.spec.errors import RecipeError

RESULTS = Path(__file__).resolve().parent / "results"
KNOBS = {"out.min_seq_len": 256, "diag.block_size": 128, "residual.sample_size": 128}
# Lq, causal, key/value heads (of 2 query heads: 1 is grouped-query attention)
MODES = {
    "causal": (None, True, 2),
    "non-causal": (None, False, 2),
    "decode": (1, True, 2),
    "grouped": (None, True, 1),
}


def record(names: list[str], n: int, head_dim: int) -> list[dict]:
    """The distinct kernel variants the recipes ``names`` launch, each mode once."""
    recorder = LaunchRecorder()
    g = torch.Generator().manual_seed(0)
    qkv = lambda lq, kv: [
        torch.randn(1, heads, length, head_dim, generator=g).half()
        for heads, length in ((2, lq or n), (kv, n), (kv, n))
    ]
    with causal_split.packing_on({"cpu"}):
        for name in names:
            attn = ac.compile(_knobs(ac.load_recipe(name)), backend="triton")
            for lq, causal, kv in MODES.values():
                q, k, v = qkv(lq, kv)
                with recorder:
                    attn(q, k, v, is_causal=causal)
    return recorder.variants


def _knobs(recipe):
    """``recipe`` with this script's knobs where it has them."""
    for knob, value in KNOBS.items():
        with contextlib.suppress(RecipeError):  # a recipe without that step or knob
            recipe = recipe.with_knobs({knob: value})
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default=",".join(ac.builtin_recipes()))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument(
        "--one-config",
        action="store_true",
        help="the first kept config per variant and kind of loads",
    )
    parser.add_argument(
        "--triton-path", help="compile with the Triton installed in this folder instead"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "compile_gpu.json")
    args = parser.parse_args()
    names = args.recipes.split(",")
    variants = record(names, args.seq_len, args.head_dim)
    rows = compile_variants(
        variants, half="bf16", every_config=not args.one_config, triton_path=args.triton_path
    )
    failed = [r for r in rows if not r["ok"]]
    for row in failed:
        print(f"FAILED {row['kernel']} {row['constexprs']}: {row['error']}")
    for row in sorted((r for r in rows if r["ok"]), key=lambda r: -r["registers"])[:8]:
        ops = " ".join(f"{k} {n}" for k, n in row["instructions"].items() if n)
        print(
            f"{row['kernel'].rsplit('.', 1)[-1]:22s} warps {row['num_warps']} stages "
            f"{row['num_stages']} regs {row['registers']} spill {row['spill_bytes']} B "
            f"shared {row['shared_bytes']} B {ops}"
        )
    print(f"{len(variants)} variants, {len(rows)} compiles, {len(failed)} failed")
    record_ = {
        "target": list(TARGET),
        "compiled_with_triton": sorted({row["triton"] for row in rows}),
        "recipes": names,
        "head_dim": args.head_dim,
        "seq_len": args.seq_len,
        "knobs": KNOBS,
        "variants": len(variants),
        "failed": len(failed),
        "rows": rows,
    }
    write_results(args.out, record_, device="cpu")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
