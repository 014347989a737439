"""``causal_split``: HyperAttention's recursive causal splitter around a non-causal body.

A causal square of n <= min_seq_len rows is computed exactly. A larger one is halved: both
diagonal halves recurse, and the lower-left rectangle (second-half queries x first-half
keys, fully visible) goes through the non-causal body; its result is merged into the second
half's rows by lse. Where n halves evenly down to the leaves, the recursion runs unrolled:
all diagonal leaves in one exact call (the exact op's ``leaf``: the Triton kernel reads
them where they lie, the others stack them as rows), then the rectangles. Where every step
of the body is packable (:class:`~attncompose.primitives.base.Packing`: sortLSH, sinks,
windows, block without a block plan, sampler, merge) and the leaves are a multiple of the
body's tiles, the rectangles of ALL levels go through ONE body call, packed end to end along
the rows (as rows of the square, :class:`~attncompose.primitives.base.RowMaps`: not copied where
the body's steps read them where they are), and merge into their rows in one
``merge_rows`` call: a fixed number of kernels, whatever
the number of levels (on the devices of :data:`PACK_DEVICES`: where a call costs its
launches, not on a CPU, where packing copies every level's rows that the level-by-level
path reads as views). There, a square whose leaves would not pack (n = 100000 halves to
leaves of 3125; an odd length halves unevenly) runs as the first n rows of the shortest
square that packs, zero rows after them (:func:`packed_length`; at most n / :data:`MAX_PAD`
of them: at the paper's knobs any n): a query sees no later key, so those rows change no
real query's keys, only how sortLSH sorts the rectangles whose queries pass n (the error
against exact attention stays as the recursion's), and the call is the same few launches
as a length that packs. Otherwise level by level, each level in
one body call where the body's steps do not depend on offsets (stacked as rows), else
one call per rectangle.
Packed or stacked, random draws differ from the recursion's, each still unbiased. Decode
(Lq < Lk, bottom-right aligned): the key prefix every query sees goes through the body,
the trailing Lq x Lq square recurses. Non-causal calls go straight to the body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from attncompose.primitives import dispatch
from attncompose.primitives.base import Packing, Partial, Primitive, Problem, RowMaps
from attncompose.primitives.causal_split.schema import CausalSplitStep
from attncompose.primitives.exact.fast import fused_exact_attention
from attncompose.primitives.merge.naive import merge, merge_rows_into
from attncompose.primitives.plan import static_plan

Body = Callable[[Problem], Partial]

# Device types where the rectangles of all levels go through one packed body call. A GPU
# call's time is largely its kernel launches (levels x ~100 level by level); a CPU has no
# launch cost, and there packing's copies of q, k and v cost more than they save
# (benchmarks/splitter_cpu.py times both forms: benchmarks/results/splitter_cpu.json).
PACK_DEVICES = {"cuda"}
# There, a square whose leaves do not pack is padded to one that does by at most 1/MAX_PAD
# of its rows (more is more products than the launches it saves are worth: level by level)
MAX_PAD = 4


@contextmanager
def packing_on(devices: set[str]) -> Iterator[None]:
    """Inside the block, the splitter packs its levels on the device types ``devices`` (the
    benchmarks time both forms, or the GPU form on a CPU)."""
    global PACK_DEVICES
    saved, PACK_DEVICES = PACK_DEVICES, set(devices)
    try:
        yield
    finally:
        PACK_DEVICES = saved


def causal_split(
    problem: Problem,
    body: Body,
    min_seq_len: int,
    exact: Body = fused_exact_attention,
    merge_rows=merge_rows_into,
    merge=merge,
) -> Partial:
    """Causal attention by recursive halving (base cases by ``exact``; a packed call's rows
    merged by ``merge_rows``, an implementation of the ``merge_rows`` op, other partials by
    ``merge``, one of the ``merge`` op); see the module doc."""
    kernels = Kernels(exact, merge_rows, merge)
    if not problem.causal:
        return body(problem)
    last_q = problem.q_offset + problem.lq
    if last_q != problem.k_offset + problem.lk or problem.lq > problem.lk:
        return exact(problem)  # not bottom-right aligned: keep it exact
    if problem.lq == problem.lk:
        return _square(problem, body, min_seq_len, kernels)
    if problem.lk <= min_seq_len:
        return exact(problem)
    delta = problem.lk - problem.lq  # keys [0, delta) are visible to every query
    rect = body(problem.sub(slice(None), slice(0, delta), causal=False))
    square = _square(
        problem.sub(slice(None), slice(delta, None), causal=True), body, min_seq_len, kernels
    )
    return kernels.merge(problem, [rect, square])


@dataclass(frozen=True)
class Kernels:
    """The implementations a causal call runs besides its body: the exact leaves, the merge
    of a packed call's rows and of two partials."""

    exact: Body
    merge_rows: Callable
    merge: Callable


def _square(problem: Problem, body: Body, min_seq_len: int, kernels: Kernels) -> Partial:
    n = problem.lq
    if n <= min_seq_len:
        return kernels.exact(problem)
    packs = problem.q.device.type in PACK_DEVICES
    shape = square_of(n, min_seq_len, getattr(body, "pack_quantum", None) if packs else None)
    if shape is None:
        return _halve(problem, body, min_seq_len, kernels)  # an odd length on the way down
    leaf, levels = shape
    if leaf << levels != n:
        return _padded_square(problem, body, leaf, levels, kernels)
    return _flat_square(problem, body, leaf, levels, kernels)


def square_of(n: int, min_seq_len: int, quantum: int | None) -> tuple[int, int] | None:
    """(leaf, levels) of the square leaf * 2**levels that a causal square of n > min_seq_len
    rows runs as: with the body's ``quantum`` (its levels pack, on a device that packs) the
    padded one of :func:`padding` where there is one, else its own leaves
    (:func:`leaf_length`); None where n halves unevenly (the recursion)."""
    padded = None if quantum is None else padding(n, min_seq_len, quantum)
    if padded is not None:
        return padded
    leaf = leaf_length(n, min_seq_len)
    return None if leaf is None else (leaf, (n // leaf).bit_length() - 1)


def leaf_length(n: int, min_seq_len: int) -> int | None:
    """Length of the diagonal leaves when a causal square of n halves evenly down to leaves
    of at most ``min_seq_len`` (n itself if it is short enough); None otherwise."""
    leaf = n
    while leaf > min_seq_len and leaf % 2 == 0:
        leaf //= 2
    return leaf if leaf <= min_seq_len else None


def packed_length(n: int, min_seq_len: int, quantum: int) -> tuple[int, int] | None:
    """(leaf, levels) of the shortest square of leaf * 2**levels >= n rows whose levels pack:
    leaves of at most ``min_seq_len``, a multiple of ``quantum``, and the fewest levels
    (padding under quantum * 2**levels rows); None when no leaf fits (quantum >
    min_seq_len)."""
    if quantum > min_seq_len:
        return None
    levels = 1
    while True:
        leaf = -(-n // (quantum << levels)) * quantum
        if leaf <= min_seq_len:
            return leaf, levels
        levels += 1


def padding(n: int, min_seq_len: int, quantum: int) -> tuple[int, int] | None:
    """Where the levels pack (``quantum``: the body's), the (leaf, levels) of the square a
    causal square of n runs as the first rows of: :func:`packed_length` when its own
    leaves would not pack and n / :data:`MAX_PAD` rows or fewer make it; else None."""
    leaf = leaf_length(n, min_seq_len)
    if leaf is not None and leaf % quantum == 0:
        return None  # it packs as it is
    longer = packed_length(n, min_seq_len, quantum)
    if longer is None or (longer[0] << longer[1]) - n > n // MAX_PAD:
        return None
    return longer


def _padded_square(
    problem: Problem, body: Body, leaf: int, levels: int, kernels: Kernels
) -> Partial:
    """A causal square of n rows as the first n of leaf * 2**levels (zero rows after them):
    a query sees no key after it, so the added keys take no part in a real query's result,
    and the square packs (one body call, whatever n; :func:`_flat_square`). What the body
    approximates differs from halving n itself only in the rectangles whose queries pass n
    (one per level), where sortLSH sorts the added queries with the real ones."""
    n = problem.lq
    grow = lambda x: torch.nn.functional.pad(x, (0, 0, 0, leaf * (1 << levels) - n))
    square = replace(problem, q=grow(problem.q), k=grow(problem.k), v=grow(problem.v))
    result = _flat_square(square, body, leaf, levels, kernels)
    return Partial(result.out[:, :n], result.lse[:, :n])


def _flat_square(problem: Problem, body: Body, leaf: int, levels: int, kernels: Kernels) -> Partial:
    """The recursion unrolled for n = leaf * 2**levels: every diagonal leaf in ONE exact call
    (the exact kernel's ``leaf``: read where they lie, or stacked as rows), then the
    rectangles level by level from the smallest (the recursion's order), each level merged
    into its rows at once (the rows below each rectangle form one strided view [rows,
    rectangles, size])."""
    rows, n = problem.q.shape[0], problem.lq
    leaves = kernels.exact(problem, leaf=leaf)
    out = leaves.out.contiguous()  # merged into in place below
    lse = leaves.lse.contiguous()
    quantum = getattr(body, "pack_quantum", None)
    packs = problem.q.device.type in PACK_DEVICES
    if packs and quantum is not None and leaf % quantum == 0:
        layout = static_plan(
            ("causal_split.packed", n, leaf, problem.q.device),
            lambda: _Levels(n, leaf, levels, problem.q.device),
        )
        packed = body(layout.packed(problem))
        kernels.merge_rows(problem, Partial(out, lse), packed, layout.q_rows, layout.sources)
        return Partial(out, lse)
    for level in range(levels):
        size = leaf << level
        starts = range(0, n, 2 * size)
        if getattr(body, "offset_free", False) and len(starts) > 1:
            rects = _stacked(problem, body, starts, size)
        else:
            each = [body(problem.sub(slice(s + size, s + 2 * size), slice(s, s + size), False))
                    for s in starts]  # fmt: skip
            rects = Partial(
                torch.stack([r.out for r in each], 1), torch.stack([r.lse for r in each], 1)
            )
        below = Partial(
            out.view(rows, len(starts), 2 * size, -1)[:, :, size:],
            lse.view(rows, len(starts), 2 * size)[:, :, size:],
        )
        kernels.merge(problem, [below, rects], into=below)
    return Partial(out, lse)


class _Levels:
    """The off-diagonal rectangles of every level of a causal square of n = leaf * 2**levels,
    packed: level by level from the smallest, each rectangle's queries (rows [s+size,
    s+2size)) and keys ([s, s+size)) as one part; ``q_rows``/``k_rows`` [levels * n/2]: the
    sequence positions they are read from (built once per (n, leaf, device))."""

    def __init__(self, n: int, leaf: int, levels: int, device: torch.device):
        q_rows, k_rows, lengths = [], [], []
        for level in range(levels):
            size = leaf << level
            pairs = torch.arange(n).view(n // (2 * size), 2, size)
            q_rows.append(pairs[:, 1].reshape(-1))
            k_rows.append(pairs[:, 0].reshape(-1))
            lengths += [size] * (n // (2 * size))
        self.q_rows = torch.cat(q_rows).to(device)
        self.k_rows = torch.cat(k_rows).to(device)
        # the same map inverted: per level, the packed row each position takes (-1: none)
        half = n // 2
        sources = torch.full((levels, n), -1, dtype=torch.int32)
        for level, rows in enumerate(q_rows):
            sources[level, rows] = torch.arange(half, dtype=torch.int32) + level * half
        self.sources = sources.to(device)
        # positions as in the square (sinks and windows in the body find their keys)
        self.packing = Packing.of(tuple(lengths), device, q_at=self.q_rows, k_at=self.k_rows)
        self.rows = RowMaps(self.q_rows, self.k_rows)

    def packed(self, problem: Problem) -> Problem:
        """The rectangles of ``problem`` as one packed non-causal problem whose queries and
        keys are rows of the square (:class:`RowMaps`): nothing is copied for the steps that
        read them where they are (sortLSH's hashing, the tile pass's plan kernel); the
        others get them gathered once (:meth:`Problem.gathered`)."""
        return replace(problem, causal=False, packed=self.packing, rows=self.rows)


def _stacked(problem: Problem, body: Body, starts: range, size: int) -> Partial:
    """The level's rectangles (queries [s+size, s+2size) x keys [s, s+size)) through ONE body
    call, stacked as rows (rectangle-major, so row n' keeps head n' % heads); the result as
    out [rows, rectangles, size, Dv], lse [rows, rectangles, size] (views)."""
    rows = problem.q.shape[0]
    cat = lambda x, shift: torch.cat([x[:, s + shift : s + shift + size] for s in starts])
    first = problem.sub(slice(size, 2 * size), slice(0, size), causal=False)
    stacked = replace(first, q=cat(problem.q, size), k=cat(problem.k, 0), v=cat(problem.v, 0))
    result = body(stacked)
    count = len(starts)
    return Partial(
        result.out.reshape(count, rows, size, -1).transpose(0, 1),
        result.lse.reshape(count, rows, size).transpose(0, 1),
    )


def _halve(problem: Problem, body: Body, min_seq_len: int, kernels: Kernels) -> Partial:
    """One level of the recursion: both diagonal halves, then the lower-left rectangle."""
    n = problem.lq
    h = n // 2
    top = _square(problem.sub(slice(0, h), slice(0, h), causal=True), body, min_seq_len, kernels)
    bottom = _square(problem.sub(slice(h, n), slice(h, n), causal=True), body, min_seq_len, kernels)
    rect = body(problem.sub(slice(h, n), slice(0, h), causal=False))
    bottom = kernels.merge(problem, [bottom, rect])
    return Partial(torch.cat([top.out, bottom.out], dim=1), torch.cat([top.lse, bottom.lse], 1))


class CausalSplit(Primitive):
    schema = CausalSplitStep
    # reads no key itself: its leaves through dispatch.call, its body's steps as they read
    # (the levels stacked rectangle-major keep query row n over key row n // kv_group)
    reads_groups = True

    def __call__(self, problem: Problem, body: Body) -> Partial:
        # chosen per call: whole squares and leaves may go to different implementations
        exact = lambda part, **inputs: dispatch.call("exact", self.backend, part, **inputs)
        merge_rows = dispatch.choose("merge_rows", self.backend, problem).load()
        merge = dispatch.choose("merge", self.backend, problem).load()
        return causal_split(problem, body, self.knobs["min_seq_len"], exact, merge_rows, merge)

    def kernel_name(self) -> str:
        return (
            "base case "
            + dispatch.describe("exact", self.backend)
            + f"; levels packed on {'/'.join(sorted(PACK_DEVICES))}, merged by "
            + dispatch.describe("merge_rows", self.backend)
        )
