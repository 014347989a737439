"""Implementations of the ``lsh_sort`` kernel op: hash, Gray rank, sort."""

from __future__ import annotations

from attncompose.primitives.dispatch import Kernel, TritonKernel
from attncompose.primitives.lsh.naive import sort_positions


class TritonGrayRankSort(TritonKernel):
    """Projections, sign bits and Gray rank in one Triton pass, then ``torch.sort``."""

    op = "lsh_sort"
    name = "triton:lsh-gray-rank+torch.sort"
    lazy = "triton.sort_positions"


class TorchGrayRankSort(Kernel):
    """The reference: sign codes by a matmul, Gray rank, stable sort."""

    op = "lsh_sort"
    name = "torch:lsh-gray-rank+torch.sort"
    function = staticmethod(sort_positions)
