"""Implementations of the ``topk_scores`` kernel op: block means and their scores."""

from __future__ import annotations

from attncompose.primitives.dispatch import Kernel, TritonKernel
from attncompose.primitives.topk.naive import block_scores


class TritonBlockMeanScores(TritonKernel):
    """Block means and their scores in two Triton passes."""

    op = "topk_scores"
    name = "triton:block-mean-scores"
    lazy = "triton.block_scores"


class TorchBlockMeanScores(Kernel):
    """The reference: block means by a padded sum, one matmul."""

    op = "topk_scores"
    name = "torch:block-mean-scores"
    function = staticmethod(block_scores)
