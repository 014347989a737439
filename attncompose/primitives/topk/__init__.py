"""``topk``: block-level heavy-hitter detector (by count k or coverage p)."""

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
    take,
)
from attncompose.primitives.plan import FULL, BlockGrid, table_fits
from attncompose.primitives.topk.naive import select_blocks
from attncompose.primitives.topk.schema import TopkStep
from attncompose.runtime import dispatch


@dataclass
class TopkCoverage(Selection, Coverage):
    table: Tensor  # [N, nQB, nKB] bool: key block j selected for query block i
    size: int
    key: tuple | None = None  # set by static tables (power): knobs that define the table

    def bind(self, block_size: int) -> TopkCoverage:
        return self  # its own block size defines the geometry

    @property
    def row_invariant(self) -> bool:
        return self.table.shape[0] == 1 or self.table.stride(0) == 0  # a static table (power)

    def _rows(self, rows: int) -> Tensor:
        """The table for index tensors of ``rows`` rows (1: shared by every row)."""
        return self.table[:1] if rows == 1 and self.row_invariant else self.table

    def covers(self, problem: Problem, qi: Tensor, kj: Tensor) -> Tensor:
        table = self._rows(max(qi.shape[0], kj.shape[0]))
        nkb = table.shape[-1]
        qb, kb = qi.clamp_min(0) // self.size, kj.clamp_min(0) // self.size
        shape = torch.broadcast_shapes(qb.shape, kb.shape)
        return take(table.flatten(1), (qb * nkb + kb).expand(table.shape[0], *shape[1:]))

    has_block_form = True

    def block_states(self, problem: Problem, grid: BlockGrid) -> Tensor:
        fits = table_fits(self.size, grid.block_q, grid.nqb) and table_fits(
            self.size, grid.block_k, grid.nkb
        )
        if not fits:
            raise ValueError(f"plan blocks {grid.block_q}x{grid.block_k} must divide {self.size}")
        table = self._rows(1)
        dev = table.device
        qi = torch.arange(grid.nqb, device=dev) * grid.block_q // self.size
        kj = torch.arange(grid.nkb, device=dev) * grid.block_k // self.size
        return table[:, qi][:, :, kj].to(torch.uint8) * FULL

    def block_grid(self) -> int:
        return self.size

    def static_key(self) -> tuple | None:
        return self.key

    def tiles(self, problem: Problem) -> Tiles:
        n, _, nkb = self.table.shape
        dev = self.table.device
        # a static table (the same for every row) gives tiles expanded along rows
        table = self.table[:1] if self.row_invariant else self.table
        count = int(table.sum(-1).max()) if table.numel() else 0
        # selected block ids first (ascending), then unselected ones marked -1
        key = torch.where(table, torch.arange(nkb, device=dev), nkb + 1)
        blocks = torch.sort(key, dim=-1).values[..., : max(count, 1)]  # [N, nQB, K]
        k_idx = blocks[..., None] * self.size + torch.arange(self.size, device=dev)
        k_idx = k_idx.flatten(-2)  # [N, nQB, K*size]
        k_idx = k_idx.masked_fill(
            (blocks.repeat_interleave(self.size, -1) > nkb) | (k_idx >= problem.lk), -1
        )
        q_idx = natural_tiles(n, problem.lq, self.size, dev)
        return Tiles(q_idx, k_idx.expand(n, -1, -1), exact=True)


class Topk(Primitive):
    schema = TopkStep
    block_form = True
    offset_free = True

    def __call__(self, problem: Problem) -> TopkCoverage:
        # sizes beyond the problem act as their largest useful value (one block, every block)
        size = min(
            self.knobs["block_size"], 1 << max(0, max(problem.lq, problem.lk) - 1).bit_length()
        )
        blocks = -(-problem.lk // size)
        k, max_k = (min(self.knobs[name], blocks) for name in ("k", "max_k"))
        est = dispatch.call("topk_scores", self.backend, problem, size)
        table = select_blocks(est, k, self.knobs.get("p"), max_k)
        return TopkCoverage(table, size)

    def kernel_name(self) -> str:
        return dispatch.describe("topk_scores", self.backend) + " + torch top-k"
