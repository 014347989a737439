"""Reference block kernel: exact softmax attention over each tile's candidate keys.

A pair (query i, key j) of a tile takes part iff both indices are valid, the key is visible
(causal), ``own`` covers it (when the candidates are a superset of what the selection covers)
and no coverage in ``exclude`` covers it. Softmax is computed in place on the score tile
(max-shifted), in float32; memory is bounded by processing tiles in chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncompose.primitives.base import (
    Coverage,
    Partial,
    Problem,
    Tiles,
    add_products,
    counting_products,
    gather_rows,
)

SCORE_BUDGET = 1 << 24  # score elements held at once (64 MiB in fp32)


def block_attention(
    problem: Problem, tiles: Tiles, own: Coverage | None = None, exclude: tuple[Coverage, ...] = ()
) -> Partial:
    """(out [N, Lq, Dv], lse [N, Lq]) over the tiles' pairs; rows in no tile get lse=-inf."""
    result = Partial.empty(problem)
    n, t, bq = tiles.q_idx.shape
    nk = tiles.k_idx.shape[-1]
    if nk == 0:
        return result
    step = max(1, SCORE_BUDGET // max(1, n * bq * nk))
    for t0 in range(0, t, step):
        sl = slice(t0, t0 + step)
        shift = None if tiles.lse_shift is None else tiles.lse_shift[:, sl]
        _tile_chunk(
            problem,
            tiles.q_idx[:, sl],
            tiles.k_idx[:, sl],
            shift,
            own,
            tiles.exact,
            exclude,
            result,
        )
    return result


def _tile_chunk(
    problem: Problem,
    qi: Tensor,
    kj: Tensor,
    shift: Tensor | None,
    own: Coverage | None,
    exact: bool,
    exclude: tuple[Coverage, ...],
    result: Partial,
) -> None:
    q = gather_rows(problem.q, qi)  # [N, T, bq, D]
    k = gather_rows(problem.k, kj)  # [N, T, nk, D]
    v = gather_rows(problem.v, kj)  # [N, T, nk, Dv]
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(problem.scale)  # [N, T, bq, nk]
    qi4, kj4 = qi.unsqueeze(-1), kj.unsqueeze(-2)
    neg_inf = float("-inf")
    if bool((kj < 0).any()):  # padded query rows are computed but never written back
        s.masked_fill_(kj4 < 0, neg_inf)
    if problem.causal:
        s.masked_fill_(~problem.visible(qi4, kj4), neg_inf)
    if own is not None and not exact:
        s.masked_fill_(~own.covers(problem, qi4, kj4), neg_inf)
    for cov in exclude:
        s.masked_fill_(cov.covers(problem, qi4, kj4), neg_inf)
    if counting_products():
        add_products((torch.isfinite(s) & (qi4 >= 0)).sum())
    top = s.amax(dim=-1, keepdim=True)  # [N, T, bq, 1]
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = s.sub_(top).exp_()
    den = p.sum(dim=-1)  # [N, T, bq]
    out = torch.matmul(p, v) / den.clamp_min(1e-30).unsqueeze(-1)  # [N, T, bq, Dv]
    lse = den.log() + top.squeeze(-1)  # -inf where no key took part
    if shift is not None:
        lse = lse + shift.unsqueeze(-1)
    _scatter_rows(result, qi, out, lse)


def _scatter_rows(result: Partial, qi: Tensor, out: Tensor, lse: Tensor) -> None:
    """Write tile rows back to their query positions (each query is in at most one tile)."""
    n, lq = result.lse.shape
    base = torch.arange(n, device=qi.device).view(n, *([1] * (qi.dim() - 1))) * lq
    flat = (qi + base).reshape(-1)
    out, lse = out.reshape(-1, out.shape[-1]), lse.reshape(-1)
    valid = qi.reshape(-1) >= 0
    if not bool(valid.all()):
        flat, out, lse = flat[valid], out[valid], lse[valid]
    result.out.view(-1, out.shape[-1]).index_copy_(0, flat, out)
    result.lse.view(-1).index_copy_(0, flat, lse)
