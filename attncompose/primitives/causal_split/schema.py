"""The ``causal_split`` step: its lazy port and knob (pydantic, imports no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from attncompose.spec.knobs import int_knob
from attncompose.spec.steps import PARTIAL, Port, StepSpec


class CausalSplitStep(StepSpec):
    """Recursive causal splitter around a non-causal sub-pipeline (HyperAttention, causal)."""

    op: Literal["causal_split"] = "causal_split"
    ports: ClassVar[dict[str, Port]] = {
        "body": Port(
            kinds=(PARTIAL,),
            min_count=1,
            max_count=1,
            lazy=True,
            doc="non-causal pipeline run on the off-diagonal rectangles",
        ),
    }
    body: str
    min_seq_len: int_knob(ge=1) = 4096
