"""Dense references for tests: full-mask attention built from coverage predicates.

Small sizes only (they hold Lq x Lk matrices): the specification that the tiled kernels
must reproduce.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncompose.eval.analysis import coverage_mask
from attncompose.primitives.base import Coverage, Partial, Problem


def make_problem(
    n: int = 2,
    lq: int = 63,
    lk: int | None = None,
    d: int = 16,
    *,
    causal: bool = False,
    seed: int = 0,
) -> Problem:
    """A float32 Problem with random q/k/v; causal problems are bottom-right aligned."""
    lk = lq if lk is None else lk
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, length, d, generator=g) for length in (lq, lk, lk))
    return Problem(
        q,
        k,
        v,
        scale=d**-0.5,
        causal=causal,
        heads=n,
        kv_group=1,
        q_offset=lk - lq if causal else 0,
    )


def dense_mask(
    problem: Problem, coverage: Coverage | None = None, exclude: tuple[Coverage, ...] = ()
) -> Tensor:
    """Bool [N, Lq, Lk]: visible pairs covered by ``coverage`` and by none of ``exclude``."""
    return coverage_mask(problem, coverage, exclude)


def masked_attention(problem: Problem, mask: Tensor, bias: Tensor | None = None) -> Partial:
    """Softmax attention restricted to ``mask`` [N, Lq, Lk], in float64: (out, lse); ``bias``
    [N, Lq, Lk] (optional) is added to the scores (log-weights of the pairs)."""
    s = torch.matmul(problem.q.double(), problem.k.double().transpose(-1, -2)) * problem.scale
    if bias is not None:
        s = s + bias.double()
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0).unsqueeze(-1))
    return Partial(torch.matmul(p, problem.v.double()), lse)
