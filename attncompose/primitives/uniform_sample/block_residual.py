"""A detector's block step and the residual sampler that excludes it, in one tile pass.

The recipe pattern ``merge(block(select: [detector, ...]), uniform_sample(exclude: [block]))``
is HyperAttention's non-causal core (:func:`block_residual` finds it, a fusion pattern of
:mod:`attncompose.primitives.fusion`). Where the sampler's draws follow the detector's tiles
(:func:`~attncompose.primitives.uniform_sample.naive.draws_follow`), each tile's sampled keys
are appended to its detector keys with a key bias: 0 for detector keys, the sampler's
log(R/m) reweighting for sampled keys, ``-inf`` for sampled keys the block covered. One
softmax over the tile then equals the lse merge of the two steps: same draws, same pairs,
same products, one kernel call instead of two plus a merge. Selections beside the detector
whose keys are the same for every query (sinks: key-only coverages) join each tile as keys
of their own, their keys dropped from the detector's by a ``-inf`` bias (the block step
excludes them so too), so HyperAttention with sinks is one pass as well. Elsewhere (causal
problems, narrow or inexact tiles, two detectors) the steps run one after the other.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from attncompose.primitives import dispatch
from attncompose.primitives.base import (
    Partial,
    Primitive,
    Problem,
    Selection,
    Tiles,
    UnionCoverage,
)
from attncompose.primitives.block import without_keys
from attncompose.primitives.block.schema import BlockStep
from attncompose.primitives.fusion import Match
from attncompose.primitives.merge.schema import MergeStep
from attncompose.primitives.uniform_sample.naive import draws_in, query_groups
from attncompose.primitives.uniform_sample.schema import UniformSampleStep


def block_residual(recipe, sid: str) -> Match | None:
    """``merge(inputs: [B, S])`` at ``sid``, where ``B`` is a block step with no exclusions
    and ``S`` a uniform_sample excluding exactly ``B``: one :class:`BlockWithResidual` that
    reads ``B``'s selections (whether they fuse is known per call: one detector, the rest
    key-only)."""
    step = recipe.steps[sid]
    if not isinstance(step, MergeStep) or len(step.inputs) != 2:
        return None
    by_type = {type(recipe.steps[name]): name for name in step.inputs}
    block, sample = by_type.get(BlockStep), by_type.get(UniformSampleStep)
    if block is None or sample is None:
        return None
    b, s = recipe.steps[block], recipe.steps[sample]
    if b.exclude or list(s.exclude) != [block]:
        return None
    make = lambda nodes: BlockWithResidual(nodes[block], nodes[sample])
    return Match((block, sample), {"select": list(b.select)}, make)


class BlockWithResidual:
    """Runs a merge step whose inputs are a one-detector block step and its sampler."""

    reads_rows = True  # indices; its tile pass through dispatch.call
    reads_groups = True  # likewise

    def __init__(self, block: Primitive, sample: Primitive):
        self.block = block
        self.sample = sample

    def __call__(self, problem: Problem, select: list[Selection]) -> Partial:
        m = self.sample.knobs["sample_size"]
        mine = [selection.bind(self.block.knobs["block_size"]) for selection in select]
        cov = mine[0] if len(mine) == 1 else UnionCoverage(mine)
        tiles = query_groups(problem, [cov]) if m else None  # the detector's, if draws follow
        if tiles is None:  # the steps one by one (each gathers rows where it must)
            diag = self.block(problem, select=select)
            parts = [diag, self.sample(problem, exclude=[diag])]
            return dispatch.call("merge", self.block.backend, problem, parts)
        keyed = [c for c in mine if c.key_only]
        n, n_tiles, bq = tiles.q_idx.shape
        drawn = draws_in(problem, m, self.sample.knobs["seed"], tiles, cov)
        covered = cov.tile_covers(problem, tiles, drawn.k_idx)  # a tile's queries cover alike
        weight = drawn.lse_shift.unsqueeze(-1).expand(covered.shape)
        weight = weight.masked_fill(covered, float("-inf"))  # -1 (no draw) pads: no key
        parts = [without_keys(problem, tiles, keyed)]  # the detector's keys, less the sinks'
        for i, band in enumerate(keyed):  # each key-only band's keys, per tile of bq queries
            own = replace(band, tile=bq).tiles(problem)
            parts.append(without_keys(problem, own, keyed[:i]))
        keys = [part.k_idx.expand(n, n_tiles, -1) for part in parts]
        if all(part.key_bias is None for part in parts):  # 0 on every detector key
            bias = torch.nn.functional.pad(weight, (sum(key.shape[-1] for key in keys), 0))
        else:
            biases = [_bias(problem, part, key) for part, key in zip(parts, keys, strict=True)]
            bias = torch.cat([*biases, weight], -1)
        joint = Tiles(
            tiles.q_idx,
            torch.cat([*keys, drawn.k_idx.expand(n, n_tiles, -1)], dim=-1),
            key_bias=bias,
            exact=True,
            every_query=tiles.every_query,
        )
        return dispatch.call("block", self.block.backend, problem, tiles=joint)

    def kernel_name(self) -> str:
        return "one tile pass of block + residual: " + dispatch.describe(
            "block", self.block.backend
        )


def _bias(problem: Problem, tiles: Tiles, k_idx: Tensor) -> Tensor:
    """The key bias [N, T, nk] of ``tiles``, as their keys ``k_idx``: without one, a kept
    float32 zero expanded (nothing made per call)."""
    if tiles.key_bias is None:
        zero = problem.memo("zero", (), lambda: torch.zeros((), device=problem.q.device))
        return zero.expand(k_idx.shape)
    return tiles.key_bias.expand(k_idx.shape)
