"""``uniform_sample``: unbiased estimate of the attention mass not covered by detectors."""

from __future__ import annotations

from attncompose.primitives.base import Partial, Primitive, Problem, register
from attncompose.primitives.block.naive import block_attention
from attncompose.primitives.uniform_sample.naive import draw_uniforms, sample_tiles


@register
class UniformSample(Primitive):
    op = "uniform_sample"

    def __call__(self, problem: Problem, exclude: list = ()) -> Partial:
        m = self.knobs["sample_size"]
        if m == 0:
            return Partial.empty(problem)
        tiles = sample_tiles(problem, draw_uniforms(problem, m, self.knobs["seed"]))
        covered = tuple(p.coverage for p in exclude)
        return block_attention(problem, tiles, exclude=covered)
