"""Step patterns the runtime evaluates together (fewer kernel passes, same result).

A fusion replaces how one step's value is computed: it reads other steps' values (its own
ports) instead of the step's inputs, and the steps it absorbs are then never evaluated on
their own. A pattern applies only when nothing else reads the absorbed steps.

Patterns:

- ``block_residual``: ``merge(inputs: [B, S])`` where ``B`` is a ``block`` step with one
  detector and no exclusions and ``S`` a ``uniform_sample`` excluding exactly ``B``
  (HyperAttention's core) -> :class:`BlockWithResidual`, reading ``B``'s detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx

from attncompose.primitives.base import Primitive
from attncompose.primitives.uniform_sample.block_residual import BlockWithResidual


@dataclass(frozen=True)
class Fusion:
    """How to compute one step: ``run(problem, **ports)`` with ports naming step ids."""

    ports: dict[str, list[str]]
    run: Any

    def kernel_name(self) -> str:
        return self.run.kernel_name()


def find_fusions(recipe, graph: nx.DiGraph, nodes: dict[str, Primitive]) -> dict[str, Fusion]:
    """Step id -> the fusion that computes it, for every pattern found in ``recipe``."""
    fusions: dict[str, Fusion] = {}
    for sid, step in recipe.steps.items():
        if step.op != "merge" or len(step.inputs) != 2:
            continue
        by_op = {recipe.steps[name].op: name for name in step.inputs}
        block, sample = by_op.get("block"), by_op.get("uniform_sample")
        if block is None or sample is None:
            continue
        b, s = recipe.steps[block], recipe.steps[sample]
        if len(b.select) != 1 or b.exclude or list(s.exclude) != [block]:
            continue
        if set(graph.successors(block)) != {sid, sample} or list(graph.successors(sample)) != [sid]:
            continue  # another step reads the block or the sample on its own
        run = BlockWithResidual(nodes[block], nodes[sample])
        fusions[sid] = Fusion({"select": list(b.select)}, run)
    return fusions
