"""The ``exact`` step (pydantic, imports no torch): no knobs, no ports."""

from __future__ import annotations

from typing import Literal

from attncompose.spec.steps import StepSpec


class ExactStep(StepSpec):
    """Exact attention with log-sum-exp (base case, fallback and reference)."""

    op: Literal["exact"] = "exact"
