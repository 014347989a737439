"""Reference residual sampler: stratified uniform keys per query tile, unbiased weights.

For a tile of queries whose visible keys are ``[0, R)``, draw one key uniformly in each of m
equal strata of ``[0, R)``: ``j_u = floor((u + U_u) * R / m)``. Every key is drawn with
probability m/R, so weighting each draw by R/m (an lse shift of log(R/m)) makes the sampled
mass an unbiased estimate of the mass of the keys it may count (visible, not covered). With
m >= R every key is taken once with weight 1: the residual is then exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncompose.primitives.base import Problem, Tiles, natural_tiles

TILE = 128  # queries sharing one draw


def draw_uniforms(problem: Problem, m: int, seed: int) -> Tensor:
    """The sampler's randomness: U [N, T, m] in [0, 1), seeded by seed and the ranges."""
    n_tiles = -(-problem.lq // TILE)
    g = problem.generator(seed, "uniform_sample")
    return torch.rand(problem.q.shape[0], n_tiles, m, generator=g, device=problem.q.device)


def sample_tiles(problem: Problem, uniforms: Tensor) -> Tiles:
    """Tiles of natural query order with m stratified key draws each and their lse shifts."""
    n, n_tiles, m = uniforms.shape
    dev = uniforms.device
    q_idx = natural_tiles(n, problem.lq, TILE, dev)
    last = (torch.arange(n_tiles, device=dev) * TILE + TILE - 1).clamp_max(problem.lq - 1)
    reach = problem.visible_keys(last).view(1, n_tiles, 1)  # R per tile
    width = min(m, problem.lk)  # more draws than keys: every key once
    u = torch.arange(width, device=dev).view(1, 1, width)
    strata = torch.floor((u + uniforms[..., :width]) * reach / m).long()
    everything = torch.where(u < reach, u, -1)  # m >= R: all keys, once
    k_idx = torch.where(reach > m, strata, everything)
    k_idx = k_idx.masked_fill(reach == 0, -1)
    ratio = (reach.float() / m).clamp_min(1.0).squeeze(-1)  # R/m, or 1 when all are taken
    shift = torch.log(ratio).expand(n, n_tiles)
    return Tiles(q_idx, k_idx, lse_shift=shift)
