"""``merge``: lse combination of partial results."""

from __future__ import annotations

from attncompose.primitives import dispatch
from attncompose.primitives.base import Partial, Primitive, Problem
from attncompose.primitives.merge.kernels import (
    TorchMerge,
    TorchMergeRows,
    TritonMerge,
    TritonMergeRows,
)
from attncompose.primitives.merge.schema import MergeStep


class Merge(Primitive):
    schema = MergeStep
    # "merge": partials over disjoint keys (this step's, the block step's passes, the causal
    # splitter's rectangle and square); "merge_rows": the causal splitter's packed rows
    kernels = (TritonMerge, TorchMerge, TritonMergeRows, TorchMergeRows)
    offset_free = True
    packable = True
    reads_rows = True  # partials only
    reads_groups = True

    def __call__(self, problem: Problem, inputs: list[Partial]) -> Partial:
        return dispatch.call("merge", self.backend, problem, list(inputs))

    def kernel_name(self) -> str:
        return dispatch.describe("merge", self.backend)
