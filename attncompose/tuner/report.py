"""What a tuning run shows: progress per recipe and length (a rich live bar on a terminal,
plain periodic lines in a log), a comparison of the recipes with the verdict per length, and
a plot of error against cost."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

import optuna
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from attncompose.runtime.files import can_write_beside
from attncompose.runtime.naming import format_ms
from attncompose.runtime.tuned import RecipeOutcome, TunedEntry
from attncompose.tuner.errors import TunerError
from attncompose.tuner.job import Reporter, TuneResult
from attncompose.tuner.objective import SLOW_FACTOR, Calibration, best_feasible
from attncompose.tuner.study import finished_trials

ERROR_FLOOR = 1e-6  # errors of 0 are drawn here on the log axis when no error is positive
LOG_EVERY_S = 10.0  # a progress line at most this often when stderr is not a terminal


def best_so_far(study: optuna.Study, target_err: float) -> str:
    """The best feasible trial of a study so far, in words."""
    best = best_feasible(finished_trials(study), target_err)
    if best is None:
        return "no feasible trial yet"
    attrs = best.user_attrs
    frac = f", frac {attrs['frac']:.3g}" if "frac" in attrs else ""
    return f"best {format_ms(attrs['latency_ms'])} ms{frac} at err {attrs['error_mean']:.3g}"


def choice_text(entry: TunedEntry) -> str:
    """An entry's choice, in a few words."""
    if entry.is_exact:
        return "chose exact attention"
    return f"chose {entry.recipe}: {format_ms(entry.latency_ms)} ms at err {entry.error_mean:.3g}"


class RichReporter(Reporter):
    """A live progress bar per recipe and length (trials done, best feasible latency and its
    error); each ends on its verdict."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.fields[label]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[best]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.tasks: dict[tuple[str, int], int] = {}

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start_length(
        self, seq_len: int, trials: int, calibration: Calibration, recipe: str = ""
    ) -> None:
        label = f"{recipe} n={seq_len}".strip()
        best = f"exact {format_ms(calibration.exact_latency_ms)} ms"
        self.tasks[recipe, seq_len] = self.progress.add_task(
            "", total=trials, label=label, best=best
        )

    def trial_done(
        self, seq_len: int, study: optuna.Study, target_err: float, recipe: str = ""
    ) -> None:
        done = len(finished_trials(study))
        text = best_so_far(study, target_err)
        self.progress.update(self.tasks[recipe, seq_len], completed=done, best=text)

    def end_length(self, seq_len: int, entry: TunedEntry) -> None:
        for (recipe, n), task in self.tasks.items():
            if n == seq_len:
                outcome = entry.recipes.get(recipe)
                won = outcome is not None and outcome.lost is None
                self.progress.update(task, best="chosen" if won else "not chosen")


class LineReporter(Reporter):
    """Progress as plain lines (for logs: nohup, CI): when a study starts, at most every
    ``every_s`` seconds while it runs and on its last trial, and each length's choice."""

    def __init__(self, stream: TextIO | None = None, every_s: float = LOG_EVERY_S):
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.start = time.monotonic()
        self.last = -float("inf")
        self.totals: dict[tuple[str, int], int] = {}

    def __enter__(self) -> LineReporter:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _line(self, text: str) -> None:
        self.last = time.monotonic()
        print(f"[{self.last - self.start:5.0f} s] {text}", file=self.stream, flush=True)

    def start_length(
        self, seq_len: int, trials: int, calibration: Calibration, recipe: str = ""
    ) -> None:
        self.totals[recipe, seq_len] = trials
        exact = calibration.exact_latency_ms
        self._line(f"{recipe} n={seq_len}: tuning, {trials} trials (exact {format_ms(exact)} ms)")

    def trial_done(
        self, seq_len: int, study: optuna.Study, target_err: float, recipe: str = ""
    ) -> None:
        done, total = len(finished_trials(study)), self.totals[recipe, seq_len]
        if done >= total or time.monotonic() - self.last >= self.every_s:
            text = best_so_far(study, target_err)
            self._line(f"{recipe} n={seq_len}: {done}/{total} trials, {text}")

    def end_length(self, seq_len: int, entry: TunedEntry) -> None:
        self._line(f"n={seq_len}: {choice_text(entry)}")


def reporter_for(console: Console) -> Reporter:
    """A live bar where ``console`` is a terminal, plain lines elsewhere."""
    return RichReporter(console) if console.is_terminal else LineReporter(console.file)


SHORT = {  # a loss kind as the table says it (the reasons in words follow the table)
    "target": "target missed",
    "budget": "over budget",
    "frac 1": "frac 1 only",
    "exact faster": "exact faster",
    "beaten": "beaten",
}


def print_comparison(result: TuneResult, console: Console) -> None:
    """Per length of this run: a table of exact attention and each recipe, why each recipe
    lost (one line each), and the conclusion line."""
    for i, n in enumerate(sorted(result.exact_ms)):
        entry = result.tuned.table[result.device][n]
        if i:
            console.print()
        console.print(comparison_table(result, n))
        for name in result.recipes:
            outcome = entry.recipes.get(name)
            if outcome is not None and outcome.lost:
                console.print(f"  {name}: {outcome.lost}", highlight=False, soft_wrap=True)
        console.print(_conclusion(n, entry, result.device), highlight=False, soft_wrap=True)


def comparison_table(result: TuneResult, n: int) -> Table:
    """One length: exact attention, then each recipe's least error ("min err"), its best point
    (frac, error, latency, speedup against exact) and a short verdict; fits 80 columns."""
    entry = result.tuned.table[result.device][n]
    mode = "causal" if result.tuned.causal else "non-causal"
    title = (
        f"n={n} {mode} on {result.device}: target error {entry.target_err:g}, cost "
        f"{entry.cost}, {entry.trials} trials"
    )
    table = Table(title=title, title_justify="left", box=None, padding=(0, 1), pad_edge=False)
    for col in ("recipe", "min err", "frac", "err", "ms", "speedup", "verdict"):
        left = col in ("recipe", "verdict")
        table.add_column(col, justify="left" if left else "right", no_wrap=col != "verdict")
    exact_ms = entry.exact_latency_ms
    verdict = "chosen" if entry.is_exact else ""
    table.add_row("exact", "0", "1", "0", format_ms(exact_ms), "1.00x", verdict)
    rough = False
    for name in result.recipes:
        if name in entry.recipes:
            cells = _outcome_cells(entry.recipes[name], exact_ms, entry)
            rough = rough or cells[3].endswith("*")
            table.add_row(name, *cells)
    if rough:
        table.caption = f"* over {SLOW_FACTOR:g}x exact attention's time: first calls only"
        table.caption_justify = "left"
    return table


def _outcome_cells(o: RecipeOutcome, exact_ms: float, entry: TunedEntry) -> list[str]:
    least = "" if o.least_error is None else f"{o.least_error:.3g}"
    if o.lost is None:
        verdict = "chosen" + (" (slower)" if entry.slower_than_exact else "")
    else:
        verdict = SHORT.get(o.lost_as, "lost")
    if o.best is None:
        return [least, "—", "—", "—", "—", verdict]
    b = o.best
    rough = b.latency_ms > SLOW_FACTOR * exact_ms
    return [
        least,
        "" if b.frac is None else f"{b.frac:.3f}",
        f"{b.error_mean:.3g}",
        format_ms(b.latency_ms) + ("*" if rough else ""),
        f"{exact_ms / b.latency_ms:.2f}x",
        verdict,
    ]


def _conclusion(n: int, entry: TunedEntry, device: str) -> str:
    exact_ms = entry.exact_latency_ms
    if not entry.is_exact:
        knobs = ", ".join(f"{k}={_num(v)}" for k, v in entry.knobs.items())
        if entry.backend is not None:
            knobs += f", on {entry.backend}"
        speed = exact_ms / entry.latency_ms
        frac = "" if entry.frac is None else f" at frac {entry.frac:.3g}"
        line = (
            f"n={n}: {entry.recipe} ({knobs}): error {entry.error_mean:.3g}{frac}, "
            f"{format_ms(entry.latency_ms)} ms vs exact {format_ms(exact_ms)} ms ({speed:.2f}x)"
        )
        return line + (f"; {entry.note}" if entry.note else "") + _decode_text(entry)
    line = f"n={n}: exact attention ({format_ms(exact_ms)} ms) is the choice on {device}"
    close = [
        (name, o.best)
        for name, o in entry.recipes.items()
        if o.best is not None and o.best.frac is not None and o.best.frac < 1
    ]
    if not close:
        least = [f"{k} {o.least_error:.3g}" for k, o in entry.recipes.items() if o.least_error]
        reached = f" (least error: {', '.join(least)})" if least else ""
        return (
            f"{line}: no recipe met the target cheaper than exact attention{reached}; more "
            "--trials or a looser --target-err may find one"
        )
    name, best = min(close, key=lambda c: c[1].frac)
    per_product = exact_ms / best.latency_ms * best.frac
    return (
        f"{line}: {name} meets the target at frac {best.frac:.3g} ({1 / best.frac:.1f}x fewer "
        f"products) but runs {format_ms(best.latency_ms)} ms, at {per_product:.0%} of exact "
        f"attention's speed per product here; it would win where its kernels run at over "
        f"{best.frac:.0%} of it (frac falls at longer lengths; GPU kernels run faster)"
    )


def _decode_text(entry: TunedEntry) -> str:
    """What a decode step of the choice measured, and what decode steps will run."""
    if entry.decode_latency_ms is None:
        return ""
    times = (
        f"{format_ms(entry.decode_latency_ms)} ms vs exact "
        f"{format_ms(entry.exact_decode_latency_ms)} ms"
    )
    if entry.decode_slower_than_exact:
        return f"; a decode step {times}: decode steps run exact attention"
    return f"; a decode step {times}"


def _num(v: float) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def require_plotting(path: Path | None = None) -> None:
    """Raise :class:`TunerError` unless matplotlib can be imported and, for ``path``, write a
    figure of its format in its folder (checked before tuning, not after it: tune and
    tune-model alike)."""
    try:
        import matplotlib
    except ImportError:
        raise TunerError("--plot needs matplotlib (pip install matplotlib)") from None
    if path is None:
        return
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise TunerError(
            f"--plot {path}: no figure format {path.suffix or '(none)'}; "
            f"name a file ending in one of .{', .'.join(sorted(formats))}"
        )
    if (err := can_write_beside(path)) is not None:
        raise TunerError(f"--plot {path}: cannot write in {path.parent}: {err}")


COSTS = {"latency_ms": "latency (ms)", "frac": "frac (share of exact attention's products)"}


def plot_tuning(result: TuneResult, path: Path) -> None:
    """PNG of error against cost: a row per length, a panel per cost (latency, frac). Each
    recipe's finished trials (knobs of frac 1, exact attention by another road, as crosses;
    errors of 0 at half the least positive error), its front (least cost for each error level)
    over the others, the choice as a star, the target and exact attention as lines."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    lengths = sorted(result.exact_ms)
    fig, axes = plt.subplots(len(lengths), 2, figsize=(12, 4.5 * len(lengths)), squeeze=False)
    for row, n in zip(axes, lengths, strict=True):
        entry = result.tuned.table[result.device][n]
        for ax, key in zip(row, COSTS, strict=True):
            _plot_panel(ax, result, n, key)
            exact = 1.0 if key == "frac" else entry.exact_latency_ms
            ax.axhline(exact, color="black", ls=":", lw=1, label="exact attention")
            target = entry.target_err
            ax.axvline(target, color="red", ls="--", lw=1, label=f"target {target:g}")
            ax.set(xscale="log", yscale="log", xlabel="relative error (mean over seeds)")
            ax.set(ylabel=COSTS[key], title=f"n={n} on {result.device}")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short axes
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_panel(ax, result: TuneResult, n: int, key: str) -> None:
    """One length and cost: every recipe's trials and front, and the choice."""
    entry = result.tuned.table[result.device][n]
    floor = _error_floor(result, n)
    for name in result.recipes:
        measured = [
            (max(t.user_attrs["error_mean"], floor), t.user_attrs[key], t.user_attrs["frac"])
            for t in result.trials[name].get(n, [])
            if {"error_mean", key, "frac"} <= set(t.user_attrs)
        ]
        points = sorted((err, cost) for err, cost, frac in measured if frac < 1)
        whole = [(err, cost) for err, cost, frac in measured if frac >= 1]
        if not points and not whole:
            continue
        color = ax.plot([], [], "-", label=name)[0].get_color()
        if points:
            ax.plot(*zip(*_front(points), strict=True), "-", color=color)
            ax.scatter(*zip(*points, strict=True), s=12, alpha=0.4, color=color)
        if whole:
            ax.scatter(*zip(*whole, strict=True), s=30, marker="x", color=color, alpha=0.6)
        if entry.recipe == name:
            chosen = entry.frac if key == "frac" else entry.latency_ms
            err = max(entry.error_mean, floor)
            ax.scatter(
                [err],
                [chosen],
                marker="*",
                s=160,
                color=color,
                edgecolor="black",
                zorder=3,
                label="chosen",
            )
    ax.scatter([], [], marker="x", color="gray", label="frac 1 (computes every product)")


def _error_floor(result: TuneResult, n: int) -> float:
    """Where errors of 0 (exact-equivalent knobs) are drawn on the log axis: half the least
    positive error of the length's trials."""
    errors = [
        t.user_attrs["error_mean"]
        for trials in result.trials.values()
        for t in trials.get(n, [])
        if t.user_attrs.get("error_mean", 0) > 0
    ]
    return min(errors, default=2 * ERROR_FLOOR) / 2


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto front of (error, cost) points sorted by error: each cheaper than all before."""
    front: list[tuple[float, float]] = []
    for err, cost in points:
        if not front or cost < front[-1][1]:
            front.append((err, cost))
    return front
