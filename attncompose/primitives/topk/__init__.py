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
    register,
    take,
)
from attncompose.primitives.topk.naive import select_blocks
from attncompose.runtime import dispatch


@dataclass
class TopkCoverage(Selection, Coverage):
    table: Tensor  # [N, nQB, nKB] bool: key block j selected for query block i
    size: int

    def bind(self, block_size: int) -> TopkCoverage:
        return self  # its own block size defines the geometry

    @property
    def row_invariant(self) -> bool:
        return self.table.shape[0] == 1 or self.table.stride(0) == 0  # a static table (power)

    def covers(self, problem: Problem, qi: Tensor, kj: Tensor) -> Tensor:
        nkb = self.table.shape[-1]
        flat = self.table.flatten(1)
        qb, kb = qi.clamp_min(0) // self.size, kj.clamp_min(0) // self.size
        shape = torch.broadcast_shapes(qb.shape, kb.shape)
        return take(flat, (qb * nkb + kb).expand(shape))

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


@register
class Topk(Primitive):
    op = "topk"
    offset_free = True

    def __call__(self, problem: Problem) -> TopkCoverage:
        size = self.knobs["block_size"]
        est = dispatch.call("topk_scores", self.backend, problem, size)
        table = select_blocks(est, self.knobs["k"], self.knobs.get("p"), self.knobs["max_k"])
        return TopkCoverage(table, size)

    def kernel_name(self) -> str:
        return dispatch.describe("topk_scores", self.backend) + " + torch top-k"
