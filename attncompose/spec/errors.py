"""The one error type for recipes: names the file, the field path and the problem."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe that cannot be used, with where (file, field path) and why."""

    def __init__(self, message: str, *, source: str | None = None, loc: str | None = None):
        self.source = source
        self.loc = loc
        self.reason = message
        where = ": ".join(part for part in (source, loc) if part)
        super().__init__(f"{where}: {message}" if where else message)


def format_loc(loc: tuple) -> str:
    """('steps', 'diag', 'block', 'block_size') -> 'steps.diag.block_size'."""
    return ".".join(str(part) for part in loc)
