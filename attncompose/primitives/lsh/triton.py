"""Triton sortLSH hashing: projections, sign bits and reflected-Gray rank in one pass.

One program per (row block, row n) projects its rows onto the r directions (padded to a
power of two >= 16 with zero directions, whose bits are 0), packs the sign bits into a code
and applies the inverse Gray map. The sort itself stays ``torch.sort`` (stable), so the
order equals the reference's whenever the sign bits do; the projection uses IEEE fp32 dots
(no TF32) for that reason.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attncompose.primitives.lsh.naive import sorted_order


@triton.jit
def _gray_rank_kernel(
    x,
    dirs,
    part,
    rank,
    s_xn,
    s_xl,
    s_xd,
    s_dn,
    s_dd,
    s_dr,
    L,
    D,
    R,
    BL: tl.constexpr,
    BD: tl.constexpr,
    BR: tl.constexpr,
    HAS_PART: tl.constexpr,
):
    i_l = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)  # row offsets i_n * s_xn may pass 2**31
    o_l = i_l * BL + tl.arange(0, BL)  # [BL]
    o_d, o_r = tl.arange(0, BD), tl.arange(0, BR)
    m_l = o_l < L
    p_x = x + i_n * s_xn + o_l[:, None] * s_xl + o_d[None, :] * s_xd
    p_d = dirs + i_n * s_dn + o_d[:, None] * s_dd + o_r[None, :] * s_dr
    m_d = o_d < D  # D need not be a power of two (MIPS augmentation adds columns)
    b_x = tl.load(p_x, mask=m_l[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BL, BD]
    b_d = tl.load(p_d, mask=m_d[:, None] & (o_r < R)[None, :], other=0.0)  # [BD, BR]
    b_p = tl.dot(b_x, b_d, input_precision="ieee")  # [BL, BR]
    b_code = tl.sum(tl.where(b_p > 0, 1 << o_r[None, :], 0), 1)  # [BL]
    for i_s in tl.static_range(5):  # inverse Gray map for codes of up to 32 bits
        b_code = b_code ^ (b_code >> (1 << i_s))
    if HAS_PART:  # the sort key of naive.within_parts: the position's part above its rank
        b_part = tl.load(part + o_l, mask=m_l, other=0).to(tl.int64)
        tl.store(rank + i_n * L + o_l, b_code.to(tl.int64) | (b_part << 32), mask=m_l)
    else:
        tl.store(rank + i_n * L + o_l, b_code, mask=m_l)


def gray_ranks(x: Tensor, directions: Tensor, part: Tensor | None = None) -> Tensor:
    """Gray rank [N, L] (int32) of the sign codes of x [N, L, D] under directions [N, D, r];
    with ``part`` [L], the sort keys of :func:`~attncompose.primitives.lsh.naive.within_parts`
    (int64), in the same pass."""
    n, length, d = x.shape
    r = directions.shape[-1]
    if r > 31:
        raise ValueError(f"at most 31 hash bits in the kernel, got {r}")
    dirs = directions.to(device=x.device, dtype=torch.float32)
    dtype = torch.int32 if part is None else torch.int64
    rank = torch.empty(n, length, dtype=dtype, device=x.device)
    bl = max(16, min(64, triton.next_power_of_2(length)))
    grid = (triton.cdiv(length, bl), n)
    _gray_rank_kernel[grid](
        x, dirs, rank if part is None else part, rank, *x.stride(), *dirs.stride(), length, d, r,
        BL=bl, BD=max(16, triton.next_power_of_2(d)), BR=max(16, triton.next_power_of_2(r)),
        HAS_PART=part is not None,
    )  # fmt: skip
    return rank


def sort_positions(
    x: Tensor, directions: Tensor, part: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as the reference: (order [N, L], position [N, L], sorted key [N, L])."""
    return sorted_order(gray_ranks(x, directions, part))
