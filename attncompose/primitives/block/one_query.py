"""A block step on one query per row (a decode step): its kept keys, gathered, in one call.

A decode step's one query either takes a key or not, so the step's pair rule reduces to a
key mask: each selection's :meth:`~attncompose.primitives.base.Coverage.covers` on every key
(positions and block tables: a few vectorised comparisons and one lookup), united, less the
exclusions and what the query cannot see. The kept keys are gathered (a decode step keeps
few: the sinks, a window, its top blocks) and attended in one ``chunk_fn`` call with no mask
where every row keeps the same keys, else one per-row gather with its padding masked.
Where every selection is a key band (sinks, a window) and none is excluded, the kept keys
are a few index ranges worked out on positions alone (:func:`kept_ranges`: no mask over the
keys, no ``nonzero``), read as a view when they are one range, else copied range by range.

No :class:`~attncompose.primitives.plan.BlockPlan` is built: a decode loop's key length grows
at every step, so a plan, reused per length, would be built (and its lists and pair masks
with it) at every step: a step of streaming at 4000 keys (9 query, 3 key/value heads) took
2.0-2.6 ms in a loop of growing lengths, 0.6-0.7 ms this way, exact attention 0.4. Same
pairs as the plan's (products counted alike); the sums run over the kept keys in ascending
order, so results agree with the plan walk to float rounding (~1e-7).
"""

from __future__ import annotations

from functools import reduce

import torch
from torch import Tensor

from attncompose.primitives.base import (
    Coverage,
    Partial,
    Problem,
    Workspace,
    add_products,
    counting_products,
    gather_rows,
    static_arange,
)
from attncompose.primitives.block.naive import grouped_chunk
from attncompose.primitives.coverages import KeyBand


def kept_keys(problem: Problem, select: list[Coverage], exclude: list[Coverage] = ()) -> Tensor:
    """[R, Lk] bool: the keys the one query of each row takes (R = 1: every row alike, else
    a row each): covered by a selection, by no exclusion, and visible."""
    dev = problem.q.device
    qi = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev)
    kj = static_arange(problem.lk, dev).view(1, 1, 1, -1)
    keep = reduce(torch.logical_or, [cov.covers(problem, qi, kj) for cov in select])
    for cov in exclude:
        keep = keep & ~cov.covers(problem, qi, kj)
    if problem.causal:
        keep = keep & problem.visible(qi, kj)
    return keep.reshape(-1, problem.lk)


def kept_ranges(
    problem: Problem, select: list[Coverage], exclude: list[Coverage] = ()
) -> list[tuple[int, int]] | None:
    """The keys :func:`kept_keys` takes for one query, as ascending disjoint index ranges
    [start, end), where every selection is a key band and nothing is excluded (else None):
    each band's keys are (anchor - extent, anchor] in positions, the query sees the keys up
    to its own position when causal."""
    if exclude or problem.packed is not None or not all(isinstance(c, KeyBand) for c in select):
        return None
    q_pos, k_off = problem.q_offset, problem.k_offset  # the one query's position
    end = min(problem.lk, q_pos - k_off + 1) if problem.causal else problem.lk
    spans = []
    for band in select:
        last = int(band.anchor(q_pos)) - k_off  # the last key index it covers
        spans.append((max(0, last - band.extent + 1), min(end, last + 1)))
    ranges: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if lo >= hi:
            continue
        if ranges and lo <= ranges[-1][1]:  # touching or overlapping: one range
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], hi))
        else:
            ranges.append((lo, hi))
    return ranges


def one_query_attention(
    problem: Problem, select: list[Coverage], exclude: list[Coverage], chunk_fn
) -> Partial:
    """(out [N, 1, Dv], lse [N, 1]) of the step on ``problem`` (one query per row) through
    ``chunk_fn(q, k, v, mask, bias, scale, scratch)`` (see the module doc)."""
    if problem.lq != 1:
        raise ValueError(f"a one-query step takes one query per row, not {problem.lq}")
    n = problem.q.shape[0]
    ranges = kept_ranges(problem, select, exclude)
    if ranges is not None:
        if counting_products():
            add_products(n * sum(end - start for start, end in ranges))
        return _range_keys(problem, ranges, chunk_fn)
    keep = kept_keys(problem, select, exclude)
    if counting_products():
        add_products(keep.sum() * (n if keep.shape[0] == 1 else 1))
    if keep.shape[0] == 1:
        return _shared_keys(problem, torch.nonzero(keep[0]).flatten(), chunk_fn)
    return _keys_per_row(problem, keep, chunk_fn)


def _range_keys(problem: Problem, ranges: list[tuple[int, int]], chunk_fn) -> Partial:
    """Every row takes the keys of ``ranges``: one range read where it lies (a view), more
    copied range by range into the workspace's buffer."""
    if not ranges:
        return _empty(problem)
    if len(ranges) == 1:
        ((start, end),) = ranges
        return _attend_shared(problem, problem.k[:, start:end], problem.v[:, start:end], chunk_fn)
    count = sum(end - start for start, end in ranges)
    scratch = problem.workspace or Workspace()
    k, v = (
        torch.cat(
            [x[:, start:end] for start, end in ranges],
            1,
            out=_buffer(scratch, name, x, (x.shape[0], count)),
        )
        for name, x in (("k", problem.k), ("v", problem.v))
    )
    return _attend_shared(problem, k, v, chunk_fn)


def _shared_keys(problem: Problem, idx: Tensor, chunk_fn) -> Partial:
    """Every row takes the keys ``idx`` [C]: gathered into the workspace's buffers."""
    if idx.numel() == 0:
        return _empty(problem)
    scratch = problem.workspace or Workspace()
    k, v = (
        torch.index_select(x, 1, idx, out=_buffer(scratch, name, x, (x.shape[0], len(idx))))
        for name, x in (("k", problem.k), ("v", problem.v))
    )
    return _attend_shared(problem, k, v, chunk_fn)


def _attend_shared(problem: Problem, k: Tensor, v: Tensor, chunk_fn) -> Partial:
    """Every row against the same kept keys k, v [N/G, C, D] of its key row: one call, a
    group's query heads stacked as the rows of its key row
    (:func:`~attncompose.primitives.block.naive.grouped_chunk`)."""
    n, d = problem.q.shape[0], problem.q.shape[-1]
    dv = problem.v.shape[-1]
    q = problem.q.float().view(n, 1, 1, d)  # [N, 1, 1, D]
    k, v = (x.float().unsqueeze(1) for x in (k, v))  # [N/G, 1, C, D]
    out, lse = grouped_chunk(
        chunk_fn, problem.kv_group, q, k, v, None, None, problem.scale, problem.workspace
    )
    return Partial(out.reshape(n, 1, dv), lse.reshape(n, 1))


def _keys_per_row(problem: Problem, keep: Tensor, chunk_fn) -> Partial:
    """Row n takes the keys ``keep[n]`` [Lk] of key row n // kv_group: gathered per row,
    padded to the most any row keeps (padding masked)."""
    n, dev = problem.q.shape[0], problem.q.device
    count = keep.sum(-1)  # [N]
    width = int(count.max())
    if width == 0:
        return _empty(problem)
    row, key = torch.nonzero(keep).unbind(-1)  # by row, keys ascending
    starts = torch.cumsum(count, 0) - count
    slot = static_arange(len(row), dev) - starts[row]
    idx = torch.zeros(n, width, dtype=torch.long, device=dev)
    idx[row, slot] = key
    valid = static_arange(width, dev) < count[:, None]  # [N, W]
    group = problem.kv_group  # row n reads key row n // group, where it lies
    scratch = problem.workspace or Workspace()
    k, v = (
        gather_rows(x, idx, _buffer(scratch, name, x, (idx.numel(),)).view(-1), group=group)
        for name, x in (("k", problem.k), ("v", problem.v))
    )
    k, v = (x.float()[:, None] for x in (k, v))  # [N, 1, W, D]
    q = problem.q.float()[:, None]  # [N, 1, 1, D]
    mask = valid[:, None, None, :]  # [N, 1, 1, W]
    out, lse = chunk_fn(q, k, v, mask, None, problem.scale, problem.workspace)
    return Partial(out.reshape(n, 1, -1), lse.reshape(n, 1))


def _buffer(scratch: Workspace, name: str, x: Tensor, rows: tuple[int, ...]) -> Tensor:
    """The workspace's buffer ``name`` for gathered keys (or values) of ``x``: [*rows, D]
    (fresh memory costs page faults on CPU, more than the copy: 2.5 of 3 ms of a per-row
    gather of 20k keys)."""
    return scratch.take(f"one-query-{name}", (*rows, x.shape[-1]), x.dtype, x.device)


def _empty(problem: Problem) -> Partial:
    """No key taken: output 0, lse -inf."""
    n, dv = problem.q.shape[0], problem.v.shape[-1]
    out = problem.q.new_zeros(n, 1, dv, dtype=torch.float32)
    return Partial(out, out.new_full((n, 1), float("-inf")))
