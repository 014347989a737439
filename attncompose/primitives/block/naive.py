"""Reference block kernel: exact softmax attention over each tile's candidate keys.

A pair (query i, key j) of a tile takes part iff both indices are valid, the key is visible
(causal), ``own`` covers it (when the candidates are a superset of what the selection covers),
no coverage in ``exclude`` covers it and the key's ``key_bias`` (if any) is finite; the bias
is added to its scores. Softmax is computed in place on the score tile (max-shifted), in
float32; memory is bounded by processing tiles in chunks.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from attncompose.primitives.base import (
    Coverage,
    Partial,
    Problem,
    Tiles,
    Workspace,
    add_products,
    counting_products,
    gather_rows,
    group_views,
    row_index,
    row_pitch,
    stack_heads,
    stacking_fills_threads,
    unstack_heads,
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
    """Drive ``chunk_fn(q, k, v, mask, bias, scale, scratch) -> (out, lse)`` over
    memory-bounded tile chunks: gather rows, build the pair mask, count products, apply lse
    shifts, scatter back. ``mask`` is None or bool [N or 1, T, bq or 1, nk] (1: the same for
    every row or query, by broadcast); ``bias`` None or the key bias [N, T, nk]; ``scratch``:
    the :class:`Workspace` of the problem (or of this call) whose buffers live until the next
    chunk. Grouped keys and values are read where they are: query row n gathers from key
    row n // kv_group, and key ranges stay views of the key rows (one ``chunk_fn`` call per
    query head of a group, :func:`grouped_chunk`)."""
    result = Partial.empty(problem)
    n, _, bq = tiles.q_idx.shape
    nk = tiles.k_idx.shape[-1]
    if nk == 0:
        return result
    step = max(1, SCORE_BUDGET // max(1, n * bq * nk))
    to_test = None if tiles.exact else own
    alike = rows_alike(tiles, [c for c in (to_test, *exclude) if c is not None])
    scratch = problem.workspace or Workspace()
    group = problem.kv_group  # query rows per key row
    for sl, first, stride in _chunks(tiles, problem.lk, step):
        qi, kj = tiles.q_idx[:, sl], tiles.k_idx[:, sl]
        rows = slice(0, 1) if alike else slice(None)  # alike: one mask, broadcast over rows
        mask = pair_mask(problem, qi[rows], kj[rows], to_test, exclude, tiles.shared, scratch)
        bias = None if tiles.key_bias is None else tiles.key_bias[:, sl]
        if bias is not None:
            finite = torch.isfinite(bias).unsqueeze(-2)
            mask = finite if mask is None else mask & finite
        if counting_products():
            valid = (qi >= 0).unsqueeze(-1)
            add_products((valid if mask is None else valid & mask).expand(-1, -1, -1, nk).sum())
        gather = lambda name, x, idx, rows=None, group=1: gather_rows(
            x, idx, scratch.take(name, (idx.numel() * x.shape[-1],), x.dtype, x.device), rows, group
        ).float()
        q = gather("q", problem.q, qi)  # [N, T, bq, D]
        if first is None:  # query row n reads key row n // group
            k_rows = row_index(kj, row_pitch(problem.k), group)  # keys and values: the same rows
            v_rows = k_rows if row_pitch(problem.v) == row_pitch(problem.k) else None
            k = gather("k", problem.k, kj, k_rows, group)  # [N, T, nk, D]
            v = gather("v", problem.v, kj, v_rows, group)  # [N, T, nk, Dv]
            out, lse = chunk_fn(q, k, v, mask, bias, problem.scale, scratch)
        else:  # key ranges in bounds: overlapping views of each key row, nothing copied
            count = sl.stop - sl.start
            k = key_ranges(problem.k, first, stride, count, nk).float()  # [N / group, ...]
            v = key_ranges(problem.v, first, stride, count, nk).float()
            out, lse = grouped_chunk(chunk_fn, group, q, k, v, mask, bias, problem.scale, scratch)
        if tiles.lse_shift is not None:
            lse = lse + tiles.lse_shift[:, sl].unsqueeze(-1)
        _scatter_rows(result, qi, out, lse)
    return result


def grouped_chunk(
    chunk_fn,
    group: int,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    bias: Tensor | None,
    scale: float,
    scratch: Workspace | None,
    into: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``chunk_fn`` on q [N, T, bq, D] against k, v [N / group, T, nk, D] (grouped keys:
    query row n reads key row n // group), the results written into ``into`` (out, lse) or
    new tensors. Where ``mask`` and ``bias`` have one row (every head of a group masks
    alike) and the call keeps the CPU's threads busy
    (:func:`~attncompose.primitives.base.stacking_fills_threads`), the group's query heads
    are stacked as the rows of one call (:func:`~attncompose.primitives.base.stack_heads`:
    group * bq queries a tile, its keys read once; a mask of bq query rows repeated for each
    head); with fewer parts than threads, one tile (a decode step's) takes the group's
    heads as its tiles against the key row broadcast (a stride-0 view); else one call per
    query head g on views (:func:`~attncompose.primitives.base.group_views`)."""
    if group == 1 and into is None:
        return chunk_fn(q, k, v, mask, bias, scale, scratch)
    alike = group > 1 and all(x is None or x.shape[0] == 1 for x in (mask, bias))
    if alike and stacking_fills_threads(q.shape[0] // group, q.shape[-2] * group, q.shape[1]):
        if mask is not None and mask.shape[-2] > 1:  # [1, T, bq, nk] -> [1, T, G * bq, nk]
            mask = mask.unsqueeze(-3).expand(*mask.shape[:-2], group, *mask.shape[-2:])
            mask = mask.flatten(-3, -2)
        out, lse = chunk_fn(stack_heads(q, group), k, v, mask, bias, scale, scratch)
        return unstack_heads(out, lse, group, into)
    if alike and q.shape[1] == 1:  # [N/G, G, bq, D] against [N/G, G (stride 0), nk, D]
        heads = q.unflatten(0, (-1, group)).flatten(1, 2)
        k, v = (x.expand(-1, group, -1, -1) for x in (k, v))
        out, lse = chunk_fn(heads, k, v, mask, bias, scale, scratch)
        out, lse = out.flatten(0, 1).unsqueeze(1), lse.flatten(0, 1).unsqueeze(1)
        if into is None:
            return out, lse
        into[0].copy_(out)
        into[1].copy_(lse)
        return into
    if into is None:
        into = (q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1]))
    per_head = lambda x: [x] * group if x is None or x.shape[0] == 1 else group_views(x, group)
    views = (group_views(q, group), *(group_views(x, group) for x in into))
    for qg, out, lse, mg, bg in zip(*views, per_head(mask), per_head(bias), strict=True):
        o, s = chunk_fn(qg, k, v, mg, bg, scale, scratch)
        out.copy_(o)
        lse.copy_(s)
    return into


def _chunks(tiles: Tiles, lk: int, step: int):
    """(slice of tiles, first key, key stride between tiles) per chunk of at most ``step``
    tiles; first/stride are None unless the chunk's candidates are key ranges
    (``tiles.k_start``) inside [0, lk) whose starts step evenly: those are read as views."""
    t = tiles.q_idx.shape[1]
    if tiles.k_start is None:
        for t0 in range(0, t, step):
            yield slice(t0, min(t0 + step, t)), None, None
        return
    nk = tiles.k_idx.shape[-1]
    starts = tiles.k_start.tolist()
    inside = [s >= 0 and s + nk <= lk for s in starts]
    t0 = 0
    while t0 < t:  # segments of tiles alike in `inside`, chunked
        t1 = t0 + 1
        while t1 < t and t1 - t0 < step and inside[t1] == inside[t0]:
            t1 += 1
        chunk = starts[t0:t1]
        steps = {b - a for a, b in itertools.pairwise(chunk)}
        if inside[t0] and len(steps) <= 1:
            yield slice(t0, t1), chunk[0], steps.pop() if steps else 0
        else:
            yield slice(t0, t1), None, None
        t0 = t1


def key_ranges(x: Tensor, first: int, stride: int, count: int, nk: int) -> Tensor:
    """[N, count, nk, D] view of x [N, L, D]: tile t reads rows first + t*stride + j."""
    s_n, s_l, s_d = x.stride()
    return x.as_strided(
        (x.shape[0], count, nk, x.shape[2]),
        (s_n, stride * s_l, s_l, s_d),
        x.storage_offset() + first * s_l,
    )


def rows_alike(tiles: Tiles, coverages: list[Coverage]) -> bool:
    """Whether every row n has the same pair mask: the same query and key indices (expanded
    along rows), no per-row key bias, and coverages whose answers do not depend on the row."""
    same = lambda x: x.shape[0] == 1 or x.stride(0) == 0
    return (
        same(tiles.q_idx)
        and same(tiles.k_idx)
        and tiles.key_bias is None
        and all(cov.row_invariant for cov in coverages)
    )


def any_key(mask: Tensor) -> Tensor:
    """``mask.any(dim=-1)`` for a bool mask, as a byte max (an order of magnitude faster on
    CPU than ``any`` over the last dimension)."""
    return mask.view(torch.uint8).amax(dim=-1).bool()


def pair_mask(
    problem: Problem,
    qi: Tensor,
    kj: Tensor,
    own: Coverage | None,
    exclude: tuple[Coverage, ...],
    shared: Coverage | None = None,
    scratch: Workspace | None = None,
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
    if scratch is None:
        mask = parts[0].expand(shape).clone()  # one full-size buffer, combined in place
    else:
        mask = scratch.take("pair_mask", shape, torch.bool, qi.device).copy_(parts[0])
    for part in parts[1:]:
        mask.logical_and_(part)
    return mask


def _softmax_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    bias: Tensor | None,
    scale: float,
    scratch: Workspace | None = None,
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
