"""The tuner's user-facing error."""

from __future__ import annotations


class TunerError(ValueError):
    """A tuning run that cannot go on as asked (arguments, storage, study), with why."""
