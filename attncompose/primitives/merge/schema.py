"""The ``merge`` step: its port (pydantic, imports no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from attncompose.spec.steps import PARTIAL, Port, StepSpec


class MergeStep(StepSpec):
    """Combine partial results over disjoint key sets by their log-sum-exp."""

    op: Literal["merge"] = "merge"
    ports: ClassVar[dict[str, Port]] = {
        "inputs": Port(
            kinds=(PARTIAL,), min_count=2, disjoint=True, doc="partials over disjoint keys"
        ),
    }
    inputs: list[str] = Field(min_length=2)
