"""Reference exact attention with log-sum-exp, in query chunks (never more than a chunk x Lk)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from attncompose.primitives.base import Partial, Problem

CHUNK_ELEMENTS = 1 << 24


def exact_attention(problem: Problem, leaf: int | None = None) -> Partial:
    """Softmax attention of every query over every visible key: (out, lse). With ``leaf``:
    of every query over the visible keys of its own leaf (:func:`on_leaves`)."""
    if leaf is not None:
        return on_leaves(exact_attention, problem, leaf)
    problem = problem.expanded()
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


def on_leaves(run: Callable[[Problem], Partial], problem: Problem, leaf: int) -> Partial:
    """``run`` (an exact attention) on a square problem cut into consecutive leaves of
    ``leaf`` rows, each query attending to the keys of its own leaf only (the causal
    splitter's diagonal): the leaves stacked as rows of one call, a view of contiguous
    inputs (strided ones are copied). out [N, Lq, Dv], lse [N, Lq]."""
    check_leaves(problem, leaf)
    problem = problem.expanded()  # a leaf's row is its query row's
    rows, n = problem.q.shape[0], problem.lq
    stack = lambda x: x.reshape(rows * (n // leaf), leaf, x.shape[-1])
    leaves = run(
        replace(problem, q=stack(problem.q), k=stack(problem.k), v=stack(problem.v),
                q_offset=0, k_offset=0)
    )  # fmt: skip
    return Partial(leaves.out.reshape(rows, n, -1), leaves.lse.reshape(rows, n))


def check_leaves(problem: Problem, leaf: int) -> None:
    """Leaves need a square problem of whole leaves, its queries and keys in order."""
    n = problem.lq
    mapped = problem.rows is not None or problem.packed is not None
    if mapped or problem.lk != n or leaf < 1 or n % leaf or problem.q_offset != problem.k_offset:
        raise ValueError(
            f"leaves of {leaf} rows need a square problem of whole leaves, queries and keys "
            f"in order: not {n} queries x {problem.lk} keys"
            + (" (packed or row-mapped)" if mapped else "")
            + ("" if problem.q_offset == problem.k_offset else " at different offsets")
        )
