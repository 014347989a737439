"""``block``: exact attention over the pairs its detectors selected, united without overlap."""

from __future__ import annotations

from attncompose.primitives.base import (
    Coverage,
    Partial,
    Primitive,
    Problem,
    UnionCoverage,
    register,
)
from attncompose.primitives.merge.naive import merge_partials
from attncompose.runtime import dispatch


@register
class Block(Primitive):
    op = "block"
    offset_free = True

    def __call__(self, problem: Problem, select: list, exclude: list = ()) -> Partial:
        prior: list[Coverage] = [p.coverage for p in exclude]
        parts, mine = [], []
        for selection in select:
            cov = selection.bind(self.knobs["block_size"])
            tiles = cov.tiles(problem)
            parts.append(
                dispatch.call(
                    "block", self.backend, problem, tiles, own=cov, exclude=tuple(prior + mine)
                )
            )
            mine.append(cov)
        result = parts[0] if len(parts) == 1 else merge_partials(parts)
        result.coverage = mine[0] if len(mine) == 1 else UnionCoverage(mine)
        return result

    def kernel_name(self) -> str:
        return dispatch.describe("block", self.backend)
