"""Recipe graph -> executable pipeline of primitive runtimes.

The pipeline evaluates steps in dependency order on a :class:`Problem`. A lazy port (the
causal splitter's body) receives a function that evaluates the body's sub-graph on a
sub-problem, so the splitter can run it on each off-diagonal rectangle. Patterns of steps
that run better together (:mod:`attncompose.primitives.fusion`) are evaluated as one; pass
``fuse=False`` to evaluate every step on its own (the reference the fusions are tested
against).
"""

from __future__ import annotations

import math
from typing import Any

import networkx as nx

from attncompose.primitives import PRIMITIVES
from attncompose.primitives.base import Covered, Partial, Primitive, Problem
from attncompose.primitives.dispatch import BACKENDS
from attncompose.primitives.fusion import Fusion, find_fusions
from attncompose.spec.errors import RecipeError


class Pipeline:
    """The compiled steps of one recipe."""

    def __init__(self, recipe, backend: str = "torch", fuse: bool = True):
        if backend not in BACKENDS:
            raise RecipeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.recipe = recipe
        self.backend = backend
        self.graph = recipe.graph
        self.output = recipe.output_id
        self.nodes: dict[str, Primitive] = {}
        for sid, step in recipe.steps.items():
            if step.op not in PRIMITIVES:
                raise RecipeError(f"no runtime registered for op {step.op!r}", loc=f"steps.{sid}")
            self.nodes[sid] = PRIMITIVES[step.op](step, backend=backend)
        for sid, step in recipe.steps.items():
            self.nodes[sid].connect(
                {port: [self.nodes[n] for n in step.port_names(port)] for port in type(step).ports}
            )
        self.fusions: dict[str, Fusion] = find_fusions(recipe, self.nodes) if fuse else {}
        # steps that only exclude ports read (their pairs, not their attention): asked for
        # their coverage alone, so that nothing is computed or counted for them
        used_as: dict[str, set[bool]] = {}
        for step in recipe.steps.values():
            for port, spec in type(step).ports.items():
                for name in step.port_names(port):
                    used_as.setdefault(name, set()).add(bool(spec.needs_coverage))
        self.coverage_only = {
            sid
            for sid, uses in used_as.items()
            if uses == {True} and sid not in self.fusions and hasattr(self.nodes[sid], "coverage")
        }
        # per step: does every step its value depends on have Primitive.offset_free? And
        # the length a packed problem's parts must be a multiple of (None: not packable)
        self.offset_free: dict[str, bool] = {}
        self.pack_quantum: dict[str, int | None] = {}
        for sid in self.nodes:
            steps = [self.nodes[s] for s in nx.ancestors(self.graph, sid) | {sid}]
            self.offset_free[sid] = all(type(node).offset_free for node in steps)
            packable = all(node.packable for node in steps)
            self.pack_quantum[sid] = (
                math.lcm(*(node.pack_quantum() for node in steps)) if packable else None
            )

    def kernels(self) -> dict[str, str]:
        """Step id -> name of the implementation that runs it."""
        names = {sid: node.kernel_name() for sid, node in self.nodes.items()}
        for sid, fusion in self.fusions.items():
            names[sid] = fusion.kernel_name()  # the absorbed steps run alone where it cannot
        for sid in self.coverage_only:
            names[sid] = "none: read only by exclude ports (its pairs, not attended)"
        return names

    def __call__(self, problem: Problem) -> Partial:
        return self.evaluate(self.output, problem, {})

    def evaluate(self, sid: str, problem: Problem, cache: dict[str, Any]) -> Any:
        """Value of step ``sid`` on ``problem`` (memoised in ``cache`` for this problem)."""
        if sid in cache:
            return cache[sid]
        fusion = self.fusions.get(sid)
        if fusion is not None:
            ports = {
                p: [self.evaluate(n, problem, cache) for n in ns] for p, ns in fusion.ports.items()
            }
            cache[sid] = value = fusion.run(problem.for_reader(fusion.run), **ports)
            return value
        step = self.recipe.steps[sid]
        ports: dict[str, Any] = {}
        for port, spec in type(step).ports.items():
            names = step.port_names(port)
            if spec.lazy:
                ports[port] = self._lazy(names[0])
            elif names:
                ports[port] = [self.evaluate(name, problem, cache) for name in names]
        node = self.nodes[sid]
        if sid in self.coverage_only:
            value = Covered(node.coverage(problem, **ports))
        else:
            value = node(problem.for_reader(node), **ports)
        cache[sid] = value
        return value

    def _lazy(self, sid: str):
        """``Problem -> value`` of step ``sid``; its ``offset_free`` says whether every step it
        depends on is (:attr:`Primitive.offset_free`), its ``pack_quantum`` what the parts of
        a packed problem must be a multiple of (None: some step is not
        :attr:`Primitive.packable`)."""
        fn = lambda sub: self.evaluate(sid, sub, {})
        fn.offset_free = self.offset_free[sid]
        fn.pack_quantum = self.pack_quantum[sid]
        return fn
