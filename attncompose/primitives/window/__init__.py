"""``window``: exact attention to the ``width`` keys ending at each query's position.

Query at absolute position p covers keys at positions (p - width, p]; with a bottom-right
causal mask that is a sliding window of ``width`` keys including the query's own position.
``width = 0`` selects nothing. The coverage is a :class:`KeyBand` anchored at the query.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from attncompose.primitives.base import Primitive, Problem
from attncompose.primitives.coverages import KeyBand
from attncompose.primitives.window.schema import WindowStep


@dataclass
class WindowCoverage(KeyBand):
    """The ``width`` keys up to and including each query's position."""

    width: int

    @property
    def extent(self) -> int:
        return self.width

    def anchor(self, q_pos: Tensor) -> Tensor:
        return q_pos

    def first_key(self, q_pos: Tensor) -> Tensor:
        return q_pos - self.width + 1  # the band of the tile's first query to its last's

    def span(self, bq: int) -> int:
        return bq + self.width - 1 if self.width else 0


class Window(Primitive):
    schema = WindowStep
    block_form = True
    packable = True  # positions of packed queries and keys are their parts' (Packing)
    reads_rows = True  # positions only
    reads_groups = True

    def __call__(self, problem: Problem) -> WindowCoverage:
        # wider than the last query's distance to the first key: the same keys as that width
        # (tiles hold width + tile keys: the knob must not size memory beyond the sequence)
        reach = max(0, problem.q_offset + problem.lq - problem.k_offset)
        return WindowCoverage(min(self.knobs["width"], reach))

    def kernel_name(self) -> str:
        return "positions only (no kernel)"
