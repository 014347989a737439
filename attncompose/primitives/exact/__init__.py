"""``exact``: exact attention with lse (base case, fallback, reference)."""

from __future__ import annotations

from attncompose.primitives.base import Partial, Primitive, Problem, register
from attncompose.primitives.exact.fast import fused_exact_attention


@register
class Exact(Primitive):
    op = "exact"

    def __call__(self, problem: Problem) -> Partial:
        return fused_exact_attention(problem)

    def kernel_name(self) -> str:
        return "torch:sdpa-with-lse"
