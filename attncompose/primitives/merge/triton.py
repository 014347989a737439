"""Triton lse merges: partial results over disjoint keys, and a packed result into its rows.

:func:`merge_partials` folds partials two at a time, one launch each (the reference,
:func:`~attncompose.primitives.merge.naive.merge_partials`, launches a dozen small ops per
part: a decode step of HyperAttention merged three times).

The causal splitter's packed body call returns every level's rectangles as rows of one
result; each row of the target (a query of the causal square) takes at most one row per
level. ``sources`` [K, L] lists, per target row, the packed rows it takes (-1: none), so
one program per (block of target rows, row n) reads its target rows and their sources and
folds them in by an online log-sum-exp in float32, then writes the target in place (its
dtype) - what :func:`~attncompose.primitives.merge.naive.merge_rows_into` does with a
scatter-max and two scatter-adds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attncompose.primitives.base import Partial, Problem

MERGE_ROWS = 32  # rows a program of the two-part merge holds


@triton.jit
def _merge_kernel(
    a_out,
    a_lse,
    b_out,
    b_lse,
    out,
    lse,
    s_an,
    s_am,
    s_al,
    s_ad,
    s_aln,
    s_alm,
    s_all,
    s_bn,
    s_bm,
    s_bl,
    s_bd,
    s_bln,
    s_blm,
    s_bll,
    s_on,
    s_om,
    s_ol,
    s_od,
    s_ln,
    s_lm,
    s_ll,
    L,
    DV,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    i_r = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)  # row offsets may pass 2**31
    i_m = tl.program_id(2).to(tl.int64)
    o_r = i_r * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_r = o_r < L
    m_rd = m_r[:, None] & (o_d < DV)[None, :]
    la = tl.load(a_lse + i_n * s_aln + i_m * s_alm + o_r * s_all, mask=m_r, other=float("-inf"))
    lb = tl.load(b_lse + i_n * s_bln + i_m * s_blm + o_r * s_bll, mask=m_r, other=float("-inf"))
    la, lb = la.to(tl.float32), lb.to(tl.float32)
    top = tl.maximum(la, lb)
    seen = top > float("-inf")  # a key on either side
    low = tl.minimum(la, lb) - tl.where(seen, top, 0.0)  # never -inf - -inf
    total = tl.where(seen, top + tl.log(1.0 + tl.exp(low)), top)  # log(e^la + e^lb)
    base = tl.where(total > float("-inf"), total, 0.0)
    keep = tl.exp(la - base)
    add = tl.exp(lb - base)
    pa = a_out + i_n * s_an + i_m * s_am + o_r[:, None] * s_al + o_d[None, :] * s_ad
    pb = b_out + i_n * s_bn + i_m * s_bm + o_r[:, None] * s_bl + o_d[None, :] * s_bd
    oa = tl.load(pa, mask=m_rd, other=0.0).to(tl.float32)
    ob = tl.load(pb, mask=m_rd, other=0.0).to(tl.float32)
    po = out + i_n * s_on + i_m * s_om + o_r[:, None] * s_ol + o_d[None, :] * s_od
    tl.store(po, (oa * keep[:, None] + ob * add[:, None]).to(out.dtype.element_ty), mask=m_rd)
    tl.store(lse + i_n * s_ln + i_m * s_lm + o_r * s_ll, total, mask=m_r)


def merge_partials(problem: Problem, parts: list[Partial], into: Partial | None = None) -> Partial:
    """The reference's result (rows all -inf stay empty) in one launch per part after the
    first: the first two merged into the result, each next one into it. The result: new
    float32 buffers, or ``into`` (written in its dtype; ``parts[0]`` itself merges in
    place). Partials are out [N, L, Dv], lse [N, L], or with two row dims [N, M, L, Dv]
    (views at any strides: a level's rectangles below the causal splitter's diagonal)."""
    first = parts[0]
    if into is None:
        out = first.out.new_empty(first.out.shape, dtype=torch.float32)
        into = Partial(out, first.lse.new_empty(first.lse.shape, dtype=torch.float32))
    if len(parts) == 1:
        into.out.copy_(first.out)
        into.lse.copy_(first.lse)
        return into
    rows = lambda x, lead: x if x.dim() == lead + 2 else x.unsqueeze(1)  # [N, M, ...]
    out, lse = rows(into.out, 2), rows(into.lse, 1)
    n, m, length, dv = out.shape
    grid = (triton.cdiv(length, MERGE_ROWS), n, m)
    for a, b in zip([first, *[into] * (len(parts) - 2)], parts[1:], strict=True):
        _merge_kernel[grid](
            rows(a.out, 2), rows(a.lse, 1), rows(b.out, 2), rows(b.lse, 1), out, lse,
            *rows(a.out, 2).stride(), *rows(a.lse, 1).stride(),
            *rows(b.out, 2).stride(), *rows(b.lse, 1).stride(),
            *out.stride(), *lse.stride(),
            length, dv,
            BR=MERGE_ROWS, BD=max(16, triton.next_power_of_2(dv)),
        )  # fmt: skip
    return into


@triton.jit
def _merge_rows_kernel(
    out,
    lse,
    p_out,
    p_lse,
    src,
    s_on,
    s_ol,
    s_od,
    s_ln,
    s_pn,
    s_pm,
    s_pd,
    s_pln,
    L,
    DV,
    K,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    i_r = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)  # row offsets may pass 2**31
    o_r = i_r * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_r = o_r < L
    m_rd = m_r[:, None] & (o_d < DV)[None, :]
    p_t = out + i_n * s_on + o_r[:, None] * s_ol + o_d[None, :] * s_od
    m = tl.load(lse + i_n * s_ln + o_r, mask=m_r, other=float("-inf"))
    acc = tl.load(p_t, mask=m_rd, other=0.0).to(tl.float32)
    weight = tl.where(m > float("-inf"), 1.0, 0.0)  # sum of e^{l - m} so far
    for kk in range(0, K):
        s = tl.load(src + kk * L + o_r, mask=m_r, other=-1).to(tl.int64)
        has = s >= 0
        ls = tl.load(p_lse + i_n * s_pln + s, mask=has, other=float("-inf"))
        ps = p_out + i_n * s_pn + s[:, None] * s_pm + o_d[None, :] * s_pd
        os = tl.load(ps, mask=has[:, None] & m_rd, other=0.0).to(tl.float32)
        top = tl.maximum(m, ls)
        base = tl.where(top > float("-inf"), top, 0.0)  # rows with nothing yet stay empty
        keep = tl.exp(m - base)
        add = tl.exp(ls - base)
        acc = acc * keep[:, None] + os * add[:, None]
        weight = weight * keep + add
        m = top
    safe = tl.where(weight > 0, weight, 1.0)
    tl.store(p_t, (acc / safe[:, None]).to(out.dtype.element_ty), mask=m_rd)
    tl.store(lse + i_n * s_ln + o_r, tl.where(weight > 0, m + tl.log(safe), m), mask=m_r)


def merge_rows_into(
    problem: Problem, target: Partial, part: Partial, rows: Tensor, sources: Tensor
) -> None:
    """Same contract as the reference (``rows`` is its map; ``sources`` [K, L] int32, the
    same map inverted: the packed rows of each target row, -1 padded)."""
    n, length, dv = target.out.shape
    if target.lse.stride(-1) != 1 or part.lse.stride(-1) != 1:
        raise ValueError("merge_rows_into: lse rows must be contiguous")
    br = 32
    grid = (triton.cdiv(length, br), n)
    _merge_rows_kernel[grid](
        target.out, target.lse, part.out, part.lse, sources.contiguous(),
        *target.out.stride(), target.lse.stride(0), *part.out.stride(), part.lse.stride(0),
        length, dv, sources.shape[0],
        BR=br, BD=max(16, triton.next_power_of_2(dv)),
    )  # fmt: skip
