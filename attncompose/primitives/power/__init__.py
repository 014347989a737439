"""``power``: PowerAttention's static sparse pattern (Chen et al., 2025).

Query block i attends to the key blocks at block distance 0, 1, 2, 4, 8, ... (up to
``max_distance``; 0 switches the pattern off), so information reaches any earlier position in
a logarithmic number of layers. Distances are in absolute positions, so the pattern is the
same inside a causal splitter's rectangles. The result is a static
:class:`~attncompose.primitives.coverages.BlockTable` (one table for every row), the kind
of coverage the ``topk`` detector computes from the data.
"""

from __future__ import annotations

import torch

from attncompose.primitives.base import Primitive, Problem, fitted_block
from attncompose.primitives.coverages import BlockTable
from attncompose.primitives.power.schema import PowerStep


def power_table(problem: Problem, size: int, max_distance: int) -> torch.Tensor:
    """Bool [N, nQB, nKB]: key block j is selected for query block i iff their distance is
    0 or a power of two not above ``max_distance`` (and max_distance > 0). Blocks in
    absolute positions: row i is the i-th block from the one of the first query (offsets no
    multiple of ``size`` shift the problem's queries and keys into them, :func:`shift_of`)."""
    dev = problem.q.device
    sq, sk = shift_of(problem, size)
    nqb, nkb = -(-(problem.lq + sq) // size), -(-(problem.lk + sk) // size)
    q_block = problem.q_offset // size + torch.arange(nqb, device=dev)
    k_block = problem.k_offset // size + torch.arange(nkb, device=dev)
    d = q_block[:, None] - k_block[None, :]
    table = (d >= 0) & (d <= max_distance) & ((d & (d - 1)) == 0) & (max_distance > 0)
    return table.expand(problem.q.shape[0], -1, -1)


def shift_of(problem: Problem, size: int) -> tuple[int, int]:
    """How far the first query and key lie into their absolute blocks of ``size``."""
    return problem.q_offset % size, problem.k_offset % size


class Power(Primitive):
    schema = PowerStep
    block_form = True
    reads_groups = True  # positions only

    def __call__(self, problem: Problem) -> BlockTable:
        # blocks are absolute: from the sequence's end up, one block holds every position
        end = max(problem.q_offset + problem.lq, problem.k_offset + problem.lk)
        size = fitted_block(self.knobs["block_size"], end)
        reach = min(self.knobs["max_distance"], -(-end // size))
        # positions only: made once per problem shape, not a dozen small ops every call
        make = lambda: power_table(problem, size, reach)
        table = problem.memo("power-table", (size, reach), make)
        return BlockTable(table, size, key=("power", size, reach), shift=shift_of(problem, size))

    def kernel_name(self) -> str:
        return "positions only (no kernel)"
