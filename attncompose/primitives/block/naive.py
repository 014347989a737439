"""Reference block kernel: exact softmax attention over each tile's candidate keys.

A pair (query i, key j) of a tile takes part iff both indices are valid, the key is visible
(causal), ``own`` covers it (when the candidates are a superset of what the selection covers),
no coverage in ``exclude`` covers it and the key's ``key_bias`` (if any) is finite; the bias
is added to its scores. Softmax is computed in place on the score tile (max-shifted), in
float32; memory is bounded by processing tiles in chunks.
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
    return run_tiles(problem, tiles, own, exclude, _softmax_chunk)


def run_tiles(
    problem: Problem, tiles: Tiles, own: Coverage | None, exclude: tuple[Coverage, ...], chunk_fn
) -> Partial:
    """Drive ``chunk_fn(q, k, v, mask, bias, scale) -> (out, lse)`` over memory-bounded tile
    chunks: gather rows, build the pair mask, count products, apply lse shifts, scatter back.
    ``mask`` is None or bool [N, T, bq or 1, nk]; ``bias`` None or the key bias [N, T, nk]."""
    result = Partial.empty(problem)
    n, t, bq = tiles.q_idx.shape
    nk = tiles.k_idx.shape[-1]
    if nk == 0:
        return result
    step = max(1, SCORE_BUDGET // max(1, n * bq * nk))
    for t0 in range(0, t, step):
        sl = slice(t0, t0 + step)
        qi, kj = tiles.q_idx[:, sl], tiles.k_idx[:, sl]
        to_test = None if tiles.exact else own
        mask = pair_mask(problem, qi, kj, to_test, exclude, tiles.shared)
        bias = None if tiles.key_bias is None else tiles.key_bias[:, sl]
        if bias is not None:
            finite = torch.isfinite(bias).unsqueeze(-2)
            mask = finite if mask is None else mask & finite
        if counting_products():
            valid = (qi >= 0).unsqueeze(-1)
            add_products((valid if mask is None else valid & mask).expand(-1, -1, -1, nk).sum())
        q = gather_rows(problem.q, qi).float()  # [N, T, bq, D]
        k = gather_rows(problem.k, kj).float()  # [N, T, nk, D]
        v = gather_rows(problem.v, kj).float()  # [N, T, nk, Dv]
        out, lse = chunk_fn(q, k, v, mask, bias, problem.scale)
        if tiles.lse_shift is not None:
            lse = lse + tiles.lse_shift[:, sl].unsqueeze(-1)
        _scatter_rows(result, qi, out, lse)
    return result


def pair_mask(
    problem: Problem,
    qi: Tensor,
    kj: Tensor,
    own: Coverage | None,
    exclude: tuple[Coverage, ...],
    shared: Coverage | None = None,
) -> Tensor | None:
    """Bool [N, T, bq or 1, nk] of the pairs that take part (None: all of them).

    Padded keys, causally invisible keys, pairs ``own`` does not cover and pairs an
    ``exclude`` coverage covers are out. Padded query rows are computed but never written.
    An exclusion by ``shared`` (the coverage the tiles group queries by) is tested on each
    tile's first query only: one key mask per tile.
    """
    qi4, kj4 = qi.unsqueeze(-1), kj.unsqueeze(-2)
    parts = []
    if bool((kj < 0).any()):
        parts.append(kj4 >= 0)
    if problem.causal:
        parts.append(problem.visible(qi4, kj4))
    if own is not None:
        parts.append(own.covers(problem, qi4, kj4))
    parts += [
        ~cov.covers(problem, qi4[..., :1, :] if cov is shared else qi4, kj4) for cov in exclude
    ]
    if not parts:
        return None
    shape = torch.broadcast_shapes(*(p.shape for p in parts))
    mask = parts[0].expand(shape).clone()  # one full-size buffer, combined in place
    for part in parts[1:]:
        mask.logical_and_(part)
    return mask


def _softmax_chunk(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """The reference: scores (+ key bias), masked max-shifted softmax, weighted values."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [N, T, bq, nk]
    if bias is not None:
        s.add_(bias.unsqueeze(-2))
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    top = s.amax(dim=-1, keepdim=True)  # [N, T, bq, 1]
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = s.sub_(top).exp_()
    den = p.sum(dim=-1)  # [N, T, bq]
    out = torch.matmul(p, v) / den.clamp_min(1e-30).unsqueeze(-1)  # [N, T, bq, Dv]
    return out, den.log() + top.squeeze(-1)  # lse is -inf where no key took part


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
