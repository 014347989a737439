"""``block``: exact attention over the pairs its detectors selected, united without overlap.

Where every selection and exclusion has a block form (sinks, windows, top-k/top-p and power
tables), the step builds one :class:`~attncompose.primitives.plan.BlockPlan` (the union of
its selections minus its exclusions) and runs it in ONE pass of the ``plan`` kernel: one
online softmax over all the key blocks a query block selects. Static plans (sinks, windows,
static tables) are built once per (length, offsets, device) and reused. Other selections
(sortLSH, whose tiles live in sorted order) run the tile kernel, one pass per selection
with the earlier ones excluded, merged by lse. A problem of one query per row (a decode
step) run by a PyTorch implementation builds no plan: its kept keys are gathered and
attended in one call (:mod:`.one_query`).
"""

from __future__ import annotations

from dataclasses import replace

from attncompose.primitives import dispatch
from attncompose.primitives.base import (
    Coverage,
    Partial,
    Primitive,
    Problem,
    Tiles,
    UnionCoverage,
    add_products,
    counting_products,
)
from attncompose.primitives.block.kernels import (
    FlexBlockSparse,
    FlexContiguousTiles,
    FusedCpuBlockSparse,
    FusedCpuTiles,
    TorchBlockSparse,
    TorchTiles,
    TritonBlockSparse,
    TritonContiguousTiles,
    TritonTileAttention,
)
from attncompose.primitives.block.schema import BlockStep
from attncompose.primitives.coverages import DifferenceCoverage
from attncompose.primitives.plan import BlockGrid, BlockPlan, plan_block_size, static_plan


def without_keys(problem: Problem, tiles: Tiles, coverages: list[Coverage]) -> Tiles:
    """``tiles`` with the keys of key-only ``coverages`` (sinks) dropped by a -inf key bias
    (each a lookup of its :meth:`~attncompose.primitives.base.Coverage.key_exclusion`)."""
    bias = tiles.key_bias
    for coverage in coverages:
        drop = coverage.key_exclusion(problem)[tiles.k_idx]  # [N, T, nk] float32
        bias = drop if bias is None else bias + drop
    return tiles if bias is tiles.key_bias else replace(tiles, key_bias=bias)


class Block(Primitive):
    schema = BlockStep
    kernels = (  # kernel ops "plan" (a block plan in one pass) and "block" (a tile pass)
        TritonBlockSparse,
        FlexBlockSparse,
        FusedCpuBlockSparse,
        TorchBlockSparse,
        TritonContiguousTiles,
        TritonTileAttention,
        FlexContiguousTiles,
        FusedCpuTiles,
        TorchTiles,
    )
    offset_free = True
    # tiles come from the selections (packable ones keep to their parts); a block plan
    # spans the whole row: a step that runs one is not packable (set by connect())
    packable = True
    reads_rows = True  # selections' indices; its kernels through dispatch.call
    reads_groups = True  # likewise (the kernels that do not take groups get them expanded)

    def pack_quantum(self) -> int:
        return self.knobs["block_size"]

    def __call__(self, problem: Problem, select: list, exclude: list = ()) -> Partial:
        prior: list[Coverage] = [p.coverage for p in exclude]
        mine = self._bound(select)
        if all(cov.has_block_form for cov in (*mine, *prior)):
            if problem.packed is not None:
                raise ValueError("a block plan cannot run a packed problem (parts unknown)")
            impl = dispatch.choose("plan", self.backend, problem) if problem.lq == 1 else None
            if getattr(impl, "one_query", None) is not None:  # a decode step: no plan built
                result = impl.one_query(problem.for_reader(impl), mine, prior)
            else:
                plan = self.plan(problem, mine, prior)
                if counting_products():  # the plan counts its products, whatever kernel runs it
                    add_products(plan.products(problem))
                result = dispatch.call("plan", self.backend, problem, plan=plan)
        else:
            result = self._tiles(problem, mine, prior)
        result.coverage = _attended(mine, prior)  # the selections bound once (LSH's: work)
        return result

    def coverage(self, problem: Problem, select: list, exclude: list = ()) -> Coverage:
        """The pairs the step attends, without attending them (what a step that excludes it
        skips; the pipeline asks only this of a step read by exclude ports alone)."""
        return _attended(self._bound(select), [p.coverage for p in exclude])

    def _bound(self, select: list) -> list[Coverage]:
        return [selection.bind(self.knobs["block_size"]) for selection in select]

    def plan(self, problem: Problem, mine: list[Coverage], prior: list[Coverage]) -> BlockPlan:
        """The block plan of this step on ``problem`` (static ones from the process cache)."""
        size = plan_block_size(problem, [*mine, *prior], self.knobs["block_size"])
        make = lambda: BlockPlan.build(problem, mine, prior, size, size)
        keys = [cov.static_key() for cov in (*mine, *prior)]
        if any(key is None for key in keys):
            return make()
        grid = BlockGrid.of(problem, size, size)
        return static_plan((tuple(keys), len(mine), grid, problem.causal, problem.q.device), make)

    def _tiles(self, problem: Problem, mine: list[Coverage], prior: list[Coverage]) -> Partial:
        """One tile-kernel pass per selection, each excluding the ones before, merged. An
        exclusion that depends on the key alone (sinks) is a -inf bias on its keys."""
        parts = []
        for i, cov in enumerate(mine):
            excluded = prior + mine[:i]
            keyed = [c for c in excluded if c.key_only]
            tiles = without_keys(problem, cov.tiles(problem), keyed)
            rest = tuple(c for c in excluded if not c.key_only)
            parts.append(
                dispatch.call("block", self.backend, problem, tiles=tiles, own=cov, exclude=rest)
            )
        return parts[0] if len(parts) == 1 else dispatch.call("merge", self.backend, problem, parts)

    planned: bool | None = None  # set by connect(): do all inputs have block forms?

    def connect(self, inputs: dict[str, list[Primitive]]) -> None:
        for node in inputs["select"]:
            node.bound_at(self.knobs["block_size"])
        selected = [type(node).block_form for node in inputs["select"]]
        excluded = [node.planned for node in inputs["exclude"]]
        self.planned = all(selected) and all(excluded)
        self.packable = not self.planned

    def kernel_name(self) -> str:
        if self.planned:
            return "block plan, one pass: " + dispatch.describe("plan", self.backend)
        return dispatch.describe("block", self.backend)


def _attended(mine: list[Coverage], prior: list[Coverage]) -> Coverage:
    """A block step's pairs: its bound selections' union, less its exclusions' pairs."""
    union = mine[0] if len(mine) == 1 else UnionCoverage(mine)
    return DifferenceCoverage(union, prior) if prior else union
