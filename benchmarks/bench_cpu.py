"""CPU speed of a recipe (torch backend) against PyTorch SDPA, measured in the same run.

B=1, H=4, d=64, fp32, n = 4096..32768, causal and non-causal, forward (``--kv-heads``:
grouped-query heads, e.g. SmolLM2's 9 query heads on 3 key/value heads, SDPA then with
``enable_gqa=True``). For causal rows it
also times SDPA on the causal splitter's exact diagonal leaves alone (the leaves stacked as
heads): sdpa / leaves bounds the speedup any splitter with that min_seq_len can reach, even
if everything else were free. frac is the share of exact attention's query-key products the
recipe computes; efficiency = speedup / (1 / frac). The callables are timed in interleaved
rounds and speedups are medians of per-round ratios (the machine is shared). Writes
``benchmarks/results/bench_cpu.json`` (device, versions, commit, date) and prints a table.

    python benchmarks/bench_cpu.py [--recipe hyperattention] [--seq-lens 4096,8192,16384,32768]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import attncompose as ac
from attncompose.eval.products import products_fraction
from attncompose.eval.timing import measure_rounds, median_ratio, write_results
from attncompose.primitives.causal_split import leaf_length

RESULTS = Path(__file__).parent / "results"


def leaf_size(recipe, n: int) -> int | None:
    """Length of the causal splitter's exact diagonal leaves at n (None: no splitting)."""
    limits = [s.knobs()["min_seq_len"] for s in recipe.steps.values() if s.op == "causal_split"]
    if not limits or n <= limits[0]:
        return None
    return leaf_length(n, limits[0])


def inputs(n: int, heads: int, kv_heads: int | None, dim: int) -> list[torch.Tensor]:
    """q [1, heads, n, dim] and k, v [1, kv_heads (default: heads), n, dim], float32, seeded
    by n."""
    g = torch.Generator().manual_seed(n)
    counts = (heads, kv_heads or heads, kv_heads or heads)
    return [torch.randn(1, h, n, dim, generator=g) for h in counts]


def bench(
    recipe: str, seq_lens: list[int], heads: int, dim: int, repeats: int, kv_heads=None
) -> list[dict]:
    attn = ac.compile(recipe, backend="torch")
    rows = []
    for n in seq_lens:
        q, k, v = inputs(n, heads, kv_heads, dim)
        gqa = k.shape[1] != heads
        for causal in (False, True):
            fns = {
                "sdpa": lambda q=q, k=k, v=v, c=causal, g=gqa: F.scaled_dot_product_attention(
                    q, k, v, is_causal=c, enable_gqa=g
                ),
                "recipe": lambda q=q, k=k, v=v, c=causal: attn(q, k, v, is_causal=c),
            }
            leaf = leaf_size(attn.recipe, n) if causal else None
            if leaf is not None:  # the exact leaves alone: a bound on the causal speedup
                group = heads // k.shape[1]  # leaves of grouped keys: repeated per query head
                kr, vr = (x.repeat_interleave(group, 1) for x in (k, v))
                qv, kv, vv = (x.view(1, heads * (n // leaf), leaf, dim) for x in (q, kr, vr))
                fns["leaves"] = lambda qv=qv, kv=kv, vv=vv: F.scaled_dot_product_attention(
                    qv, kv, vv, is_causal=True
                )
            t = measure_rounds(fns, repeats=repeats)  # interleaved: drifts hit all alike
            frac = products_fraction(attn, q, k, v, causal)
            speedup = median_ratio(t["sdpa"], t["recipe"])
            row = {
                "n": n,
                "causal": causal,
                "recipe_ms": t["recipe"].median_ms,
                "sdpa_ms": t["sdpa"].median_ms,
                "speedup": speedup,  # median over rounds of sdpa / recipe
                "frac": frac,  # share of exact attention's query-key products computed
                "efficiency": speedup * frac,  # speedup / (1 / frac)
                "recipe_samples_ms": t["recipe"].samples_ms,
                "sdpa_samples_ms": t["sdpa"].samples_ms,
            }
            note = ""
            if leaf is not None:
                row["leaf"] = leaf
                row["leaves_sdpa_ms"] = t["leaves"].median_ms
                row["bound_speedup"] = median_ratio(t["sdpa"], t["leaves"])
                note = (
                    f"  (exact {leaf}-leaves alone {row['leaves_sdpa_ms']:.1f} ms: "
                    f"bound {row['bound_speedup']:.2f}x)"
                )
            rows.append(row)
            print(
                f"n={n:6d} {'causal    ' if causal else 'non-causal'} "
                f"{recipe} {row['recipe_ms']:9.1f} ms  sdpa {row['sdpa_ms']:9.1f} ms  "
                f"speedup {speedup:5.2f}x  frac {frac:.4f} efficiency {row['efficiency']:.0%}"
                + note,
                flush=True,
            )
    return rows


def cpu_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    """Arguments the CPU benchmarks share: recipe, heads, key/value heads, head dim, repeats."""
    parser.add_argument("--recipe", default="hyperattention")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=repeats)


def write_cpu_results(path: Path, benchmark: str, args: argparse.Namespace, rows: list) -> None:
    """A CPU benchmark's rows with its setting (B=1, fp32, torch backend) and run_info."""
    record = {
        "benchmark": benchmark,
        "recipe": args.recipe,
        "batch": 1,
        "heads": args.heads,
        "kv_heads": args.kv_heads or args.heads,
        "head_dim": args.dim,
        "dtype": "float32",
        "backend": "torch",
        "rows": rows,
    }
    write_results(path, record, "cpu")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpu_arguments(parser, repeats=3)
    parser.add_argument("--seq-lens", default="4096,8192,16384,32768")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_cpu.json")
    args = parser.parse_args()
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    rows = bench(args.recipe, seq_lens, args.heads, args.dim, args.repeats, args.kv_heads)
    write_cpu_results(args.out, "bench_cpu", args, rows)


if __name__ == "__main__":
    main()
