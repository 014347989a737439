"""Dense views of what a pipeline covers, for analysis and tests (small n: they hold Lq x Lk).

``coverage_mask`` turns any coverage into its [N, Lq, Lk] boolean mask; ``attention_probs``
gives exact attention probabilities; together they measure how much of each query's
attention mass a detector captures.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncompose.primitives.base import Coverage, Problem


def coverage_mask(
    problem: Problem, coverage: Coverage | None = None, exclude: tuple[Coverage, ...] = ()
) -> Tensor:
    """Bool [N, Lq, Lk]: visible pairs covered by ``coverage`` (all if None), minus ``exclude``."""
    n = problem.q.shape[0]
    qi = torch.arange(problem.lq, device=problem.q.device).view(1, 1, -1, 1).expand(n, 1, -1, 1)
    kj = torch.arange(problem.lk, device=problem.q.device).view(1, 1, 1, -1).expand(n, 1, 1, -1)
    mask = problem.visible(qi, kj).expand(n, 1, problem.lq, problem.lk)
    if coverage is not None:
        mask = mask & coverage.covers(problem, qi, kj)
    for cov in exclude:
        mask = mask & ~cov.covers(problem, qi, kj)
    return mask[:, 0]


def attention_probs(problem: Problem) -> Tensor:
    """Exact attention probabilities [N, Lq, Lk] (float32, causal mask applied)."""
    problem = problem.expanded()
    s = torch.matmul(problem.q, problem.k.transpose(-1, -2)) * problem.scale
    if problem.causal:
        full = coverage_mask(problem)
        s = s.masked_fill(~full, float("-inf"))
    return torch.softmax(s, dim=-1)


def captured_mass(probs: Tensor, mask: Tensor) -> Tensor:
    """Share of each query's attention mass on the masked pairs: [N, Lq]."""
    return (probs * mask).sum(-1)


def oracle_mass(probs: Tensor, budget: int) -> Tensor:
    """Mass of each query's ``budget`` heaviest keys (the best any detector can do): [N, Lq]."""
    return probs.topk(min(budget, probs.shape[-1]), dim=-1).values.sum(-1)
