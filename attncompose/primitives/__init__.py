"""Primitives: each a folder with its PyTorch reference (``naive.py``) and its runtime."""

from __future__ import annotations

from attncompose.primitives import (
    block,
    causal_split,
    exact,
    lsh,
    merge,
    power,
    sink,
    topk,
    uniform_sample,
    window,
)
from attncompose.primitives.base import (
    PRIMITIVES,
    Coverage,
    Partial,
    Primitive,
    Problem,
    Selection,
    Tiles,
    register,
)

__all__ = [
    "PRIMITIVES",
    "Coverage",
    "Partial",
    "Primitive",
    "Problem",
    "Selection",
    "Tiles",
    "register",
]
del block, causal_split, exact, lsh, merge, power, sink, topk, uniform_sample, window
