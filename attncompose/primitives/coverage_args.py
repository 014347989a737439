"""Coverage predicates as kernel data, so a Triton kernel can test "is (i, j) covered?".

A :class:`Predicate` gives each query a group id ``a[n, i]`` and each key a group id
``b[n, j]``; the pair is covered iff ``a == b`` (bucket form, sortLSH) or, when ``table`` is
set, iff ``table[n, a, b]`` (table form, block top-k). A coverage may need several predicates
(a union: covered iff any covers), which kernels can only use as exclusions.

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
from attncompose.primitives.topk import TopkCoverage


@dataclass(frozen=True)
class Predicate:
    """``q_ids`` [N, Lq] and ``k_ids`` [N, Lk] int32; ``table`` [N, A, B] bool or None."""

    q_ids: Tensor
    k_ids: Tensor
    table: Tensor | None = None


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
    q_bucket = cov._q_bucket(problem, cov.sel.q_pos)  # [N, Lq]
    k_bucket = cov.sel.k_pos // cov.b  # [N, Lk]
    return [Predicate(q_bucket.int(), k_bucket.int())]


@kernel_form(TopkCoverage)
def _topk(cov: TopkCoverage, problem: Problem) -> list[Predicate]:
    n = cov.table.shape[0]
    dev = cov.table.device
    q_block = (torch.arange(problem.lq, device=dev, dtype=torch.int32) // cov.size).expand(n, -1)
    k_block = (torch.arange(problem.lk, device=dev, dtype=torch.int32) // cov.size).expand(n, -1)
    return [Predicate(q_block, k_block, cov.table)]
