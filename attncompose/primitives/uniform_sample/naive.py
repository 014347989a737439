"""Reference residual sampler: stratified uniform keys per query tile, unbiased weights.

For a tile of queries whose visible keys are ``[0, R)`` (in a packed problem: its part's),
draw one key uniformly in each of m equal strata of ``[0, R)``: ``j_u = floor((u + U_u) * R
/ m)``. Every key is drawn with probability m/R, so weighting each draw by R/m (an lse shift
of log(R/m)) makes the sampled mass an unbiased estimate of the mass of the keys it may
count (visible, not covered). With m >= R every key is taken once with weight 1: the
residual is then exact.

Which queries share a tile's draws does not matter for unbiasedness, only for cost. Tiles
are 128 queries in natural order, except for a non-causal problem whose one exclusion has
exact tiles (each tile's queries cover the same keys, as sortLSH and top-k blocks do, with
sinks beside them or not): then the draws follow those tiles, so what a tile must exclude
is one key set, not a pair mask, and the sampled keys can join the detector's keys in one
tile pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attncompose.primitives.base import Coverage, Problem, Tiles, UnionCoverage, natural_tiles

TILE = 128  # queries sharing one draw in natural order
MIN_GROUP = 64  # narrower detector tiles would multiply the keys drawn and gathered


def draws_follow(problem: Problem, tiles: Tiles) -> bool:
    """Whether the draws may follow a detector's ``tiles`` (see the module doc)."""
    return not problem.causal and tiles.exact and tiles.q_idx.shape[-1] >= MIN_GROUP


def query_groups(problem: Problem, exclude: Sequence[Coverage]) -> Tiles | None:
    """The exclusion's tiles, when the sampler's draws may follow them (see module doc): of
    its one detector, beside which a union may hold key-only coverages (sinks: the same keys
    for every query, so a detector tile's queries still cover alike)."""
    if problem.causal or len(exclude) != 1:
        return None
    parts = exclude[0].parts if isinstance(exclude[0], UnionCoverage) else list(exclude)
    detectors = [cov for cov in parts if not cov.key_only]
    if len(detectors) != 1:
        return None
    try:
        tiles = detectors[0].tiles(problem)
    except NotImplementedError:  # e.g. a union: it has no tiles of its own
        return None
    return tiles if draws_follow(problem, tiles) else None


def residual_tiles(problem: Problem, m: int, seed: int, exclude: Sequence[Coverage]) -> Tiles:
    """The sampler's tiles: m stratified draws per query tile, excluding ``exclude``."""
    groups = query_groups(problem, exclude)
    if groups is None:
        make = lambda: sample_tiles(problem, draw_uniforms(problem, m, seed))
        return kept_draws(problem, ("natural", m, seed), make)
    return draws_in(problem, m, seed, groups, exclude[0])


def draws_in(problem: Problem, m: int, seed: int, tiles: Tiles, cov: Coverage) -> Tiles:
    """m stratified draws per tile of a detector's ``tiles``, whose queries ``cov`` groups.

    The draws depend on a tile's slot, not on the queries the detector put in it: in a
    non-causal problem every query sees all keys, or in a packed one its part's, and a
    detector's tiles keep to the part of their slot (sortLSH sorts within parts; the parts
    are multiples of the tile). So they are the draws of the slots' first queries."""
    n, n_tiles, width = tiles.q_idx.shape

    def make() -> tuple[Tensor, Tensor]:
        slots = torch.arange(n_tiles, device=problem.q.device).mul_(width)
        first = slots.view(1, n_tiles, 1).expand(n, n_tiles, 1)
        drawn = sample_tiles(problem, draw_uniforms(problem, m, seed, n_tiles), first)
        return drawn.k_idx, drawn.lse_shift

    k_idx, shift = kept_draws(problem, ("follow", m, seed, n_tiles, width), make)
    return Tiles(tiles.q_idx, k_idx, lse_shift=shift, shared=cov, every_query=tiles.every_query)


def kept_draws(problem: Problem, key: tuple, make):
    """``make()``, kept in the problem's workspace from call to call while the ranges and
    ``key`` (knobs, tiling) stay the same: the draws depend on nothing else. The generator
    and the index arithmetic then run once per shape, not in every call (where a fresh
    generator also could not be captured in a CUDA graph: a replay must equal a call)."""
    return problem.memo("uniform_sample", (*key, problem.causal), make)


def draw_uniforms(problem: Problem, m: int, seed: int, n_tiles: int | None = None) -> Tensor:
    """The sampler's randomness: U [N, T, min(m, Lk)] in [0, 1), seeded by seed and the ranges
    (T: ``n_tiles``, by default the number of natural 128-query tiles)."""
    if n_tiles is None:
        n_tiles = -(-problem.lq // TILE)
    m = min(m, problem.lk)  # m >= R takes every key once: no draw is needed beyond Lk
    g = problem.generator(seed, "uniform_sample")
    return torch.rand(problem.q.shape[0], n_tiles, m, generator=g, device=problem.q.device)


def sample_tiles(
    problem: Problem,
    uniforms: Tensor,
    q_idx: Tensor | None = None,
    shared: Coverage | None = None,
) -> Tiles:
    """Tiles of ``q_idx`` (default: natural order, 128 queries) with m stratified key draws
    each and their lse shifts; ``shared``: the coverage ``q_idx`` groups queries by."""
    n, n_tiles, m = uniforms.shape
    dev = uniforms.device
    every_query = q_idx is None
    if every_query:
        q_idx = natural_tiles(n, problem.lq, TILE, dev)
    first, reach = problem.visible_range(q_idx.amax(dim=-1))  # [N, T]: a tile's keys
    reach = reach.unsqueeze(-1)  # R per tile [N, T, 1]
    width = min(m, problem.lk)  # more draws than keys: every key once
    u = torch.arange(width, device=dev).view(1, 1, width)
    strata = torch.floor((u + uniforms[..., :width]) * reach / m).long()
    strata = torch.minimum(strata, reach - 1)  # float32 u + U rounds up to u + 1 for U ~ 1
    everything = torch.where(u < reach, u, -1)  # m >= R: all keys, once
    k_idx = torch.where(reach > m, strata, everything)
    k_idx = k_idx.masked_fill(reach == 0, -1)
    if not isinstance(first, int):  # the tile's part of a packed problem
        k_idx = torch.where(k_idx >= 0, k_idx + first.unsqueeze(-1), -1)
    shift = torch.log((reach.float() / m).clamp_min(1.0)).squeeze(-1)  # R/m, 1 if all taken
    shift = shift.expand(n, n_tiles)
    return Tiles(q_idx, k_idx, lse_shift=shift, shared=shared, every_query=every_query)
