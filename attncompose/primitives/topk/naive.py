"""Reference block top-k: score key blocks by block means, keep the best per query block.

The estimated mass of key block j for query block i is ``exp(scale * qbar_i . kbar_j) * |j|``
(mean query against mean key, times the block's size). Count mode keeps the k best visible
blocks; coverage mode keeps the smallest set whose estimated share reaches p (at most max_k).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncompose.primitives.base import Problem


def block_means(x: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """(means [N, nB, D], counts [nB]) of consecutive blocks of ``size`` rows of x [N, L, D]."""
    n, length, d = x.shape
    nb = -(-length // size)
    padded = x.new_zeros(n, nb * size, d)
    padded[:, :length] = x
    counts = torch.full((nb,), size, device=x.device, dtype=x.dtype)
    counts[-1] = length - (nb - 1) * size
    return padded.view(n, nb, size, d).sum(2) / counts[:, None], counts


def block_scores(problem: Problem, size: int) -> Tensor:
    """Estimated log-mass [N, nQB, nKB] of each key block per query block; -inf if invisible."""
    qm, _ = block_means(problem.q.float(), size)
    km, kcount = block_means(problem.k.float(), size)
    est = torch.matmul(qm, km.transpose(-1, -2)) * problem.scale + kcount.log()
    nqb, nkb = est.shape[1:]
    dev = problem.q.device
    last_q = (torch.arange(nqb, device=dev) * size + size - 1).clamp_max(problem.lq - 1)
    first_k = torch.arange(nkb, device=dev) * size
    visible = problem.visible(last_q[:, None], first_k[None, :])
    return est.masked_fill(~visible, float("-inf"))


def select_blocks(est: Tensor, k: int, p: float | None, max_k: int) -> Tensor:
    """Bool table [N, nQB, nKB] of selected key blocks (never an invisible one)."""
    visible = torch.isfinite(est)
    nkb = est.shape[-1]
    order = torch.sort(est, dim=-1, descending=True)
    if p is None:
        keep = torch.arange(nkb, device=est.device) < min(k, nkb)
        keep = keep.expand_as(est)
    else:
        share = torch.softmax(order.values, dim=-1).nan_to_num(0.0)
        before = torch.cumsum(share, dim=-1) - share  # mass of the better blocks
        keep = (before < p) & (torch.arange(nkb, device=est.device) < max_k)
    table = torch.zeros_like(visible)
    table.scatter_(-1, order.indices, keep)
    return table & visible
