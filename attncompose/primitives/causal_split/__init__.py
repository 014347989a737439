"""``causal_split``: HyperAttention's recursive causal splitter around a non-causal body.

A causal square of n <= min_seq_len rows is computed exactly. A larger one is halved: both
diagonal halves recurse, and the lower-left rectangle (second-half queries x first-half
keys, fully visible) goes through the non-causal body; its result is merged into the second
half's rows by lse. Decode (Lq < Lk, bottom-right aligned): the key prefix every query sees
goes through the body, the trailing Lq x Lq square recurses. Non-causal calls go straight to
the body.
"""

from __future__ import annotations

from collections.abc import Callable

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
