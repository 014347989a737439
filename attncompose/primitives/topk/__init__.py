"""``topk``: block-level heavy-hitter detector (by count k or coverage p).

Per query block, the key blocks of largest estimated mass (the query block's mean query
against the key blocks' means or against each key, :mod:`.naive`), as a
:class:`~attncompose.primitives.coverages.BlockTable` of one table per row.
"""

from __future__ import annotations

from attncompose.primitives import dispatch
from attncompose.primitives.base import (
    Primitive,
    Problem,
    add_products,
    counting_products,
    fitted_block,
)
from attncompose.primitives.coverages import BlockTable
from attncompose.primitives.topk.kernels import TorchBlockMeanScores, TritonBlockMeanScores
from attncompose.primitives.topk.naive import key_products, select_blocks
from attncompose.primitives.topk.schema import TopkStep


class Topk(Primitive):
    schema = TopkStep
    kernels = (TritonBlockMeanScores, TorchBlockMeanScores)
    block_form = True
    reads_groups = True  # its scores through dispatch.call
    offset_free = True

    def __call__(self, problem: Problem) -> BlockTable:
        # sizes beyond the problem act as their largest useful value (one block, every block)
        size = fitted_block(self.knobs["block_size"], max(problem.lq, problem.lk))
        blocks = -(-problem.lk // size)
        k, max_k = (min(self.knobs[name], blocks) for name in ("k", "max_k"))
        score = self.knobs["score"]
        est = dispatch.call("topk_scores", self.backend, problem, size, score=score)
        if score == "keys" and counting_products():  # its count syncs with the device
            add_products(key_products(problem, size))
        p = self.knobs.get("p")
        table = select_blocks(est, k, p, max_k)
        return BlockTable(table, size, most=k if p is None else max_k)

    def kernel_name(self) -> str:
        return dispatch.describe("topk_scores", self.backend) + " + torch top-k"
