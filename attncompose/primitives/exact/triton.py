"""Triton flash-attention forward with lse: causal with absolute positions, any offsets.

One program per (query block, row n) streams the visible key blocks with an online softmax
in the log2 domain (scores pre-multiplied by ``scale * log2(e)``); rows that see no key get
``out = 0`` and ``lse = -inf``, as in the reference. Inputs may be float32, float16 or
bfloat16; accumulation is float32 and the results are float32.

Rows of q, k and v are read by pointer arithmetic (cp.async pipelining on a GPU) or, on GPUs
with the tensor memory accelerator (sm_90+), through tensor descriptors (TMA bulk copies):
an autotuned choice, see :func:`descriptors`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from attncompose.primitives import dispatch
from attncompose.primitives.base import Partial, Problem
from attncompose.primitives.exact.naive import check_leaves

LOG2E = math.log2(math.e)


@triton.jit
def online_softmax_step(b_s, b_v, b_m, b_l, b_acc, DOT: tl.constexpr):
    """One key chunk: b_s [BQ, BK] log2 scores (-inf masked), b_v [BK, BDV] -> (m, l, acc);
    ``DOT``: tl.dot's input precision (see :func:`dot_precision`)."""
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))  # [BQ]
    b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # rows with no key yet stay at 0 mass
    b_p = tl.exp2(b_s - b_ms[:, None])  # [BQ, BK]
    b_alpha = tl.exp2(b_m - b_ms)  # [BQ]
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT)
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
    GROUP,  # query rows per key/value row (grouped-query attention): row n reads n // GROUP
    Lq,
    Lk,
    delta,  # q_offset - k_offset: key j is visible to query i iff j <= i + delta
    leaf,  # query i sees the keys of its leaf [i // leaf * leaf, + leaf) only
    qk_scale,  # scale * log2(e)
    ROWS_B,  # autotune key only: power-of-two bucket of Lq
    KEYS_B,  # autotune key only: power-of-two bucket of Lk
    TMA_OK,  # autotune key only: which loads the configs may use (see descriptors())
    CAUSAL: tl.constexpr,
    LEAVES: tl.constexpr,  # several leaves: a query tile across two masks each query to its own
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    DOT: tl.constexpr,
    TMA: tl.constexpr,  # rows through tensor descriptors (zero past the ends), not pointers
):
    i_q = tl.program_id(0)
    i_n = tl.program_id(1).to(tl.int64)  # row offsets i_n * s_qn may pass 2**31
    o_q = i_q * BQ + tl.arange(0, BQ)  # [BQ]
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_q = o_q < Lq
    i_kv = i_n // GROUP  # the row's key/value row
    if TMA:
        b_q = rows_of(q + i_n * s_qn, Lq, s_ql, BQ, BD).load([i_q * BQ, 0])  # [BQ, BD]
        d_k = rows_of(k + i_kv * s_kn, Lk, s_kl, BK, BD)
        d_v = rows_of(v + i_kv * s_vn, Lk, s_vl, BK, BDV)
    else:
        p_q = q + i_n * s_qn + o_q[:, None] * s_ql + o_d[None, :] * s_qd
        b_q = tl.load(p_q, mask=m_q[:, None], other=0.0)  # [BQ, BD]
        d_k, d_v = k + i_kv * s_kn, v + i_kv * s_vn  # the row's keys and values
    b_m = tl.full([BQ], float("-inf"), tl.float32)
    b_l = tl.zeros([BQ], tl.float32)
    b_acc = tl.zeros([BQ, BDV], tl.float32)
    k0 = i_q * BQ // leaf * leaf  # leaf of the block's first query (0: one leaf holds all)
    k_last = (tl.minimum(Lq, (i_q + 1) * BQ) - 1) // leaf * leaf  # ... of its last query
    k_end = tl.minimum(Lk, k_last + leaf)
    hi = k_end
    lo = k0 + (k_end - k0) // BK * BK  # key blocks wholly before the leaf's end
    lo = tl.where(k_last > k0, k0, lo)  # a block across leaves: no key every query sees
    if CAUSAL:  # keys past the block's last query are invisible to the whole block; keys up
        # to its first query's are visible to every query of it
        hi = tl.minimum(k_end, tl.maximum(k0, (i_q + 1) * BQ + delta))
        lo = tl.minimum(lo, k0 + tl.maximum(0, i_q * BQ + delta + 1 - k0) // BK * BK)
    lo = tl.minimum(lo, hi)
    # blocks of keys every query of the block sees: no mask (rows past Lq compute unstored)
    for i_k in range(k0, lo, BK):
        b_k, b_v = _key_block(d_k, d_v, i_k, Lk, s_kl, s_kd, s_vl, s_vd, BK, BD, BDV, TMA)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT) * qk_scale  # [BQ, BK]
        b_m, b_l, b_acc = online_softmax_step(b_s, b_v, b_m, b_l, b_acc, DOT)
    # the rest: the causal diagonal and the last, partial block of keys
    for i_k in range(lo, hi, BK):
        o_k = i_k + tl.arange(0, BK)  # [BK]
        b_k, b_v = _key_block(d_k, d_v, i_k, Lk, s_kl, s_kd, s_vl, s_vd, BK, BD, BDV, TMA)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT) * qk_scale  # [BQ, BK]
        m_s = m_q[:, None] & (o_k < k_end)[None, :]
        if LEAVES:  # each query's own leaf (one leaf: every key of the row)
            m_s = m_s & ((o_k // leaf)[None, :] == (o_q // leaf)[:, None])
        if CAUSAL:
            m_s = m_s & (o_k[None, :] <= o_q[:, None] + delta)
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax_step(b_s, b_v, b_m, b_l, b_acc, DOT)
    b_out, b_lse = finish_rows(b_m, b_l, b_acc)
    p_o = o + i_n * s_on + o_q[:, None] * s_ol + o_dv[None, :] * s_od
    tl.store(p_o, b_out, mask=m_q[:, None])
    tl.store(lse + i_n * s_ln + o_q, b_lse, mask=m_q)


@triton.jit
def _key_block(
    d_k, d_v, i_k, Lk, s_kl, s_kd, s_vl, s_vd, BK: tl.constexpr, BD: tl.constexpr,
    BDV: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Keys and values i_k .. i_k + BK of a row ([BK, BD], [BK, BDV]; zeros past Lk):
    ``d_k``/``d_v`` its tensor descriptors (TMA) or its first key's and value's pointers."""
    if TMA:
        b_k, b_v = d_k.load([i_k, 0]), d_v.load([i_k, 0])
    else:
        o_k = i_k + tl.arange(0, BK)
        b_k, b_v = kv_rows(d_k, d_v, o_k, o_k < Lk, s_kl, s_kd, s_vl, s_vd, BD, BDV)
    return b_k, b_v


@triton.jit
def kv_rows(k, v, s_k, m_k, s_kl, s_kd, s_vl, s_vd, BD: tl.constexpr, BDV: tl.constexpr):
    """Key and value rows ``s_k`` [BK] where ``m_k``, zeros elsewhere ([BK, BD], [BK, BDV]):
    ``k``/``v`` point at the first key and value of their row n."""
    m = m_k[:, None]
    p_k = k + s_k[:, None] * s_kl + tl.arange(0, BD)[None, :] * s_kd
    p_v = v + s_k[:, None] * s_vl + tl.arange(0, BDV)[None, :] * s_vd
    return tl.load(p_k, mask=m, other=0.0), tl.load(p_v, mask=m, other=0.0)


@triton.jit
def rows_of(base, rows, stride, BR: tl.constexpr, BC: tl.constexpr):
    """A tensor descriptor of the ``rows`` rows of ``BC`` contiguous elements at ``base``,
    ``stride`` apart, read in blocks of ``BR`` rows; rows past the end read as zeros."""
    return tl.make_tensor_descriptor(base, [rows, BC], [stride, 1], [BR, BC])


def tile_sizes(rows: int, cols: int) -> tuple[int, int]:
    """(BQ, BK) under the interpreter: powers of two in [16, 64] (tl.dot needs 16; small tiles
    keep interpreted programs cheap)."""
    return (
        max(16, min(64, triton.next_power_of_2(rows))),
        max(16, min(64, triton.next_power_of_2(cols))),
    )


# (BQ, BK, num_warps, num_stages) the attention kernels autotune over on a GPU
ATTENTION_CONFIGS = (
    (128, 128, 8, 2),
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 32, 4, 3),
    (64, 128, 4, 2),
    (64, 64, 4, 3),
    (64, 32, 4, 3),
    (32, 64, 4, 2),
    (16, 64, 4, 2),
    (16, 32, 2, 2),
    (16, 16, 2, 1),
)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision, as PyTorch's own matmuls: float32 inputs in full precision
    ("ieee") unless ``torch.backends.cuda.matmul.allow_tf32`` allows TF32 (Triton's default
    would be TF32 always); 16-bit inputs are multiplied exactly either way."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


def bucket(size: int) -> int:
    """Power-of-two bucket of a length: the autotune key, so lengths (a decode step's growing
    Lk) share one tuning per bucket instead of tuning at every new length."""
    return max(16, triton.next_power_of_2(max(1, size)))


def prune_configs(configs, named_args, **kwargs):
    """Drop tile sizes larger than the bucketed rows/keys a program sees (all masked work)."""
    rows, keys = named_args["ROWS_B"], named_args["KEYS_B"]
    kept = [c for c in configs if c.kwargs["BQ"] <= rows and c.kwargs["BK"] <= keys]
    return kept or [min(configs, key=lambda c: c.kwargs["BQ"] * c.kwargs["BK"])]


# TMA_OK, the launch argument saying which loads a kernel's configs may use
NO_TMA, EITHER, TMA_ONLY = 0, 1, 2
TMA_MODES = {"auto": EITHER, "on": TMA_ONLY, "off": NO_TMA}


def tma_tiles(bq: int, bk: int, stages: int) -> bool:
    """Whether a tile config is also tried with tensor-descriptor loads: tiles that run on
    Hopper's warpgroup MMA (64+ rows and keys), software-pipelined (2+ stages)."""
    return bq >= 64 and bk >= 64 and stages >= 2


def descriptors(*tensors: torch.Tensor) -> int:
    """The kernels' ``TMA_OK`` for reading rows of these [N, L, D] tensors: ``NO_TMA`` unless
    this Triton has tensor descriptors, the tensors sit on a GPU with TMA (sm_90+; any device
    under the interpreter) and their rows are as TMA needs them (contiguous, 16-byte aligned
    starts and strides, 16+ bytes long); else by ``ATTNCOMPOSE_TMA``: "auto" (default: the
    autotuner times descriptor loads against pointer loads; the interpreter runs pointer
    loads), "on" (descriptor loads only, the interpreter too) or "off" (never)."""
    mode = os.environ.get("ATTNCOMPOSE_TMA", "auto")
    if mode not in TMA_MODES:
        raise ValueError(f"ATTNCOMPOSE_TMA={mode!r}: expected one of {', '.join(TMA_MODES)}")
    if TMA_MODES[mode] == NO_TMA or not hasattr(tl, "make_tensor_descriptor"):
        return NO_TMA
    for t in tensors:
        size = t.element_size()
        starts = [t.data_ptr(), *(s * size for s in t.stride()[:-1])]
        if t.stride(-1) != 1 or t.shape[-1] * size < 16 or any(x % 16 for x in starts):
            return NO_TMA
    if not dispatch.interpreting():
        dev = tensors[0].device
        if dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] < 9:
            return NO_TMA
    return TMA_MODES[mode]


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the tensor descriptors a kernel makes (Triton's allocator)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _allocator_set() -> None:
    """Give Triton an allocator for device-made tensor descriptors unless one is set."""
    try:
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # another Triton: ours, as documented
        unset = True
    if unset:
        triton.set_allocator(_scratch)


def prune_tma(configs, named_args) -> list:
    """The configs whose loads ``TMA_OK`` allows; with ``TMA_ONLY``, pointer loads where no
    descriptor config is left."""
    allowed = named_args.get("TMA_OK", NO_TMA)
    if allowed == EITHER:
        return list(configs)
    uses = lambda c: c.kwargs.get("TMA", False)
    kept = [c for c in configs if uses(c) == (allowed == TMA_ONLY)]
    return kept or [c for c in configs if not uses(c)]


def autotuned(
    kernel, key: list[str], configs=ATTENTION_CONFIGS, prune=prune_configs, tma: bool = False
):
    """``kernel`` autotuned over ``configs`` per (ROWS_B, KEYS_B, *key) and input dtypes,
    ``prune`` dropping the configs that do not suit a launch. ``tma``: the kernel takes
    ``TMA_OK`` and a ``TMA`` constexpr; the configs of :func:`tma_tiles` come twice, with
    pointer loads and with descriptor loads, and ``TMA_OK`` (an autotune key) picks which
    may run.

    The kernels only store their results (nothing accumulates into ``out``), so the
    autotuner's repeated launches leave the same result."""
    made = []
    for bq, bk, w, s in configs:
        loads = (False, True) if tma and tma_tiles(bq, bk, s) else (False,)
        for use in loads:
            kwargs = {"BQ": bq, "BK": bk} | ({"TMA": use} if tma else {})
            made.append(triton.Config(kwargs, num_warps=w, num_stages=s))
    both = lambda configs, named_args, **kw: prune_tma(prune(configs, named_args), named_args)
    return triton.autotune(
        configs=made,
        key=["ROWS_B", "KEYS_B", *(["TMA_OK"] if tma else []), *key],
        prune_configs_by={"early_config_prune": both if tma else prune},
    )(kernel)


def launch(
    kernel, tuned, grid, rows: int, keys: int, *args, tma: int | None = None, **meta
) -> None:
    """Run an attention kernel: ``grid(BQ)`` programs; ``rows``/``keys``: queries and
    candidate keys a program row sees; ``tma``: the ``TMA_OK`` of a kernel that takes one
    (:func:`descriptors`). Under the interpreter with one config (the fixed
    :func:`tile_sizes`; descriptor loads only when ``tma`` is ``TMA_ONLY``), on a GPU
    through ``tuned``, its autotuned wrapper."""
    keys_args = (bucket(rows), bucket(keys)) + (() if tma is None else (tma,))
    if dispatch.interpreting():
        bq, bk = tile_sizes(rows, keys)
        if tma is not None:
            meta["TMA"] = tma == TMA_ONLY
        kernel[grid(bq)](*args, *keys_args, BQ=bq, BK=bk, **meta)
    else:
        if tma:
            _allocator_set()
        tuned[lambda config: grid(config["BQ"])](*args, *keys_args, **meta)


_exact_tuned = autotuned(_exact_fwd_kernel, ["CAUSAL", "LEAVES", "BD", "BDV", "DOT"], tma=True)


def exact_attention(
    problem: Problem, out: Partial | None = None, leaf: int | None = None
) -> Partial:
    """Same contract as the reference ``exact_attention``; writes into ``out`` when given.
    ``leaf``: the queries and keys are consecutive leaves of ``leaf`` rows, each attending
    to its own only (:func:`~attncompose.primitives.exact.naive.on_leaves`), read where
    they lie (a tile of queries across two leaves masks each query to its own)."""
    if leaf is not None:
        check_leaves(problem, leaf)
    q, k, v = problem.q, problem.k, problem.v
    n, lq, d = q.shape
    dv = v.shape[-1]
    if out is None:
        out = Partial(
            q.new_empty(n, lq, dv, dtype=torch.float32), q.new_empty(n, lq, dtype=torch.float32)
        )
    launch(
        _exact_fwd_kernel,
        _exact_tuned,
        lambda bq: (triton.cdiv(lq, bq), n),
        lq if leaf is None else leaf,  # tuned as the stacked leaves were
        problem.lk if leaf is None else leaf,
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
        problem.kv_group,
        lq,
        problem.lk,
        problem.q_offset - problem.k_offset,
        max(lq, problem.lk, 1) if leaf is None else leaf,
        problem.scale * LOG2E,
        tma=descriptors(q, k, v),
        CAUSAL=problem.causal,
        LEAVES=leaf is not None and leaf < lq,  # queries of more than one leaf
        BD=d,
        BDV=dv,
        DOT=dot_precision(q.dtype),
    )
    return out
