"""Reference block top-k: score key blocks per query block, keep the best ones.

The estimated mass of key block j for query block i (``score``):

- ``means``: ``exp(scale * qbar_i . kbar_j) * |j|``, the block's mean query against its mean
  key, times the block's size: nQB x nKB products of means;
- ``keys``: ``sum_{k in j} exp(scale * qbar_i . k)``, the mean query against every key of the
  block: nQB x Lk products (counted, :func:`key_products`). A block holding a few heavy keys
  among others keeps their mass here, where its mean key averages them away (on SmolLM2's
  early layers, whose heads attend to scattered single tokens, the same k blocks then keep
  2-4x less error).

A key block is visible to a query block when its first key is visible to the block's last
query. Count mode keeps the k best visible blocks; coverage mode keeps the smallest set whose
estimated share reaches p (at most max_k).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncompose.primitives.base import Problem, static_arange


def block_means(x: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """(means [N, nB, D], counts [nB]) of consecutive blocks of ``size`` rows of x [N, L, D].
    Full blocks are summed where they lie; only a last block cut by L is copied (zero-padded
    to ``size`` rows: the same sums as the whole of x padded, without copying every key of
    a decode step)."""
    n, length, d = x.shape
    nb, whole = -(-length // size), length // size
    sums = x[:, : whole * size].unflatten(1, (whole, size)).sum(2)
    if whole < nb:
        tail = x.new_zeros(n, 1, size, d)
        tail[:, 0, : length - whole * size] = x[:, whole * size :]
        sums = torch.cat([sums, tail.sum(2)], 1)
    counts = torch.full((nb,), size, device=x.device, dtype=x.dtype)
    counts[-1] = length - (nb - 1) * size
    return sums / counts[:, None], counts


SCORES = ("means", "keys")
SCORE_CHUNK = 1 << 24  # key scores held at once by the ``keys`` reference (64 MiB in fp32)


def block_scores(problem: Problem, size: int, score: str = "means") -> Tensor:
    """Estimated log-mass [N, nQB, nKB] of each key block per query block (``score``: see the
    module doc); -inf if invisible."""
    qm, _ = block_means(problem.q.float(), size)
    group = problem.kv_group  # query row n reads key row n // group
    if score == "means":
        km, kcount = block_means(problem.k.float(), size)
        km = km.repeat_interleave(group, 0) if group > 1 else km  # means: small
        est = torch.matmul(qm, km.transpose(-1, -2)) * problem.scale + kcount.log()
    elif score == "keys":
        est = _key_scores(qm, problem.k.float(), size, problem.scale, group)
    else:
        raise ValueError(f"unknown score {score!r}: expected one of {list(SCORES)}")
    return est.masked_fill(~block_visibility(problem, size), float("-inf"))


def _key_scores(qm: Tensor, k: Tensor, size: int, scale: float, group: int = 1) -> Tensor:
    """log sum_{k in block j} exp(scale * qm_i . k): [N, nQB, nKB], query blocks in chunks
    (k [N / group, Lk, D]: the mean queries of a group's heads in one product with its keys)."""
    lk = k.shape[1]
    n, nqb, d = qm.shape
    nkb = -(-lk // size)
    est = k.new_empty(n, nqb, nkb)
    step = max(1, SCORE_CHUNK // max(1, n * nkb * size))
    for i0 in range(0, nqb, step):
        chunk = qm[:, i0 : i0 + step]  # [N, C, D] -> [N / G, G*C, D]: a group's rows together
        grouped = chunk.reshape(-1, group * chunk.shape[1], d)
        s = torch.matmul(grouped, k.transpose(-1, -2)) * scale  # [N / G, G*C, Lk]
        s = torch.nn.functional.pad(s, (0, nkb * size - lk), value=float("-inf"))
        est[:, i0 : i0 + step] = torch.logsumexp(s.view(n, -1, nkb, size), -1)
    return est


def block_visibility(problem: Problem, size: int) -> Tensor:
    """[nQB, nKB] bool: key block j's first key is visible to query block i's last query."""
    nqb, nkb = -(-problem.lq // size), -(-problem.lk // size)
    dev = problem.q.device
    last_q = (torch.arange(nqb, device=dev) * size + size - 1).clamp_max(problem.lq - 1)
    first_k = torch.arange(nkb, device=dev) * size
    return problem.visible(last_q[:, None], first_k[None, :])


def key_products(problem: Problem, size: int) -> int:
    """Query-key products of ``keys`` scoring: each row's mean queries against the keys of
    the key blocks visible to them (what a kernel that skips invisible blocks computes)."""
    counts = torch.full((-(-problem.lk // size),), size, device=problem.q.device)
    counts[-1] = problem.lk - (len(counts) - 1) * size
    per_row = (block_visibility(problem, size).long() * counts).sum()
    return problem.q.shape[0] * int(per_row)


def select_blocks(est: Tensor, k: int, p: float | None, max_k: int) -> Tensor:
    """Bool table [N, nQB, nKB] of selected key blocks (never an invisible one)."""
    visible = est.abs() < float("inf")  # isfinite in two ops (it launches four)
    nkb = est.shape[-1]
    order = torch.sort(est, dim=-1, descending=True)
    rank = static_arange(nkb, est.device)
    if p is None:
        keep = rank < min(k, nkb)
        keep = keep.expand_as(est)
    else:
        share = torch.softmax(order.values, dim=-1).nan_to_num(0.0)
        before = torch.cumsum(share, dim=-1) - share  # mass of the better blocks
        keep = (before < p) & (rank < max_k)
    table = torch.zeros_like(visible)
    table.scatter_(-1, order.indices, keep)
    return table & visible
