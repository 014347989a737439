"""Primitives: one folder per op, and the op list that registers them.

Each folder ``attncompose/primitives/<op>/`` holds all of one primitive: its step model
(``schema.py``, pydantic, no torch), its runtime (the :class:`Primitive` subclass in
``__init__.py``, with its selection and coverage), its PyTorch reference (``naive.py``) and
its kernels (``kernels.py``: each implementation with what it cannot run). :func:`register`
takes a primitive in: its step model into the recipe's vocabulary
(:func:`attncompose.spec.register_step`), its runtime under its op name, its kernels into
:mod:`~attncompose.primitives.dispatch` and its fusion patterns into
:mod:`~attncompose.primitives.fusion`.
:data:`OPS`, the op list, registers the built-in ones in the order recipes' messages name
them; adding a primitive is one folder and one entry there.
"""

from __future__ import annotations

from attncompose.primitives import dispatch, fusion
from attncompose.primitives.base import (
    Coverage,
    Partial,
    Primitive,
    Problem,
    Selection,
    Tiles,
)
from attncompose.primitives.block import Block
from attncompose.primitives.causal_split import CausalSplit
from attncompose.primitives.exact import Exact
from attncompose.primitives.lsh import Lsh
from attncompose.primitives.merge import Merge
from attncompose.primitives.power import Power
from attncompose.primitives.sink import Sink
from attncompose.primitives.topk import Topk
from attncompose.primitives.uniform_sample import UniformSample
from attncompose.primitives.window import Window
from attncompose.spec.steps import register_step

PRIMITIVES: dict[str, type[Primitive]] = {}


def register(primitive: type[Primitive]) -> type[Primitive]:
    """Take a primitive in: its step model, its runtime under its op name, its kernels and
    its fusion patterns."""
    op = primitive.op
    if PRIMITIVES.get(op, primitive) is not primitive:
        raise ValueError(f"a primitive named {op!r} is already registered")
    register_step(primitive.schema)
    PRIMITIVES[op] = primitive
    for kernel in primitive.kernels:
        dispatch.add(kernel)
    for pattern in primitive.fusions:
        fusion.add(pattern)
    return primitive


# the op list
OPS: tuple[type[Primitive], ...] = (
    Lsh,
    Topk,
    Sink,
    Window,
    Power,
    Block,
    UniformSample,
    Merge,
    Exact,
    CausalSplit,
)
for _primitive in OPS:
    register(_primitive)

__all__ = [
    "OPS",
    "PRIMITIVES",
    "Coverage",
    "Partial",
    "Primitive",
    "Problem",
    "Selection",
    "Tiles",
    "register",
]
