"""Error-vs-cost curves: each recipe's knobs swept on captured attention, error against frac.

For every recipe and every point of its sweep: the mean relative error of the attention
output over the captured layers (causal, against exact attention) and frac, the share of
exact attention's query-key products it computes. Writes a data file and a PNG per length,
and, with ``--ppl``, the model perplexity (all 30 layers replaced) of each recipe's best
point under frac 0.25 and 0.5 — the comparison against StreamingLLM asked by issue 6.

    python benchmarks/curves.py --seq-len 4096 [--data FILE] [--ppl]

Outputs: ``benchmarks/results/curves-n{N}.json``, ``docs/curves-n{N}.png``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import attncompose as ac
from attncompose.eval.data import load_qkv
from attncompose.eval.metrics import relative_error
from attncompose.eval.products import run_counted
from attncompose.eval.reference import exact_attention
from attncompose.eval.timing import write_results

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (0.25, 0.5)
DATA_DEPENDENT = (
    "block-topk",
    "topp",
    "hyperattention",
    "hyperattention-sinks",
    "hyperattention-aligned",
)


def grid(**axes) -> list[dict]:
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


SWEEPS: dict[str, list[dict]] = {
    "streaming": grid(
        **{
            "sinks.count": [4],
            "local.width": [64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144],
        }
    ),
    "block-topk": grid(
        **{"local.width": [64, 128, 256, 512, 1024], "heavy.k": [1, 2, 4, 8, 16, 32]}
    ),
    "topp": grid(
        **{
            "local.width": [64, 256, 512],
            "heavy.p": [0.7, 0.9, 0.95, 0.98, 0.99],
            "heavy.max_k": [64],
        }
    ),
    "power": grid(**{"pattern.block_size": [32, 64, 128, 256]}),
    "hyperattention": grid(
        **{
            "out.min_seq_len": [512, 1024, 2048, 4096],
            "diag.block_size": [256],
            "residual.sample_size": [0, 256],
        }
    ),
    "hyperattention-sinks": grid(
        **{
            "out.min_seq_len": [512, 1024, 2048, 4096],
            "diag.block_size": [256],
            "residual.sample_size": [0, 256],
        }
    ),
    "hyperattention-aligned": grid(
        **{
            "out.min_seq_len": [512, 1024, 2048, 4096],
            "diag.block_size": [128, 256],
            "residual.sample_size": [0],
        }
    ),
}


def sweep(items, recipes: list[str]) -> list[dict]:
    exact = {it.name: exact_attention(it.q, it.k, it.v, True) for it in items}
    points = []
    for name in recipes:
        base = ac.load_recipe(name)
        for knobs in SWEEPS[name]:
            attn = ac.compile(base.with_knobs(knobs), backend="torch")
            errors, fracs = [], []
            for it in items:
                out, frac = run_counted(attn, it.q, it.k, it.v, True)
                errors.append(relative_error(out, exact[it.name]))
                fracs.append(frac)
            point = {
                "recipe": name,
                "knobs": knobs,
                "error": sum(errors) / len(errors),
                "frac": sum(fracs) / len(fracs),
                "per_layer_error": errors,
            }
            points.append(point)
            print(
                f"{name:24s} {knobs} err={point['error']:.4f} frac={point['frac']:.3f}", flush=True
            )
    return points


def best_under(points: list[dict], recipe: str, budget: float) -> dict | None:
    """The recipe's lowest-error point computing at most ``budget`` of the products."""
    ok = [p for p in points if p["recipe"] == recipe and p["frac"] <= budget]
    return min(ok, key=lambda p: p["error"]) if ok else None


def perplexities(points: list[dict], seq_len: int, recipes: list[str]) -> dict:
    from attncompose.models import load_model
    from attncompose.models.evaluate import perplexity
    from attncompose.models.text import load_text, token_ids

    model, tokenizer = load_model("smollm2")
    ids = token_ids(tokenizer, seq_len, load_text(None))
    out = {"exact": perplexity(model, ids)}
    print(f"exact perplexity {out['exact']:.3f}", flush=True)
    for budget in BUDGETS:
        for name in recipes:
            point = best_under(points, name, budget)
            if point is None:
                continue
            t0 = time.perf_counter()
            attn = ac.compile(ac.load_recipe(name).with_knobs(point["knobs"]), backend="torch")
            ppl = perplexity(model, ids, attn)
            out[f"{name}@{budget}"] = {
                "knobs": point["knobs"],
                "frac": point["frac"],
                "error": point["error"],
                "perplexity": ppl,
                "seconds": time.perf_counter() - t0,
            }
            print(f"{name}@{budget}: ppl {ppl:.3f} (frac {point['frac']:.3f})", flush=True)
    return out


def plot(points: list[dict], seq_len: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name in dict.fromkeys(p["recipe"] for p in points):
        pts = sorted((p["frac"], p["error"]) for p in points if p["recipe"] == name)
        front, best = [], float("inf")
        for frac, err in pts:
            if err < best:
                front.append((frac, err))
                best = err
        ax.scatter(*zip(*pts, strict=True), s=10, alpha=0.35)
        ax.plot(*zip(*front, strict=True), marker="o", ms=3, label=name)
    for budget in BUDGETS:
        ax.axvline(budget, color="grey", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("frac: share of exact attention's query-key products computed")
    ax.set_ylabel("relative error of the attention output (mean over layers)")
    ax.set_title(f"SmolLM2 captured attention, n={seq_len}, causal")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--recipes", default=",".join(SWEEPS))
    parser.add_argument("--ppl", action="store_true", help="also model perplexity (slow)")
    parser.add_argument("--ppl-recipes", default="streaming,block-topk,topp,hyperattention-aligned")
    args = parser.parse_args()
    items = load_qkv(args.data, args.seq_len)
    recipes = args.recipes.split(",")
    points = sweep(items, recipes)
    result = {
        "benchmark": "curves",
        "seq_len": args.seq_len,
        "data": [it.name for it in items],
        "points": points,
        "best_under": {f"{r}@{b}": best_under(points, r, b) for r in recipes for b in BUDGETS},
    }
    out = ROOT / f"benchmarks/results/curves-n{args.seq_len}.json"
    plot(points, args.seq_len, ROOT / f"docs/curves-n{args.seq_len}.png")
    if args.ppl:
        result["perplexity"] = perplexities(points, args.seq_len, args.ppl_recipes.split(","))
    write_results(out, result, "cpu")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
