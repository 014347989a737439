"""Render README.md's result tables and figures from benchmarks/results/*.json.

Each generated part sits between marker comments in README.md (a table on its own lines, or
a figure inside a sentence)::

    <!-- results:NAME -->
    | ... generated ... |
    <!-- /results:NAME -->

``python benchmarks/readme_tables.py`` rewrites them from the results files;
``--check`` exits 1 and names the parts that differ (tests/test_readme.py runs it), so no
figure in those parts is typed by hand. Timings are shown with their spread: the median over
every timed round of every run of a benchmark (``results/NAME.json`` and any further runs in
``results/runs/NAME-*.json``), and the least and greatest round, with the runs listed under
the table (commit, date, machine load where recorded). Runs that began with more runnable
work than the machine has CPUs are listed apart with their speedups, not pooled.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from attncompose.spec.knobs import format_knob

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(
    r"<!-- results:(?P<name>[\w-]+) -->(?P<body>.*?)<!-- /results:(?P=name) -->", re.S
)
DETECTORS = {  # results name -> README label, in the README's order
    "oracle top-B": "oracle: each query's {b} heaviest keys",
    "random B keys": "{b} random keys",
    "lsh rank (paper)": "sortLSH, rank pairing (the paper)",
    "lsh code": "sortLSH, code pairing",
    "lsh code + mips": "sortLSH, code pairing + MIPS augmentation",
    "topk block means (16)": "top-k key blocks by block means (16-key blocks)",
    "topk key scores (64)": "top-k key blocks by key scores (64-key blocks)",
    "topk key scores (16)": "top-k key blocks by key scores (16-key blocks)",
    "window": "window",
    "sink 4 + window": "4 sinks + window",
}
DETECTOR_BUDGET = "128"
RECIPE_NOTES = {"streaming": " (window + 4 sinks)", "hyperattention": " (paper)"}
# the block recipes bench_cpu.py measures one by one (bench_cpu_<recipe>.json)
BLOCK_RECIPES = ("streaming", "power", "block-topk", "topp")
GQA_RECIPES = ("streaming", "power", "topp", "exact", "hyperattention")  # bench_cpu --kv-heads
BENCH_NOTES = {"streaming": " (4 sinks + 1024 window)"}  # bench_cpu runs default knobs


def runs(stem: str, results: Path = RESULTS) -> list[dict]:
    """Every run of a benchmark: ``results/STEM.json`` first, then ``results/runs/STEM-*.json``."""
    paths = [results / f"{stem}.json", *sorted((results / "runs").glob(f"{stem}-*.json"))]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def ratios(row: dict, timed: str = "recipe") -> list[float]:
    """Per-round SDPA / ``timed`` (the recipe, or bench_decode_cpu's unchecked module) time
    ratios of one bench_cpu row."""
    samples = row[f"{timed}_samples_ms"]
    return [s / r for s, r in zip(row["sdpa_samples_ms"], samples, strict=True)]


def spread(values: list[float], unit: str = "x", digits: int = 1) -> str:
    """'median (least-greatest)', or just the value when there is one."""
    mid = f"{statistics.median(values):.{digits}f}{unit}"
    if len(values) == 1 or min(values) == max(values):
        return mid
    return f"{mid} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def rows_by_key(all_runs: list[dict]) -> dict[tuple[int, bool], list[dict]]:
    """bench_cpu rows of every run, grouped by (n, causal)."""
    grouped: dict[tuple[int, bool], list[dict]] = {}
    for run in all_runs:
        for row in run["rows"]:
            grouped.setdefault((row["n"], row["causal"]), []).append(row)
    return grouped


def runs_line(all_runs: list[dict]) -> str:
    """Which runs a table pools (commit, date, load where recorded), and, apart, the runs
    taken while the machine was busier than it has CPUs, with their speedups."""
    quiet = [run for run in all_runs if not is_busy(run)]
    parts = dict.fromkeys(
        f"{run['commit'][:7]} on {run['date'][:10]}{load_text(run)}" for run in quiet
    )
    line = (
        f"Runs: {'; '.join(parts)}. Speedup: median over the timed rounds (of every run where "
        "a row has several), with the least and greatest round."
    )
    for run in all_runs:
        if is_busy(run):
            speedups = ", ".join(
                f"{row['n']} {'causal' if row['causal'] else 'non-causal'} "
                f"{statistics.median(ratios(row)):.1f}x"
                for row in run["rows"]
            )
            line += (
                f" Not pooled, a run on a busy machine ({run['commit'][:7]} on "
                f"{run['date'][:10]}{load_text(run)}): {speedups}."
            )
    return line


def is_busy(run: dict) -> bool:
    """Whether a run began with more runnable work than the machine has CPUs (load recorded)."""
    return "load_1min" in run and float(run["load_1min"]) > float(run["cpus"])


def load_text(run: dict) -> str:
    """', load L on C CPUs' where the run recorded its machine's load, else ''."""
    return f", load {run['load_1min']} on {run['cpus']} CPUs" if "load_1min" in run else ""


def bench_cpu(results: Path) -> str:
    """HyperAttention at its paper defaults against SDPA, per length, both masking modes."""
    all_runs = runs("bench_cpu", results)
    grouped = rows_by_key([run for run in all_runs if not is_busy(run)])
    lines = [
        "| n | non-causal ms (SDPA) | speedup | frac | causal ms (SDPA) | speedup | frac "
        "| leaves alone: bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted({n for n, _ in grouped}):
        cells = [str(n)]
        for causal in (False, True):
            rows = grouped.get((n, causal), [])
            if not rows:
                cells += ["", "", ""]
                continue
            recipe = statistics.median(s for r in rows for s in r["recipe_samples_ms"])
            sdpa = statistics.median(s for r in rows for s in r["sdpa_samples_ms"])
            cells += [
                f"{recipe:.0f} ({sdpa:.0f})",
                spread([x for r in rows for x in ratios(r)]),
                f"{rows[0]['frac']:.3f}",
            ]
        bounds = [r["bound_speedup"] for r in grouped.get((n, True), []) if "bound_speedup" in r]
        cells.append(spread(bounds) if bounds else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + runs_line(all_runs)


def bench_cpu_recipes(results: Path) -> str:
    """The block recipes against SDPA: a column per (length, masking mode)."""
    grouped = {
        name: rows_by_key([r for r in runs(f"bench_cpu_{name}", results) if not is_busy(r)])
        for name in BLOCK_RECIPES
    }
    lengths = sorted({n for g in grouped.values() for n, _ in g})
    head = [f"{n} non-causal | causal, frac" for n in lengths]
    lines = ["| recipe | " + " | ".join(head) + " |", "|---|" + "---|---|" * len(lengths)]
    for name in BLOCK_RECIPES:
        cells = []
        for n, causal in ((n, c) for n in lengths for c in (False, True)):
            rows = grouped[name].get((n, causal), [])
            text = spread([x for r in rows for x in ratios(r)]) if rows else ""
            cells.append(f"{text}, frac {rows[0]['frac']:.3f}" if rows and causal else text)
        lines.append(f"| `{name}`{BENCH_NOTES.get(name, '')} | " + " | ".join(cells) + " |")
    all_runs = [run for name in BLOCK_RECIPES for run in runs(f"bench_cpu_{name}", results)]
    return "\n".join(lines) + "\n\n" + runs_line(all_runs)


def bench_cpu_before(
    before: str, label: str, prefix: str = "bench_cpu", recipes: tuple[str, ...] = BLOCK_RECIPES
) -> Callable[[Path], str]:
    """A table of each recipe now and at an earlier commit, same script and machine: the
    speedups over SDPA measured in each run (``results/{prefix}_{recipe}.json`` now,
    ``results/{before}/`` the same files then)."""

    def table(results: Path) -> str:
        before_runs = {name: runs(f"{prefix}_{name}", results / before) for name in recipes}
        lines = [f"| recipe | n | mode | {label} | now |", "|---|---|---|---|---|"]
        for name in recipes:
            old = rows_by_key(before_runs[name])
            new = rows_by_key(runs(f"{prefix}_{name}", results)[:1])
            for (n, causal), rows in sorted(old.items()):
                mode = "causal" if causal else "non-causal"
                now = new.get((n, causal), [])
                cells = [spread([x for r in rows_ for x in ratios(r)]) for rows_ in (rows, now)]
                lines.append(
                    f"| `{name}` | {n} | {mode} | {cells[0]} | {cells[1] if now else ''} |"
                )
        quoted = dict.fromkeys(
            f"{run['commit'][:7]} on {run['date'][:10]}{load_text(run)}"
            for name in recipes
            for run in before_runs[name] + runs(f"{prefix}_{name}", results)[:1]
        )
        return "\n".join(lines) + f"\n\nRuns (before; now): {'; '.join(quoted)}."

    return table


# earlier runs, oldest first
BEFORE_DECODE = (
    "before-gqa",
    "before-decode",
    "before-one-query",
    "before-stack",
    "before-ranges",
)


def bench_decode_cpu(results: Path) -> str:
    """One decode step of each recipe (grouped heads) against SDPA, now and at earlier
    commits, same script and machine: before grouped keys and values were read in place
    (``results/before-gqa/``), before decode steps read only the key blocks and queries
    they take (``results/before-decode/``), before a block plan's decode step ran on its
    kept keys (``results/before-one-query/``), before a group's query heads were stacked
    as the rows of one call (``results/before-stack/``) and before a decode step of key
    bands took its keys as index ranges (``results/before-ranges/``); a column per earlier
    run, headed by its commit."""
    now = runs("bench_decode_cpu", results)[:1]
    befores = [runs("bench_decode_cpu", results / name)[:1] for name in BEFORE_DECODE]
    befores = [b for b in befores if b]
    old = [{(row["recipe"], row["n"]): row for row in b[0]["rows"]} for b in befores]
    heads = "".join(f" {b[0]['commit'][:7]} ms |" for b in befores)
    lines = [
        f"| recipe | n | frac |{heads} now ms | SDPA ms | speedup now | unchecked ms | speedup |",
        "|---|---|---|" + "---|" * len(befores) + "---|---|---|---|---|",
    ]
    for row in (row for run in now for row in run["rows"]):
        prior = [o.get((row["recipe"], row["n"])) for o in old]
        cells = [
            f"`{row['recipe']}`",
            str(row["n"]),
            f"{row['frac']:.3f}",
            *(f"{p['recipe_ms']:.1f}" if p else "" for p in prior),
            f"{row['recipe_ms']:.1f}",
            f"{row['sdpa_ms']:.1f}",
            spread(ratios(row), digits=2),
            f"{row['unchecked_ms']:.1f}",
            spread(ratios(row, "unchecked"), digits=2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    quoted = dict.fromkeys(
        f"{run['commit'][:7]} on {run['date'][:10]}{load_text(run)}"
        for run in [*(b[0] for b in befores), *now]
    )
    return "\n".join(lines) + f"\n\nRuns (earlier; now): {'; '.join(quoted)}."


def bench_generate_cpu(results: Path) -> str:
    """Generating with SmolLM2 (bench_generate_cpu.py): per implementation the prompt's
    forward pass, a decode step of the whole model, and how many greedy tokens equal
    transformers' SDPA's."""
    run = runs("bench_generate_cpu", results)[0]
    lines = [
        "| attention | prefill ms | ms per token | tokens/s | same tokens as SDPA |",
        "|---|---|---|---|---|",
    ]
    for row in run["rows"]:
        cells = [
            f"`{row['impl']}`",
            spread(row["prefill_samples_ms"], unit="", digits=0),
            spread(row["step_samples_ms"], unit="", digits=1),
            f"{row['tokens_per_s']:.1f}",
            f"{row['same_tokens']} of {row['new']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    where = f"{run['commit'][:7]} on {run['date'][:10]}{load_text(run)}"
    prompt = f"{run['prompt_tokens']} tokens of `{run['text']}`, {run['new_tokens']} generated"
    return "\n".join(lines) + f"\n\n({prompt}; {where}, {run['repeats']} rounds.)"


def model_tuning_table(results: dict) -> str:
    """The README table: per length, exact, the best uniform recipe, per layer."""
    lines = [
        "| tokens | attention | calibration text (fit / test segment) | frac | other text | "
        "frac | mean layer error (other text) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in sorted(results["lengths"].items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"| {n} | exact | {r['exact']['fit']:.3f} / {r['exact']['test']:.3f} | 1 | "
            f"{r['exact']['eval']:.3f} | 1 | 0 |"
        )
        rows = []
        if r["uniform"].get("recipe"):
            u = r["uniform"]
            knobs = ", ".join(f"{k}={format_knob(v)}" for k, v in u["knobs"].items())
            rows.append((f"uniform `{u['recipe']}` ({knobs})", u))
        for goal, p in r["per_layer"].items():
            scope = "per head group" if "--per-head" in goal else "per layer"
            rows.append((f"{scope}, {goal.replace(' --per-head', '')}", p))
        for label, m in rows:
            lines.append(
                f"| {n} | {label} | {m['fit']['perplexity']:.3f} ({m['fit']['change']:+.1%}) / "
                f"{m['test']['perplexity']:.3f} ({m['test']['change']:+.1%}) | "
                f"{m['fit']['frac']:.3f} | {m['eval']['perplexity']:.3f} "
                f"({m['eval']['change']:+.1%}) | {m['eval']['frac']:.3f} | "
                f"{m['eval']['error_mean']:.3f} |"
            )
    return "\n".join(lines)


def model_tuning(results: Path) -> str:
    """SmolLM2 per layer against the best uniform recipe (``benchmarks/model_tuning.py``), and
    how long each tuning took (the phases the tuned files record)."""
    (run,) = runs("model_tuning", results)[:1]
    lines = [model_tuning_table(run), ""]
    for n, r in sorted(run["lengths"].items(), key=lambda kv: int(kv[0])):
        # per scope (per layer / per head group: their own studies), the phases of the run
        # that ran the studies (later goals reuse them) and whether it resumed stored ones
        firsts: dict[bool, tuple[dict, bool]] = {}
        for goal, p in r["per_layer"].items():
            phases = p["tune"]["phases_s"]
            scope = "--per-head" in goal
            if scope not in firsts:
                firsts[scope] = (phases, bool(p["tune"].get("resumed")))
            first, resumed = firsts[scope]
            cpu = f", CPU {phases['total_cpu_s'] / 60:.0f} min" if "total_cpu_s" in phases else ""
            shared = r.get("shared_trials")
            trials = (
                f"{shared} model-wide + {r['trials']} per-layer trials per recipe"
                if shared
                else f"{r['trials']} trials per study"
            )
            lines.append(
                f"- {n} tokens, `{goal}`, {trials}: tuning took "
                f"{phases['total_s'] / 60:.0f} min{cpu} (`benchmarks/results/{p['tuned_file']}`)"
            )
            if phases is first and resumed:
                lines.append(
                    "  (resumed from the studies and sensitivities that earlier, interrupted "
                    "runs stored: not a time from scratch)"
                )
            elif resumed:
                lines.append("  (it reused the studies of the run above)")
            elif phases is not first and "shared_s" in first and "sensitivity_s" in phases:
                studies = first["shared_s"] + first["studies_s"]
                rest = phases["total_s"] - phases["shared_s"] - phases["studies_s"]
                lines.append(
                    f"  (it reused the studies of the run above; from scratch: their "
                    f"{studies / 60:.1f} min + its {rest / 60:.1f} min of sensitivities, "
                    f"verification and final passes = {(studies + rest) / 60:.0f} min)"
                )
    where = []
    for n, r in sorted(run["lengths"].items(), key=lambda kv: int(kv[0])):
        info = r.get("run", run)  # a length without its own record: the file's
        where.append(f"{n} tokens: {info['commit'][:7]} on {info['date'][:10]}{load_text(info)}")
    return "\n".join(lines) + f"\n\n{run['model']}; {'; '.join(where)}."


def profile_cpu(stem: str) -> Callable[[Path], str]:
    """Where a call's time goes (``results/STEM.json`` of profile_cpu.py): inside SDPA's fused
    kernel, and everything else."""

    def render(results: Path) -> str:
        (run,) = runs(stem, results)[:1]
        lines = [
            "| n | mode | recipe ms (SDPA) | speedup | in SDPA's kernel ms | everything else ms "
            "| speedup were the rest free |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in run["rows"]:
            mode = "causal" if row["causal"] else "non-causal"
            lines.append(
                f"| {row['n']} | {mode} | {row['recipe_ms']:.0f} ({row['sdpa_ms']:.0f}) "
                f"| {row['speedup']:.2f}x | {row['attention_kernel_ms']:.0f} of "
                f"{row['profiled_ms']:.0f} | {row['other_ms']:.0f} "
                f"| {row['bound_free_overhead']:.2f}x |"
            )
        when = f"{run['recipe']}, {run['commit'][:7]} on {run['date'][:10]}{load_text(run)}"
        return "\n".join(lines) + f"\n\n({when})"

    return render


def tune_time(results: Path) -> str:
    """The README's first command, timed: seconds (a figure inside a sentence)."""
    (run,) = runs("tune_time_cpu", results)[:1]
    when = f"{run['commit'][:7]}, {run['date'][:10]}{load_text(run)}"
    return f"{run['seconds']:.0f} s ({run['cpu_seconds']:.0f} s of CPU time; {when})"


def tune_time_result(results: Path) -> str:
    """What the README's first command chose when it was timed (a sentence)."""
    (run,) = runs("tune_time_cpu", results)[:1]
    return run["conclusion"]


def launch_count(results: Path) -> str:
    """What one causal call of each recipe launches on a GPU (estimated on the CPU by
    ``launch_count.py``; the same at every level count), a figure inside a sentence."""
    (run,) = runs("launch_count", results)[:1]
    packs: dict[str, set[int]] = {}
    padded: dict[str, set[int]] = {}
    odd: set[int] = set()
    for row in run["rows"]:  # rows before padding have no "padded_to": lengths that pack
        pad = row.get("padded_to", row["seq_len"]) != row["seq_len"]
        (padded if pad else packs).setdefault(row["recipe"], set()).add(row["launches"])
        odd |= {row["seq_len"]} if pad else set()
    figure = lambda counts: "/".join(map(str, sorted(counts)))
    counts = ", ".join(
        f"`{name}` {figure(n)}" + (f" ({figure(padded[name])} padded)" if name in padded else "")
        for name, n in packs.items()
    )
    levels = sorted({row["levels"] for row in run["rows"] if row["levels"] is not None})
    lengths = ", ".join(map(str, sorted(odd)))
    also = f"; padded: n = {lengths}, run as the first rows of a length that packs" if odd else ""
    return (
        f"{counts} (kernels and the torch ops between them, at {levels[0]} to {levels[-1]} "
        f"levels{also}; {run['commit'][:7]}, {run['date'][:10]})"
    )


def detectors(results: Path) -> str:
    """Attention mass a detector's pairs hold, off the diagonal and in full causal attention."""
    (run,) = runs("detector_quality", results)[:1]
    means = {s: run["settings"][s][DETECTOR_BUDGET]["mean"] for s in ("rectangle", "causal")}
    best = {
        s: max(v for k, v in m.items() if k in DETECTORS and k != "oracle top-B")
        for s, m in means.items()
    }
    lines = [
        "| detector | off-diagonal rectangle (splitter body) | full causal |",
        "|---|---|---|",
    ]
    for key, label in DETECTORS.items():
        cells = []
        for setting in ("rectangle", "causal"):
            value = means[setting].get(key)
            text = "—" if value is None else f"{value:.3f}"
            cells.append(f"**{text}**" if value == best[setting] else text)
        lines.append(f"| {label.format(b=DETECTOR_BUDGET)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(seq_len: int) -> Callable[[Path], str]:
    """Each recipe's least error under a frac budget, and perplexity there where measured."""

    def render(results: Path) -> str:
        (run,) = runs(f"curves-n{seq_len}", results)[:1]
        best, ppl = run["best_under"], run["perplexity"]
        budgets = sorted({k.split("@")[1] for k in best}, key=float)
        recipes = list(dict.fromkeys(k.split("@")[0] for k in best))
        head = " | ".join(f"error @ frac<={b} | ppl" for b in budgets)
        lines = [f"| n={seq_len} | {head} |", "|---|" + "---|---|" * len(budgets)]
        columns = {}  # (budget, what) -> {recipe: value}, for the bold least value
        for b in budgets:
            columns[b, "error"] = {r: best[f"{r}@{b}"]["error"] for r in recipes}
            columns[b, "ppl"] = {
                r: ppl[f"{r}@{b}"]["perplexity"] for r in recipes if f"{r}@{b}" in ppl
            }
        for r in recipes:
            cells = [_least_bold(columns[b, what], r) for b in budgets for what in ("error", "ppl")]
            lines.append(f"| `{r}`{RECIPE_NOTES.get(r, '')} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    return render


def _least_bold(column: dict[str, float], recipe: str) -> str:
    """A recipe's value in a column, bold where it is the column's least; '' where absent."""
    if recipe not in column:
        return ""
    text = f"{column[recipe]:.3f}"
    return f"**{text}**" if column[recipe] == min(column.values()) else text


def exact_ppl(seq_len: int) -> Callable[[Path], str]:
    """Exact perplexity of a curves run (a figure inside a sentence)."""
    return lambda results: f"{runs(f'curves-n{seq_len}', results)[0]['perplexity']['exact']:.3f}"


def smollm2(results: Path) -> str:
    """Tuned recipes on SmolLM2, all 30 layers: perplexity (vs exact) and frac per target."""
    sys.path.insert(0, str(Path(__file__).parent))
    from smollm2_table import pivot  # this folder's

    return pivot(json.loads((results / "smollm2_table.json").read_text()))


GPU_LENGTHS = (8192, 32768, 131072)  # the columns of the GPU table (causal, d=128)


def bench_gpu(results: Path) -> str:
    """Per GPU measured (``bench_gpu_<device>.json``): each recipe's and FlexAttention's
    causal speedup over the faster of cuDNN/flash at d=128, with its efficiency."""
    files = sorted(p for p in results.glob("bench_gpu_*.json") if "cpu-smoke" not in p.name)
    if not files:
        return (
            "No GPU has been measured since the block plans landed: `bash "
            "benchmarks/gpu_session.sh` on a GPU runs the compiled kernel tests and "
            "`benchmarks/bench_gpu.py`, whose `benchmarks/results/bench_gpu_<device>.json` "
            "this table is rendered from."
        )
    parts = []
    for path in files:
        run = json.loads(path.read_text())
        rows = [r for r in run["rows"] if r["causal"] and r["head_dim"] == 128 and r["q_len"] > 1]
        cells: dict[tuple[str, str], dict[int, str]] = {}
        for r in rows:
            if r["recipe"] is None or r.get("speedup_vs_best_exact") is None:
                continue
            cell = f"{r['speedup_vs_best_exact']:.2f}x ({r['efficiency']:.2f})"
            cells.setdefault((r["recipe"], r["impl"]), {})[r["seq_len"]] = cell
        head = " | ".join(f"{n // 1024}k" for n in GPU_LENGTHS)
        lines = [f"| recipe | implementation | {head} |", "|---|---|" + "---|" * len(GPU_LENGTHS)]
        for (recipe, impl), by_n in sorted(cells.items()):
            values = " | ".join(by_n.get(n, "") for n in GPU_LENGTHS)
            lines.append(f"| `{recipe}` | {impl} | {values} |")
        parts.append(
            "\n".join(lines)
            + f"\n\n{run['device']}, torch {run['torch']}, triton {run['triton']}, bf16, B=1, "
            f"H={run['heads']}; {run['commit'][:7]} on {run['date'][:10]}."
        )
    return "\n\n".join(parts)


def launch_count_calls(results: Path) -> str:
    """What one call of each recipe launches on the Triton backend (``launch_count.py
    --calls``), the commit before (``results/before-launches/``) and now: a table."""
    (now,) = runs("launch_count_calls", results)[:1]
    (before,) = runs("launch_count_calls", results / "before-launches")[:1]
    calls = ("prefill", "decode", "decode, new length")
    count = lambda run: {(r["recipe"], r["call"]): r for r in run["rows"]}
    was, counted = count(before), count(now)
    cell = lambda row: f"{row['launches']}" + (f" ({row['waits']} wait)" if row["waits"] else "")
    head = ["recipe", *(f"{c}: {before['commit'][:7]}, now" for c in calls)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe in dict.fromkeys(r["recipe"] for r in now["rows"]):
        cells = [
            f"{cell(was[recipe, c])} -> {cell(counted[recipe, c])}"
            if (recipe, c) in was
            else cell(counted[recipe, c])
            for c in calls
        ]
        lines.append(f"| `{recipe}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\n(n = {now['seq_len']}, {now['heads']} query and {now['kv_heads']} "
        f"key/value heads, d={now['head_dim']}, the Triton kernels interpreted on a CPU; "
        f"{before['commit'][:7]} on {before['date'][:10]}, now {now['commit'][:7]} on "
        f"{now['date'][:10]}.)"
    )


TABLES: dict[str, Callable[[Path], str]] = {
    "bench_gpu": bench_gpu,
    "bench_cpu": bench_cpu,
    "bench_cpu_recipes": bench_cpu_recipes,
    "bench_cpu_before_plans": bench_cpu_before("before-plans", "before plans"),
    "bench_cpu_gqa": bench_cpu_before("before-stack", "before", "bench_cpu_gqa", GQA_RECIPES),
    "bench_decode_cpu": bench_decode_cpu,
    "bench_generate_cpu": bench_generate_cpu,
    "profile_cpu": profile_cpu("profile_cpu"),
    "profile_cpu_topp": profile_cpu("profile_cpu_topp"),
    "tune_time": tune_time,
    "tune_time_result": tune_time_result,
    "detectors": detectors,
    "launch_count": launch_count,
    "launch_count_calls": launch_count_calls,
    "curves-n4096": curves(4096),
    "curves-n8192": curves(8192),
    "exact-ppl-n4096": exact_ppl(4096),
    "exact-ppl-n8192": exact_ppl(8192),
    "smollm2": smollm2,
    "model_tuning": model_tuning,
}


def render(text: str, results: Path = RESULTS) -> str:
    """``text`` with every marked part replaced by what the results say; an unknown name is
    an error. Block parts (a newline after the opening marker) keep their own lines."""

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(
                f"README marks an unknown results part {name!r}; known: {sorted(TABLES)}"
            )
        body = TABLES[name](results)
        if match["body"].startswith("\n"):
            body = f"\n{body}\n"
        return f"<!-- results:{name} -->{body}<!-- /results:{name} -->"

    return MARKER.sub(fill, text)


def differing(text: str, rendered: str) -> list[str]:
    """Names of the marked parts whose text differs."""
    old = {m["name"]: m["body"] for m in MARKER.finditer(text)}
    new = {m["name"]: m["body"] for m in MARKER.finditer(rendered)}
    return [name for name in new if old.get(name) != new[name]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="Exit 1 if README.md is stale.")
    args = parser.parse_args()
    text = args.readme.read_text()
    rendered = render(text, args.results)
    if args.check:
        stale = differing(text, rendered)
        if stale:
            print(
                f"{args.readme}: out of date with {args.results} in {', '.join(stale)}; "
                "run python benchmarks/readme_tables.py",
                file=sys.stderr,
            )
            sys.exit(1)
        print(f"{args.readme}: {len(MARKER.findall(text))} results parts up to date")
        return
    args.readme.write_text(rendered)
    print(f"wrote {args.readme}")


if __name__ == "__main__":
    main()
