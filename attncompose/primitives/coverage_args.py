"""Coverage predicates as kernel data, so a Triton kernel can test "is (i, j) covered?".

A :class:`Predicate` gives each query a group id ``a[n, i]`` and each key a group id
``b[n, j]``; the pair is covered iff ``a == b`` (bucket form: sortLSH, sinks), iff
``table[n, a, b]`` when ``table`` is set (table form: block top-k), or iff
``0 <= a - b < band`` when ``band`` is set (band form on positions: local windows).
A coverage may need several predicates (a union: covered iff any covers), which kernels
can only use as exclusions.

The set is open: ``@kernel_form(MyCoverage)`` registers the converter of a new coverage.
Coverages without one have no kernel form and their patterns run in PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attncompose.primitives.base import Coverage, Problem, UnionCoverage
from attncompose.primitives.lsh import LshCoverage
from attncompose.primitives.sink import SinkCoverage
from attncompose.primitives.topk import TopkCoverage
from attncompose.primitives.window import WindowCoverage


@dataclass(frozen=True)
class Predicate:
    """``q_ids`` [N or 1, Lq] and ``k_ids`` [N or 1, Lk] int32; ``table`` [N or 1, A, B] bool
    (1: the same for every row) or None."""

    q_ids: Tensor
    k_ids: Tensor
    table: Tensor | None = None
    band: int | None = None


Converter = Callable[[Coverage, Problem], list[Predicate]]
_FORMS: dict[type, Converter] = {}


def kernel_form(cls: type) -> Callable[[Converter], Converter]:
    """Register the kernel form of a coverage class."""

    def deco(fn: Converter) -> Converter:
        _FORMS[cls] = fn
        return fn

    return deco


def has_kernel_form(cov: Coverage) -> bool:
    """Whether ``predicates(cov, ...)`` will succeed."""
    if isinstance(cov, UnionCoverage):
        return all(has_kernel_form(part) for part in cov.parts)
    return type(cov) in _FORMS


def predicates(cov: Coverage, problem: Problem) -> list[Predicate]:
    """Predicates whose union is ``cov`` (several only for a union)."""
    if isinstance(cov, UnionCoverage):
        return [p for part in cov.parts for p in predicates(part, problem)]
    if type(cov) not in _FORMS:
        raise TypeError(f"{type(cov).__name__} has no kernel form")
    return _FORMS[type(cov)](cov, problem)


@kernel_form(LshCoverage)
def _lsh(cov: LshCoverage, problem: Problem) -> list[Predicate]:
    n = cov.sel.q_pos.shape[0]
    slots = torch.arange(problem.lq, device=cov.sel.q_pos.device)
    slot_bucket = cov._slot_bucket(problem, slots).expand(n, -1)  # [N, Lq] by sorted slot
    q_bucket = slot_bucket.gather(1, cov.sel.q_pos)  # [N, Lq] by query index
    k_bucket = cov.sel.k_pos // cov._block(problem)  # [N, Lk]
    return [Predicate(q_bucket.int(), k_bucket.int())]


@kernel_form(TopkCoverage)
def _topk(cov: TopkCoverage, problem: Problem) -> list[Predicate]:
    dev = cov.table.device
    q_block = (torch.arange(problem.lq, device=dev, dtype=torch.int32) // cov.size)[None]
    k_block = (torch.arange(problem.lk, device=dev, dtype=torch.int32) // cov.size)[None]
    # a static table (power) is one table for every row, whatever the rows of the call
    table = cov.table[:1] if cov.row_invariant else cov.table
    return [Predicate(q_block, k_block, table)]


def _positions(problem: Problem, length: int, offset: int) -> Tensor:
    n = problem.q.shape[0]
    return (torch.arange(length, device=problem.q.device, dtype=torch.int32) + offset).expand(n, -1)


@kernel_form(SinkCoverage)
def _sink(cov: SinkCoverage, problem: Problem) -> list[Predicate]:
    sink = _positions(problem, problem.lk, problem.k_offset) < cov.count  # [N, Lk]
    q_ids = torch.zeros_like(_positions(problem, problem.lq, 0))
    return [Predicate(q_ids, torch.where(sink, 0, -1).int())]


@kernel_form(WindowCoverage)
def _window(cov: WindowCoverage, problem: Problem) -> list[Predicate]:
    q_pos = _positions(problem, problem.lq, problem.q_offset)
    k_pos = _positions(problem, problem.lk, problem.k_offset)
    return [Predicate(q_pos, k_pos, band=cov.width)]
