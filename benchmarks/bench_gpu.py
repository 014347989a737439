"""HyperAttention (paper defaults, Triton backend) against SDPA flash and cuDNN, one layer forward.

B=1, H=32, d in {64, 128}, bf16, n = 4k..128k, causal and non-causal. Per point: latency of
every implementation (``attncompose.timing.measure``), relative error of hyperattention
against exact float32 attention, and efficiency = measured speedup over SDPA flash / ideal
speedup (exact FLOPs / FLOPs the pipeline computes, counted analytically from its knobs).
Writes benchmarks/results/bench_gpu_<device>.json with device, versions, commit and date.

    python benchmarks/bench_gpu.py                     # the GPU grid (needs CUDA)
    python benchmarks/bench_gpu.py --lengths 131072 --dims 128 --out F   # part of it
    python benchmarks/bench_gpu.py --cpu-smoke         # torch backend, tiny n, on CPU

The results file is rewritten after every point: a run stopped by a time limit keeps them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

import attncompose as ac
from attncompose.bench import bench_length, random_qkv
from attncompose.timing import device_name, write_results

RESULTS = Path(__file__).parent / "results"
GPU_GRID = {"lengths": [4096, 8192, 16384, 32768, 65536, 131072], "dims": [64, 128], "heads": 32}
SMOKE_GRID = {"lengths": [256, 512], "dims": [16], "heads": 2}


def hyper_flops(n: int, d: int, knobs: dict[str, int], causal: bool) -> float:
    """Matmul FLOPs per head of the hyperattention pipeline at length n (Lq = Lk)."""
    b, m, base = knobs["block_size"], knobs["sample_size"], knobs["min_seq_len"]

    def body(lq: int, lk: int) -> float:  # sortLSH blocks (<= 2 key blocks per tile) + samples
        span = b if lq * b % lk == 0 or lq >= lk else 2 * b
        return 4.0 * d * lq * (min(span, lk) + min(m, lk))

    def square(size: int) -> float:  # the recursive causal splitter
        if size <= base:
            return 2.0 * d * size * size
        h = size // 2
        return square(h) + square(size - h) + body(size - h, h)

    return square(n) if causal else body(n, n)


def exact_flops(n: int, d: int, causal: bool) -> float:
    return (2.0 if causal else 4.0) * d * n * n


def run_grid(
    grid: dict, backend: str, device: torch.device, dtype: torch.dtype, save
) -> list[dict]:
    """Every point of ``grid``; ``save(rows)`` after each one, so a killed run keeps them."""
    attn = ac.compile("hyperattention", backend=backend)
    knobs = {k: v for step in attn.recipe.steps.values() for k, v in step.knobs().items()}
    rows = []
    for d in grid["dims"]:
        for causal in (False, True):
            for n in grid["lengths"]:
                q, k, v = random_qkv(1, grid["heads"], n, d, dtype, device)
                measured = bench_length(attn, q, k, v, causal, "hyperattention")
                ideal = exact_flops(n, d, causal) / hyper_flops(n, d, knobs, causal)
                flash = next((r for r in measured if r.name == "sdpa-flash_attention"), None)
                for r in measured:
                    row = {"head_dim": d, **asdict(r)}
                    if r.error is not None and flash and flash.median_ms and r.median_ms:
                        speedup = flash.median_ms / r.median_ms
                        row |= {"speedup_vs_flash": speedup, "ideal_speedup": ideal,
                                "efficiency": speedup / ideal}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                save(rows)
                del q, k, v
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="torch backend, tiny n, CPU")
    parser.add_argument("--lengths", help="comma-separated n (default: the grid's)")
    parser.add_argument("--dims", help="comma-separated head dims (default: the grid's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.cpu_smoke:
        device, backend, grid, dtype = torch.device("cpu"), "torch", SMOKE_GRID, torch.float32
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --cpu-smoke to check the script on CPU")
        device, backend, grid, dtype = torch.device("cuda"), "triton", GPU_GRID, torch.bfloat16
    grid = dict(grid)
    for key, given in (("lengths", args.lengths), ("dims", args.dims)):
        if given:
            grid[key] = [int(x) for x in given.split(",")]
    slug = "cpu-smoke" if args.cpu_smoke else device_name(device).replace(" ", "_")
    out = args.out or RESULTS / f"bench_gpu_{slug}.json"

    def save(rows: list[dict]) -> None:
        result = {
            "benchmark": "bench_gpu",
            "backend": backend,
            "dtype": str(dtype).removeprefix("torch."),
            "batch": 1,
            "heads": grid["heads"],
            "grid": grid,
            "flops_note": "ideal speedup = exact matmul FLOPs / analytical FLOPs of the pipeline",
            "rows": rows,
        }
        write_results(out, result, device)

    run_grid(grid, backend, device, dtype, save)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
