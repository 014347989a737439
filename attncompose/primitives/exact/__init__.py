"""``exact``: exact attention with lse (base case, fallback, reference)."""

from __future__ import annotations

from attncompose.primitives import dispatch
from attncompose.primitives.base import Partial, Primitive, Problem
from attncompose.primitives.exact.kernels import SdpaCuda, SdpaWithLse, TritonFlash
from attncompose.primitives.exact.schema import ExactStep


class Exact(Primitive):
    schema = ExactStep
    kernels = (SdpaCuda, TritonFlash, SdpaWithLse)
    offset_free = True
    reads_groups = True  # its kernels through dispatch.call

    def __call__(self, problem: Problem) -> Partial:
        return dispatch.call("exact", self.backend, problem)

    def kernel_name(self) -> str:
        return dispatch.describe("exact", self.backend)
