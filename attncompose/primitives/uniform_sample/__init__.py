"""``uniform_sample``: unbiased estimate of the attention mass not covered by detectors."""

from __future__ import annotations

from attncompose.primitives import dispatch
from attncompose.primitives.base import Partial, Primitive, Problem
from attncompose.primitives.uniform_sample.block_residual import block_residual
from attncompose.primitives.uniform_sample.naive import TILE, residual_tiles
from attncompose.primitives.uniform_sample.schema import UniformSampleStep


class UniformSample(Primitive):
    schema = UniformSampleStep
    fusions = (block_residual,)
    offset_free = True
    packable = True  # each tile draws from its own part's keys
    reads_rows = True  # draws indices; its tile pass through dispatch.call
    reads_groups = True  # likewise

    def pack_quantum(self) -> int:
        return TILE  # tiles in natural order (draws that follow a detector: its tiles)

    def __call__(self, problem: Problem, exclude: list = ()) -> Partial:
        m = self.knobs["sample_size"]
        if m == 0:
            return Partial.empty(problem)
        covered = tuple(p.coverage for p in exclude)
        tiles = residual_tiles(problem, m, self.knobs["seed"], covered)
        return dispatch.call("block", self.backend, problem, tiles=tiles, exclude=covered)

    def kernel_name(self) -> str:
        return "torch:stratified-draws + " + dispatch.describe("block", self.backend)
