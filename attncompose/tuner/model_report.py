"""What ``tune-model`` shows: rich progress per unit, a summary table, a per-layer cost plot."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from attncompose.runtime.model_tuned import Choice, LengthTuning
from attncompose.spec.knobs import format_knob
from attncompose.tuner.front import Point
from attncompose.tuner.model_job import ModelReporter, ModelTuneResult
from attncompose.tuner.report import require_plotting


class RichModelReporter(ModelReporter):
    """A bar for all units (studies done) and one per unit while it runs (trials of every
    recipe); phases (capture, sensitivities, verification rounds) as log lines."""

    def __init__(self, console: Console | None = None):
        if console is None:
            console = Console(stderr=True)
            if not console.is_terminal:  # a log file: no width to respect
                console = Console(stderr=True, width=160)
        self.console = console
        self.progress = Progress(
            TextColumn("{task.fields[label]:>8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.overall: int | None = None
        self.tasks: dict[str, int] = {}
        self.done: dict[str, dict[str, int]] = {}
        self.trials = 0

    def __enter__(self) -> RichModelReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def phase(self, text: str) -> None:
        self.progress.console.log(text)

    def start_units(self, labels: list[str], trials: int) -> None:
        self.trials = trials
        self.overall = self.progress.add_task("", total=len(labels), label="units", info="")

    def trial_done(self, label: str, recipe: str, done: int, best: str) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task("", total=None, label=label, info="")
            self.done[label] = {}
        self.done[label][recipe] = min(done, self.trials)
        counts = ", ".join(f"{r} {n}" for r, n in self.done[label].items())
        self.progress.update(self.tasks[label], completed=sum(self.done[label].values()))
        self.progress.update(self.tasks[label], info=counts)

    def shared_trial_done(self, recipe: str, done: int, total: int, front: list[Point]) -> None:
        key = f"all:{recipe}"
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task("", total=total, label="all", info="")
        info = f"{recipe}, model-wide: {len(front)} on the front"
        self.progress.update(self.tasks[key], completed=min(done, total), info=info)
        if done >= total:
            self.progress.remove_task(self.tasks.pop(key))
            self.progress.console.log(f"{recipe}: {done} model-wide trials, {info}")

    def unit_done(self, label: str, front: list[Point]) -> None:
        if label in self.tasks:
            self.progress.remove_task(self.tasks.pop(label))
        cheap = [p for p in front if not p.is_exact]
        text = f"{label}: front of {len(front)} points"
        if cheap:
            text += f", cost {cheap[0].cost:.3g} at error {cheap[0].error:.3g}"
        self.progress.console.log(text)
        if self.overall is not None:
            self.progress.advance(self.overall)


def summary_table(result: ModelTuneResult) -> Table:
    """One row per layer (per head group): recipe, knobs, error per segment, frac, latency,
    a decode step's (``exact`` where exact attention's measured faster: decode steps run it);
    the goal, perplexities and frac of the forward passes in the caption."""
    entry = result.entry
    roles = [s.role for s in entry.segments]
    goal = (
        f"target error {entry.target_err:g}"
        if entry.target_err is not None
        else f"perplexity budget {entry.ppl_budget:+.1%}"
    )
    table = Table(title=f"{result.tuned.model.name}, n={result.seq_len}, {goal}, {entry.cost}")
    cols = ["layer", "heads", "recipe", "knobs", *[f"err {r}" for r in roles], "frac", "ms"]
    cols.append("decode ms")
    for col in cols:
        table.add_column(col, justify="left" if col in ("recipe", "knobs") else "right")
    for layer, tuning in sorted(entry.layers.items()):
        for choice in tuning.choices:
            table.add_row(
                str(layer),
                ",".join(map(str, choice.kv_heads)),
                choice.recipe or "exact",
                _knobs(choice.knobs),
                *[f"{choice.errors.get(r, 0.0):.4f}" for r in roles],
                f"{choice.frac:.3f}",
                "" if choice.latency_ms is None else f"{choice.latency_ms:.3g}",
                _decode_cell(choice),
            )
    table.caption = _caption(entry)
    table.caption_justify = "left"
    return table


def _decode_cell(choice: Choice) -> str:
    """A decode step's ms of the choice, and where exact attention's was faster, ``exact``."""
    if choice.decode_latency_ms is None:
        return ""
    cell = f"{choice.decode_latency_ms:.3g}"
    if choice.decode_slower_than_exact:
        cell += f" (exact {choice.exact_decode_latency_ms:.3g})"
    return cell


def _knobs(knobs: dict | None) -> str:
    return "" if not knobs else " ".join(f"{k}={format_knob(v)}" for k, v in knobs.items())


def _caption(entry: LengthTuning) -> str:
    lines = []
    for seg in entry.segments:
        line = f"{seg.role} (tokens from {seg.offset}): exact perplexity {seg.exact_ppl:.4g}"
        if seg.ppl is not None:
            line += (
                f", tuned {seg.ppl:.4g} ({seg.ppl / seg.exact_ppl - 1:+.2%}), frac {seg.frac:.3f}"
            )
        if seg.role in entry.error_mean:
            line += f", mean layer error {entry.error_mean[seg.role]:.4f}"
        lines.append(line)
    times = ", ".join(
        f"{k.removesuffix('_s')} {v:.0f} s"
        + (
            f" (CPU {entry.seconds[k[:-2] + '_cpu_s']:.0f} s)"
            if k[:-2] + "_cpu_s" in entry.seconds
            else ""
        )
        for k, v in entry.seconds.items()
        if not k.endswith("_cpu_s")
    )
    return "\n".join([*lines, *entry.notes, times])


def plot_layers(result: ModelTuneResult, path: Path) -> None:
    """PNG: per layer, the chosen frac (bars, coloured by recipe) and error on each segment."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    entry = result.entry
    layers = sorted(entry.layers)
    fig, (ax, ax_err) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    recipes = sorted({c.recipe or "exact" for lt in entry.layers.values() for c in lt.choices})
    colors = {r: f"C{i}" for i, r in enumerate(recipes)}
    for layer in layers:
        choices = entry.layers[layer].choices
        width = 0.8 / len(choices)
        for j, c in enumerate(choices):
            x = layer - 0.4 + width * (j + 0.5)
            ax.bar(x, c.frac, width=width, color=colors[c.recipe or "exact"])
    handles = [Patch(color=colors[r], label=r) for r in recipes]
    ax.set(
        ylabel="frac (share of products)", title=f"{result.tuned.model.name}, n={result.seq_len}"
    )
    ax.legend(handles=handles, fontsize="small", ncol=len(recipes))
    for role in dict.fromkeys(r for lt in entry.layers.values() for r in lt.errors):
        ax_err.plot(layers, [entry.layers[i].errors[role] for i in layers], "o-", ms=3, label=role)
    if entry.target_err is not None:
        ax_err.axhline(entry.target_err, color="red", ls="--", lw=1, label="target")
    ax_err.set(xlabel="layer", ylabel="relative error")
    ax_err.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
