"""The vocabulary of recipe steps: the base model, ports, kinds of values, one open registry.

A step names its primitive with ``op`` (the discriminator), carries its knobs, and names the
steps it reads through *ports* (``select``, ``exclude``, ``inputs``, ``body``). Each step
class declares what kind of value it produces and what each port accepts, so the graph can
be checked without importing torch.

The step models themselves live with their primitives (``attncompose/primitives/<op>/
schema.py``, importing no torch either); registering a primitive registers its step here
(:func:`register_step`), and the recipe model picks it up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from attncompose.spec.knobs import is_tunable, knob_value

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

    @classmethod
    def op_name(cls) -> str:
        """The op this step model declares (its ``op`` literal)."""
        op = cls.model_fields["op"].default
        if not isinstance(op, str):
            raise TypeError(f"{cls.__name__}.op needs a default: its Literal op name")
        return op

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
    op = cls.op_name()
    if op in STEP_TYPES and STEP_TYPES[op] is not cls:
        raise ValueError(f"a step named {op!r} is already registered")
    STEP_TYPES[op] = cls  # the Recipe model takes it up (spec.recipe.recipe_model)
    return cls


SEED = Field(0, ge=-(2**63), le=2**63 - 1, description="seed of the step's random draws")
# the port of steps that skip the pairs other steps covered: their keys are disjoint
EXCLUDE = Port(kinds=(PARTIAL,), needs_coverage=True, doc="block steps whose pairs to skip")
