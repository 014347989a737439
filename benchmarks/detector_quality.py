"""How much of each query's attention mass do the detectors find, at equal key budget?

On captured Q/K/V (default: the built-in SmolLM2 capture), for each layer and each detector
selecting about B keys per query: the mean share of the attention mass on the selected pairs,
against the oracle (each query's B heaviest keys) and B random keys. Two settings:

- ``rectangle``: second-half queries x first-half keys, non-causal (what the causal
  splitter hands its body);
- ``causal``: the whole causal problem (where sinks and windows apply).

Writes ``benchmarks/results/detector_quality.json`` and ``docs/detectors.md``.

    python benchmarks/detector_quality.py [--data FILE] [--seq-len 4096] [--budgets 128,256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from attncompose.eval.analysis import attention_probs, captured_mass, coverage_mask, oracle_mass
from attncompose.eval.data import load_qkv
from attncompose.eval.timing import write_results
from attncompose.primitives import PRIMITIVES, Problem
from attncompose.primitives.base import UnionCoverage
from attncompose.spec import STEP_TYPES

ROOT = Path(__file__).resolve().parent.parent


def detectors(budget: int) -> dict[str, list[tuple[dict, int]]]:
    """Detector name -> the selections it unites: (step fields, block size it is bound to)."""
    lsh = {"op": "lsh", "num_projections": 7}
    return {
        "lsh rank (paper)": [(lsh, budget)],
        "lsh code": [(lsh | {"pairing": "code"}, budget)],
        "lsh code + mips": [(lsh | {"pairing": "code", "align": "mips"}, budget)],
        "lsh code + mips, 2 rounds": [
            (lsh | {"pairing": "code", "align": "mips", "seed": s}, budget // 2) for s in (0, 1)
        ],
        "topk block means (64)": [({"op": "topk", "block_size": 64, "k": budget // 64}, 64)],
        "topk block means (16)": [({"op": "topk", "block_size": 16, "k": budget // 16}, 16)],
        "topk key scores (64)": [
            ({"op": "topk", "block_size": 64, "k": budget // 64, "score": "keys"}, 64)
        ],
        "topk key scores (16)": [
            ({"op": "topk", "block_size": 16, "k": budget // 16, "score": "keys"}, 16)
        ],
        "window": [({"op": "window", "width": budget}, 128)],
        "sink 4 + window": [
            ({"op": "sink", "count": 4}, 128),
            ({"op": "window", "width": budget - 4}, 128),
        ],
        "sink 4 + topk (64)": [
            ({"op": "sink", "count": 4}, 128),
            ({"op": "topk", "block_size": 64, "k": budget // 64 - 1}, 64),
        ],
    }


def build(problem: Problem, parts: list[tuple[dict, int]]):
    covs = []
    for fields, block in parts:
        step = STEP_TYPES[fields["op"]].model_validate(fields)
        covs.append(PRIMITIVES[fields["op"]](step)(problem).bind(block))
    return covs[0] if len(covs) == 1 else UnionCoverage(covs)


def random_mask(problem: Problem, budget: int, seed: int = 0) -> torch.Tensor:
    visible = coverage_mask(problem)
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(visible.shape, generator=g).masked_fill(~visible, -1.0)
    chosen = scores.topk(min(budget, problem.lk), dim=-1).indices
    return torch.zeros_like(visible).scatter_(-1, chosen, True) & visible


def problems(item, setting: str) -> Problem:
    q, k, v = item.q[0], item.k[0], item.v[0]
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    n = q.shape[1]
    full = Problem(
        q.float(),
        k.float(),
        v.float(),
        scale=q.shape[-1] ** -0.5,
        causal=True,
        heads=q.shape[0],
        kv_group=1,  # keys and values repeated per query head above: the detectors' view
    )
    if setting == "causal":
        return full
    return full.sub(slice(n // 2, n), slice(0, n // 2), causal=False)


def measure_layer(item, setting: str, budget: int) -> dict[str, float]:
    problem = problems(item, setting)
    probs = attention_probs(problem)
    rows = {
        "oracle top-B": float(oracle_mass(probs, budget).mean()),
        "random B keys": float(captured_mass(probs, random_mask(problem, budget)).mean()),
    }
    for name, parts in detectors(budget).items():
        if setting == "rectangle" and ("window" in name or "sink" in name):
            continue  # positional parts see nothing in the off-diagonal rectangle
        mask = coverage_mask(problem, build(problem, parts))
        rows[name] = float(captured_mass(probs, mask).mean())
        rows[name + " (keys/query)"] = float(mask.sum(-1).float().mean())
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# Detector quality on captured attention",
        "",
        f"Data: {result['data']}, n={result['seq_len']}, layers {result['layers']}. "
        "Mean share of each query's attention mass on the pairs a detector selects, at a "
        "budget of about B keys per query (averaged over layers, heads and queries).",
        f"Produced by `python benchmarks/detector_quality.py` on {result['device']} "
        f"(commit {result['commit'][:10]}, {result['date']}).",
        "",
    ]
    for setting, by_budget in result["settings"].items():
        budgets = list(by_budget)
        lines += [
            f"## {setting}",
            "",
            "| detector | " + " | ".join(f"B={b}" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        names = [k for k in by_budget[budgets[0]]["mean"] if not k.endswith("(keys/query)")]
        for name in names:
            cells = []
            for b in budgets:
                mean = by_budget[b]["mean"]
                keys = mean.get(name + " (keys/query)")
                cells.append(f"{mean[name]:.3f}" + (f" ({keys:.0f} keys)" if keys else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--budgets", default="128,256")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/detector_quality.json"
    )
    parser.add_argument("--doc", type=Path, default=ROOT / "docs/detectors.md")
    args = parser.parse_args()
    items = load_qkv(args.data, args.seq_len)
    budgets = [int(b) for b in args.budgets.split(",")]
    settings: dict = {}
    for setting in ("rectangle", "causal"):
        settings[setting] = {}
        for budget in budgets:
            per_layer = {item.name: measure_layer(item, setting, budget) for item in items}
            keys = next(iter(per_layer.values())).keys()
            mean = {k: sum(r[k] for r in per_layer.values()) / len(per_layer) for k in keys}
            settings[setting][budget] = {"per_layer": per_layer, "mean": mean}
            print(setting, budget, {k: round(v, 3) for k, v in mean.items()}, flush=True)
    result = {
        "benchmark": "detector_quality",
        "data": items[0].name.split(":")[0],
        "seq_len": args.seq_len,
        "layers": [i.name.split(":")[-1] for i in items],
        "settings": settings,
    }
    result = write_results(args.out, result, "cpu")
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(markdown(result))
    print(f"wrote {args.out} and {args.doc}")


if __name__ == "__main__":
    main()
