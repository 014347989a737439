"""Implementations of the ``topk_scores`` kernel op: a key block's estimated mass per query
block, from block means or from every key (the ``score`` knob)."""

from __future__ import annotations

from attncompose.primitives.dispatch import Kernel, TritonKernel
from attncompose.primitives.topk.naive import block_scores


class TritonBlockMeanScores(TritonKernel):
    """Block means and their scores in two Triton passes (``keys``: one pass over the keys)."""

    op = "topk_scores"
    name = "triton:block-mean-scores"
    lazy = "triton.block_scores"
    reads_groups = True  # row n reads key row n // kv_group (block means once per key row)


class TorchBlockMeanScores(Kernel):
    """The reference: block means by a padded sum, one matmul (``keys``: a matmul against
    every key, a log-sum-exp per block)."""

    op = "topk_scores"
    name = "torch:block-mean-scores"
    function = staticmethod(block_scores)
    reads_groups = True  # a group's key means, or its keys, read once for its query heads
