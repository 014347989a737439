"""``lsh``: sortLSH detector (HyperAttention).

Queries and keys are sorted by the Gray rank of their hash codes (one seeded set of
directions per query head). Pairing ``rank`` (the paper) matches sorted query block i with
sorted key block i; pairing ``code`` sends each tile of sorted queries to the key block where
its median code falls among the sorted key codes, so differently distributed queries and keys
still meet their own buckets. ``align: mips`` hashes vectors augmented so that angular LSH
follows inner products (Neyshabur & Srebro's reduction of MIPS to angular search).

Bound to a block size b, the key sort is cut into blocks of b; with rank pairing the query at
sorted slot p is paired with key block ``floor(p * Lk/Lq / b)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from attncompose.primitives import dispatch
from attncompose.primitives.base import (
    Coverage,
    Predicate,
    Primitive,
    Problem,
    Selection,
    Tiles,
    pinned,
    static_arange,
    take,
)
from attncompose.primitives.lsh.kernels import TorchGrayRankSort, TritonGrayRankSort
from attncompose.primitives.lsh.naive import mips_augment, projections
from attncompose.primitives.lsh.schema import LshStep
from attncompose.primitives.plan import static_plan


@dataclass
class LshSelection(Selection):
    q_order: Tensor  # [N, Lq] query indices in sorted order
    q_pos: Tensor  # [N, Lq] sorted slot of each query
    k_order: Tensor  # [N, Lk], or the first sorted slots only (a decode step's, Lsh.kept_keys)
    k_pos: Tensor  # [N, Lk] (past k_order's slots: len(k_order), in no block they read)
    q_rank: Tensor | None = None  # [N, Lq] Gray ranks in sorted order (code pairing)
    k_rank: Tensor | None = None  # [N, Lk]

    def bind(self, block_size: int) -> LshCoverage:
        return LshCoverage(self, block_size)


@dataclass
class LshCoverage(Coverage):
    """Sorted query slot p is paired with one key block (by rank quantile or by code)."""

    sel: LshSelection
    b: int
    _made: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _block(self, problem: Problem) -> int:
        return min(self.b, problem.lk)  # one block holds every key once b >= Lk

    def _tile(self, problem: Problem) -> int:
        lq, lk, b = problem.lq, problem.lk, self._block(problem)
        if self.sel.q_rank is not None:
            return min(b, lq)
        return max(1, min(b, lq, b * lq // lk))  # a tile's queries span at most two key blocks

    def _slot_bucket(self, problem: Problem, slots: Tensor) -> Tensor:
        """Rank pairing: the key block paired with each sorted query slot; [S] -> [1, S]."""
        b = self._block(problem)
        n_blocks = -(-problem.lk // b)
        return (slots * problem.lk // (problem.lq * b)).clamp_max(n_blocks - 1)[None]

    def _code_buckets(self, problem: Problem) -> Tensor:
        """Code pairing: the key block of each tile of sorted queries [N, T], where its
        median's code falls among the sorted key codes, at most its part's last (made once
        per coverage and lengths)."""
        lq, lk, b = problem.lq, problem.lk, self._block(problem)
        made = self._made.get((lq, lk))
        if made is None:
            median, _ = self._code_layout(problem)
            where = torch.searchsorted(self.sel.k_rank, self.sel.q_rank[:, median])  # [N, T]
            last = self._last_blocks(problem, median)
            made = self._made[lq, lk] = (where // b).clamp_max(last)
        return made

    def _last_blocks(self, problem: Problem, median: Tensor) -> int | Tensor:
        """The last key block a tile's queries may take: that of the keys, or in a packed
        problem that of each tile's part ([T], made once per packing). A median code above
        every key of its part falls where the next part's keys start: without this bound
        the tile would take keys of another rectangle of the causal splitter, later ones
        included."""
        b = self._block(problem)
        if problem.packed is None:
            return (problem.lk - 1) // b
        packing = problem.packed  # parts hold equal query and key ranges

        def make() -> Tensor:
            return ((packing.start + packing.length - 1) // b)[median]

        return problem.memo("lsh-last-blocks", (b, median.shape[0]), make)

    def _code_layout(self, problem: Problem) -> tuple[Tensor, Tensor]:
        """Code pairing: each tile's median slot [T] and each slot's tile [Lq], made once per
        lengths and device."""
        lq, bq, device = problem.lq, self._tile(problem), self.sel.q_rank.device

        def make() -> tuple[Tensor, Tensor]:
            median = torch.arange(-(-lq // bq), device=device) * bq + bq // 2
            return median.clamp_max(lq - 1), torch.arange(lq, device=device) // bq

        return static_plan(("lsh-code-layout", lq, bq, device), make)

    def _query_buckets(self, problem: Problem) -> Tensor:
        """Key block paired with every sorted query slot [N or 1, Lq]: with rank pairing the
        same in every call of these lengths, made once (no per-call index arithmetic)."""
        if self.sel.q_rank is not None:  # code pairing: its tile's
            return self._code_buckets(problem)[:, self._code_layout(problem)[1]]
        device = self.sel.q_pos.device
        make = lambda: self._slot_bucket(problem, torch.arange(problem.lq, device=device))
        return static_plan(("lsh-buckets", problem.lq, problem.lk, self.b, device), make)

    has_kernel_form = True

    def predicates(self, problem: Problem) -> list[Predicate]:
        """Bucket form: each query's paired key block against each key's block."""
        n = self.sel.q_pos.shape[0]
        slot_bucket = self._query_buckets(problem).expand(n, -1)  # [N, Lq] by sorted slot
        q_bucket = slot_bucket.gather(1, self.sel.q_pos)  # [N, Lq] by query index
        k_bucket = self.sel.k_pos // self._block(problem)  # [N, Lk]
        return [Predicate(q_bucket.int(), k_bucket.int())]

    def covers(self, problem: Problem, qi: Tensor, kj: Tensor) -> Tensor:
        slot_bucket = self._query_buckets(problem).expand(self.sel.q_pos.shape[0], -1)
        qb = take(slot_bucket, take(self.sel.q_pos, qi))
        kb = take(self.sel.k_pos, kj) // self._block(problem)
        return qb == kb

    def tile_covers(self, problem: Problem, tiles: Tiles, kj: Tensor) -> Tensor:
        """For exact tiles of :meth:`tiles`: key j is covered for tile t iff its sorted slot is
        in the tile's key block (with rank pairing, its first slot's: made once per
        lengths; with code pairing, its median's)."""
        if not tiles.exact:
            return super().tile_covers(problem, tiles, kj)
        n_tiles, bq = tiles.q_idx.shape[1:]
        bucket = self._tile_buckets(problem, bq, n_tiles)  # [N or 1, T]
        return take(self.sel.k_pos, kj) // self._block(problem) == bucket.unsqueeze(-1)

    def _tile_buckets(self, problem: Problem, bq: int, n_tiles: int) -> Tensor:
        """The key block each tile of ``bq`` sorted queries starts at [N or 1, T]: with code
        pairing its median's, with rank pairing its first slot's (made once per lengths)."""
        if self.sel.q_rank is not None:
            return self._code_buckets(problem)
        device = self.sel.q_pos.device
        make = lambda: self._slot_bucket(problem, torch.arange(n_tiles, device=device) * bq)
        return static_plan(("lsh-tile-buckets", problem.lq, problem.lk, self.b, bq, device), make)

    def tiles(self, problem: Problem) -> Tiles:
        lq, b = problem.lq, self._block(problem)
        bq = self._tile(problem)
        n_tiles = -(-lq // bq)
        n = self.sel.q_order.shape[0]
        span = self._span(problem, bq, n_tiles)
        # the query slots in tile order are 0 .. T*bq-1: the sorted order, -1 padded
        q_idx = _padded(self.sel.q_order, n_tiles * bq).view(n, n_tiles, bq)
        if self.sel.q_rank is not None:  # code pairing: each tile takes its median's block
            blocks = _padded(self.sel.k_order, -(-problem.lk // b) * b).view(n, -1, b)
            first = self._code_buckets(problem)[..., None]  # [N, T, 1]
            k_idx = blocks.gather(1, first.expand(n, n_tiles, b))  # [N, T, b], -1 padded
        else:  # rank pairing: the same key slots in every call of these lengths
            key = ("lsh-key-slots", lq, problem.lk, b, bq, self.sel.q_order.device)
            slots, pad = static_plan(key, lambda: self._key_slots(problem, bq, n_tiles, span))
            k_idx = self.sel.k_order.gather(1, slots.expand(n, -1))  # slots: clamped
            if pad is not None:
                k_idx = k_idx.masked_fill(pad, -1)
            k_idx = k_idx.view(n, n_tiles, span * b)
        # every query of a tile is paired with the tile's first key block alone
        exact = span == 1 and (self.sel.q_rank is not None or lq % bq == 0)
        return Tiles(q_idx, k_idx, exact=exact, every_query=True)  # q_order: a permutation

    def _key_slots(
        self, problem: Problem, bq: int, n_tiles: int, span: int
    ) -> tuple[Tensor, Tensor | None]:
        """Rank pairing: sorted key slots of each tile, flat [1, T * span*b] and clamped to
        the keys, and where they pass the last key (None: nowhere, known on the host)."""
        b, lk = self._block(problem), problem.lk
        device = self.sel.k_order.device
        first = self._tile_buckets(problem, bq, n_tiles)
        slots = (first[..., None] * b + static_arange(span * b, device)).flatten(1)
        if not self._passes_keys(problem, bq, n_tiles, span):
            return slots, None
        return slots.clamp_max(lk - 1), slots >= lk

    def _passes_keys(self, problem: Problem, bq: int, n_tiles: int, span: int) -> bool:
        """With rank pairing, whether the last tile's key slots (the highest) pass the last
        key, on the host."""
        last = self._host_bucket(problem, (n_tiles - 1) * bq)
        return (last + span) * self._block(problem) > problem.lk

    def _host_bucket(self, problem: Problem, slot: int) -> int:
        """:meth:`_slot_bucket` of one slot with rank pairing, on the host."""
        b = self._block(problem)
        return min(slot * problem.lk // (problem.lq * b), -(-problem.lk // b) - 1)

    def _span(self, problem: Problem, bq: int, n_tiles: int) -> int:
        """Key blocks a tile of ``bq`` sorted queries spans: 1 with code pairing (a tile takes
        its median's block); with rank pairing from the slots' quantiles, on the host (no
        device synchronisation)."""
        if self.sel.q_rank is not None or problem.lq == problem.lk:
            return 1  # equal lengths: slot p is in key block p // b, a tile in one block
        bucket = lambda slot: self._host_bucket(problem, slot)
        lq = problem.lq
        return 1 + max(
            bucket(min(t * bq + bq - 1, lq - 1)) - bucket(t * bq) for t in range(n_tiles)
        )


def _padded(order: Tensor, length: int) -> Tensor:
    """``order`` [N, L] padded with -1 to ``length`` columns (itself where L == length)."""
    extra = length - order.shape[1]
    return order if extra == 0 else torch.nn.functional.pad(order, (0, extra), value=-1)


class Lsh(Primitive):
    schema = LshStep
    kernels = (TritonGrayRankSort, TorchGrayRankSort)
    offset_free = True
    packable = True  # sorted within each part; its tiles are the block step's
    reads_rows = True  # hashes queries and keys where they are
    reads_groups = True  # key row n // kv_group with query row n's directions

    def __init__(self, step: LshStep, backend: str = "torch"):
        super().__init__(step, backend)
        self.block_sizes: set[int] = set()  # the block sizes its selection is bound at

    def bound_at(self, block_size: int) -> None:
        self.block_sizes.add(block_size)

    def kept_keys(self, problem: Problem) -> int | None:
        """How many sorted key slots the block steps read, where fewer than all: a decode
        step's one query (rank pairing) takes the first key block, so only the first
        ``max(block sizes)`` keys in sorted order are found (a top-k, not a sort of every
        key); None: all of them (several queries, code pairing, packed parts, or block
        sizes unknown)."""
        if self.knobs["pairing"] != "rank" or problem.lq != 1 or problem.packed is not None:
            return None
        keep = max(self.block_sizes, default=problem.lk)
        return keep if keep < problem.lk else None

    def __call__(self, problem: Problem) -> LshSelection:
        part = None if problem.packed is None else problem.packed.part  # sorted per part
        rows = None if problem.rows is None else (problem.rows.q, problem.rows.k)
        if self.knobs["align"] == "mips":  # new vectors: of the queries and keys in order
            rows, problem = None, problem.gathered()
            q, k = mips_augment(problem.q, problem.k, part)
        else:
            q, k = problem.q, problem.k
        dirs = self.directions(problem, q.shape[-1])
        sort_positions = dispatch.choose("lsh_sort", self.backend, problem).load()
        (q_order, q_pos, q_rank), (k_order, k_pos, k_rank) = sort_positions(
            (q, k), dirs, part, rows, self.kept_keys(problem)
        )
        if self.knobs["pairing"] == "rank":
            return LshSelection(q_order, q_pos, k_order, k_pos)
        # code pairing: the sorted ranks (the part above them: a part's codes meet only their
        # own part's), as the sort left them
        return LshSelection(q_order, q_pos, k_order, k_pos, q_rank, k_rank)

    def directions(self, problem: Problem, dim: int | None = None) -> Tensor:
        """Hash directions per row [N, D, r]: one seeded set per query head.

        Keys are hashed once per query head (grouped keys where they are, with each query
        head's directions), so grouped-query attention equals attention with K/V repeated to
        every query head.
        """
        return pinned(
            projections(
                problem.heads,
                dim or problem.q.shape[-1],
                self.knobs["num_projections"],
                self.knobs["seed"],
                str(problem.q.device),
                problem.q.shape[0],
            )
        )

    def kernel_name(self) -> str:
        return dispatch.describe("lsh_sort", self.backend)
