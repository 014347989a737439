"""``attncompose tune-model``: the click command (thin; the work is in
:mod:`attncompose.tuner.model_job`)."""

from __future__ import annotations

from pathlib import Path

import click

from attncompose.cli.options import (
    backend_option,
    cost_option,
    device_option,
    seed_option,
    storage_options,
)
from attncompose.cli.options import user_errors as _user_errors

DEFAULT_RECIPES = "topp,block-topk,streaming"


def _recipe_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))
    if not names:
        raise click.BadParameter("name at least one recipe (built-in name or YAML path)")
    return names


@click.command("tune-model")
@click.option("--model", "model_name", default="smollm2", show_default=True)
@click.option("--seq-len", type=click.IntRange(min=2), required=True, help="Tokens per segment.")
@click.option(
    "--recipes",
    default=DEFAULT_RECIPES,
    show_default=True,
    callback=_recipe_list,
    help="Comma-separated recipes (built-in names or YAML paths) each layer may choose from.",
)
@click.option(
    "--target-err",
    type=float,
    default=None,
    help="Each layer: the cheapest choice with relative error <= this (fit and check segments).",
)
@click.option(
    "--ppl-budget",
    type=float,
    default=None,
    help="Relative perplexity growth allowed on the calibration text (0.02 = +2%), verified "
    "by forward passes; choices allocated by measured layer sensitivity.",
)
@click.option(
    "--text",
    default=None,
    help="Calibration text: a file, or a built-in text (pydoc-topics, the default, or "
    "stdlib-docs).",
)
@click.option(
    "--segments",
    type=click.IntRange(1, 3),
    default=3,
    show_default=True,
    help="SEQ-LEN-token segments of the text: fit (trials), check (choices must hold there "
    "too), test (measured only).",
)
@click.option("--per-head", is_flag=True, help="A choice per key/value head group, not per layer.")
@click.option(
    "--shared-trials",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Model-wide trials per recipe, each run on every layer (head group); every layer "
    "chooses among them and its own trials.",
)
@click.option(
    "--trials",
    type=click.IntRange(min=0),
    default=6,
    show_default=True,
    help="Trials per layer (head group) and recipe on top of the model-wide ones, all workers "
    "together.",
)
@cost_option("Minimise measured latency, or frac (share of exact attention's query-key products).")
@seed_option
@storage_options(
    "Optuna storage shared by workers", "Study name prefix shared by workers (with --storage)."
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of cached captures [default: $ATTNCOMPOSE_CACHE or ~/.cache/attncompose].",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a PNG of per-layer cost and error.",
)
@backend_option
@device_option("Device to tune on [default: cuda if available].")
@_user_errors
def tune_model(
    model_name: str,
    seq_len: int,
    recipes: tuple[str, ...],
    target_err: float | None,
    ppl_budget: float | None,
    text: str | None,
    segments: int,
    per_head: bool,
    shared_trials: int,
    trials: int,
    cost: str,
    seed: int,
    storage: str | None,
    study: str | None,
    cache: Path | None,
    out: Path,
    plot: Path | None,
    backend: str,
    device: str | None,
) -> None:
    """Tune every layer of a model: per layer (or KV-head group) a recipe and its knobs.

    Captures the model's Q/K/V on the text once (cached), runs per recipe one model-wide
    study (each trial on every layer) and one study per layer x recipe seeded with it (all
    resumable, shared by workers given the same --storage and --study), then chooses to
    --target-err or to --ppl-budget. Writes a model-level tuned file: load it with
    attncompose.load, evaluate it with `attncompose eval FILE --model ...`.
    """
    import optuna
    from rich.console import Console

    from attncompose.models import load_model, model_card
    from attncompose.models.text import all_token_ids, load_text, text_name, text_sha256
    from attncompose.tuner.model_job import (
        ModelTuneConfig,
        TextInfo,
        check_out_file,
        load_recipes,
    )
    from attncompose.tuner.model_job import tune_model as run
    from attncompose.tuner.model_report import RichModelReporter, plot_layers, summary_table
    from attncompose.tuner.report import require_plotting

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if plot is not None:
        require_plotting(plot)  # before the model loads and any trial runs
    config = ModelTuneConfig(
        seq_len=seq_len,
        recipes=recipes,
        target_err=target_err,
        ppl_budget=ppl_budget,
        per_head=per_head,
        trials=trials,
        shared_trials=shared_trials,
        cost=cost,
        segments=segments,
        seed=seed,
        backend=backend,
        device=device,
        storage=storage,
        study=study,
        cache=cache,
        out=out,
    )
    config.check()  # bad arguments fail before the model loads (a minute on a busy CPU)
    load_recipes(recipes)
    card = model_card(model_name)
    card.check(seq_len)
    check_out_file(out, card)
    body = load_text(text)
    model, tokenizer = load_model(model_name)
    info = TextInfo(text_name(text), text_sha256(body), all_token_ids(tokenizer, body))
    with RichModelReporter() as reporter:
        result = run(model, model_name, info, config, reporter)
    console = Console()
    if not console.is_terminal:  # a log file: keep rows whole
        console = Console(width=200)
    console.print(summary_table(result))
    if plot is not None:
        plot_layers(result, plot)
    click.echo(f"wrote {out}" + (f" and {plot}" if plot else ""))
