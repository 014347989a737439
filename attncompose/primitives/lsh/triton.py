"""Triton sortLSH hashing: projections, sign bits and reflected-Gray rank in one pass.

One program per (row block, row n) projects its rows onto the r directions (padded to a
power of two >= 16 with zero directions, whose bits are 0), packs the sign bits into a code
and applies the inverse Gray map; queries and keys of one shape in one launch (the keys'
rows after the queries'), then one sort. The sort itself stays ``torch.sort`` (stable), so
the order equals the reference's whenever the sign bits do; the projection uses IEEE fp32
dots (no TF32) for that reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from attncompose.primitives.lsh.naive import sort_together


@triton.jit
def _gray_rank_kernel(
    x,
    y,
    x_rows,  # [L] the row of x each position reads (HAS_ROWS)
    y_rows,
    dirs,
    part,
    rank,
    s_xn,
    s_xl,
    s_xd,
    s_yn,
    s_yl,
    s_yd,
    s_dn,
    s_dd,
    s_dr,
    N,
    L,
    D,
    R,
    GX,  # query rows per row of x (grouped keys: row n hashes row n // G)
    GY,
    BL: tl.constexpr,
    BD: tl.constexpr,
    BR: tl.constexpr,
    HAS_PART: tl.constexpr,
    HAS_ROWS: tl.constexpr,
):
    i_l = tl.program_id(0)
    i_r = tl.program_id(1).to(tl.int64)  # row offsets i_r * s_xn may pass 2**31
    i_n = i_r % N  # the row of the result within its input (and of its directions)
    o_l = i_l * BL + tl.arange(0, BL)  # [BL]
    o_d, o_r = tl.arange(0, BD), tl.arange(0, BR)
    m_l = o_l < L
    m_d = o_d < D  # D need not be a power of two (MIPS augmentation adds columns)
    m_x = m_l[:, None] & m_d[None, :]
    p_d = dirs + i_n * s_dn + o_d[:, None] * s_dd + o_r[None, :] * s_dr
    if i_r >= N:  # rows N .. 2N-1 of the result: y's rows
        b_x = _load_rows(y, y_rows, i_n // GY, s_yn, s_yl, s_yd, o_l, o_d, m_l, m_x, HAS_ROWS)
    else:
        b_x = _load_rows(x, x_rows, i_n // GX, s_xn, s_xl, s_xd, o_l, o_d, m_l, m_x, HAS_ROWS)
    b_d = tl.load(p_d, mask=m_d[:, None] & (o_r < R)[None, :], other=0.0)  # [BD, BR]
    b_p = tl.dot(b_x, b_d, input_precision="ieee")  # [BL, BR]
    b_code = tl.sum(tl.where(b_p > 0, 1 << o_r[None, :], 0), 1)  # [BL]
    for i_s in tl.static_range(5):  # inverse Gray map for codes of up to 32 bits
        b_code = b_code ^ (b_code >> (1 << i_s))
    if HAS_PART:  # the sort key of naive.within_parts: the position's part above its rank
        b_part = tl.load(part + o_l, mask=m_l, other=0).to(tl.int64)
        tl.store(rank + i_r * L + o_l, b_code.to(tl.int64) | (b_part << 32), mask=m_l)
    else:
        tl.store(rank + i_r * L + o_l, b_code, mask=m_l)


@triton.jit
def _load_rows(x, rows, i_n, s_n, s_l, s_d, o_l, o_d, m_l, m_x, HAS_ROWS: tl.constexpr):
    """Positions ``o_l`` of row n of ``x`` as float32 [BL, BD]: its rows ``o_l``, or with
    HAS_ROWS the rows ``rows[o_l]``."""
    r_l = o_l
    if HAS_ROWS:
        r_l = tl.load(rows + o_l, mask=m_l, other=0).to(tl.int32)
    p_x = x + i_n * s_n + r_l[:, None] * s_l + o_d[None, :] * s_d
    return tl.load(p_x, mask=m_x, other=0.0).to(tl.float32)


def gray_ranks(
    xs: Sequence[Tensor],
    directions: Tensor,
    part: Tensor | None = None,
    rows: Sequence[Tensor] | None = None,
) -> Tensor:
    """Gray ranks [len(xs) * N, L] (int32) of the sign codes of one or two inputs x [N / G,
    L, D] of one length and dim (queries and keys: one launch) under directions [N, D, r],
    the inputs' rows one after the other (row n of an input of N / G rows hashes its row
    n // G: grouped keys, as in the reference); with ``part`` [L], the sort keys of
    :func:`~attncompose.primitives.lsh.naive.within_parts` (int64), in the same pass. With
    ``rows`` (one [L] per input), input i is ``xs[i][:, rows[i]]``, read where it is."""
    x, *rest = xs
    n = directions.shape[0]
    if len(rest) > 1 or any(y.shape[1:] != x.shape[1:] or n % y.shape[0] for y in xs):
        raise ValueError(
            f"one or two inputs of one length and dim whose rows divide the directions' {n}, "
            f"got {[tuple(y.shape) for y in xs]}"
        )
    y = rest[0] if rest else x
    _, length, d = x.shape
    x_rows = y_rows = None
    if rows is not None:
        x_rows, *more = rows
        y_rows = more[0] if more else x_rows
        if y_rows.shape != x_rows.shape:
            raise ValueError(f"row maps of one length, got {[tuple(r.shape) for r in rows]}")
        length = x_rows.shape[0]
    r = directions.shape[-1]
    if r > 31:
        raise ValueError(f"at most 31 hash bits in the kernel, got {r}")
    dirs = directions.to(device=x.device, dtype=torch.float32)
    dtype = torch.int32 if part is None else torch.int64
    rank = torch.empty(len(xs) * n, length, dtype=dtype, device=x.device)
    bl = max(16, min(64, triton.next_power_of_2(length)))
    grid = (triton.cdiv(length, bl), len(xs) * n)
    _gray_rank_kernel[grid](
        x, y, rank if x_rows is None else x_rows, rank if y_rows is None else y_rows, dirs,
        rank if part is None else part, rank, *x.stride(), *y.stride(), *dirs.stride(),
        n, length, d, r, n // x.shape[0], n // y.shape[0],
        BL=bl, BD=max(16, triton.next_power_of_2(d)), BR=max(16, triton.next_power_of_2(r)),
        HAS_PART=part is not None, HAS_ROWS=rows is not None,
    )  # fmt: skip
    return rank


def sort_positions(
    xs: Sequence[Tensor],
    directions: Tensor,
    part: Tensor | None = None,
    rows: Sequence[Tensor] | None = None,
    keep: int | None = None,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Same contract as the reference: per input (order, position, sorted key), inputs of
    one shape hashed in one launch and sorted in one sort; row-mapped inputs read where they
    are."""
    if rows is None:
        ranks = lambda group: gray_ranks(group, directions, part)
        return sort_together(xs, ranks, None, keep=None if part is not None else keep)
    inputs = list(zip(xs, rows, strict=True))
    shape_of = lambda item: (*item[0].shape[1:], item[1].shape[0])  # [source L, D, L]
    ranks = lambda group: gray_ranks([x for x, _ in group], directions, part, [r for _, r in group])
    return sort_together(inputs, ranks, None, shape_of, None if part is not None else keep)
