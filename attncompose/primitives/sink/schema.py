"""The ``sink`` step: its knob and what it produces (pydantic, imports no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from attncompose.spec.knobs import int_knob
from attncompose.spec.steps import SELECTION, StepSpec


class SinkStep(StepSpec):
    """Attention sinks: the first ``count`` keys of the sequence, for every query (0: off)."""

    op: Literal["sink"] = "sink"
    produces: ClassVar[str] = SELECTION
    count: int_knob(ge=0) = 4
