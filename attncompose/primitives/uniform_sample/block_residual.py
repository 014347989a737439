"""A detector's block step and the residual sampler that excludes it, in one tile pass.

The recipe pattern ``merge(block(select: [detector]), uniform_sample(exclude: [block]))`` is
HyperAttention's non-causal core (:func:`block_residual` finds it, a fusion pattern of
:mod:`attncompose.primitives.fusion`). Where the sampler's draws follow the detector's tiles
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
from attncompose.primitives.block.schema import BlockStep
from attncompose.primitives.fusion import Match
from attncompose.primitives.merge.naive import merge_partials
from attncompose.primitives.merge.schema import MergeStep
from attncompose.primitives.uniform_sample.naive import draws_follow, draws_in
from attncompose.primitives.uniform_sample.schema import UniformSampleStep


def block_residual(recipe, sid: str) -> Match | None:
    """``merge(inputs: [B, S])`` at ``sid``, where ``B`` is a block step with one detector and
    no exclusions and ``S`` a uniform_sample excluding exactly ``B``: one
    :class:`BlockWithResidual` that reads ``B``'s detector."""
    step = recipe.steps[sid]
    if not isinstance(step, MergeStep) or len(step.inputs) != 2:
        return None
    by_type = {type(recipe.steps[name]): name for name in step.inputs}
    block, sample = by_type.get(BlockStep), by_type.get(UniformSampleStep)
    if block is None or sample is None:
        return None
    b, s = recipe.steps[block], recipe.steps[sample]
    if len(b.select) != 1 or b.exclude or list(s.exclude) != [block]:
        return None
    make = lambda nodes: BlockWithResidual(nodes[block], nodes[sample])
    return Match((block, sample), {"select": list(b.select)}, make)


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
