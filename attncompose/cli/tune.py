"""``attncompose tune``: the click command (thin; the work is in :mod:`attncompose.tuner`)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from attncompose.cli.options import (
    backend_option,
    causal_option,
    cost_option,
    data_option,
    device_option,
    parse_lengths,
    seed_option,
    storage_options,
)
from attncompose.cli.options import user_errors as _user_errors


@click.command("tune")
@click.argument("recipes", nargs=-1, required=True)
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
    help="Largest latency (ms) a choice may have: points over it are ruled out, also under "
    "--cost products; where none is left, exact attention.",
)
@cost_option(
    "Minimise measured latency, or the share of exact attention's query-key products "
    "(device-independent; for comparing recipes where timings say little, e.g. on CPU)."
)
@causal_option
@data_option
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=40,
    show_default=True,
    help="Finished trials per recipe and length (all workers together).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds per length for this worker.",
)
@seed_option
@click.option(
    "--seeds",
    "n_seeds",
    type=click.IntRange(min=3),
    default=3,
    show_default=True,
    help="Settings of the recipe's seed knobs the error is averaged over.",
)
@storage_options("Optuna storage", "Study name shared by workers (with --storage).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Tuned recipe file [default: NAME.tuned.yaml for one recipe, tuned.yaml for several].",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a PNG of error vs cost per length (each recipe's trials and front, target, "
    "exact attention); needs matplotlib.",
)
@backend_option
@click.option(
    "--backends",
    default=None,
    help="Comma-separated implementations to time as a tunable choice (e.g. triton,flex): "
    "each trial runs on one of them and the tuned file records which won.",
)
@device_option("Device to tune on [default: cuda if available].")
@_user_errors
def tune(
    recipes: tuple[str, ...],
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
    backends,
    device,
) -> None:
    """Tune each of RECIPES per sequence length and keep, per length, the cheapest one that
    meets --target-err (least latency, or least products with --cost products), or exact
    attention where none beats it; prints how the recipes compare and why each lost.

    Rerunning the same command resumes; workers given the same --storage and --study share
    the trials. Writes the tuned file (load it with attncompose.load).
    """
    import optuna
    from rich.console import Console

    from attncompose.eval.data import SYNTHETIC, SYNTHETIC_NOTE
    from attncompose.tuner.job import TuneConfig, load_recipes
    from attncompose.tuner.job import tune as run_tune
    from attncompose.tuner.report import (
        plot_tuning,
        print_comparison,
        reporter_for,
        require_plotting,
    )

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if plot is not None:
        require_plotting(plot)  # before any trial runs, not after the file is written
    if data is not None and str(data) == SYNTHETIC:
        click.echo(f"{SYNTHETIC_NOTE}: knobs tuned on them say little about a model", err=True)
    loaded = load_recipes(list(recipes))
    # a name is free text: only its safe characters name a file here (not "../x", "a b/c")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", loaded[0][0].name).lstrip(".-") or "recipe"
    default_out = f"{stem}.tuned.yaml" if len(loaded) == 1 else "tuned.yaml"
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
        backends=tuple(b.strip() for b in backends.split(",") if b.strip()) if backends else (),
        device=device,
        storage=storage,
        study=study,
        out=out or Path(default_out),
    )
    config.check()
    with reporter_for(Console(stderr=True)) as reporter:
        result = run_tune(list(recipes), config, reporter)
    print_comparison(result, Console(highlight=False))
    if plot is not None:
        plot_tuning(result, plot)
    click.echo(f"wrote {config.out}" + (f" and {plot}" if plot else ""))
