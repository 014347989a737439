"""The ``topk`` step: its knobs and what it produces (pydantic, imports no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from attncompose.spec.knobs import float_knob, int_knob, str_knob
from attncompose.spec.steps import SELECTION, StepSpec


class TopkStep(StepSpec):
    """Block top-k detector: per query block, the key blocks of largest estimated mass, by
    count k or coverage p. ``score``: how a block's mass is estimated from the query block's
    mean query, against the block's mean key (``means``) or against each of its keys
    (``keys``: finds blocks holding a few heavy keys, at nQB x Lk products)."""

    op: Literal["topk"] = "topk"
    produces: ClassVar[str] = SELECTION
    block_size: int_knob(ge=1) = 64
    k: int_knob(ge=0) = 8
    p: float_knob(ge=0.0, le=1.0) | None = Field(
        None, description="coverage mode: smallest set of blocks whose estimated mass reaches p"
    )
    max_k: int_knob(ge=1) = 64
    score: str_knob("means", "keys") = "means"
