"""The ``window`` step: its knob and what it produces (pydantic, imports no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from attncompose.spec.knobs import int_knob
from attncompose.spec.steps import SELECTION, StepSpec


class WindowStep(StepSpec):
    """Local band: the ``width`` keys up to and including each query's position (0: off)."""

    op: Literal["window"] = "window"
    produces: ClassVar[str] = SELECTION
    width: int_knob(ge=0) = 256
