"""The tuner's user-facing error."""

from __future__ import annotations

from attncompose.errors import AttncomposeError


class TunerError(AttncomposeError, ValueError):
    """A tuning run that cannot go on as asked (arguments, storage, study), with why."""
