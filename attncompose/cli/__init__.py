"""The ``attncompose`` command line (click). Thin: every command calls the library.

This package holds every command: validate, show, schema, run, capture and eval here; tune,
tune-model and bench in their own modules, imported only when run (``--help`` stays fast);
the options several share and the user-error wrapper in :mod:`attncompose.cli.options`.

User mistakes (bad recipe, bad arguments, bad data) print one line on stderr and exit 2;
no traceback.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import ClassVar

import click

from attncompose.cli.options import EXIT_USER_ERROR, backend_option, causal_option, data_option
from attncompose.cli.options import user_errors as _user_errors


class _LazyGroup(click.Group):
    """Commands with heavy imports (optuna, triton) load only when they are run."""

    lazy: ClassVar[dict[str, str]] = {
        "tune": "attncompose.cli.tune:tune",
        "tune-model": "attncompose.cli.tune_model:tune_model",
        "bench": "attncompose.cli.bench:bench",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            import importlib

            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def main(self, *args, **kwargs):
        """Usage errors (bad option values, missing arguments, unknown commands) are one
        ``error:`` line with exit status 2, as every other user mistake; warnings (e.g. a
        tuned file used at an untuned length) one ``warning:`` line, not a source location
        inside click."""
        formatwarning = warnings.formatwarning
        warnings.formatwarning = _warning_line
        try:
            return self._main(*args, **kwargs)
        finally:
            warnings.formatwarning = formatwarning

    def _main(self, *args, **kwargs):
        if not kwargs.pop("standalone_mode", True):
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as err:
            where = f" (see {err.ctx.command_path} --help)" if err.ctx is not None else ""
            click.echo(f"error: {err.format_message().rstrip('.')}{where}", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


@click.group(cls=_LazyGroup)
@click.version_option(package_name="attncompose")
def main() -> None:
    """Approximate attention composed from primitives: validate, inspect, run, tune."""


@main.command()
@click.argument("recipes", nargs=-1, required=True)
def validate(recipes: tuple[str, ...]) -> None:
    """Check recipe files (or built-in names); one line per file."""
    from attncompose.spec.errors import RecipeError
    from attncompose.spec.recipe import load_recipe

    failed = 0
    for name in recipes:
        try:
            recipe = load_recipe(name)
            click.echo(f"ok: {name} ({recipe.name}, {len(recipe.steps)} steps)")
        except RecipeError as err:
            failed += 1
            msg = str(err) if str(err).startswith(name) else f"{name}: {err}"
            click.echo(f"error: {msg}", err=True)
    if failed:
        sys.exit(EXIT_USER_ERROR)


@main.command()
@click.argument("recipe")
@click.option("--dot", is_flag=True, help="Print Graphviz DOT instead of text.")
@backend_option
@_user_errors
def show(recipe: str, dot: bool, backend: str) -> None:
    """Print the compiled graph: steps, edges, knobs and the kernels chosen."""
    from attncompose.runtime.compiler import Pipeline
    from attncompose.spec.graph import describe, to_dot
    from attncompose.spec.recipe import load_recipe

    r = load_recipe(recipe)
    if dot:
        click.echo(to_dot(r))
        return
    click.echo(describe(r, kernels=Pipeline(r, backend=backend).kernels()))


@main.command()
def schema() -> None:
    """Print the JSON Schema of recipe files (for editor completion)."""
    from attncompose.spec.recipe import recipe_json_schema

    click.echo(json.dumps(recipe_json_schema(), indent=2))


@main.command()
@click.argument("recipe")
@click.option("--seq-len", type=click.IntRange(min=1), required=True)
@causal_option
@data_option
@backend_option
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@_user_errors
def run(
    recipe: str, seq_len: int, causal: bool, data: Path | None, backend: str, repeats: int
) -> None:
    """Error and latency of RECIPE against exact attention at one sequence length."""
    from rich.console import Console
    from rich.table import Table

    from attncompose.eval.compare import compare_to_exact
    from attncompose.eval.data import SYNTHETIC, SYNTHETIC_NOTE
    from attncompose.runtime.attention import compile as compile_recipe

    attn = compile_recipe(recipe, backend=backend)
    rows = compare_to_exact(attn, data, seq_len, causal, repeats=repeats)
    source = rows[0].name.partition(":")[0]  # items are FILE:layerN, or synthetic
    mode = "causal" if causal else "non-causal"
    table = Table(title=f"{attn.recipe.name}, n={seq_len}, {mode}, data: {source}")
    for col in ("data", "rel. error", "latency ms", "exact ms", "speedup"):
        table.add_column(col, justify="right" if col != "data" else "left", no_wrap=True)
    for row in rows:
        table.add_row(
            row.name.partition(":")[2] or row.name,
            f"{row.error:.4f}",
            f"{row.latency_ms:.1f}",
            f"{row.exact_ms:.1f}",
            f"{row.exact_ms / row.latency_ms:.2f}x",
        )
    Console().print(table)
    if data is not None and str(data) == SYNTHETIC:
        click.echo(SYNTHETIC_NOTE)


def _int_list(value: str | None) -> list[int] | None:
    if value in (None, "all"):
        return None
    try:
        return [int(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"expected 'all' or comma-separated integers, got {value!r}"
        ) from None


_model_option = click.option("--model", "model_name", default="smollm2", show_default=True)
_text_option = click.option(
    "--text",
    default=None,
    help="Text file, or a built-in text: pydoc-topics (Python's pydoc_data topics, the "
    "default) or stdlib-docs (standard-library docstrings).",
)


@main.command()
@_model_option
@_text_option
@click.option("--seq-len", type=click.IntRange(min=2), required=True)
@click.option("--layers", default="all", show_default=True, help="'all' or e.g. 0,12,29.")
@click.option(
    "--kv-heads",
    default="all",
    show_default=True,
    help="'all' or key/value heads to keep, each with its query heads.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Storage dtype of the tensors.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@_user_errors
def capture(
    model_name: str,
    text: str | None,
    seq_len: int,
    layers: str,
    kv_heads: str,
    dtype: str,
    out: Path,
) -> None:
    """Run a model on a text and store post-RoPE Q, K, V per layer (safetensors)."""
    import torch

    from attncompose.models import load_model, model_card
    from attncompose.models.text import load_text, text_sha256, token_ids

    chosen, heads = _int_list(layers), _int_list(kv_heads)  # bad arguments fail before loading
    model_card(model_name).check(seq_len, "all" if chosen is None else chosen, heads)
    body = load_text(text)
    model, tokenizer = load_model(model_name)
    from attncompose.models.capture import capture_qkv  # imports transformers: after the checks
    from attncompose.models.capture_file import save_capture, select_kv_heads

    ids = token_ids(tokenizer, seq_len, body)
    qkv = capture_qkv(model, ids, "all" if chosen is None else chosen)
    if heads is not None:
        qkv = select_kv_heads(qkv, heads)
    cast = getattr(torch, dtype)
    qkv = {i: tuple(t.to(cast) for t in triple) for i, triple in qkv.items()}
    meta = save_capture(out, qkv, model=model_name, text_sha256=text_sha256(body))
    size = out.stat().st_size / 2**20
    click.echo(
        f"wrote {out}: layers {meta['layers']}, n={meta['length']}, "
        f"{meta['num_q_heads']} query / {meta['num_kv_heads']} kv heads, {size:.1f} MiB"
    )


@main.command(name="eval")
@click.argument("recipe")
@_model_option
@_text_option
@click.option("--seq-len", type=click.IntRange(min=2), required=True)
@click.option(
    "--layers",
    default="all",
    show_default=True,
    help="Layers that use the recipe: 'all', e.g. 0,12,29.",
)
@_user_errors
def evaluate(recipe: str, model_name: str, text: str | None, seq_len: int, layers: str) -> None:
    """Perplexity with exact attention and with RECIPE (a recipe, a tuned file or a
    model-level tuned file); per-layer error and frac."""
    import time

    from rich.console import Console
    from rich.table import Table

    from attncompose.eval.model import evaluate_recipe

    chosen = _int_list(layers)
    start = time.monotonic()
    say = lambda stage: click.echo(f"[{time.monotonic() - start:5.0f} s] eval: {stage}", err=True)
    report = evaluate_recipe(
        recipe, model_name, text, seq_len, "all" if chosen is None else chosen, progress=say
    )
    console = Console()
    summary = Table(title=f"{report.recipe} on {model_name}, n={seq_len}")
    for col in ("attention", "perplexity", "vs exact", "frac", "attention share of time"):
        summary.add_column(col, justify="right" if col != "attention" else "left")
    summary.add_row("exact", f"{report.exact_ppl:.3f}", "", "1.000", f"{report.exact_share:.0%}")
    summary.add_row(
        report.recipe,
        f"{report.ppl:.3f}",
        f"{report.ppl / report.exact_ppl - 1:+.1%}",
        f"{report.frac:.3f}",
        f"{report.share:.0%}",
    )
    console.print(summary)
    layers_table = Table(title="per-layer output error on captured Q/K/V")
    for col in ("layer", "rel. error", "frac"):
        layers_table.add_column(col, justify="right")
    for layer, (err, frac) in report.layers.items():
        layers_table.add_row(str(layer), f"{err:.4f}", f"{frac:.3f}")
    console.print(layers_table)
