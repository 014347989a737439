"""Triton flash-attention forward with lse: causal with absolute positions, any offsets.

One program per (query block, row n) streams the visible key blocks with an online softmax
in the log2 domain (scores pre-multiplied by ``scale * log2(e)``); rows that see no key get
``out = 0`` and ``lse = -inf``, as in the reference. Inputs may be float32, float16 or
bfloat16; accumulation is float32 and the results are float32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attncompose.primitives.base import Partial, Problem

LOG2E = math.log2(math.e)


@triton.jit
def online_softmax_step(b_s, b_v, b_m, b_l, b_acc):
    """One key chunk: b_s [BQ, BK] log2 scores (-inf masked), b_v [BK, BDV] -> (m, l, acc)."""
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))  # [BQ]
    b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # rows with no key yet stay at 0 mass
    b_p = tl.exp2(b_s - b_ms[:, None])  # [BQ, BK]
    b_alpha = tl.exp2(b_m - b_ms)  # [BQ]
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return b_mn, b_l, b_acc


@triton.jit
def finish_rows(b_m, b_l, b_acc):
    """(out [BQ, BDV], natural-log lse [BQ]); out 0 and lse -inf where no key took part."""
    m_any = b_l > 0
    b_out = b_acc / tl.where(m_any, b_l, 1.0)[:, None]
    b_lse = tl.where(
        m_any, (b_m + tl.log2(tl.where(m_any, b_l, 1.0))) * 0.6931471805599453, float("-inf")
    )
    return b_out, b_lse


@triton.jit
def _exact_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,
    s_qn,
    s_ql,
    s_qd,
    s_kn,
    s_kl,
    s_kd,
    s_vn,
    s_vl,
    s_vd,
    s_on,
    s_ol,
    s_od,
    s_ln,
    Lq,
    Lk,
    delta,  # q_offset - k_offset: key j is visible to query i iff j <= i + delta
    qk_scale,  # scale * log2(e)
    CAUSAL: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
):
    i_q, i_n = tl.program_id(0), tl.program_id(1)
    o_q = i_q * BQ + tl.arange(0, BQ)  # [BQ]
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_q = o_q < Lq
    p_q = q + i_n * s_qn + o_q[:, None] * s_ql + o_d[None, :] * s_qd
    b_q = tl.load(p_q, mask=m_q[:, None], other=0.0)  # [BQ, BD]
    b_m = tl.full([BQ], float("-inf"), tl.float32)
    b_l = tl.zeros([BQ], tl.float32)
    b_acc = tl.zeros([BQ, BDV], tl.float32)
    hi = Lk
    if CAUSAL:  # keys past the block's last query are invisible to the whole block
        hi = tl.minimum(Lk, tl.maximum(0, (i_q + 1) * BQ + delta))
    for i_k in range(0, hi, BK):
        o_k = i_k + tl.arange(0, BK)  # [BK]
        m_k = o_k < Lk
        p_k = k + i_n * s_kn + o_k[:, None] * s_kl + o_d[None, :] * s_kd
        p_v = v + i_n * s_vn + o_k[:, None] * s_vl + o_dv[None, :] * s_vd
        b_k = tl.load(p_k, mask=m_k[:, None], other=0.0)  # [BK, BD]
        b_v = tl.load(p_v, mask=m_k[:, None], other=0.0)  # [BK, BDV]
        b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale  # [BQ, BK]
        m_s = m_q[:, None] & m_k[None, :]
        if CAUSAL:
            m_s = m_s & (o_k[None, :] <= o_q[:, None] + delta)
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax_step(b_s, b_v, b_m, b_l, b_acc)
    b_out, b_lse = finish_rows(b_m, b_l, b_acc)
    p_o = o + i_n * s_on + o_q[:, None] * s_ol + o_dv[None, :] * s_od
    tl.store(p_o, b_out, mask=m_q[:, None])
    tl.store(lse + i_n * s_ln + o_q, b_lse, mask=m_q)


def tile_sizes(rows: int, cols: int) -> tuple[int, int]:
    """(BQ, BK): powers of two in [16, 64] (tl.dot needs 16; 64 keeps registers in bounds)."""
    return (
        max(16, min(64, triton.next_power_of_2(rows))),
        max(16, min(64, triton.next_power_of_2(cols))),
    )


def exact_attention(problem: Problem, out: Partial | None = None) -> Partial:
    """Same contract as the reference ``exact_attention``; writes into ``out`` when given."""
    q, k, v = problem.q, problem.k, problem.v
    n, lq, d = q.shape
    dv = v.shape[-1]
    if out is None:
        out = Partial(
            q.new_empty(n, lq, dv, dtype=torch.float32), q.new_empty(n, lq, dtype=torch.float32)
        )
    bq, bk = tile_sizes(lq, problem.lk)
    grid = (triton.cdiv(lq, bq), n)
    _exact_fwd_kernel[grid](
        q,
        k,
        v,
        out.out,
        out.lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.out.stride(),
        out.lse.stride(0),
        lq,
        problem.lk,
        problem.q_offset - problem.k_offset,
        problem.scale * LOG2E,
        CAUSAL=problem.causal,
        BQ=bq,
        BK=bk,
        BD=d,
        BDV=dv,
    )
    return out
