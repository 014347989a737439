"""What every command shares: user mistakes become one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import sys

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

        errors = (
            RecipeError,
            AttentionInputError,
            DataError,
            CaptureError,
            ModelNotAvailableError,
            FileNotFoundError,
        )
        try:
            return fn(*args, **kwargs)
        except errors as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
