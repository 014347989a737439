"""The ``attncompose`` command line (click). Thin: every command calls the library.

User mistakes (bad recipe, bad arguments, bad data) print one line on stderr and exit 2;
no traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

EXIT_USER_ERROR = 2


def _user_errors(fn):
    """Turn the library's user-facing errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from attncompose.data import DataError
        from attncompose.runtime.checks import AttentionInputError
        from attncompose.spec.errors import RecipeError

        try:
            return fn(*args, **kwargs)
        except (RecipeError, AttentionInputError, DataError, FileNotFoundError) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


@click.group()
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
@click.option(
    "--backend", default="auto", show_default=True, type=click.Choice(["auto", "torch", "triton"])
)
@_user_errors
def show(recipe: str, dot: bool, backend: str) -> None:
    """Print the compiled graph: steps, edges, knobs and the kernels chosen."""
    from attncompose.graph import describe, to_dot
    from attncompose.runtime.compiler import Pipeline
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
@click.option("--causal/--no-causal", default=False, show_default=True)
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Captured Q/K/V (safetensors); default: the built-in data.",
)
@click.option(
    "--backend", default="auto", show_default=True, type=click.Choice(["auto", "torch", "triton"])
)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@_user_errors
def run(
    recipe: str, seq_len: int, causal: bool, data: Path | None, backend: str, repeats: int
) -> None:
    """Error and latency of RECIPE against exact attention at one sequence length."""
    from rich.console import Console
    from rich.table import Table

    from attncompose.evaluation import compare_to_exact
    from attncompose.runtime.attention import compile as compile_recipe

    attn = compile_recipe(recipe, backend=backend)
    table = Table(title=f"{attn.recipe.name}, n={seq_len}, {'causal' if causal else 'non-causal'}")
    for col in ("data", "rel. error", "latency ms", "exact ms", "speedup"):
        table.add_column(col, justify="right" if col != "data" else "left")
    for row in compare_to_exact(attn, data, seq_len, causal, repeats=repeats):
        table.add_row(
            row.name,
            f"{row.error:.4f}",
            f"{row.latency_ms:.1f}",
            f"{row.exact_ms:.1f}",
            f"{row.exact_ms / row.latency_ms:.2f}x",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
