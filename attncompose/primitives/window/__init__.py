"""``window``: exact attention to the ``width`` keys ending at each query's position.

Query at absolute position p covers keys at positions (p - width, p]; with a bottom-right
causal mask that is a sliding window of ``width`` keys including the query's own position.
``width = 0`` selects nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attncompose.primitives.base import (
    Coverage,
    Primitive,
    Problem,
    Selection,
    Tiles,
    natural_tiles,
)
from attncompose.primitives.plan import BlockGrid, interval_states
from attncompose.primitives.window.schema import WindowStep


@dataclass
class WindowCoverage(Selection, Coverage):
    width: int
    tile: int = 128

    row_invariant = True  # positions only

    def bind(self, block_size: int) -> WindowCoverage:
        return WindowCoverage(self.width, tile=block_size)

    def covers(self, problem: Problem, qi: Tensor, kj: Tensor) -> Tensor:
        q_pos, k_pos = qi + problem.q_offset, kj + problem.k_offset
        return (k_pos <= q_pos) & (k_pos > q_pos - self.width)

    has_block_form = True

    def block_states(self, problem: Problem, grid: BlockGrid) -> Tensor:
        q_first, q_last = (x[:, None] for x in grid.q_span(problem.q.device))  # [nQB, 1]
        k_first, k_last = (x[None, :] for x in grid.k_span(problem.q.device))  # [1, nKB]
        w = self.width
        full = (k_last <= q_first) & (k_first > q_last - w)  # every pair inside the band
        some = (k_first <= q_last) & (k_last > q_first - w) & (w > 0)
        return interval_states(full & (w > 0), some)[None]

    def static_key(self) -> tuple:
        return ("window", self.width)

    def tiles(self, problem: Problem) -> Tiles:
        n, dev = problem.q.shape[0], problem.q.device
        bq = min(self.tile, problem.lq)
        q_idx = natural_tiles(n, problem.lq, bq, dev)
        if self.width == 0:
            return Tiles(q_idx, q_idx.new_empty(*q_idx.shape[:2], 0))
        first_q = torch.arange(q_idx.shape[1], device=dev) * bq  # [T]
        start = first_q + problem.q_offset - problem.k_offset - self.width + 1  # local key idx
        k_idx = start[:, None] + torch.arange(bq + self.width - 1, device=dev)  # [T, nk]
        k_idx = k_idx.masked_fill((k_idx < 0) | (k_idx >= problem.lk), -1)
        return Tiles(q_idx, k_idx.expand(n, -1, -1), k_start=start)


class Window(Primitive):
    schema = WindowStep
    block_form = True

    def __call__(self, problem: Problem) -> WindowCoverage:
        # wider than the last query's distance to the first key: the same keys as that width
        # (tiles hold width + tile keys: the knob must not size memory beyond the sequence)
        reach = max(0, problem.q_offset + problem.lq - problem.k_offset)
        return WindowCoverage(min(self.knobs["width"], reach))

    def kernel_name(self) -> str:
        return "positions only (no kernel)"
