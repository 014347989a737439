"""Triton block-sparse attention that walks a :class:`~attncompose.primitives.plan.BlockPlan`.

One launch for the whole plan. One program per (query sub-tile of a plan query block, row n)
loads its queries once, then runs ONE online softmax over every key block the plan lists for
its query block: first the full blocks, read as contiguous key ranges with no mask at all,
then the partial blocks, where the pair rule is evaluated (bounds, causal on absolute
positions, the plan's own coverages OR'ed, its exclusions subtracted, all as kernel data:
:meth:`~attncompose.primitives.base.Coverage.predicates`). A per-key log-weight
(``key_bias``) rides along in both. float16/bfloat16 inputs are read as they are and
multiplied in their precision, accumulation is float32, ``out`` is written in the inputs'
dtype and ``lse`` in float32. Tiles (BQ, BK dividing the plan's blocks), warps and stages
are autotuned per device, and on GPUs with TMA, where the plan reads rows in place (no row
maps), pointer loads against tensor-descriptor loads (:func:`~attncompose.primitives.exact.
triton.descriptors`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attncompose.primitives.base import Partial, Problem
from attncompose.primitives.block.triton import Packed, covered, pack
from attncompose.primitives.exact.triton import (
    LOG2E,
    NO_TMA,
    autotuned,
    descriptors,
    dot_precision,
    finish_rows,
    kv_rows,
    launch,
    online_softmax_step,
    rows_of,
)
from attncompose.primitives.plan import BlockPlan


@triton.jit
def _plan_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,
    full_num,
    full_idx,
    part_num,
    part_idx,
    kbias,
    pred_q,
    pred_k,
    meta,
    table,
    q_rows,  # [N, Lq] the problem query each plan row reads and writes (HAS_ROWS)
    k_rows,  # [N, Lk] the problem key (and value) each plan key reads (HAS_KROWS)
    q_map,  # [problem Lq] the row of q each problem query is (HAS_MAPS: Problem.rows)
    k_map,  # [problem Lk] the row of k and v each problem key is
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
    s_pr,  # plan row stride: 1 when every row has its own lists, 0 when they share one
    s_br,  # key bias row stride (in elements; 0: shared)
    s_rn,  # q_rows row stride
    s_kr,  # k_rows row stride
    N,
    GROUP,  # query rows per key/value row (grouped-query attention): row n reads n // GROUP
    Lq,
    Lk,  # the plan's keys
    NQB,  # query blocks of the plan
    W_FULL,  # width of the full-block index lists
    W_PART,
    delta,  # q_offset - k_offset: key j is visible to query i iff j <= i + delta
    qk_scale,  # scale * log2(e)
    ROWS_B,  # autotune key only: the plan's query block
    KEYS_B,  # autotune key only: the plan's key block
    TMA_OK,  # autotune key only: which loads the configs may use (exact.triton.descriptors)
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KBIAS: tl.constexpr,
    HAS_ROWS: tl.constexpr,  # plan rows in permuted order (no pair rule: no causality)
    HAS_KROWS: tl.constexpr,  # plan keys in permuted order (no pair rule either)
    HAS_MAPS: tl.constexpr,  # the problem's queries and keys are rows of q, k, v
    N_OWN: tl.constexpr,  # predicates whose union a partial pair must be in (0: any pair)
    N_PRED: tl.constexpr,  # own predicates first, then the excluded ones
    MODES: tl.constexpr,  # each predicate's form, 2 bits each (Packed.modes)
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    DOT: tl.constexpr,
    TMA: tl.constexpr,  # rows in place through tensor descriptors (never with HAS_KROWS/MAPS)
):
    SUB: tl.constexpr = BLOCK_Q // BQ
    i_p = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)  # row offsets i_n * s_qn may pass 2**31
    i_qb = i_p // SUB
    o_q = i_qb * BLOCK_Q + (i_p % SUB) * BQ + tl.arange(0, BQ)  # [BQ]
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    # the problem's query of each row (where its result is written), the row of q it is
    r_q, s_q, m_q = _rows_of(o_q, o_q < Lq, q_rows, i_n * s_rn, q_map, HAS_ROWS, HAS_MAPS)
    if TMA and not HAS_ROWS:
        d_q = rows_of(q + i_n * s_qn, Lq, s_ql, BQ, BD)
        b_q = d_q.load([i_qb * BLOCK_Q + (i_p % SUB) * BQ, 0])  # [BQ, BD]
    else:
        p_q = q + i_n * s_qn + s_q[:, None] * s_ql + o_d[None, :] * s_qd
        b_q = tl.load(p_q, mask=m_q[:, None], other=0.0)  # [BQ, BD]
    k_n, v_n = k + (i_n // GROUP) * s_kn, v + (i_n // GROUP) * s_vn  # the row's keys, values
    if TMA:
        d_k = rows_of(k_n, Lk, s_kl, BK, BD)
        d_v = rows_of(v_n, Lk, s_vl, BK, BDV)
    b_m = tl.full([BQ], float("-inf"), tl.float32)
    b_l = tl.zeros([BQ], tl.float32)
    b_acc = tl.zeros([BQ, BDV], tl.float32)
    p_list = i_n * s_pr * NQB + i_qb
    SUBK: tl.constexpr = BLOCK_K // BK  # key tiles per plan key block
    # full blocks: every pair takes part, contiguous keys, no mask (bounds: kernel_states);
    # one flat loop over (block, key tile) so the pipeliner prefetches across blocks
    n_full = tl.load(full_num + p_list)
    for i_it in range(0, n_full * SUBK):
        i_kb = tl.load(full_idx + p_list * W_FULL + i_it // SUBK).to(tl.int64)
        o_k = i_kb * BLOCK_K + (i_it % SUBK) * BK + tl.arange(0, BK)  # [BK]
        if HAS_KROWS:  # keys where they are; a key of row -1 takes no part
            _, s_k, m_r = _rows_of(o_k, o_k < Lk, k_rows, i_n * s_kr, k_map, True, HAS_MAPS)
            b_k, b_v = kv_rows(k_n, v_n, s_k, m_r, s_kl, s_kd, s_vl, s_vd, BD, BDV)
        elif TMA:
            i_k = (i_kb * BLOCK_K).to(tl.int32) + (i_it % SUBK) * BK
            b_k, b_v = d_k.load([i_k, 0]), d_v.load([i_k, 0])  # [BK, BD], [BK, BDV]
        else:
            s_k = o_k  # the row of k it is
            if HAS_MAPS:
                s_k = tl.load(k_map + o_k).to(tl.int32)
            b_k = tl.load(k_n + s_k[:, None] * s_kl + o_d[None, :] * s_kd)
            b_v = tl.load(v_n + s_k[:, None] * s_vl + o_dv[None, :] * s_vd)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT) * qk_scale  # [BQ, BK]
        if HAS_KBIAS:
            b_s = _add_bias(b_s, kbias, i_n * s_br, o_k, o_k < Lk)
        if HAS_KROWS:
            b_s = tl.where(m_r[None, :], b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax_step(b_s, b_v, b_m, b_l, b_acc, DOT)
    # partial blocks: the pair rule decides
    n_part = tl.load(part_num + p_list)
    for i_it in range(0, n_part * SUBK):
        i_kb = tl.load(part_idx + p_list * W_PART + i_it // SUBK).to(tl.int64)
        o_k = i_kb * BLOCK_K + (i_it % SUBK) * BK + tl.arange(0, BK)  # [BK]
        _, s_k, m_k = _rows_of(o_k, o_k < Lk, k_rows, i_n * s_kr, k_map, HAS_KROWS, HAS_MAPS)
        if TMA:  # keys past Lk read as zeros
            i_k = (i_kb * BLOCK_K).to(tl.int32) + (i_it % SUBK) * BK
            b_k, b_v = d_k.load([i_k, 0]), d_v.load([i_k, 0])  # [BK, BD], [BK, BDV]
        else:
            b_k, b_v = kv_rows(k_n, v_n, s_k, m_k, s_kl, s_kd, s_vl, s_vd, BD, BDV)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT) * qk_scale  # [BQ, BK]
        m_s = m_q[:, None] & m_k[None, :]
        if CAUSAL:
            m_s = m_s & (o_k[None, :] <= o_q[:, None] + delta)
        if N_PRED > 0:
            m_own = tl.full([BQ, BK], N_OWN == 0, tl.int1)
            for i_r in tl.static_range(N_PRED):  # WHOLE: a plan tile is in one table block
                hit = covered(pred_q, pred_k, meta, table, i_r, i_n, o_q, o_k, m_q, m_k,
                              N, Lq, Lk, MODES, True)  # fmt: skip
                if i_r < N_OWN:
                    m_own = m_own | hit
                else:
                    m_s = m_s & ~hit
            m_s = m_s & m_own
        if HAS_KBIAS:
            b_s = _add_bias(b_s, kbias, i_n * s_br, o_k, m_k)
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax_step(b_s, b_v, b_m, b_l, b_acc, DOT)
    b_out, b_lse = finish_rows(b_m, b_l, b_acc)
    p_o = o + i_n * s_on + r_q[:, None] * s_ol + o_dv[None, :] * s_od
    tl.store(p_o, b_out.to(o.dtype.element_ty), mask=m_q[:, None])
    tl.store(lse + i_n * s_ln + r_q, b_lse, mask=m_q)


@triton.jit
def _rows_of(o, m, rows, row, maps, HAS_ROWS: tl.constexpr, HAS_MAPS: tl.constexpr):
    """(r, s, m) of plan indices ``o`` [B] in bounds where ``m``: the problem's index r
    (``rows[row + o]`` with HAS_ROWS; -1: none), the row s of the tensor that index is
    (``maps[r]`` with HAS_MAPS) and ``m`` less the indices of none."""
    r = o
    if HAS_ROWS:
        r = tl.load(rows + row + o, mask=m, other=-1).to(tl.int32)
        m = m & (r >= 0)
    s = r
    if HAS_MAPS:
        s = tl.load(maps + r, mask=m, other=0).to(tl.int32)
    return r, s, m


@triton.jit
def _add_bias(b_s, kbias, row, o_k, m_k):
    """Scores + the keys' natural-log weights (into the log2 domain); -inf drops a key."""
    b_kb = tl.load(kbias + row + o_k, mask=m_k, other=float("-inf"))  # [BK]
    b_kb = b_kb * 1.4426950408889634
    return tl.where(b_kb[None, :] > float("-inf"), b_s + b_kb[None, :], float("-inf"))


# (BQ, BK, num_warps, num_stages): tiles that divide the plan's blocks; FlashAttention-2's
# Hopper-friendly shapes first (128 x 64 with 8 warps for d=128, 4 for d=64)
PLAN_CONFIGS = (
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (64, 32, 4, 3),
    (32, 32, 4, 2),
    (16, 16, 2, 1),
)


def prune_plan_configs(configs, named_args, **kwargs):
    """Tiles that divide the plan's blocks and are at least half of them (up to 128): small
    tiles in large blocks only repeat loads; fewer configs, less autotuning per variant."""
    block_q, block_k = named_args["ROWS_B"], named_args["KEYS_B"]
    fits = lambda tile, block: tile <= block and 2 * tile >= min(block, 128)
    kept = [c for c in configs if fits(c.kwargs["BQ"], block_q) and fits(c.kwargs["BK"], block_k)]
    return kept or [min(configs, key=lambda c: c.kwargs["BQ"] * c.kwargs["BK"])]


_PLAN_KEY = ["BLOCK_Q", "BLOCK_K", "CAUSAL", "HAS_KBIAS", "HAS_ROWS", "HAS_KROWS", "HAS_MAPS"]
_PLAN_KEY += ["N_OWN", "N_PRED", "MODES"]
_plan_tuned = autotuned(
    _plan_fwd_kernel, [*_PLAN_KEY, "BD", "BDV", "DOT"], PLAN_CONFIGS, prune_plan_configs, True
)


def _packed(problem: Problem, plan: BlockPlan) -> tuple[Packed, int]:
    """The plan's pair rule as kernel data: own predicates first (OR), then exclusions."""
    rules = [(p, True) for cov in plan.own for p in cov.predicates(problem)]
    rules += [(p, False) for cov in plan.exclude for p in cov.predicates(problem)]
    return pack(problem, rules), sum(want for _, want in rules)


def plan_attention(problem: Problem, plan: BlockPlan) -> Partial:
    """(out [N, Lq, Dv] in the inputs' dtype, lse [N, Lq] float32) over the plan's pairs,
    in one kernel launch; rows that select no key get out 0 and lse -inf. With
    ``plan.query_rows`` the plan's rows read and write the problem's queries they name (a
    query in no row, unless ``plan.every_query``: out 0, lse -inf); with ``plan.key_rows``
    its keys read the problem's keys and values they name. A problem with row maps
    (``problem.rows``) is read through them."""
    q, k, v = problem.q, problem.k, problem.v
    n, lq, d = q.shape[0], problem.lq, q.shape[-1]
    dv = v.shape[-1]
    maps = problem.rows
    g = plan.grid
    lists = plan.kernel_lists()
    make = lambda: _packed(problem, plan)
    # a static plan is reused across calls: its rules too (per row count and device)
    packed, n_own = plan.memo(("rules", n, q.device), make) if plan.row_invariant else make()
    rows = plan.query_rows
    if rows is None or plan.every_query:
        out = Partial(q.new_empty(n, lq, dv), q.new_empty(n, lq, dtype=torch.float32))
    else:  # queries in no row keep these
        out = Partial(
            q.new_zeros(n, lq, dv), q.new_full((n, lq), float("-inf"), dtype=torch.float32)
        )
    if rows is not None and rows.stride(-1) != 1:
        rows = rows.contiguous()
    k_rows = plan.key_rows
    if k_rows is not None and k_rows.stride(-1) != 1:
        k_rows = k_rows.contiguous()
    bias = plan.key_bias
    kbias = lists.full_num if bias is None else bias.float().contiguous()
    launch(
        _plan_fwd_kernel,
        _plan_tuned,
        lambda bq: (g.nqb * (g.block_q // bq), n),
        g.block_q,
        g.block_k,
        q,
        k,
        v,
        out.out,
        out.lse,
        lists.full_num,
        lists.full_idx,
        lists.part_num,
        lists.part_idx,
        kbias,
        packed.q_ids,
        packed.k_ids,
        packed.meta,
        packed.table,
        lists.full_num if rows is None else rows,
        lists.full_num if k_rows is None else k_rows,
        lists.full_num if maps is None else maps.q,
        lists.full_num if maps is None else maps.k,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.out.stride(),
        out.lse.stride(0),
        int(plan.rows > 1),
        0 if bias is None or bias.shape[0] == 1 else kbias.stride(0),
        0 if rows is None else rows.stride(0),
        0 if k_rows is None else k_rows.stride(0),
        n,
        problem.kv_group,
        lq if rows is None else g.lq,  # the plan's rows
        problem.lk if k_rows is None else g.lk,  # the plan's keys
        g.nqb,
        lists.full_idx.shape[-1],
        lists.part_idx.shape[-1],
        problem.q_offset - problem.k_offset,
        problem.scale * LOG2E,
        tma=NO_TMA if k_rows is not None or maps is not None else descriptors(q, k, v),
        BLOCK_Q=g.block_q,
        BLOCK_K=g.block_k,
        CAUSAL=problem.causal,
        HAS_KBIAS=bias is not None,
        HAS_ROWS=rows is not None,
        HAS_KROWS=k_rows is not None,
        HAS_MAPS=maps is not None,
        N_OWN=n_own,
        N_PRED=packed.count,
        MODES=packed.modes,
        BD=d,
        BDV=dv,
        DOT=dot_precision(q.dtype),
    )
    return out
