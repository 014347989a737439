"""What every command shares: user mistakes become one line on stderr and exit status 2, and
the options several commands take (data, backend, lists of lengths)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

EXIT_USER_ERROR = 2


def user_errors(fn):
    """Turn the library's user-facing errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from attncompose.data import DataError
        from attncompose.models.capture_file import CaptureError
        from attncompose.models.smollm2 import ModelNotAvailableError
        from attncompose.runtime.checks import AttentionInputError
        from attncompose.spec.errors import RecipeError
        from attncompose.tuner.errors import TunerError

        errors = (
            RecipeError,
            AttentionInputError,
            DataError,
            CaptureError,
            ModelNotAvailableError,
            TunerError,
            FileNotFoundError,
        )
        try:
            return fn(*args, **kwargs)
        except errors as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def parse_lengths(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """click callback: '4096,8192' -> (4096, 8192), positive and without repeats."""
    try:
        lengths = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not lengths or min(lengths) < 1:
        raise click.BadParameter(f"expected positive lengths, got {value!r}")
    return tuple(dict.fromkeys(lengths))


data_option = click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Captured Q/K/V (safetensors); default: the built-in data.",
)
backend_option = click.option(
    "--backend", default="auto", show_default=True, type=click.Choice(["auto", "torch", "triton"])
)
