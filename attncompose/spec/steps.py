"""Pydantic models of the recipe steps, one per primitive, in one open registry.

A step names its primitive with ``op`` (the discriminator), carries its knobs, and names the
steps it reads through *ports* (``select``, ``exclude``, ``inputs``, ``body``). Each step
class declares what kind of value it produces and what each port accepts, so the graph can
be checked without importing torch.

Register a new primitive's step with :func:`register_step`; the recipe model picks it up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from attncompose.spec.knobs import float_knob, int_knob, is_tunable, knob_value

# Kinds of values that flow along the graph's edges.
SELECTION = "selection"  # a detector's choice of (query, key) pairs, not yet computed
PARTIAL = "partial"  # attention over part of the keys: (out, lse)


@dataclass(frozen=True)
class Port:
    """An input slot of a step: which kinds it accepts and how many names it takes."""

    kinds: tuple[str, ...]
    min_count: int = 0
    max_count: int | None = None
    needs_coverage: bool = False  # only steps that record which pairs they covered
    lazy: bool = False  # re-evaluated on sub-problems (causal splitter body)
    # the step combines these partials (its keys are their union): they must be disjoint
    disjoint: bool = False
    doc: str = ""


class StepSpec(BaseModel):
    """Base of every step model; subclasses set ``op`` and the class variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: str
    produces: ClassVar[str] = PARTIAL
    ports: ClassVar[dict[str, Port]] = {}
    provides_coverage: ClassVar[bool] = False

    def port_names(self, port: str) -> list[str]:
        """Step ids wired into ``port`` (a port holds one name or a list)."""
        value = getattr(self, port)
        if value is None:
            return []
        return [value] if isinstance(value, str) else list(value)

    def knob_fields(self) -> dict[str, Any]:
        """Knob name -> declared value (plain or tunable), excluding op and ports."""
        skip = {"op", *self.ports}
        return {name: getattr(self, name) for name in type(self).model_fields if name not in skip}

    def knobs(self) -> dict[str, Any]:
        """Knob name -> value in effect (defaults for tunable knobs)."""
        return {name: knob_value(v) for name, v in self.knob_fields().items()}

    def tunables(self) -> dict[str, Any]:
        """Knob name -> tunable declaration, for knobs the recipe lets the tuner search."""
        return {name: v for name, v in self.knob_fields().items() if is_tunable(v)}


STEP_TYPES: dict[str, type[StepSpec]] = {}


def register_step(cls: type[StepSpec]) -> type[StepSpec]:
    """Add a step model to the registry (its ``op`` literal is the key)."""
    op = cls.model_fields["op"].default
    if not isinstance(op, str):
        raise TypeError(f"{cls.__name__}.op needs a default: its Literal op name")
    if op in STEP_TYPES and STEP_TYPES[op] is not cls:
        raise ValueError(f"a step named {op!r} is already registered")
    STEP_TYPES[op] = cls  # the Recipe model takes it up (spec.recipe.recipe_model)
    return cls


# the step skips the pairs these steps covered: its keys are disjoint from theirs
SEED = Field(0, ge=-(2**63), le=2**63 - 1, description="seed of the step's random draws")
_COVERAGE = Port(kinds=(PARTIAL,), needs_coverage=True, doc="block steps whose pairs to skip")


@register_step
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


@register_step
class TopkStep(StepSpec):
    """Block top-k detector: key blocks of largest block-mean score, by count k or coverage p."""

    op: Literal["topk"] = "topk"
    produces: ClassVar[str] = SELECTION
    block_size: int_knob(ge=1) = 64
    k: int_knob(ge=0) = 8
    p: float_knob(ge=0.0, le=1.0) | None = Field(
        None, description="coverage mode: smallest set of blocks whose estimated mass reaches p"
    )
    max_k: int_knob(ge=1) = 64


@register_step
class SinkStep(StepSpec):
    """Attention sinks: the first ``count`` keys of the sequence, for every query (0: off)."""

    op: Literal["sink"] = "sink"
    produces: ClassVar[str] = SELECTION
    count: int_knob(ge=0) = 4


@register_step
class WindowStep(StepSpec):
    """Local band: the ``width`` keys up to and including each query's position (0: off)."""

    op: Literal["window"] = "window"
    produces: ClassVar[str] = SELECTION
    width: int_knob(ge=0) = 256


@register_step
class PowerStep(StepSpec):
    """PowerAttention's static pattern: key blocks at power-of-two block distances (0: off)."""

    op: Literal["power"] = "power"
    produces: ClassVar[str] = SELECTION
    block_size: int_knob(ge=1) = 64
    max_distance: int_knob(ge=0) = 1 << 20


@register_step
class BlockStep(StepSpec):
    """Exact attention over the (query, key) pairs selected by its detectors, as (out, lse)."""

    op: Literal["block"] = "block"
    ports: ClassVar[dict[str, Port]] = {
        "select": Port(kinds=(SELECTION,), min_count=1, doc="detectors, united in order"),
        "exclude": _COVERAGE,
    }
    provides_coverage: ClassVar[bool] = True
    select: list[str] = Field(min_length=1)
    exclude: list[str] = []
    block_size: int_knob(ge=1) = 256


@register_step
class UniformSampleStep(StepSpec):
    """Residual estimate from m keys sampled uniformly, skipping covered pairs, unbiased."""

    op: Literal["uniform_sample"] = "uniform_sample"
    ports: ClassVar[dict[str, Port]] = {"exclude": _COVERAGE}
    exclude: list[str] = []
    sample_size: int_knob(ge=0) = 256
    seed: int = SEED


@register_step
class MergeStep(StepSpec):
    """Combine partial results over disjoint key sets by their log-sum-exp."""

    op: Literal["merge"] = "merge"
    ports: ClassVar[dict[str, Port]] = {
        "inputs": Port(
            kinds=(PARTIAL,), min_count=2, disjoint=True, doc="partials over disjoint keys"
        ),
    }
    inputs: list[str] = Field(min_length=2)


@register_step
class ExactStep(StepSpec):
    """Exact attention with log-sum-exp (base case, fallback and reference)."""

    op: Literal["exact"] = "exact"


@register_step
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
