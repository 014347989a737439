"""``attncompose tune``: the click command (thin; the work is in :mod:`attncompose.tuner`)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from attncompose.commands import EXIT_USER_ERROR
from attncompose.commands import user_errors as _user_errors


def _tuner_errors(fn):
    """Tuner errors (arguments, storage, study) as one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from attncompose.tuner.errors import TunerError

        try:
            return fn(*args, **kwargs)
        except TunerError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def _lengths(ctx, param, value: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not lengths or min(lengths) < 1:
        raise click.BadParameter(f"expected positive lengths, got {value!r}")
    return tuple(dict.fromkeys(lengths))


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
    callback=_lengths,
    help="Comma-separated sequence lengths to tune.",
)
@click.option(
    "--latency-budget-ms",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Use exact attention where the best feasible latency exceeds this.",
)
@click.option("--causal/--no-causal", default=True, show_default=True)
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Captured Q/K/V (safetensors); default: the built-in data.",
)
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
@click.option(
    "--backend", default="auto", show_default=True, type=click.Choice(["auto", "torch", "triton"])
)
@click.option("--device", default=None, help="Device to tune on [default: cuda if available].")
@_user_errors
@_tuner_errors
def tune(
    recipe: str,
    target_err: float,
    seq_lens: tuple[int, ...],
    latency_budget_ms,
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

    from attncompose.spec.recipe import load_recipe
    from attncompose.tuner.job import TuneConfig
    from attncompose.tuner.job import tune as run_tune
    from attncompose.tuner.report import RichReporter, plot_pareto, summary_table

    optuna.logging.set_verbosity(optuna.logging.WARNING)
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
        backend=backend,
        device=device,
        storage=storage,
        study=study,
        out=out or Path(f"{recipe_model.name}.tuned.yaml"),
    )
    with RichReporter() as reporter:
        result = run_tune(recipe, config, reporter)
    Console().print(summary_table(result))
    if plot is not None:
        plot_pareto(result, target_err, plot)
    click.echo(f"wrote {config.out}" + (f" and {plot}" if plot else ""))
