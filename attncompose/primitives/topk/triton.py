"""Triton block scoring of the top-k detector: block means and their scores in two passes.

``_block_means_kernel``: one program per (block, row n) averages the block's rows (the last
block may be short). ``_block_scores_kernel``: one program per (query block, row n) averages
its queries on the fly and scores them against a chunk of key-block means at a time:
``scale * qbar . kbar + log |key block|``, ``-inf`` where no query of the block sees the
key block's first key (causal, absolute positions). ``_key_scores_kernel`` (``keys``
scoring): one program per (query block, row n) scores its mean query against every key of
each visible key block, a log-sum-exp per block (invisible blocks are skipped). Same contract
as the reference :func:`~attncompose.primitives.topk.naive.block_scores`; the selection (a
sort) stays torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attncompose.primitives.base import Problem


@triton.jit
def _mean_rows(x, i_n, i_b, s_n, s_l, s_d, L, D, SIZE, BS: tl.constexpr, BD: tl.constexpr):
    """Mean [BD] (float32) of rows [i_b*SIZE, min(L, (i_b+1)*SIZE)) of x[i_n]."""
    o_s = i_b * SIZE + tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m_s = (tl.arange(0, BS) < SIZE) & (o_s < L)
    p_x = x + i_n * s_n + o_s[:, None] * s_l + o_d[None, :] * s_d
    b_x = tl.load(p_x, mask=m_s[:, None] & (o_d < D)[None, :], other=0.0).to(tl.float32)
    return tl.sum(b_x, 0) / tl.sum(m_s.to(tl.float32), 0)


@triton.jit
def _block_means_kernel(x, out, s_n, s_l, s_d, L, D, NB, SIZE, BS: tl.constexpr, BD: tl.constexpr):
    i_b = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)  # row offsets may pass 2**31
    b_mean = _mean_rows(x, i_n, i_b, s_n, s_l, s_d, L, D, SIZE, BS, BD)
    o_d = tl.arange(0, BD)
    tl.store(out + (i_n * NB + i_b) * D + o_d, b_mean, mask=o_d < D)


@triton.jit
def _query_block(q, s_qn, s_ql, s_qd, Lq, D, SIZE, BS: tl.constexpr, BD: tl.constexpr):
    """This program's query block and row (grid: (query block, row n)), the block's mean query
    [BD] (float32) and its last query's index."""
    i_b = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)  # row offsets may pass 2**31
    b_qbar = _mean_rows(q, i_n, i_b, s_qn, s_ql, s_qd, Lq, D, SIZE, BS, BD)
    return i_b, i_n, b_qbar, tl.minimum(i_b * SIZE + SIZE - 1, Lq - 1)


@triton.jit
def _block_scores_kernel(
    q, kbar, est, s_qn, s_ql, s_qd, Lq, Lk, D, NQB, NKB, SIZE, delta, scale, GROUP,
    CAUSAL: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BKB: tl.constexpr,
):  # fmt: skip
    i_b, i_n, b_qbar, last_q = _query_block(q, s_qn, s_ql, s_qd, Lq, D, SIZE, BS, BD)
    o_d = tl.arange(0, BD)
    for j0 in range(0, NKB, BKB):
        o_j = j0 + tl.arange(0, BKB)
        m_j = o_j < NKB
        p_k = kbar + ((i_n // GROUP) * NKB + o_j[:, None]) * D + o_d[None, :]
        b_k = tl.load(p_k, mask=m_j[:, None] & (o_d < D)[None, :], other=0.0)  # [BKB, BD]
        b_s = tl.sum(b_k * b_qbar[None, :], 1) * scale  # [BKB]
        count = tl.minimum(Lk - o_j * SIZE, SIZE).to(tl.float32)
        b_s = b_s + tl.log(tl.maximum(count, 1.0))
        if CAUSAL:
            b_s = tl.where(o_j * SIZE <= last_q + delta, b_s, float("-inf"))
        tl.store(est + (i_n * NQB + i_b) * NKB + o_j, b_s, mask=m_j)


@triton.jit
def _key_scores_kernel(
    q, k, est, s_qn, s_ql, s_qd, s_kn, s_kl, s_kd, Lq, Lk, D, NQB, NKB, SIZE, delta, scale,
    GROUP, CAUSAL: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    i_b, i_n, b_qbar, last_q = _query_block(q, s_qn, s_ql, s_qd, Lq, D, SIZE, BS, BD)
    o_d = tl.arange(0, BD)
    o_s = tl.arange(0, BS)
    n_vis = NKB
    if CAUSAL:  # key blocks whose first key the block's last query sees
        reach = last_q + delta
        n_vis = tl.where(reach >= 0, tl.minimum(NKB, reach // SIZE + 1), 0)
    p_est = est + (i_n * NQB + i_b) * NKB
    for j in range(0, n_vis):
        o_k = j * SIZE + o_s
        m_k = (o_s < SIZE) & (o_k < Lk)
        p_k = k + (i_n // GROUP) * s_kn + o_k[:, None] * s_kl + o_d[None, :] * s_kd
        b_k = tl.load(p_k, mask=m_k[:, None] & (o_d < D)[None, :], other=0.0).to(tl.float32)
        b_s = tl.where(m_k, tl.sum(b_k * b_qbar[None, :], 1) * scale, float("-inf"))  # [BS]
        b_m = tl.max(b_s, 0)
        tl.store(p_est + j, b_m + tl.log(tl.sum(tl.exp(b_s - b_m), 0)))
    for j in range(n_vis, NKB):
        tl.store(p_est + j, float("-inf"))


def block_scores(problem: Problem, size: int, score: str = "means") -> Tensor:
    """Estimated log-mass [N, nQB, nKB] (float32) of each key block per query block; query
    row n reads key row n // kv_group (block means: one per key row)."""
    q, k = problem.q, problem.k
    n, lq, d = q.shape
    n_kv, lk = k.shape[:2]
    group = problem.kv_group
    nqb, nkb = triton.cdiv(lq, size), triton.cdiv(lk, size)
    bs, bd = triton.next_power_of_2(size), triton.next_power_of_2(d)
    if score == "keys":
        est = torch.empty(n, nqb, nkb, dtype=torch.float32, device=q.device)
        _key_scores_kernel[(nqb, n)](
            q, k, est, *q.stride(), *k.stride(), lq, lk, d, nqb, nkb, size,
            problem.q_offset - problem.k_offset, problem.scale, group,
            CAUSAL=problem.causal, BS=bs, BD=bd,
        )  # fmt: skip
        return est
    kbar = torch.empty(n_kv, nkb, d, dtype=torch.float32, device=q.device)
    _block_means_kernel[(nkb, n_kv)](k, kbar, *k.stride(), lk, d, nkb, size, BS=bs, BD=bd)
    est = torch.empty(n, nqb, nkb, dtype=torch.float32, device=q.device)
    _block_scores_kernel[(nqb, n)](
        q, kbar, est, *q.stride(), lq, lk, d, nqb, nkb, size,
        problem.q_offset - problem.k_offset, problem.scale, group,
        CAUSAL=problem.causal, BS=bs, BD=bd, BKB=min(64, triton.next_power_of_2(nkb)),
    )  # fmt: skip
    return est
