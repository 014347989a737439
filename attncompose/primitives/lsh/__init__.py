"""``lsh``: sortLSH detector (HyperAttention).

Queries and keys are sorted by the Gray rank of their hash codes (one seeded set of
directions per query head). Bound to a block size b, the key sort is cut into
blocks of b, and the query at sorted slot p is paired with key block ``floor(p * Lk/Lq / b)``
(for Lq = Lk: sorted query block i with sorted key block i, as in the paper).
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
    register,
    take,
)
from attncompose.primitives.lsh.naive import projections
from attncompose.runtime import dispatch


@dataclass
class LshSelection(Selection):
    q_order: Tensor  # [N, Lq] query indices in sorted order
    q_pos: Tensor  # [N, Lq] sorted slot of each query
    k_order: Tensor  # [N, Lk]
    k_pos: Tensor  # [N, Lk]

    def bind(self, block_size: int) -> LshCoverage:
        return LshCoverage(self, block_size)


@dataclass
class LshCoverage(Coverage):
    sel: LshSelection
    b: int

    def _block(self, problem: Problem) -> int:
        return min(self.b, problem.lk)  # one block holds every key once b >= Lk

    def _q_bucket(self, problem: Problem, pos: Tensor) -> Tensor:
        b = self._block(problem)
        n_blocks = -(-problem.lk // b)
        return (pos * problem.lk // (problem.lq * b)).clamp_max(n_blocks - 1)

    def covers(self, problem: Problem, qi: Tensor, kj: Tensor) -> Tensor:
        qb = self._q_bucket(problem, take(self.sel.q_pos, qi))
        kb = take(self.sel.k_pos, kj) // self._block(problem)
        return qb == kb

    def tiles(self, problem: Problem) -> Tiles:
        lq, lk, b = problem.lq, problem.lk, self._block(problem)
        bq = max(1, min(b, lq, b * lq // lk))  # a tile's queries span at most two key blocks
        n_tiles = -(-lq // bq)
        slots = torch.arange(n_tiles * bq, device=problem.q.device).view(n_tiles, bq)
        first = self._q_bucket(problem, slots[:, 0])  # [T]
        last = self._q_bucket(problem, slots[:, -1].clamp_max(lq - 1))
        span = int((last - first).max()) + 1
        k_slots = first[:, None] * b + torch.arange(span * b, device=slots.device)  # [T, nk]
        n = self.sel.q_order.shape[0]
        q_idx = self._lookup(self.sel.q_order, slots, lq, n)
        k_idx = self._lookup(self.sel.k_order, k_slots, lk, n)
        exact = lq == lk and lq % b == 0  # sorted query block t is paired with key block t
        return Tiles(q_idx, k_idx, exact=exact)

    @staticmethod
    def _lookup(order: Tensor, slots: Tensor, length: int, n: int) -> Tensor:
        idx = take(order, slots.clamp_max(length - 1).unsqueeze(0).expand(n, -1, -1))
        return idx.masked_fill(slots >= length, -1)


@register
class Lsh(Primitive):
    op = "lsh"

    def __call__(self, problem: Problem) -> LshSelection:
        dirs = self.directions(problem)
        sort_positions = dispatch.choose("lsh_sort", self.backend, problem).load()
        q_order, q_pos = sort_positions(problem.q, dirs)
        k_order, k_pos = sort_positions(problem.k, dirs)
        return LshSelection(q_order, q_pos, k_order, k_pos)

    def directions(self, problem: Problem) -> Tensor:
        """Hash directions per row [N, D, r]: one seeded set per query head.

        Keys are hashed once per query head (on the expanded keys), so grouped-query
        attention equals attention with K/V repeated to every query head.
        """
        dirs = projections(
            problem.heads, problem.q.shape[-1], self.knobs["num_projections"], self.knobs["seed"]
        ).to(problem.q.device)
        return dirs.repeat(problem.q.shape[0] // problem.heads, 1, 1)

    def kernel_name(self) -> str:
        return dispatch.describe("lsh_sort", self.backend)
