"""``sink``: exact attention to the first ``count`` keys (attention sinks, StreamingLLM).

Positions are absolute, so inside a causal splitter only rectangles that hold the first keys
see them. ``count = 0`` selects nothing.
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
from attncompose.primitives.sink.schema import SinkStep


@dataclass
class SinkCoverage(Selection, Coverage):
    count: int
    tile: int = 128

    row_invariant = True  # positions only

    def bind(self, block_size: int) -> SinkCoverage:
        return SinkCoverage(self.count, tile=block_size)

    def covers(self, problem: Problem, qi: Tensor, kj: Tensor) -> Tensor:
        return (kj + problem.k_offset < self.count) & (kj >= 0)

    has_block_form = True
    key_only = True

    def block_states(self, problem: Problem, grid: BlockGrid) -> Tensor:
        k_first, k_last = grid.k_span(problem.q.device)  # [nKB]
        states = interval_states(k_last < self.count, k_first < self.count)
        return states.expand(1, grid.nqb, -1)

    def static_key(self) -> tuple:
        return ("sink", self.count)

    def tiles(self, problem: Problem) -> Tiles:
        n, dev = problem.q.shape[0], problem.q.device
        width = max(0, min(problem.lk, self.count - problem.k_offset))
        q_idx = natural_tiles(n, problem.lq, min(self.tile, problem.lq), dev)
        k_idx = torch.arange(width, device=dev).expand(n, q_idx.shape[1], width)
        start = torch.zeros(q_idx.shape[1], dtype=torch.long, device=dev)
        return Tiles(q_idx, k_idx, exact=True, k_start=start)


class Sink(Primitive):
    schema = SinkStep
    block_form = True

    def __call__(self, problem: Problem) -> SinkCoverage:
        # more sinks than keys: every key (the knob never sizes memory beyond the sequence)
        return SinkCoverage(min(self.knobs["count"], problem.k_offset + problem.lk))

    def kernel_name(self) -> str:
        return "positions only (no kernel)"
