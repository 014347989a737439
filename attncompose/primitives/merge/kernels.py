"""Implementations of the ``merge`` kernel op (partials over disjoint keys merged by lse) and
of ``merge_rows`` (a packed result merged into its rows)."""

from __future__ import annotations

from attncompose.primitives.dispatch import Kernel, TritonKernel
from attncompose.primitives.merge.naive import merge, merge_rows_into


class TritonMerge(TritonKernel):
    """Two partials at a time in one launch (the reference launches a dozen ops a part)."""

    op = "merge"
    name = "triton:lse-merge"
    lazy = "triton.merge_partials"
    reads_rows = True  # partials only: the problem's tensors are not read
    reads_groups = True


class TorchMerge(Kernel):
    """The reference: elementwise torch ops, folding the parts into a copy of the first."""

    op = "merge"
    name = "torch:lse-merge"
    function = staticmethod(merge)
    reads_rows = True
    reads_groups = True


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
