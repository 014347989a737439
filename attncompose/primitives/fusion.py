"""Step patterns evaluated together (fewer kernel passes, same result): the generic machinery.

A fusion replaces how one step (the root) is computed: it reads other steps' values (its own
ports) instead of the root's inputs, and the steps it absorbs are then never evaluated on
their own. An op folder declares a pattern, ``(recipe, step id) -> Match | None``, and lists
it in its primitive's ``fusions``; registering the primitive adds it here. The compiler asks
:func:`find_fusions` which steps of a recipe run fused: a match applies only where nothing
outside it reads an absorbed step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attncompose.primitives.base import Primitive


@dataclass(frozen=True)
class Match:
    """A pattern found at one step: the steps it absorbs, the step ids each port of the fused
    run reads, and ``make(nodes)``, the fused run from the compiled steps (id -> runtime)."""

    absorbed: tuple[str, ...]
    ports: dict[str, list[str]]
    make: Callable[[dict[str, Primitive]], Any]


Pattern = Callable[[Any, str], Match | None]  # (recipe, step id) -> Match or None


@dataclass(frozen=True)
class Fusion:
    """How to compute one step: ``run(problem, **ports)`` with ports naming step ids."""

    ports: dict[str, list[str]]
    run: Any

    def kernel_name(self) -> str:
        return self.run.kernel_name()


PATTERNS: list[Pattern] = []


def add(pattern: Pattern) -> Pattern:
    """Register a fusion pattern (:func:`find_fusions` tries them in order)."""
    if pattern not in PATTERNS:
        PATTERNS.append(pattern)
    return pattern


def find_fusions(recipe, nodes: dict[str, Primitive]) -> dict[str, Fusion]:
    """Step id -> the fusion that computes it, for every registered pattern found in
    ``recipe`` whose absorbed steps nothing else reads."""
    fusions: dict[str, Fusion] = {}
    for sid in recipe.steps:
        for pattern in PATTERNS:
            match = pattern(recipe, sid)
            if match is None:
                continue
            inside = {sid, *match.absorbed}
            if all(set(recipe.graph.successors(step)) <= inside for step in match.absorbed):
                fusions[sid] = Fusion(match.ports, match.make(nodes))
                break
    return fusions
