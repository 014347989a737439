"""What a tuning run shows: rich progress per length, a summary table, a Pareto plot."""

from __future__ import annotations

from pathlib import Path

import optuna
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from attncompose.tuned import TunedEntry
from attncompose.tuner.errors import TunerError
from attncompose.tuner.job import Reporter, TuneResult
from attncompose.tuner.objective import Calibration, best_feasible
from attncompose.tuner.study import finished_trials

ERROR_FLOOR = 1e-6  # errors of 0 (exact-equivalent knobs) drawn here on the log axis


class RichReporter(Reporter):
    """A progress bar per length (trials done, best feasible latency and its error); says
    which lengths fall back to exact attention and why."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("n={task.fields[n]:>6}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[best]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.tasks: dict[int, int] = {}

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start_length(self, seq_len: int, trials: int, calibration: Calibration) -> None:
        best = f"exact {calibration.exact_latency_ms:.3g} ms"
        self.tasks[seq_len] = self.progress.add_task("", total=trials, n=seq_len, best=best)

    def trial_done(self, seq_len: int, study: optuna.Study, target_err: float) -> None:
        trials = finished_trials(study)
        best = best_feasible(trials, target_err)
        text = "no feasible trial yet"
        if best is not None:
            attrs = best.user_attrs
            frac = f", frac {attrs['frac']:.3g}" if "frac" in attrs else ""
            text = f"best {attrs['latency_ms']:.3g} ms{frac} at err {attrs['error_mean']:.3g}"
        self.progress.update(self.tasks[seq_len], completed=len(trials), best=text)

    def end_length(self, seq_len: int, entry: TunedEntry) -> None:
        """The length's row ends on its choice (the summary table says why, if exact)."""
        text = (
            "chose exact attention"
            if entry.fallback
            else f"chose {entry.latency_ms:.3g} ms at err {entry.error_mean:.3g}"
        )
        self.progress.update(self.tasks[seq_len], best=text)


def summary_table(result: TuneResult) -> Table:
    """One row per tuned length of this run's device: choice, error, frac, latency, speedup.
    Why a length fell back to exact attention is a caption line under the table."""
    table = Table(title=f"tuned {result.tuned.recipe['name']} on {result.device}")
    cols = ("n", "choice", "err mean", "err max", "frac", "ms", "exact ms", "speedup", "trials")
    for col in cols:
        table.add_column(col, justify="left" if col == "choice" else "right", no_wrap=True)
    table.columns[1].no_wrap = False  # the knobs, one per line
    reasons = []
    for n, e in sorted(result.tuned.table.get(result.device, {}).items()):
        if n not in result.trials:
            continue
        if e.is_exact:
            reasons.append(f"n={n}: exact attention, {e.fallback}")
        table.add_row(
            str(n),
            "exact" if e.is_exact else _knobs(e.knobs),
            f"{e.error_mean:.4f}",
            f"{e.error_max:.4f}",
            "" if e.frac is None else f"{e.frac:.3f}",
            f"{e.latency_ms:.3g}",
            f"{e.exact_latency_ms:.3g}",
            f"{e.exact_latency_ms / e.latency_ms:.2f}x",
            str(e.trials),
        )
    table.caption = "\n".join(reasons) or None
    table.caption_justify = "left"
    return table


def _knobs(knobs: dict) -> str:
    return "\n".join(f"{k}={v}" for k, v in knobs.items())


def plot_pareto(result: TuneResult, target_err: float, path: Path) -> None:
    """PNG of error vs latency of every finished trial per length, its Pareto front (least
    latency for each error level), the target line and exact attention's latency."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TunerError("--plot needs matplotlib (pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, trials in sorted(result.trials.items()):
        points = sorted(
            (max(t.user_attrs["error_mean"], ERROR_FLOOR), t.user_attrs["latency_ms"])
            for t in trials
            if "error_mean" in t.user_attrs
        )
        (line,) = ax.plot(*zip(*_front(points), strict=True), "-", label=f"n={n}")
        ax.scatter(*zip(*points, strict=True), s=12, alpha=0.4, color=line.get_color())
        ax.axhline(result.exact_ms[n], color=line.get_color(), ls=":", lw=1)
    ax.axvline(target_err, color="red", ls="--", lw=1, label=f"target {target_err:g}")
    ax.set(xscale="log", yscale="log", xlabel="relative error (mean over seeds)")
    ax.set(ylabel="latency (ms)", title=f"{result.tuned.recipe['name']} on {result.device}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto front of (error, latency) points sorted by error: each faster than all before."""
    front: list[tuple[float, float]] = []
    for err, ms in points:
        if not front or ms < front[-1][1]:
            front.append((err, ms))
    return front
