"""The ``lsh`` step: its knobs and what it produces (pydantic, imports no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from attncompose.spec.knobs import int_knob
from attncompose.spec.steps import SEED, SELECTION, StepSpec


class LshStep(StepSpec):
    """sortLSH detector: queries and keys sorted by the Gray rank of their r-bit hash codes."""

    op: Literal["lsh"] = "lsh"
    produces: ClassVar[str] = SELECTION
    num_projections: int_knob(ge=1, le=30) = 7
    seed: int = SEED
    pairing: Literal["rank", "code"] = Field(
        "rank",
        description="rank: sorted query block i with sorted key block i (the paper); code: "
        "each sorted query tile with the key block where its codes fall among the key codes",
    )
    align: Literal["none", "mips"] = Field(
        "none",
        description="mips: hash [q/|q|, 0] and [k/M, sqrt(1-|k|^2/M^2)] so that angular LSH "
        "tracks inner products (the MIPS-to-angular reduction) instead of raw directions",
    )
