"""``attncompose tune``: the click command (thin; the work is in :mod:`attncompose.tuner`)."""

from __future__ import annotations

from pathlib import Path

import click

from attncompose.commands import backend_option, data_option, device_option, parse_lengths
from attncompose.commands import user_errors as _user_errors


@click.command("tune")
@click.argument("recipe")
@click.option(
    "--target-err",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    help="Largest mean relative error (vs exact attention) allowed.",
)
@click.option(
    "--seq-lens",
    default="4096",
    show_default=True,
    callback=parse_lengths,
    help="Comma-separated sequence lengths to tune.",
)
@click.option(
    "--latency-budget-ms",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Use exact attention where the best feasible latency exceeds this.",
)
@click.option(
    "--cost",
    type=click.Choice(["latency", "products"]),
    default="latency",
    show_default=True,
    help="Minimise measured latency, or the share of exact attention's query-key products "
    "(device-independent; for comparing recipes where timings say little, e.g. on CPU).",
)
@click.option("--causal/--no-causal", default=True, show_default=True)
@data_option
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=40,
    show_default=True,
    help="Finished trials per length (all workers together).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds per length for this worker.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampler seed.")
@click.option(
    "--seeds",
    "n_seeds",
    type=click.IntRange(min=3),
    default=3,
    show_default=True,
    help="Settings of the recipe's seed knobs the error is averaged over.",
)
@click.option(
    "--storage",
    default=None,
    help="Optuna storage: sqlite:///FILE, postgresql://..., or journal:PATH "
    "[default: a SQLite file beside --out].",
)
@click.option("--study", default=None, help="Study name shared by workers (with --storage).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Tuned recipe file [default: RECIPE-NAME.tuned.yaml].",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a PNG of error vs latency per length (Pareto front, target line).",
)
@backend_option
@device_option("Device to tune on [default: cuda if available].")
@_user_errors
def tune(
    recipe: str,
    target_err: float,
    seq_lens: tuple[int, ...],
    latency_budget_ms,
    cost,
    causal,
    data,
    trials,
    timeout,
    seed,
    n_seeds,
    storage,
    study,
    out,
    plot,
    backend,
    device,
) -> None:
    """Tune RECIPE's knobs per sequence length: least latency with error <= --target-err.

    Rerunning the same command resumes; workers given the same --storage and --study share
    the trials. Writes the tuned recipe (load it with attncompose.load).
    """
    import optuna
    from rich.console import Console

    from attncompose.data import SYNTHETIC, SYNTHETIC_NOTE
    from attncompose.spec.recipe import load_recipe
    from attncompose.tuner.job import TuneConfig
    from attncompose.tuner.job import tune as run_tune
    from attncompose.tuner.report import RichReporter, plot_pareto, summary_table

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if data is not None and str(data) == SYNTHETIC:
        click.echo(f"{SYNTHETIC_NOTE}: knobs tuned on them say little about a model", err=True)
    recipe_model = load_recipe(recipe)
    config = TuneConfig(
        target_err=target_err,
        seq_lens=seq_lens,
        causal=causal,
        data=data,
        trials=trials,
        timeout_s=timeout,
        seed=seed,
        n_seeds=n_seeds,
        latency_budget_ms=latency_budget_ms,
        cost=cost,
        backend=backend,
        device=device,
        storage=storage,
        study=study,
        out=out or Path(f"{recipe_model.name}.tuned.yaml"),
    )
    with RichReporter() as reporter:
        result = run_tune(recipe, config, reporter)
    console = Console()
    if not console.is_terminal:  # a log file: no terminal width to respect, keep rows whole
        console = Console(width=160)
    console.print(summary_table(result))
    if plot is not None:
        plot_pareto(result, target_err, plot)
    click.echo(f"wrote {config.out}" + (f" and {plot}" if plot else ""))
