"""``sink``: exact attention to the first ``count`` keys (attention sinks, StreamingLLM).

Positions are absolute, so inside a causal splitter only rectangles that hold the first keys
see them. ``count = 0`` selects nothing. The coverage is a :class:`KeyBand` whose band ends
at the fixed position ``count - 1``, the same keys for every query.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from attncompose.primitives.base import Primitive, Problem
from attncompose.primitives.coverages import KeyBand
from attncompose.primitives.sink.schema import SinkStep


@dataclass
class SinkCoverage(KeyBand):
    """The keys at absolute positions [0, count)."""

    count: int

    key_only = True  # which keys, whatever the query

    @property
    def extent(self) -> int:
        return self.count

    def anchor(self, q_pos: Tensor) -> int:
        return self.count - 1

    def first_key(self, q_pos: Tensor) -> int:
        return 0

    def span(self, bq: int) -> int:
        return self.count


class Sink(Primitive):
    schema = SinkStep
    block_form = True
    packable = True  # positions of packed keys are their parts' (Packing.k_at)
    reads_rows = True  # positions only
    reads_groups = True

    def __call__(self, problem: Problem) -> SinkCoverage:
        # more sinks than keys: every key (the knob never sizes memory beyond the sequence)
        return SinkCoverage(min(self.knobs["count"], problem.k_offset + problem.lk))

    def kernel_name(self) -> str:
        return "positions only (no kernel)"
