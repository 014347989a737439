"""The ``power`` step: its knobs and what it produces (pydantic, imports no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from attncompose.spec.knobs import int_knob
from attncompose.spec.steps import SELECTION, StepSpec


class PowerStep(StepSpec):
    """PowerAttention's static pattern: key blocks at power-of-two block distances (0: off)."""

    op: Literal["power"] = "power"
    produces: ClassVar[str] = SELECTION
    block_size: int_knob(ge=1) = 64
    max_distance: int_knob(ge=0) = 1 << 20
