"""Triton tile kernel: exact attention of each tile's queries over its candidate keys.

Same contract as the reference ``block_attention``. One program per (query sub-tile, tile,
row n) gathers its queries by ``q_idx``, streams the tile's candidate keys (``k_idx``) in
chunks with an online softmax and applies, per pair: padding (-1), the causal mask on
absolute positions, the selection's own coverage (unless ``tiles.exact``) and every
``exclude`` coverage, all as kernel data (:meth:`Coverage.predicates`).
The tile's ``lse_shift`` is added to its rows' lse and its ``key_bias`` to the scores of each
candidate key (a key with bias ``-inf`` takes no part).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from attncompose.primitives.base import Coverage, Partial, Predicate, Problem, Tiles, pinned
from attncompose.primitives.exact.triton import (
    LOG2E,
    autotuned,
    dot_precision,
    finish_rows,
    kv_rows,
    launch,
    online_softmax_step,
)


@triton.jit
def _keep(
    pred_q, pred_k, meta, table, i_p: tl.constexpr, i_n, b_qi, b_kj, m_q, m_k, N, Lq, Lk, MODES
):
    """Bool [BQ, BK]: does predicate i_p let the pairs through (covered == want)?"""
    want = tl.load(meta + i_p * 6 + 1)
    hit = covered(pred_q, pred_k, meta, table, i_p, i_n, b_qi, b_kj, m_q, m_k, N, Lq, Lk, MODES)
    return hit == (want != 0)


@triton.jit
def covered(
    pred_q,
    pred_k,
    meta,
    table,
    i_p: tl.constexpr,
    i_n,
    b_qi,
    b_kj,
    m_q,
    m_k,
    N,
    Lq,
    Lk,
    MODES: tl.constexpr,
    WHOLE: tl.constexpr = False,
):
    """Bool [BQ, BK]: does predicate i_p cover the pairs (queries b_qi x keys b_kj)? Its form
    (bits 2*i_p of :attr:`Packed.modes`) is known when the kernel compiles: only that form is
    computed. ``WHOLE``: the tile mostly lies in one block of any table (a plan's blocks
    divide its tables' blocks), so a table is read once, not per pair; pair by pair where it
    does not (a table of absolute blocks shifted against the problem's, BlockTable.shift)."""
    MODE: tl.constexpr = (MODES >> (2 * i_p)) & 3
    b_a = tl.load(pred_q + (i_p * N + i_n) * Lq + b_qi, mask=m_q, other=-1)  # [BQ]
    b_b = tl.load(pred_k + (i_p * N + i_n) * Lk + b_kj, mask=m_k, other=-2)  # [BK]
    if MODE == 1 and WHOLE:  # the tile's one table entry (ids of padding are negative)
        p_row = table + tl.load(meta + i_p * 6 + 2) + i_n * tl.load(meta + i_p * 6 + 3)
        cols = tl.load(meta + i_p * 6 + 4)
        a, b = tl.max(b_a, 0), tl.max(b_b, 0)
        a_low = tl.min(tl.where(b_a >= 0, b_a, a), 0)
        b_low = tl.min(tl.where(b_b >= 0, b_b, b), 0)
        if (a_low == a) & (b_low == b):
            entry = tl.load(p_row + a * cols + b, mask=(a >= 0) & (b >= 0))
            hit = tl.full([b_qi.shape[0], b_kj.shape[0]], 1, tl.int1) & (entry != 0)  # [BQ, BK]
        else:  # the tile straddles table blocks
            p_t = p_row + b_a[:, None] * cols + b_b[None, :]
            hit = tl.load(p_t, mask=m_q[:, None] & m_k[None, :], other=0) != 0
    elif MODE == 1:  # table: row b_a, column b_b of this row n's table
        p_row = table + tl.load(meta + i_p * 6 + 2) + i_n * tl.load(meta + i_p * 6 + 3)
        p_t = p_row + b_a[:, None] * tl.load(meta + i_p * 6 + 4) + b_b[None, :]
        hit = tl.load(p_t, mask=m_q[:, None] & m_k[None, :], other=0) != 0  # [BQ, BK]
    elif MODE == 2:  # band: query minus key position in [0, width)
        b_gap = b_a[:, None] - b_b[None, :]  # [BQ, BK]
        hit = (b_gap >= 0) & (b_gap < tl.load(meta + i_p * 6 + 5))
    else:  # bucket: the same id
        hit = b_a[:, None] == b_b[None, :]
    return hit


@triton.jit
def _block_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,
    q_idx,
    k_idx,
    shift,
    kbias,
    pred_q,
    pred_k,
    meta,
    table,
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
    N,
    GROUP,  # query rows per key/value row (grouped-query attention): row n reads n // GROUP
    T,
    Lq,
    Lk,
    TQ,  # queries per tile (bq)
    NK,  # candidate keys per tile
    delta,  # q_offset - k_offset
    qk_scale,  # scale * log2(e)
    ROWS_B,  # autotune key only: power-of-two bucket of TQ
    KEYS_B,  # autotune key only: power-of-two bucket of NK
    CAUSAL: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_KBIAS: tl.constexpr,
    N_PRED: tl.constexpr,
    MODES: tl.constexpr,  # each predicate's form, 2 bits each (Packed.modes)
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    DOT: tl.constexpr,
):
    i_s, i_t = tl.program_id(0), tl.program_id(1)
    i_n = tl.program_id(2).to(tl.int64)  # row offsets i_n * s_qn may pass 2**31
    o_r = i_s * BQ + tl.arange(0, BQ)  # [BQ] rows of the tile
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    p_tile = (i_n * T + i_t).to(tl.int64)
    b_qi = tl.load(q_idx + p_tile * TQ + o_r, mask=o_r < TQ, other=-1)  # [BQ]
    m_q = b_qi >= 0
    p_q = q + i_n * s_qn + b_qi[:, None] * s_ql + o_d[None, :] * s_qd
    b_q = tl.load(p_q, mask=m_q[:, None], other=0.0)  # [BQ, BD]
    k_n, v_n = k + (i_n // GROUP) * s_kn, v + (i_n // GROUP) * s_vn  # the row's keys, values
    b_m = tl.full([BQ], float("-inf"), tl.float32)
    b_l = tl.zeros([BQ], tl.float32)
    b_acc = tl.zeros([BQ, BDV], tl.float32)
    for i_k in range(0, NK, BK):
        o_k = i_k + tl.arange(0, BK)  # [BK]
        b_kj = tl.load(k_idx + p_tile * NK + o_k, mask=o_k < NK, other=-1)  # [BK]
        m_k = b_kj >= 0
        b_k, b_v = kv_rows(k_n, v_n, b_kj, m_k, s_kl, s_kd, s_vl, s_vd, BD, BDV)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT) * qk_scale  # [BQ, BK]
        m_s = m_q[:, None] & m_k[None, :]
        if CAUSAL:
            m_s = m_s & (b_kj[None, :] <= b_qi[:, None] + delta)
        for i_p in tl.static_range(N_PRED):
            m_s = m_s & _keep(
                pred_q, pred_k, meta, table, i_p, i_n, b_qi, b_kj, m_q, m_k, N, Lq, Lk, MODES
            )
        if HAS_KBIAS:
            b_kb = tl.load(kbias + p_tile * NK + o_k, mask=o_k < NK, other=float("-inf"))
            m_s = m_s & (b_kb > float("-inf"))[None, :]
            b_kb = b_kb * 1.4426950408889634  # natural-log weights into the log2 domain
            b_s = b_s + tl.where(b_kb > float("-inf"), b_kb, 0.0)[None, :]
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax_step(b_s, b_v, b_m, b_l, b_acc, DOT)
    b_out, b_lse = finish_rows(b_m, b_l, b_acc)
    if HAS_SHIFT:
        b_lse = b_lse + tl.load(shift + p_tile)
    p_o = o + i_n * s_on + b_qi[:, None] * s_ol + o_dv[None, :] * s_od
    tl.store(p_o, b_out, mask=m_q[:, None])
    tl.store(lse + i_n * s_ln + b_qi, b_lse, mask=m_q)


_block_tuned = autotuned(
    _block_fwd_kernel,
    ["CAUSAL", "HAS_SHIFT", "HAS_KBIAS", "N_PRED", "MODES", "BD", "BDV", "DOT"],
)


@dataclass(frozen=True)
class Packed:
    """Predicates stacked for the kernel: ids [P, N, Lq] / [P, N, Lk], flat int8 tables and
    meta [P, 6] = (mode: 0 bucket / 1 table / 2 band, want: keep iff covered, table offset,
    table stride per row n (0: one table for every row), table columns, band width); the
    modes also as ``modes`` (2 bits each, predicate p at bits 2p), a constexpr of the kernels:
    each predicate's form is chosen when they compile, not per pair."""

    q_ids: Tensor
    k_ids: Tensor
    meta: Tensor
    table: Tensor
    count: int
    modes: int = 0


def pack(problem: Problem, rules: list[tuple[Predicate, bool]]) -> Packed:
    dev = problem.q.device
    if not rules:
        return pinned(_no_rules(dev))
    n = problem.q.shape[0]
    meta, tables, offset = [], [], 0
    for pred, want in rules:
        if pred.table is None:
            band = pred.band is not None
            meta.append([2 if band else 0, int(want), 0, 0, 0, pred.band if band else 0])
            continue
        count, rows, cols = pred.table.shape  # count 1: one table for every row
        meta.append([1, int(want), offset, rows * cols if count > 1 else 0, cols, 0])
        tables.append(pred.table.reshape(-1).to(torch.int8))
        offset += pred.table.numel()
    table = torch.cat(tables) if tables else torch.zeros(1, dtype=torch.int8, device=dev)
    return Packed(
        torch.stack([p.q_ids.expand(n, -1) for p, _ in rules]).int().contiguous(),
        torch.stack([p.k_ids.expand(n, -1) for p, _ in rules]).int().contiguous(),
        pinned(_meta_on(tuple(map(tuple, meta)), dev)),
        table,
        len(rules),
        sum(row[0] << (2 * i) for i, row in enumerate(meta)),
    )


@functools.lru_cache(maxsize=16)
def _no_rules(device: torch.device) -> Packed:
    """The kernel's arguments for no rules (placeholders it never reads), made once per
    device, not three small launches per call."""
    dummy = torch.zeros(1, dtype=torch.int32, device=device)
    return Packed(dummy, dummy, dummy.long(), dummy.to(torch.int8), 0)


@functools.lru_cache(maxsize=256)
def _meta_on(meta: tuple[tuple[int, ...], ...], device: torch.device) -> Tensor:
    """The rules' meta rows on ``device``, made once per meta, each value written there by a
    fill that takes it as an argument: a copy from host memory would make the host wait for
    the device (and cannot be captured in a CUDA graph), and a decode loop meets new meta at
    every step (its table's columns grow with the keys)."""
    out = torch.zeros(len(meta), len(meta[0]), dtype=torch.int64, device=device)
    for i, row in enumerate(meta):
        for j, value in enumerate(row):
            if value:
                out[i, j].fill_(value)
    return out


def block_attention(
    problem: Problem,
    tiles: Tiles,
    own: Coverage | None = None,
    exclude: tuple[Coverage, ...] = (),
    out: Partial | None = None,
) -> Partial:
    """(out [N, Lq, Dv], lse [N, Lq]) over the tiles' pairs; rows in no tile get lse=-inf.

    ``out``: buffers to write; the kernel writes only rows that sit in a tile, so pass
    ``out`` only when every query is in one (else the rest keeps what ``out`` held).
    """
    if out is None:
        n, lq = problem.q.shape[:2]
        out = Partial(
            problem.q.new_zeros(n, lq, problem.v.shape[-1], dtype=torch.float32),
            problem.q.new_full((n, lq), float("-inf"), dtype=torch.float32),
        )
    rules: list[tuple[Predicate, bool]] = []
    if own is not None and not tiles.exact:
        mine = own.predicates(problem)
        if len(mine) != 1:
            raise TypeError("a union coverage can only be excluded, not selected, in a kernel")
        rules.append((mine[0], True))
    rules += [(p, False) for cov in exclude for p in cov.predicates(problem)]
    packed = pack(problem, rules)
    q, k, v = problem.q, problem.k, problem.v
    n, t, tq = tiles.q_idx.shape
    nk = tiles.k_idx.shape[-1]
    q_idx = tiles.q_idx.expand(n, t, tq).contiguous()
    k_idx = tiles.k_idx.expand(n, t, nk).contiguous()
    shift = tiles.lse_shift
    shift = q_idx if shift is None else shift.float().expand(n, t).contiguous()
    kbias = tiles.key_bias
    kbias = q_idx if kbias is None else kbias.float().expand(n, t, nk).contiguous()
    launch(
        _block_fwd_kernel,
        _block_tuned,
        lambda bq: (triton.cdiv(tq, bq), t, n),
        tq,
        nk,
        q,
        k,
        v,
        out.out,
        out.lse,
        q_idx,
        k_idx,
        shift,
        kbias,
        packed.q_ids,
        packed.k_ids,
        packed.meta,
        packed.table,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.out.stride(),
        out.lse.stride(0),
        n,
        problem.kv_group,
        t,
        problem.lq,
        problem.lk,
        tq,
        nk,
        problem.q_offset - problem.k_offset,
        problem.scale * LOG2E,
        CAUSAL=problem.causal,
        HAS_SHIFT=tiles.lse_shift is not None,
        HAS_KBIAS=tiles.key_bias is not None,
        N_PRED=packed.count,
        MODES=packed.modes,
        BD=q.shape[-1],
        BDV=v.shape[-1],
        DOT=dot_precision(q.dtype),
    )
    return out
