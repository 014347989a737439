"""Block plans: the execution form of a block step's selections.

A :class:`BlockPlan` cuts the (query, key) plane of a problem into blocks of
``block_q x block_k`` and says, per row n and query block i, which key blocks j take part:

- **full** (``FULL``): every in-range pair of the block takes part; a kernel computes the
  block without evaluating any mask;
- **partial** (``PARTIAL``): a pair takes part iff it is causally visible, some coverage of
  ``own`` covers it (every pair when ``own`` is empty) and no coverage of ``exclude`` does;
  a kernel evaluates that rule in these blocks only;
- none (``NONE``): the block is skipped.

The plan is a dense uint8 ``state`` [R, nQB, nKB] (R = 1 when every row has the same plan:
sinks, windows, static tables; R = N for data-dependent detectors), so that the algebra is
elementwise and runs where the tensors live, with no host synchronisation: a union of
selections is the maximum of their states (a block full in any part stays full; partial
rules OR), an exclusion subtracts (full in the excluded coverage -> none, partial -> partial
with the excluded pairs masked), and causality caps every block at what is visible.
:meth:`BlockPlan.lists` turns the states into per-query-block index lists of full and
partial key blocks, the form kernels walk (FlexAttention's ``BlockMask.from_kv_blocks``
takes the same lists). The plan counts the products it asks for (:meth:`products`), and
shows itself (:meth:`to_dense`, :meth:`to_string`).

Coverages give their block form through :meth:`Coverage.block_states`; one with none (e.g.
sortLSH, whose tiles live in sorted order) keeps the tile path of the block kernel.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import reduce

import torch
from torch import Tensor

from attncompose.primitives.base import Coverage, Problem, fitted_block, pinned

NONE, PARTIAL, FULL = 0, 1, 2
STATIC_CACHE_SIZE = 64  # static plans kept per process (per length, offsets, device, knobs)
RULE_TILES_KEPT = 1 << 26  # rule tiles (bool elements) kept per process and static pattern


@dataclass(frozen=True)
class BlockGrid:
    """How a problem's (query, key) plane is cut: lengths, block sizes, absolute offsets."""

    lq: int
    lk: int
    block_q: int
    block_k: int
    q_offset: int = 0
    k_offset: int = 0

    @staticmethod
    def of(problem: Problem, block_q: int, block_k: int) -> BlockGrid:
        return BlockGrid(
            problem.lq, problem.lk, block_q, block_k, problem.q_offset, problem.k_offset
        )

    @property
    def nqb(self) -> int:
        return -(-self.lq // self.block_q)

    @property
    def nkb(self) -> int:
        return -(-self.lk // self.block_k)

    def q_span(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Absolute positions of the first and last (in-range) query of each block: [nQB]."""
        return _span(self.nqb, self.block_q, self.lq, self.q_offset, device)

    def k_span(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Absolute positions of the first and last (in-range) key of each block: [nKB]."""
        return _span(self.nkb, self.block_k, self.lk, self.k_offset, device)

    def rows_in(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """In-range queries per query block [nQB] and keys per key block [nKB]."""
        q_first, q_last = self.q_span(device)
        k_first, k_last = self.k_span(device)
        return q_last - q_first + 1, k_last - k_first + 1


def _span(count: int, size: int, length: int, offset: int, device) -> tuple[Tensor, Tensor]:
    return pinned(_spans(count, size, length, offset, torch.device(device)))


@functools.lru_cache(maxsize=256)
def _spans(count: int, size: int, length: int, offset: int, device) -> tuple[Tensor, Tensor]:
    """First and last positions of the blocks, made once per grid (do not modify): a plan
    built at every call (a top-k's, a decode loop's at each new length) asks for them in
    each of its parts."""
    first = torch.arange(count, device=device) * size
    last = (first + size - 1).clamp_max(length - 1)
    return first + offset, last + offset


def interval_states(full: Tensor, some: Tensor) -> Tensor:
    """uint8 states from two bool tensors: FULL where ``full``, else PARTIAL where ``some``
    (two ops: a bool's byte is 0 or 1)."""
    return (full | some).view(torch.uint8) + full.view(torch.uint8)


def visible_states(grid: BlockGrid, causal: bool, device: torch.device) -> Tensor:
    """[1, nQB, nKB]: which blocks a causal mask keeps whole (FULL), cuts (PARTIAL) or drops."""
    if not causal:
        return torch.full((1, grid.nqb, grid.nkb), FULL, dtype=torch.uint8, device=device)
    q_first, q_last = grid.q_span(device)
    k_first, k_last = grid.k_span(device)
    full = k_last[None, :] <= q_first[:, None]  # the block's last key is visible to its first query
    some = k_first[None, :] <= q_last[:, None]
    return interval_states(full, some)[None]


@dataclass(frozen=True)
class BlockLists:
    """Index lists of a plan, FlexAttention's ``BlockMask`` layout: per row and query block
    the number of full (partial) key blocks and their indices, ascending, padded with other
    blocks (in no set order): ``*_num`` int32 [R, nQB], ``*_idx`` int32 [R, nQB, W]."""

    full_num: Tensor
    full_idx: Tensor
    part_num: Tensor
    part_idx: Tensor


BIAS_FREE = ("kernel_states", "kernel_lists")  # memo entries a key bias leaves alone


@dataclass(eq=False)
class BlockPlan:
    """Which key blocks each query block attends to, and how (see the module doc).

    ``state`` uint8 [R, nQB, nKB] (R = 1: the same for every row); ``own`` / ``exclude``:
    the coverages whose pairs a partial block keeps / drops; ``key_bias`` [R, Lk] (optional):
    a log-weight added to the scores of each key, ``-inf`` drops it (R may be 1).
    ``query_rows`` [N, grid.lq] (optional): the plan's query rows in permuted order (a
    detector's tiles): row i reads and writes the problem's query ``query_rows[n, i]`` (-1:
    none), so the queries need no sorted copy and the result no scatter; ``every_query``:
    they hold every query once (no output row is left unwritten). ``key_rows`` [N, grid.lk]
    (optional): plan key j reads the problem's key and value ``key_rows[n, j]`` (-1: none,
    it takes no part), so the keys need no copy in plan order either. Only where the
    implementation says it walks them (``row_maps`` of its kernel class), and only for a
    plan without pair rules (no causality, no own or excluded coverage).
    """

    grid: BlockGrid
    causal: bool
    state: Tensor
    own: tuple[Coverage, ...] = ()
    exclude: tuple[Coverage, ...] = ()
    key_bias: Tensor | None = None
    # block states of each own, then each excluded coverage: a rule is evaluated pair by pair
    # only in the blocks a coverage cuts (a table's blocks are whole or absent)
    parts: tuple[Tensor, ...] = ()
    _lists: dict = field(default_factory=dict, repr=False)  # cached lists, masks of a plan
    query_rows: Tensor | None = None
    every_query: bool = False
    key_rows: Tensor | None = None

    # ------------------------------------------------------------------ building

    @staticmethod
    def build(
        problem: Problem,
        select: list[Coverage],
        exclude: list[Coverage] = (),
        block_q: int = 128,
        block_k: int = 128,
    ) -> BlockPlan:
        """The plan of the union of ``select`` minus the pairs of ``exclude`` on ``problem``
        (each coverage must have a block form: ``Coverage.has_block_form``)."""
        grid = BlockGrid.of(problem, block_q, block_k)
        device = problem.q.device
        # a plan with a data-dependent part (top-k) is built at every call: its static parts
        # (sinks, windows, causality) are kept per grid, where each launched a few dozen small
        # ops a call (a static plan is kept whole by its caller: Block.plan)
        keep = any(cov.static_key() is None for cov in (*select, *exclude))
        own = [_states(cov, problem, grid, keep) for cov in select]
        excluded = [_states(cov, problem, grid, keep) for cov in exclude]
        causal = problem.causal
        visible = _kept(
            ("visible", grid, causal, device), lambda: visible_states(grid, causal, device), keep
        )
        state = torch.minimum(union_states(own), visible)
        for states in excluded:
            state = subtract_states(state, states)
        return BlockPlan(
            grid, problem.causal, state, tuple(select), tuple(exclude), parts=(*own, *excluded)
        )

    @property
    def rows(self) -> int:
        return self.state.shape[0]

    @property
    def row_invariant(self) -> bool:
        """Whether every row has the same plan (its lists and masks can be built once)."""
        return self.rows == 1 and (self.key_bias is None or self.key_bias.shape[0] == 1)

    def with_key_bias(self, bias: Tensor) -> BlockPlan:
        """A copy whose keys carry ``bias`` [R or 1, Lk] (added to their scores); its kernel
        lists, which no bias changes, are this plan's (built once where this one is cached:
        a tile pass's diagonal plan takes a new bias every call)."""
        self.kernel_lists()
        lists = {key: self._lists[key] for key in BIAS_FREE if key in self._lists}
        return BlockPlan(
            self.grid, self.causal, self.state, self.own, self.exclude, bias, self.parts, lists
        )

    def with_rows(
        self, queries: Tensor, every_query: bool, keys: Tensor | None = None
    ) -> BlockPlan:
        """A copy whose query rows are the problem's queries ``queries`` [N, grid.lq] and,
        given ``keys`` [N, grid.lk], whose keys are the problem's keys ``keys`` (see the class
        doc), its lists this plan's."""
        if self.causal or self.own or self.exclude:
            raise ValueError("rows in permuted order take a plan without pair rules")
        return replace(self, query_rows=queries, every_query=every_query, key_rows=keys)

    def natural_rows(self) -> BlockPlan:
        """This plan, for an implementation that walks the problem's queries and keys in
        order (the class doc: row maps only where the kernel class says so)."""
        if self.query_rows is not None or self.key_rows is not None:
            raise ValueError("this plan implementation takes no rows in permuted order")
        return self

    # ------------------------------------------------------------------ lists and rules

    def lists(self, trim: bool = False) -> BlockLists:
        """Full and partial key-block lists (cached). ``trim``: cut the index width to the
        largest count (a host synchronisation: for CPU kernels, whose shapes need it)."""
        return self.memo(("lists", trim), lambda: _lists_of(self.state, trim))

    def kernel_states(self) -> Tensor:
        """The states a kernel walks: a last key block cut by Lk counts as partial, so full
        blocks are read with no bound check (the rule masks the padding keys)."""
        g = self.grid
        if g.lk % g.block_k == 0:
            return self.state
        return self.memo("kernel_states", lambda: _edge_partial(self.state))

    def kernel_lists(self) -> BlockLists:
        """:meth:`lists` of :meth:`kernel_states` (cached; no host synchronisation)."""
        return self.memo("kernel_lists", lambda: _lists_of(self.kernel_states(), False))

    def memo(self, key, make):
        """``make()`` computed once per plan (e.g. a kernel's packed rules or a static mask)."""
        if key not in self._lists:
            self._lists[key] = make()
        return self._lists[key]

    def pair_mask(
        self, problem: Problem, qi: Tensor, kj: Tensor, at: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Bool mask of the pairs that take part in a partial block: ``qi`` [R', T, BQ, 1] and
        ``kj`` [R', T, 1, nk] local indices (-1: out of range) with R' = 1 or the rows of the
        coverages. In range, causally visible, covered by ``own`` (any; all if empty) and by
        no ``exclude`` coverage. ``at`` = (query block [T], key blocks [R', T, W]) of the
        indices (``nk = W * block_k``): coverages are then asked pair by pair only where
        they cut a block, elsewhere their block state answers."""
        mask = (qi >= 0) & (kj >= 0)
        if self.causal:
            mask = mask & problem.visible(qi, kj)
        hits = [self._covered(i, c, problem, qi, kj, at) for i, c in enumerate(self.own)]
        if hits:
            mask = mask & reduce(torch.logical_or, hits)
        for i, cov in enumerate(self.exclude, start=len(self.own)):
            mask = mask & ~self._covered(i, cov, problem, qi, kj, at)
        return mask

    def partial_mask(self, problem: Problem, qb: Tensor, blocks: Tensor, valid: Tensor) -> Tensor:
        """Bool [R', M, BQ, W*BK]: the pairs that take part in query blocks ``qb`` [M] x their
        partial key blocks ``blocks`` [R, M, W] (``valid`` [R, M, W]: the slots in use), read
        from :meth:`rule_tiles` where the plan has them, else by :meth:`pair_mask`."""
        tiles = None
        if not self.row_invariant:
            tiles = self.memo("rule-tiles", lambda: self.rule_tiles(problem))
        if tiles is not None:
            mask = tiles[0].mask(qb, blocks, valid, tiles[1])
            if mask is not None:
                return mask
        g = self.grid
        kj = block_indices(blocks, g.block_k, g.lk, valid).flatten(-2)  # [R, M, nk]
        qi = block_indices(qb, g.block_q, g.lq)[None, :, :, None]  # [1, M, BQ, 1]
        return self.pair_mask(problem, qi, kj[:, :, None, :], at=(qb, blocks))

    def rule_tiles(self, problem: Problem) -> tuple[RuleTiles, Tensor] | None:
        """The pair rule of this plan's partial blocks as :class:`RuleTiles` built once per
        static pattern, with the blocks the data-dependent coverages hold whole (bool
        [R, nQB, nKB]); None unless every coverage is static (knobs and positions only)
        or data-dependent with whole blocks only (top-k/top-p tables), exclusions static."""
        if not self.own or len(self.parts) != len(self.own) + len(self.exclude):
            return None
        own_parts = list(zip(self.own, self.parts[: len(self.own)], strict=True))
        static = [(c, s) for c, s in own_parts if c.static_key() is not None]
        dynamic = [s for c, s in own_parts if c.static_key() is None]
        if not dynamic or any(c.static_key() is None for c in self.exclude):
            return None
        if any(bool((s == PARTIAL).any()) for s in dynamic):
            return None
        whole = reduce(torch.logical_or, (s == FULL for s in dynamic))
        keys = tuple(c.static_key() for c, _ in static), tuple(c.static_key() for c in self.exclude)
        key = ("rule-tiles", keys, self.grid, self.causal, self.state.device)
        make = lambda: _rule_tiles(problem, self, static)
        return static_plan(key, make, keep=lambda t: t.table.numel() <= RULE_TILES_KEPT), whole

    def _covered(self, i: int, cov: Coverage, problem: Problem, qi, kj, at) -> Tensor:
        if at is None or not self.parts:
            return cov.covers(problem, qi, kj)
        qb, kb = at
        states = self.parts[i]  # [Rc, nQB, nKB]
        rows = torch.arange(states.shape[0], device=states.device)[:, None, None]
        st = states[rows, qb.view(1, -1, 1), kb.long()]  # [R'', T, W]
        per_key = lambda x: x.repeat_interleave(self.grid.block_k, -1).unsqueeze(-2)
        whole = per_key(st == FULL)  # [R'', T, 1, nk]
        cut = st == PARTIAL
        if not bool(cut.any()):
            return whole
        return whole | (per_key(cut) & cov.covers(problem, qi, kj))

    # ------------------------------------------------------------------ views and counts

    def to_dense(self, problem: Problem) -> Tensor:
        """Bool [R, Lq, Lk] of the pairs that take part (small problems: it is Lq x Lk)."""
        g, dev = self.grid, self.state.device
        qi = torch.arange(g.lq, device=dev)
        kj = torch.arange(g.lk, device=dev)
        blocks = self.state[:, qi // g.block_q][:, :, kj // g.block_k]  # [R, Lq, Lk]
        rule = self.pair_mask(problem, qi.view(1, 1, -1, 1), kj.view(1, 1, 1, -1))[:, 0]
        return (blocks == FULL) | ((blocks == PARTIAL) & rule)

    def products(self, problem: Problem) -> int:
        """Query-key pairs that take part over every row of ``problem`` (the plan's own count
        of what a kernel computes: full blocks by their area, partial ones by their rule;
        keys with a -inf weight take no part)."""

        def count() -> int:
            q_rows, k_cols = self.grid.rows_in(self.state.device)
            if self.key_bias is not None:
                kept = _kept_keys(self)  # [Rb, nKB, BK]
                k_cols = kept.sum(-1)[:, None, :]  # [Rb, 1, nKB]
            area = q_rows[:, None] * k_cols  # [.., nQB, nKB] pairs per block that take part
            return int(((self.state == FULL) * area).sum()) + count_partial_pairs(self, problem)

        per_row = self.memo("products", count) if self.row_invariant else count()
        return per_row * (problem.q.shape[0] // self.counted_rows)

    @property
    def counted_rows(self) -> int:
        """Rows a count covers: the plan's, or its key bias's where that has more."""
        bias_rows = 1 if self.key_bias is None else self.key_bias.shape[0]
        return max(self.rows, bias_rows)

    def to_string(self, row: int = 0, limit: int = 64) -> str:
        """The plan of one row as text, one line per query block: ``█`` full, ``░`` partial,
        ``·`` skipped (FlexAttention's ``BlockMask.to_string`` in spirit); large plans are
        cut at ``limit`` blocks each way."""
        state = self.state[min(row, self.rows - 1)].cpu()
        glyph = {FULL: "█", PARTIAL: "░", NONE: "·"}
        g = self.grid
        lines = [
            f"block plan {g.lq}x{g.lk} in {g.block_q}x{g.block_k} blocks "
            f"({'causal' if self.causal else 'non-causal'}, row {row} of {self.rows}): "
            f"{int((state == FULL).sum())} full, {int((state == PARTIAL).sum())} partial"
        ]
        for i in range(min(g.nqb, limit)):
            cells = "".join(glyph[int(s)] for s in state[i, :limit])
            lines.append(cells + ("…" if g.nkb > limit else ""))
        if g.nqb > limit:
            lines.append("⋮")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()


@dataclass(frozen=True)
class RuleTiles:
    """A plan's pair rule in its partial blocks, one ``block_q x block_k`` tile per block,
    for plans whose data-dependent coverages hold whole blocks only: a pair of a partial
    block takes part iff it is in range, causally visible, in no excluded coverage, and
    covered by a static coverage (tile *A*) or in a block a row's table holds whole (tile
    *B*: every such pair). ``ids`` int64 [nQB, nKB]: 2t for the block of tiles t, -1 where
    no partial block can lie; ``table`` bool [2T + 1, BQ, BK]: A_0, B_0, A_1, ..., and an
    all-False tile last (padding slots)."""

    ids: Tensor
    table: Tensor

    def mask(self, qb: Tensor, blocks: Tensor, valid: Tensor, whole: Tensor) -> Tensor | None:
        """[R, M, BQ, W*BK] pair mask of query blocks ``qb`` [M] x their key blocks
        ``blocks`` [R, M, W] (``valid`` [R, M, W]: the slots in use), ``whole`` [R or 1, nQB,
        nKB] from :meth:`BlockPlan.rule_tiles`; None if a block has no tiles."""
        kb = blocks.long()
        ids = self.ids[qb[None, :, None], kb]  # [R, M, W]
        if bool(((ids < 0) & valid).any()):
            return None
        rows = torch.arange(whole.shape[0], device=whole.device)[:, None, None]
        use_b = whole[rows, qb[None, :, None], kb]
        idx = torch.where(valid, ids + use_b, self.table.shape[0] - 1)
        r, m, w = idx.shape
        _, bq, bk = self.table.shape
        return self.table[idx].permute(0, 1, 3, 2, 4).reshape(r, m, bq, w * bk)


def _rule_tiles(
    problem: Problem, plan: BlockPlan, static: list[tuple[Coverage, Tensor]]
) -> RuleTiles:
    """:class:`RuleTiles` of ``plan`` (``static``: its static coverages with their block
    states): tiles for every block where a row's partial block can lie (cut by causality, a
    static coverage, an exclusion or the last key block's edge)."""
    g, dev = plan.grid, plan.state.device
    visible = visible_states(g, plan.causal, dev)
    a_state = torch.zeros_like(visible)
    if static:
        a_state = torch.minimum(union_states([s for _, s in static]), visible)
    states = torch.cat([a_state, visible])  # [2, nQB, nKB]: static pairs, every pair
    for excluded in plan.parts[len(plan.own) :]:
        states = subtract_states(states, excluded)
    if g.lk % g.block_k:
        states = _edge_partial(states)
    cut = (states == PARTIAL).any(0)  # [nQB, nKB]
    qb, kb = torch.nonzero(cut).unbind(-1)  # [T]
    qi = block_indices(qb, g.block_q, g.lq)[None, :, :, None]  # [1, T, BQ, 1]
    kj = block_indices(kb, g.block_k, g.lk)[None, :, None, :]  # [1, T, 1, BK]
    b = (qi >= 0) & (kj >= 0) & problem.visible(qi, kj)
    for cov in plan.exclude:
        b = b & ~cov.covers(problem, qi, kj)
    a = torch.zeros_like(b)
    if static:
        a = b & reduce(torch.logical_or, (c.covers(problem, qi, kj) for c, _ in static))
    table = torch.stack([a[0], b[0]], 1).flatten(0, 1)  # [2T, BQ, BK]
    table = torch.cat([table, table.new_zeros(1, *table.shape[1:])])
    ids = torch.full((g.nqb, g.nkb), -1, dtype=torch.long, device=dev)
    ids[qb, kb] = 2 * torch.arange(len(qb), device=dev)
    return RuleTiles(ids, table)


def count_partial_pairs(plan: BlockPlan, problem: Problem, budget: int = 1 << 24) -> int:
    """Pairs that take part in the partial blocks of ``plan`` (rules evaluated in chunks of
    about ``budget`` pairs; rows of a row-invariant plan counted once)."""
    g = plan.grid
    lists = plan.lists(trim=True)
    num, idx = lists.part_num, lists.part_idx  # [R, nQB], [R, nQB, W]
    width = idx.shape[-1]
    if width == 0:
        return 0
    dev = plan.state.device
    rows = plan.counted_rows
    step = max(1, budget // max(1, rows * width * g.block_q * g.block_k))
    total = 0
    for i0 in range(0, g.nqb, step):
        sl = slice(i0, min(i0 + step, g.nqb))
        qb = torch.arange(sl.start, sl.stop, device=dev)
        valid = torch.arange(width, device=dev) < num[:, sl, None]  # [R, T, W]
        mask = plan.partial_mask(problem, qb, idx[:, sl], valid).expand(rows, -1, -1, -1)
        if plan.key_bias is not None:  # keys with a finite weight: [Rb, T, 1, nk]
            kj = block_indices(idx[:, sl], g.block_k, g.lk, valid).flatten(-2).unsqueeze(-2)
            flat = kj.clamp_min(0).expand(plan.key_bias.shape[0], -1, -1, -1).flatten(1)
            mask = mask & torch.isfinite(plan.key_bias).gather(-1, flat).view(
                *flat.shape[:1], *kj.shape[1:]
            )
        total += int(mask.sum())
    return total


def _kept_keys(plan: BlockPlan) -> Tensor:
    """[Rb, nKB, BK]: whether each key (padded to whole blocks) has a finite weight."""
    g = plan.grid
    kept = torch.isfinite(plan.key_bias)
    kept = torch.nn.functional.pad(kept, (0, g.nkb * g.block_k - g.lk))
    return kept.view(kept.shape[0], g.nkb, g.block_k)


def block_indices(blocks: Tensor, size: int, length: int, valid: Tensor | None = None) -> Tensor:
    """Element indices of blocks: [..., size] = block * size + 0..size-1, -1 where past
    ``length`` or where ``valid`` [...] is False."""
    idx = blocks[..., None].long() * size + torch.arange(size, device=blocks.device)
    bad = idx >= length
    if valid is not None:
        bad = bad | ~valid[..., None]
    return idx.masked_fill(bad, -1)


def _edge_partial(state: Tensor) -> Tensor:
    state = state.clone()
    state[..., -1].clamp_(max=PARTIAL)
    return state


def _lists_of(state: Tensor, trim: bool) -> BlockLists:
    full_num, full_idx = _block_list(state == FULL, trim)
    part_num, part_idx = _block_list(state == PARTIAL, trim)
    return BlockLists(full_num, full_idx, part_num, part_idx)


def _block_list(selected: Tensor, trim: bool) -> tuple[Tensor, Tensor]:
    """(count int32 [R, nQB], indices int32 [R, nQB, W]) of the True blocks, ascending first."""
    num = selected.sum(-1, dtype=torch.int32)
    width = selected.shape[-1]
    if trim:
        width = int(num.max()) if num.numel() else 0
    return num, selected_first(selected, width).to(torch.int32).contiguous()


def selected_first(selected: Tensor, width: int) -> Tensor:
    """Indices [..., width] of the True blocks of ``selected`` [..., nKB], ascending first
    (then other blocks, in no set order): a top-k of descending keys, 3x faster than a sort."""
    key = pinned(_descending(selected.shape[-1], selected.device))
    return torch.topk(selected * key, width, dim=-1).indices


@functools.lru_cache(maxsize=64)
def _descending(count: int, device: torch.device) -> Tensor:
    """int32 ``count, ..., 1``, made once per (count, device) (do not modify)."""
    return torch.arange(count, 0, -1, dtype=torch.int32, device=device)


def union_states(states: list[Tensor]) -> Tensor:
    """A block takes the strongest state any part gives it (rows broadcast)."""
    return reduce(torch.maximum, states)


def subtract_states(state: Tensor, excluded: Tensor) -> Tensor:
    """Blocks the excluded coverage holds whole are dropped; blocks it holds in part become
    partial (its pairs are masked there)."""
    state = torch.where(excluded == FULL, NONE, state)
    return torch.where(excluded == PARTIAL, torch.minimum(state, torch.ones_like(state)), state)


def _states(cov: Coverage, problem: Problem, grid: BlockGrid, keep: bool) -> Tensor:
    """The coverage's block states on ``grid``; with ``keep``, a static coverage's are kept
    per grid (:func:`_kept`)."""

    def make() -> Tensor:
        states = cov.block_states(problem, grid)
        if states is None:
            raise TypeError(f"{type(cov).__name__} has no block form")
        return states

    key = cov.static_key()
    return _kept(("states", key, grid, problem.q.device), make, keep and key is not None)


def _kept(key: tuple, make, keep: bool) -> Tensor:
    """``make()``, kept per ``key`` by :func:`static_plan` if ``keep`` (never modified: the
    plan algebra makes new tensors)."""
    return static_plan(key, make) if keep else make()


def plan_block_size(problem: Problem, coverages: list[Coverage], default: int) -> int:
    """The plan's block size on ``problem``: the gcd of the table coverages' block sizes (each
    plan block then lies in one table block), else ``default``; each fitted to the longer
    sequence (:func:`~attncompose.primitives.base.fitted_block`)."""
    length = max(problem.lq, problem.lk)
    sizes = [fitted_block(s, length) for s in (c.block_grid() for c in coverages) if s is not None]
    return math.gcd(*sizes) if sizes else fitted_block(default, length)


def table_fits(size: int, block: int, count: int) -> bool:
    """Whether ``count`` plan blocks of ``block`` each lie in one table block of ``size``."""
    return size % block == 0 or size >= count * block


_STATIC: OrderedDict[tuple, object] = OrderedDict()  # plans, states, layouts


def static_plan(key: tuple, make, keep=lambda value: True):
    """The plan (or a plan's rule tiles) of ``key`` built once per process (LRU of
    :data:`STATIC_CACHE_SIZE`): static patterns (sinks, windows, static tables, causality)
    depend only on lengths, offsets, knobs and device, so their lists and masks are reused
    across calls. A value ``keep`` refuses (too large) is returned, not kept."""
    plan = _STATIC.get(key)
    if plan is None:
        plan = make()
        if not keep(plan):
            return plan
        _STATIC[key] = plan
        while len(_STATIC) > STATIC_CACHE_SIZE:
            _STATIC.popitem(last=False)
    else:
        _STATIC.move_to_end(key)
    return pinned(plan)
