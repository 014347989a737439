"""The one error type for recipes: names the file, the field path and the problem.

pydantic's own wording ("Input should be a valid integer, unable to parse string as an
integer", "Unable to extract tag using discriminator 'op'") is rewritten here into plain
words that say what is allowed and what was given (:func:`plain_error`).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from attncompose.errors import AttncomposeError


class RecipeError(AttncomposeError, ValueError):
    """A recipe that cannot be used, with where (file, field path) and why."""

    def __init__(self, message: str, *, source: str | None = None, loc: str | None = None):
        self.source = source
        self.loc = loc
        self.reason = message
        where = ": ".join(part for part in (source, loc) if part)
        super().__init__(f"{where}: {message}" if where else message)


def knobs_loc(where: str, err: RecipeError) -> str:
    """Where in a tuned file a :meth:`with_knobs` error lies: ``WHERE.knobs[step.knob]`` when
    it names the knob, else ``WHERE.knobs``."""
    named = err.loc is not None and err.loc.startswith("knobs[")
    return f"{where}.{err.loc}" if named else f"{where}.knobs"


def format_loc(loc: tuple) -> str:
    """('steps', 'diag', 'block_size') -> 'steps.diag.block_size'; a key holding a dot is
    bracketed: ('knobs', 'heavy.p') -> 'knobs[heavy.p]'."""
    out = ""
    for part in loc:
        text = str(part)
        out += f"[{text}]" if "." in text else (f".{text}" if out else text)
    return out


# the member names pydantic appends to the location of each alternative of a union
_UNION_MEMBERS = ("int", "float", "str", "bool", "function-plain[", "function-after[")

_KINDS = {
    "int": "an integer",
    "float": "a number",
    "string": "text",
    "bool": "true or false",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping",
    "model_attributes": "a mapping",
}


def plain_error(err: ValidationError | list[dict]) -> tuple[str, str]:
    """(field path, plain message) of the first problem of a pydantic error (or of its
    ``errors()``), saying how many more there are; a union's failed alternatives are one."""
    problems: dict[tuple, list[dict]] = {}
    for e in err.errors() if isinstance(err, ValidationError) else err:
        problems.setdefault(_strip_members(e["loc"]), []).append(e)
    loc, first = next(iter(problems.items()))
    msg = _or(first)
    extra = len(problems) - 1
    if extra:
        msg += f" (and {extra} more problem{'s' if extra > 1 else ''})"
    return format_loc(loc), msg


def _strip_members(loc: tuple) -> tuple:
    while loc and isinstance(loc[-1], str) and loc[-1].startswith(_UNION_MEMBERS):
        loc = loc[:-1]
    return tuple(loc)


def _or(alternatives: list[dict]) -> str:
    """One message for the failed alternatives of a union (or a lone error)."""
    wanted = [_wanted(e) for e in alternatives]
    if len(alternatives) > 1 and all(wanted):
        return f"expected {' or '.join(dict.fromkeys(wanted))}, got {_show(alternatives[0])}"
    return plain_message(alternatives[0])


def _wanted(error: dict) -> str | None:
    kind = error["type"].removesuffix("_type").removesuffix("_parsing")
    return _KINDS.get(kind)


def plain_message(error: dict[str, Any]) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) in plain words."""
    kind, ctx = error["type"], error.get("ctx", {})
    wanted = _wanted(error)
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return "unknown field"
    if wanted is not None:
        return f"expected {wanted}, got {_show(error)}"
    if kind == "int_from_float":
        return f"expected an integer, got {_show(error)}"
    if kind == "finite_number":
        return f"expected a finite number, got {_show(error)}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {_show(error)}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"takes at most {ctx.get('max_length')} item(s)"
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("more than", "gt"),
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)}, got {_show(error)}"
    return str(error["msg"]).removeprefix("Value error, ")


def _show(error: dict) -> str:
    text = repr(error.get("input"))
    return text if len(text) <= 60 else text[:57] + "..."
