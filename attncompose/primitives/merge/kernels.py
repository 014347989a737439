"""Implementations of the ``merge_rows`` kernel op: a packed result merged into its rows."""

from __future__ import annotations

from attncompose.primitives.dispatch import Kernel, TritonKernel
from attncompose.primitives.merge.naive import merge_rows_into


class TritonMergeRows(TritonKernel):
    """Every target row's sources gathered and folded in by an online lse, one launch."""

    op = "merge_rows"
    name = "triton:merge-rows"
    lazy = "triton.merge_rows_into"


class TorchMergeRows(Kernel):
    """The reference: a scatter-max and two scatter-adds."""

    op = "merge_rows"
    name = "torch:scatter-merge-rows"
    function = staticmethod(merge_rows_into)
