"""A detector's block step and the residual sampler that excludes it, in one tile pass.

The recipe pattern ``merge(block(select: [detector]), uniform_sample(exclude: [block]))`` is
HyperAttention's non-causal core. Where the sampler's draws follow the detector's tiles
(:func:`~attncompose.primitives.uniform_sample.naive.draws_follow`), each tile's sampled keys
are appended to its detector keys with a key bias: 0 for detector keys, the sampler's
log(R/m) reweighting for sampled keys, ``-inf`` for sampled keys the detector covered. One
softmax over the tile then equals the lse merge of the two steps: same draws, same pairs,
same products, one kernel call instead of two plus a merge. Elsewhere (causal problems,
narrow or inexact tiles) the steps run one after the other.
"""

from __future__ import annotations

import torch

from attncompose.primitives import dispatch
from attncompose.primitives.base import Partial, Primitive, Problem, Selection, Tiles
from attncompose.primitives.merge.naive import merge_partials
from attncompose.primitives.uniform_sample.naive import draws_follow, draws_in


class BlockWithResidual:
    """Runs a merge step whose inputs are a one-detector block step and its sampler."""

    def __init__(self, block: Primitive, sample: Primitive):
        self.block = block
        self.sample = sample

    def __call__(self, problem: Problem, select: list[Selection]) -> Partial:
        m = self.sample.knobs["sample_size"]
        cov = select[0].bind(self.block.knobs["block_size"])
        tiles = cov.tiles(problem)
        if m == 0 or not draws_follow(problem, tiles):
            diag = self.block(problem, select=select)
            return merge_partials([diag, self.sample(problem, exclude=[diag])])
        n, n_tiles = tiles.q_idx.shape[0], tiles.q_idx.shape[1]
        drawn = draws_in(problem, m, self.sample.knobs["seed"], tiles, cov)
        first_q = tiles.q_idx[..., :1, None]  # [N, T, 1, 1]: the tile's queries cover alike
        covered = cov.covers(problem, first_q, drawn.k_idx.unsqueeze(-2)).squeeze(-2)
        weight = drawn.lse_shift.unsqueeze(-1).expand(covered.shape)
        weight = weight.masked_fill(covered | (drawn.k_idx < 0), float("-inf"))
        own_k = tiles.k_idx.expand(n, n_tiles, -1)
        joint = Tiles(
            tiles.q_idx,
            torch.cat([own_k, drawn.k_idx.expand(n, n_tiles, -1)], dim=-1),
            key_bias=torch.cat([own_k.new_zeros(own_k.shape, dtype=weight.dtype), weight], -1),
            exact=True,
        )
        return dispatch.call("block", self.block.backend, problem, tiles=joint)

    def kernel_name(self) -> str:
        return "one tile pass of block + residual: " + dispatch.describe(
            "block", self.block.backend
        )
