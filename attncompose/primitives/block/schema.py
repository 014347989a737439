"""The ``block`` step: its ports and knob (pydantic, imports no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from attncompose.spec.knobs import int_knob
from attncompose.spec.steps import EXCLUDE, SELECTION, Port, StepSpec


class BlockStep(StepSpec):
    """Exact attention over the (query, key) pairs selected by its detectors, as (out, lse)."""

    op: Literal["block"] = "block"
    ports: ClassVar[dict[str, Port]] = {
        "select": Port(kinds=(SELECTION,), min_count=1, doc="detectors, united in order"),
        "exclude": EXCLUDE,
    }
    provides_coverage: ClassVar[bool] = True
    select: list[str] = Field(min_length=1)
    exclude: list[str] = Field(default=[])  # pydantic copies it per step
    block_size: int_knob(ge=1) = 256
