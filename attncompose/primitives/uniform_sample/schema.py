"""The ``uniform_sample`` step: its port and knobs (pydantic, imports no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from attncompose.spec.knobs import int_knob
from attncompose.spec.steps import EXCLUDE, SEED, Port, StepSpec


class UniformSampleStep(StepSpec):
    """Residual estimate from m keys sampled uniformly, skipping covered pairs, unbiased."""

    op: Literal["uniform_sample"] = "uniform_sample"
    ports: ClassVar[dict[str, Port]] = {"exclude": EXCLUDE}
    exclude: list[str] = Field(default=[])  # pydantic copies it per step
    sample_size: int_knob(ge=0) = 256
    seed: int = SEED
