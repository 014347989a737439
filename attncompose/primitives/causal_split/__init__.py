"""``causal_split``: HyperAttention's recursive causal splitter around a non-causal body.

A causal square of n <= min_seq_len rows is computed exactly. A larger one is halved: both
diagonal halves recurse, and the lower-left rectangle (second-half queries x first-half
keys, fully visible) goes through the non-causal body; its result is merged into the second
half's rows by lse. Where n halves evenly down to the leaves, the recursion runs unrolled:
all diagonal leaves in one exact call, then the rectangles level by level. Decode (Lq < Lk,
bottom-right aligned): the key prefix every query sees goes through the body, the trailing
Lq x Lq square recurses. Non-causal calls go straight to the body.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from attncompose.primitives.base import Partial, Primitive, Problem, register
from attncompose.primitives.exact.fast import fused_exact_attention
from attncompose.primitives.merge.naive import merge_partials
from attncompose.runtime import dispatch

Body = Callable[[Problem], Partial]


def causal_split(
    problem: Problem, body: Body, min_seq_len: int, exact: Body = fused_exact_attention
) -> Partial:
    """Causal attention by recursive halving (base cases by ``exact``); see the module doc."""
    if not problem.causal:
        return body(problem)
    last_q = problem.q_offset + problem.lq
    if last_q != problem.k_offset + problem.lk or problem.lq > problem.lk:
        return exact(problem)  # not bottom-right aligned: keep it exact
    if problem.lq == problem.lk:
        return _square(problem, body, min_seq_len, exact)
    if problem.lk <= min_seq_len:
        return exact(problem)
    delta = problem.lk - problem.lq  # keys [0, delta) are visible to every query
    rect = body(problem.sub(slice(None), slice(0, delta), causal=False))
    square = _square(
        problem.sub(slice(None), slice(delta, None), causal=True), body, min_seq_len, exact
    )
    return merge_partials([rect, square])


def _square(problem: Problem, body: Body, min_seq_len: int, exact: Body) -> Partial:
    n = problem.lq
    if n <= min_seq_len:
        return exact(problem)
    leaf, levels = n, 0
    while leaf > min_seq_len and leaf % 2 == 0:
        leaf, levels = leaf // 2, levels + 1
    if leaf <= min_seq_len:
        return _flat_square(problem, body, leaf, levels, exact)
    return _halve(problem, body, min_seq_len, exact)  # an odd length on the way down


def _flat_square(problem: Problem, body: Body, leaf: int, levels: int, exact: Body) -> Partial:
    """The recursion unrolled for n = leaf * 2**levels: every diagonal leaf in ONE exact call
    (the leaves stacked as rows: a view of contiguous inputs), then the rectangles level by
    level from the smallest, each merged into its rows in place (the recursion's order)."""
    rows, n = problem.q.shape[0], problem.lq
    parts = 1 << levels
    stack = lambda x: x.reshape(rows * parts, leaf, x.shape[-1])
    diagonal = replace(
        problem, q=stack(problem.q), k=stack(problem.k), v=stack(problem.v), q_offset=0, k_offset=0
    )
    leaves = exact(diagonal)  # squares: causal alignment needs no offsets
    out = leaves.out.reshape(rows, n, -1)
    lse = leaves.lse.reshape(rows, n)
    for level in range(levels):
        size = leaf << level
        for start in range(0, n, 2 * size):
            below = slice(start + size, start + 2 * size)
            rect = body(problem.sub(below, slice(start, start + size), causal=False))
            merged = merge_partials([Partial(out[:, below], lse[:, below]), rect])
            out[:, below] = merged.out
            lse[:, below] = merged.lse
    return Partial(out, lse)


def _halve(problem: Problem, body: Body, min_seq_len: int, exact: Body) -> Partial:
    """One level of the recursion: both diagonal halves, then the lower-left rectangle."""
    n = problem.lq
    h = n // 2
    top = _square(problem.sub(slice(0, h), slice(0, h), causal=True), body, min_seq_len, exact)
    bottom = _square(problem.sub(slice(h, n), slice(h, n), causal=True), body, min_seq_len, exact)
    rect = body(problem.sub(slice(h, n), slice(0, h), causal=False))
    bottom = merge_partials([bottom, rect])
    return Partial(torch.cat([top.out, bottom.out], dim=1), torch.cat([top.lse, bottom.lse], 1))


@register
class CausalSplit(Primitive):
    op = "causal_split"

    def __call__(self, problem: Problem, body: Body) -> Partial:
        exact = dispatch.choose("exact", self.backend, problem).load()
        return causal_split(problem, body, self.knobs["min_seq_len"], exact)

    def kernel_name(self) -> str:
        return "base case " + dispatch.describe("exact", self.backend)
