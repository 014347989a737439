"""``merge``: lse combination of partial results."""

from __future__ import annotations

from attncompose.primitives.base import Partial, Primitive, Problem
from attncompose.primitives.merge.kernels import TorchMergeRows, TritonMergeRows
from attncompose.primitives.merge.naive import merge_partials
from attncompose.primitives.merge.schema import MergeStep


class Merge(Primitive):
    schema = MergeStep
    kernels = (TritonMergeRows, TorchMergeRows)  # "merge_rows": the causal splitter's
    offset_free = True
    packable = True
    reads_rows = True  # partials only
    reads_groups = True

    def __call__(self, problem: Problem, inputs: list[Partial]) -> Partial:
        return merge_partials(list(inputs))

    def kernel_name(self) -> str:
        return "torch:lse-merge"  # elementwise; no Triton kernel yet
