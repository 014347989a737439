"""What a model takes, known before loading it, and the error for inputs it cannot take.

Loading a model takes up to a minute on a busy CPU, so a command checks its arguments (layers,
key/value heads, sequence length) against the model's card first and fails at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from attncompose.eval.data import DataError

LayerSelection = Union[str, int, Sequence[int]]


class ModelInputError(DataError):
    """Input a model cannot take: layers or heads it lacks, more tokens than its positions or
    than the text holds, a text that is empty or not UTF-8."""


def select_layers(layers: LayerSelection, num_layers: int) -> frozenset[int]:
    """Layer indices chosen by ``layers``: "all", k >= 0 (first k), -k (last k) or a list."""
    if layers == "all":
        return frozenset(range(num_layers))
    if isinstance(layers, (bool, str)):
        raise ValueError(f"layers must be 'all', an int or a list of ints, not {layers!r}")
    if isinstance(layers, int):
        if abs(layers) > num_layers:
            raise ValueError(f"layers={layers} but the model has {num_layers} layers")
        return frozenset(range(layers) if layers >= 0 else range(num_layers + layers, num_layers))
    chosen = frozenset(int(i) for i in layers)
    outside = sorted(i for i in chosen if not 0 <= i < num_layers)
    if outside:
        raise ValueError(f"layers {outside} are outside 0..{num_layers - 1}")
    return chosen


@dataclass(frozen=True)
class ModelCard:
    """A model's shape: ``layers`` decoder layers, ``kv_heads`` key/value heads per layer,
    ``positions`` the longest sequence it was trained for."""

    name: str
    layers: int
    kv_heads: int
    positions: int

    def check(
        self, seq_len: int, layers: str | list[int] = "all", kv_heads: list[int] | None = None
    ) -> None:
        """Raise :class:`ModelInputError` for a length, layers or heads the model lacks."""
        if seq_len > self.positions:
            raise ModelInputError(
                f"--seq-len {seq_len} exceeds the {self.positions} positions of {self.name} "
                "(beyond them its attention is untrained)"
            )
        try:
            select_layers(layers, self.layers)
        except ValueError as err:
            raise ModelInputError(f"{err} ({self.name})") from None
        bad = sorted(h for h in kv_heads or () if not 0 <= h < self.kv_heads)
        if bad:
            raise ModelInputError(f"no key/value heads {bad}: {self.name} has {self.kv_heads}")
        twice = sorted({h for h in kv_heads or () if list(kv_heads).count(h) > 1})
        if twice:  # a capture would hold them twice and claim as many heads
            raise ModelInputError(f"--kv-heads names key/value heads {twice} more than once")
