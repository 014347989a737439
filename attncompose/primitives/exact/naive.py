"""Reference exact attention with log-sum-exp, in query chunks (never more than a chunk x Lk)."""

from __future__ import annotations

import torch

from attncompose.primitives.base import Partial, Problem

CHUNK_ELEMENTS = 1 << 24


def exact_attention(problem: Problem) -> Partial:
    """Softmax attention of every query over every visible key: (out, lse)."""
    n, lq = problem.q.shape[:2]
    lk = problem.lk
    result = Partial.empty(problem)
    chunk = max(1, CHUNK_ELEMENTS // max(1, n * lk))
    kj = torch.arange(lk, device=problem.q.device)
    q, k, v = problem.q.float(), problem.k.float(), problem.v.float()
    for i0 in range(0, lq, chunk):
        qi = torch.arange(i0, min(lq, i0 + chunk), device=problem.q.device)
        s = torch.matmul(q[:, qi], k.transpose(-1, -2)) * problem.scale
        s = s.masked_fill(~problem.visible(qi[:, None], kj[None, :]), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.nan_to_num(neginf=0.0).unsqueeze(-1))
        result.out[:, qi] = torch.matmul(p, v)
        result.lse[:, qi] = lse
    return result
