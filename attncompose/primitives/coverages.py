"""Coverages that several ops produce: a table of key blocks, a band of key positions.

- :class:`BlockTable`: per (row, query block), which key blocks are selected; every pair of a
  selected block is covered. The ``topk`` detector computes one per row from the data, the
  ``power`` pattern one for every row from positions alone.
- :class:`DifferenceCoverage`: a coverage less others (what a block step with exclusions
  attended).
- :class:`KeyBand`: each query covers the keys whose absolute positions lie in a band of
  fixed width ending at an anchor, ``(anchor - width, anchor]``; the anchor is the query's own
  position (``window``) or a fixed position (``sink``: the first ``count`` keys end at
  ``count - 1``). Positions only: the same for every row, with a block form (static plans),
  key ranges as tiles and the band form as kernel data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import reduce

import torch
from torch import Tensor

from attncompose.primitives.base import (
    CompositeCoverage,
    Coverage,
    Predicate,
    Problem,
    Selection,
    Tiles,
    natural_tiles,
    static_arange,
    take,
)
from attncompose.primitives.plan import (
    FULL,
    BlockGrid,
    interval_states,
    subtract_states,
    table_fits,
)


@dataclass
class BlockTable(Selection, Coverage):
    """Key blocks selected per query block: ``table`` [N or 1, nQB, nKB] bool (key block j
    selected for query block i; one row, or rows expanded by stride 0, for a table shared
    by every row) on blocks of ``size`` positions. ``key``: set by static tables (built from
    knobs and positions alone), so that their plans are built once. ``most``: a bound on the
    blocks any query block selects, known without reading the table (a detector's k): its
    tiles then take that width instead of counting (a host synchronisation). ``shift``
    (queries, keys): a table of blocks in absolute positions (power) on a problem whose
    offsets are no multiple of ``size`` (the last queries of a prefill after a prefix): query
    i lies in row (i + shift[0]) // size, key j in column (j + shift[1]) // size; a top-k
    detector's blocks start at the problem's first query and key (no shift)."""

    table: Tensor
    size: int
    key: tuple | None = None
    most: int | None = None
    shift: tuple[int, int] = (0, 0)

    def bind(self, block_size: int) -> BlockTable:
        return self  # its own block size defines the geometry

    @property
    def row_invariant(self) -> bool:
        return self.table.shape[0] == 1 or self.table.stride(0) == 0  # a static table (power)

    def _rows(self, rows: int) -> Tensor:
        """The table for index tensors of ``rows`` rows (1: shared by every row)."""
        return self.table[:1] if rows == 1 and self.row_invariant else self.table

    def covers(self, problem: Problem, qi: Tensor, kj: Tensor) -> Tensor:
        table = self._rows(max(qi.shape[0], kj.shape[0]))
        nkb = table.shape[-1]
        (sq, sk), size = self.shift, self.size
        qb, kb = (qi.clamp_min(0) + sq) // size, (kj.clamp_min(0) + sk) // size
        shape = torch.broadcast_shapes(qb.shape, kb.shape)
        return take(table.flatten(1), (qb * nkb + kb).expand(table.shape[0], *shape[1:]))

    has_kernel_form = True

    def predicates(self, problem: Problem) -> list[Predicate]:
        def block_of(length: int, shift: int):  # each position's block
            dev = problem.q.device
            return lambda: (
                (torch.arange(length, device=dev, dtype=torch.int32) + shift) // self.size
            )[None]

        # the same in every call of these lengths: kept per problem
        key = (self.size, *self.shift)
        q_block = problem.memo("table-query-blocks", key, block_of(problem.lq, self.shift[0]))
        k_block = problem.memo("table-key-blocks", key, block_of(problem.lk, self.shift[1]))
        # a static table (power) is one table for every row, whatever the rows of the call
        return [Predicate(q_block, k_block, self._rows(1))]

    has_block_form = True

    def block_states(self, problem: Problem, grid: BlockGrid) -> Tensor:
        fits = table_fits(self.size, grid.block_q, grid.nqb) and table_fits(
            self.size, grid.block_k, grid.nkb
        )
        if not fits:
            raise ValueError(f"plan blocks {grid.block_q}x{grid.block_k} must divide {self.size}")
        table = self._rows(1)
        if self.shift != (0, 0):
            return self._shifted_states(table, grid)
        if (grid.block_q, grid.block_k) == (self.size, self.size):  # its own blocks: as it is
            return table.view(torch.uint8) * FULL  # (bool and uint8 share their bytes)
        dev = table.device
        qi = static_arange(grid.nqb, dev, grid.block_q) // self.size
        kj = static_arange(grid.nkb, dev, grid.block_k) // self.size
        return table[:, qi][:, :, kj].to(torch.uint8) * FULL

    def _shifted_states(self, table: Tensor, grid: BlockGrid) -> Tensor:
        """A shifted table's states: a plan block (no larger than a table block) lies in at
        most two rows and two columns of the table: full where each of those is selected,
        partial where some is (the pair rule, :meth:`covers`, decides there)."""
        dev, size = table.device, self.size

        def cells(count: int, block: int, length: int, shift: int) -> tuple[Tensor, Tensor]:
            first = static_arange(count, dev, block)  # the first and last position's cell
            last = (first + block).clamp_max(length) - 1
            return (first + shift) // size, (last + shift) // size

        rows = cells(grid.nqb, grid.block_q, grid.lq, self.shift[0])
        cols = cells(grid.nkb, grid.block_k, grid.lk, self.shift[1])
        corners = [table[:, r][:, :, c] for r in rows for c in cols]
        full = corners[0] & corners[1] & corners[2] & corners[3]
        some = corners[0] | corners[1] | corners[2] | corners[3]
        return interval_states(full, some)

    def block_grid(self) -> int:
        return self.size

    def static_key(self) -> tuple | None:
        return self.key

    def tiles(self, problem: Problem) -> Tiles:
        n, rows, nkb = self.table.shape
        dev, size = self.table.device, self.size
        sq, sk = self.shift
        # a static table (the same for every row) gives tiles expanded along rows
        table = self._rows(1)
        if self.most is not None:
            count = min(self.most, nkb)
        else:  # reads the table: a host synchronisation, as static tables do once per plan
            count = int(table.sum(-1).max()) if table.numel() else 0
        # selected block ids first (ascending), then unselected ones marked -1
        key = torch.where(table, static_arange(nkb, dev), nkb + 1)
        blocks = torch.sort(key, dim=-1).values[..., : max(count, 1)]  # [N, nQB, K]
        k_idx = blocks[..., None] * size + static_arange(size, dev)
        k_idx = (k_idx - sk if sk else k_idx).flatten(-2)  # [N, nQB, K*size]
        out = (blocks.repeat_interleave(size, -1) > nkb) | (k_idx >= problem.lk)
        k_idx = k_idx.masked_fill(out | (k_idx < 0) if sk else out, -1)
        if sq == 0 or rows == 1:  # one tile per block from the first query (or all of them)
            q_idx = natural_tiles(n, problem.lq, size, dev)
        else:  # row r holds queries [r * size - sq, (r + 1) * size - sq)
            q_idx = torch.arange(rows * size, device=dev).view(rows, size) - sq
            q_idx = q_idx.masked_fill((q_idx < 0) | (q_idx >= problem.lq), -1).expand(n, -1, -1)
        return Tiles(q_idx, k_idx.expand(n, -1, -1), exact=True, every_query=True)


@dataclass
class KeyBand(Selection, Coverage):
    """Keys at absolute positions ``(anchor - extent, anchor]`` for every query (see the module
    doc); subclasses give :attr:`extent`, :meth:`anchor`, :meth:`first_key` and :meth:`span`.
    ``tile``: queries per tile. In a packed problem a band keeps to its query's part."""

    tile: int = field(default=128, kw_only=True)

    row_invariant = True  # positions only
    has_block_form = True
    has_kernel_form = True

    @property
    def extent(self) -> int:
        """How many key positions the band holds (0: none)."""
        raise NotImplementedError

    def anchor(self, q_pos: Tensor) -> Tensor | int:
        """The last key position covered by queries at absolute positions ``q_pos``."""
        raise NotImplementedError

    def first_key(self, q_pos: Tensor) -> Tensor | int:
        """The first key position a tile of queries from absolute position ``q_pos`` [T] on
        may cover (an int: the same for every tile)."""
        raise NotImplementedError

    def span(self, bq: int) -> int:
        """How many key positions from :meth:`first_key` on a tile of ``bq`` queries may
        cover."""
        raise NotImplementedError

    def bind(self, block_size: int) -> KeyBand:
        return replace(self, tile=block_size)

    def static_key(self) -> tuple:
        return (
            type(self).__name__,
            *(getattr(self, f.name) for f in fields(self) if not f.kw_only),
        )

    def covers(self, problem: Problem, qi: Tensor, kj: Tensor) -> Tensor:
        if self.key_only:  # the same keys for every query: read from the static mask
            hit = self.covered_keys(problem)[kj]  # -1 pads read its last entry: False
            return hit.expand(torch.broadcast_shapes(qi.shape, kj.shape))
        last = self.anchor(problem.q_positions(qi))  # the last covered key position
        k_pos = problem.k_positions(kj)
        hit = (k_pos <= last) & (k_pos > last - self.extent) & (kj >= 0)  # -1 pads
        # (a key-only band is asked with any query: it answers for the key alone)
        if problem.packed is not None and not self.key_only:  # nor into another part
            part = problem.packed.part
            hit = hit & (part[qi.clamp_min(0)] == part[kj.clamp_min(0)])
        return hit

    def covered_keys(self, problem: Problem) -> Tensor:
        """[Lk + 1] bool: the keys a key-only band covers (for every query), then False for
        index -1 (padding), made once per pattern and positions: one lookup a call."""
        if not self.key_only:
            raise TypeError(f"{type(self).__name__} covers keys per query")

        def make() -> Tensor:
            k_pos = problem.k_positions(torch.arange(problem.lk, device=problem.q.device))
            last = self.anchor(k_pos)  # an int: the same for every query
            covered = (k_pos <= last) & (k_pos > last - self.extent)
            return torch.cat([covered, covered.new_zeros(1)])

        return problem.memo("covered-keys", self.static_key(), make)

    def predicates(self, problem: Problem) -> list[Predicate]:
        """Its band as kernel data: positions only, kept per problem (:meth:`Problem.memo`)."""
        return problem.memo("band-predicates", self.static_key(), lambda: self._predicates(problem))

    def _predicates(self, problem: Problem) -> list[Predicate]:
        q_pos = _positions(problem, problem.lq, problem.q_positions)
        anchor = self.anchor(q_pos)
        if isinstance(anchor, int):
            anchor = torch.full_like(q_pos, anchor)
        k_pos = _positions(problem, problem.lk, problem.k_positions)
        return [Predicate(anchor, k_pos, band=self.extent)]

    def block_states(self, problem: Problem, grid: BlockGrid) -> Tensor:
        q_first, q_last = (x[:, None] for x in grid.q_span(problem.q.device))  # [nQB, 1]
        k_first, k_last = (x[None, :] for x in grid.k_span(problem.q.device))  # [1, nKB]
        w = self.extent
        if w == 0:  # an empty band
            return torch.zeros(1, grid.nqb, grid.nkb, dtype=torch.uint8, device=problem.q.device)
        end_first, end_last = self.anchor(q_first), self.anchor(q_last)
        full = (k_last <= end_first) & (k_first > end_last - w)  # every pair inside the band
        some = (k_first <= end_last) & (k_last > end_first - w)
        return interval_states(full, some).expand(grid.nqb, grid.nkb)[None]

    def tiles(self, problem: Problem) -> Tiles:
        """Natural query tiles and the key range each may cover: positions only, made once
        per pattern, tile and positions (in the workspace: :meth:`Problem.memo`)."""
        return problem.memo(
            "band-tiles", (*self.static_key(), self.tile), lambda: self._tiles(problem)
        )

    def _tiles(self, problem: Problem) -> Tiles:
        n, dev = problem.q.shape[0], problem.q.device
        bq = min(self.tile, problem.lq)
        q_idx = natural_tiles(n, problem.lq, bq, dev)
        first_q = torch.arange(q_idx.shape[1], device=dev) * bq  # [T]
        first, span = self.first_key(problem.q_positions(first_q)), self.span(bq)
        if problem.packed is None:  # key indices [lo, hi) of the tile's keys; base: at 0
            lo, hi, base = 0, problem.lk, problem.k_offset
        else:  # the tile's part (positions run on within a part)
            lo = problem.packed.start[first_q]
            hi = (lo + problem.packed.length[first_q])[:, None]
            base = problem.k_positions(lo) - lo
            lo = lo[:, None]
        start = first - base  # local index of the first candidate
        if isinstance(start, int):  # fixed positions (sinks): only the keys in range
            end = min(start + span, hi)
            start = max(start, 0)
            span = max(0, end - start)
            start = torch.full_like(first_q, start)
        k_idx = start[:, None] + torch.arange(span, device=dev)  # [T, nk]
        k_idx = k_idx.masked_fill((k_idx < lo) | (k_idx >= hi), -1)
        # a band with a fixed anchor holds the same keys for every query: tiles are exact;
        # its keys are a range of each row (not when packed: a part may cut it)
        k_start = start if problem.packed is None else None
        k_idx = k_idx.expand(n, -1, -1)
        return Tiles(q_idx, k_idx, exact=self.key_only, k_start=k_start, every_query=True)


def _positions(problem: Problem, length: int, positions) -> Tensor:
    """Absolute positions [N, length] (int32) of indices 0..length-1 under ``positions``."""
    n = problem.q.shape[0]
    idx = torch.arange(length, device=problem.q.device)
    return positions(idx).to(torch.int32).expand(n, -1)


@dataclass
class DifferenceCoverage(CompositeCoverage):
    """The pairs of ``base`` that no coverage of ``minus`` holds: what a block step that
    excludes other steps attended (its selections' union less its exclusions), so that a step
    excluding IT skips only those pairs (it skipped the whole union, and the pairs the block
    left to its exclusions were computed by no step). Positions and block states follow the
    parts; it has no kernel form (a kernel's rule ORs its own coverages and subtracts
    exclusions: a difference to subtract is no such rule), so the Triton and Flex kernels
    that would test it pair by pair refuse it, naming it."""

    base: Coverage
    minus: list[Coverage]
    kind = "difference"

    @property
    def members(self) -> list[Coverage]:
        return [self.base, *self.minus]

    def block_states(self, problem: Problem, grid: BlockGrid) -> Tensor | None:
        states = self._member_states(problem, grid)
        return None if states is None else reduce(subtract_states, states)

    def covers(self, problem: Problem, qi: Tensor, kj: Tensor) -> Tensor:
        mask = self.base.covers(problem, qi, kj)
        for part in self.minus:
            mask = mask & ~part.covers(problem, qi, kj)
        return mask

    def tile_covers(self, problem: Problem, tiles: Tiles, kj: Tensor) -> Tensor:
        mask = self.base.tile_covers(problem, tiles, kj)
        for part in self.minus:
            mask = mask & ~part.tile_covers(problem, tiles, kj)
        return mask
