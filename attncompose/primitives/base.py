"""What primitives exchange, and the base class of their runtimes.

Shapes: the runtime flattens batch and query heads into one leading dimension ``N = B*Hq``
(keys and values keep their ``Hkv`` heads: N / kv_group rows, see :class:`Problem`), so

- ``q``: [N, Lq, D], ``k``: [N / kv_group, Lk, D], ``v``: [N / kv_group, Lk, Dv], float32
  (or the caller's float16 / bfloat16 where the Triton kernels run, which accumulate in
  float32; PyTorch implementations upcast what they compute with);
- a :class:`Partial` holds ``out`` [N, Lq, Dv] and ``lse`` [N, Lq] (``-inf`` where a row
  attended no key), both float32;
- a :class:`Coverage` says which (query, key) pairs a kernel computed exactly, so that later
  kernels and the sampler skip them (a union is never counted twice).

Positions are absolute: query ``i`` sits at ``q_offset + i``, key ``j`` at ``k_offset + j``;
under a causal mask key ``j`` is visible to query ``i`` iff its position is not larger.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from attncompose.spec.steps import StepSpec

if TYPE_CHECKING:
    from attncompose.primitives.dispatch import Kernel
    from attncompose.primitives.fusion import Pattern
    from attncompose.primitives.plan import BlockGrid


MEMO_KEYS = 8  # values a workspace keeps per memo name (see Workspace.memo)


class Workspace:
    """Named buffers reused by the steps of a call and, kept by an attention module, across
    its calls: on CPU, touching fresh memory (page faults) costs more than the copies written
    into it; on a GPU, reuse keeps addresses stable. A buffer holds an intermediate only
    until the same name is taken again (never an output); not for concurrent calls."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._memos: dict[str, OrderedDict[tuple, Any]] = {}

    def memo(self, name: str, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()`` for ``key``, kept under ``name``: inputs a call derives from its shapes
        and knobs alone (never from the data). The last :data:`MEMO_KEYS` keys of a name are
        kept (the levels of one causal call each have their own), so held memory stays
        bounded when lengths change from call to call."""
        kept = self._memos.setdefault(name, OrderedDict())
        if key in kept:
            kept.move_to_end(key)
            return pinned(kept[key])
        value = kept[key] = make()
        while len(kept) > MEMO_KEYS:
            kept.popitem(last=False)
        return pinned(value)

    def take(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised [shape] tensor; ``name``'s buffer, grown when too small."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != dtype
            or buf.device != device
            # made under torch.inference_mode: outside it, such a tensor cannot be written
            or (buf.is_inference() and not torch.is_inference_mode_enabled())
        ):
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def clear(self) -> None:
        """Drop every buffer and memo (taken again, they are made anew)."""
        self._buffers.clear()
        self._memos.clear()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


@dataclass(frozen=True, eq=False)  # equal only to itself: memo keys hold it (Problem.memo)
class Packing:
    """Independent non-causal problems packed end to end along each row (FlashAttention's
    variable-length batches): part s holds queries and keys ``[start_s, start_s + length_s)``
    and its queries attend only its own keys. ``part``, ``start``, ``length`` [L] (int64, on
    the problem's device): each index's part, and that part's first index and length;
    ``q_at``, ``k_at`` [L]: where each query and key sits, added to the problem's offsets for
    its absolute position (consecutive within a part; by default each part from 0).
    Primitives that declare :attr:`Primitive.packable` honour it; the causal splitter packs
    the off-diagonal rectangles of every level into one body call this way."""

    lengths: tuple[int, ...]
    part: Tensor
    start: Tensor
    length: Tensor
    q_at: Tensor
    k_at: Tensor

    @staticmethod
    def of(
        lengths: tuple[int, ...],
        device: torch.device | str,
        q_at: Tensor | None = None,
        k_at: Tensor | None = None,
    ) -> Packing:
        sizes = torch.tensor(lengths, dtype=torch.long)
        part = torch.repeat_interleave(torch.arange(len(lengths)), sizes)
        starts = (torch.cumsum(sizes, 0) - sizes)[part]
        local = torch.arange(part.numel()) - starts  # each part from 0
        on = lambda x: x.to(device=device, dtype=torch.long)
        q_at, k_at = (local if at is None else at for at in (q_at, k_at))
        return Packing(tuple(lengths), on(part), on(starts), on(sizes[part]), on(q_at), on(k_at))


@dataclass(frozen=True, eq=False)
class RowMaps:
    """Where a problem's queries and keys are: query i is row ``q[i]`` of its ``q`` tensor,
    key j row ``k[j]`` of its ``k`` and ``v`` (int64 [Lq], [Lk], the same for every row n).
    The causal splitter's packed levels are rows of the square this way, so nothing copies
    them where every reader takes the maps (:attr:`Primitive.reads_rows`)."""

    q: Tensor
    k: Tensor


@dataclass(frozen=True)
class Problem:
    """One (query range) x (key range) attention problem (``workspace``: the buffers its
    kernels may reuse for intermediates; ``packed``: several independent problems packed
    along the rows, see :class:`Packing`; ``rows``: its queries and keys are rows of ``q``,
    ``k`` and ``v`` picked by :class:`RowMaps`, else they are ``q``, ``k``, ``v``
    themselves, in order: :meth:`gathered` makes them so).

    Grouped-query attention: ``k`` and ``v`` hold one row per key/value head, N /
    ``kv_group`` rows, and query row n reads key/value row n // ``kv_group`` (the query heads
    of a group are consecutive rows). Readers that do not take groups get the problem with
    its keys and values repeated for every query row (:meth:`expanded`)."""

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    causal: bool
    heads: int  # query heads per batch element: row n of q belongs to head n % heads
    kv_group: int  # query heads per key/value head (GQA)
    q_offset: int = 0
    k_offset: int = 0
    workspace: Workspace | None = None
    packed: Packing | None = None
    rows: RowMaps | None = None
    _gathered: list = field(default_factory=list, init=False, repr=False, compare=False)
    _expanded: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kv_group < 1 or self.k.shape[0] * self.kv_group != self.q.shape[0]:
            raise ValueError(
                f"{self.q.shape[0]} query rows need {self.q.shape[0]} / kv_group "
                f"({self.kv_group}) key rows, got k {tuple(self.k.shape)}"
            )

    @property
    def lq(self) -> int:
        return self.q.shape[1] if self.rows is None else self.rows.q.shape[0]

    @property
    def lk(self) -> int:
        return self.k.shape[1] if self.rows is None else self.rows.k.shape[0]

    def gathered(self) -> Problem:
        """This problem with its queries, keys and values in order (its row maps gathered,
        into the workspace where there is one; once per problem); itself without maps."""
        if self.rows is None:
            return self
        if not self._gathered:
            copy = lambda name, x, rows: _gather_rows(self.workspace, name, x, rows)
            q, k = copy("q", self.q, self.rows.q), copy("k", self.k, self.rows.k)
            v = copy("v", self.v, self.rows.k)
            self._gathered.append(replace(self, q=q, k=k, v=v, rows=None))
        return self._gathered[0]

    def expanded(self) -> Problem:
        """This problem with one key and value row per query row (``kv_group`` 1: each
        key/value row repeated for the query heads of its group; a copy, made once per
        problem); itself where that is so already."""
        if self.kv_group == 1:
            return self
        if not self._expanded:
            group = self.kv_group
            repeat = lambda x: x.unsqueeze(1).expand(x.shape[0], group, *x.shape[1:]).flatten(0, 1)
            self._expanded.append(replace(self, k=repeat(self.k), v=repeat(self.v), kv_group=1))
        return self._expanded[0]

    def for_reader(self, reader: Any) -> Problem:
        """This problem as ``reader`` (a step, a fused pattern, a kernel) can read it:
        itself where the reader takes row maps (``reads_rows``), else :meth:`gathered`; and
        where it does not take grouped keys and values (``reads_groups``), :meth:`expanded`."""
        problem = self if getattr(reader, "reads_rows", False) else self.gathered()
        return problem if getattr(reader, "reads_groups", False) else problem.expanded()

    def sub(self, q: slice, k: slice, causal: bool) -> Problem:
        """The sub-problem of a query range and a key range (offsets follow)."""
        if self.packed is not None or self.rows is not None:
            raise ValueError("a packed problem has no sub-ranges: its parts are independent")
        q0 = q.start or 0
        k0 = k.start or 0
        return replace(
            self,
            q=self.q[:, q],
            k=self.k[:, k],
            v=self.v[:, k],
            causal=causal,
            q_offset=self.q_offset + q0,
            k_offset=self.k_offset + k0,
        )

    def visible(self, qi: Tensor, kj: Tensor) -> Tensor:
        """Bool mask of causally visible pairs (all True when not causal); broadcasts."""
        if not self.causal:
            return torch.ones(
                torch.broadcast_shapes(qi.shape, kj.shape), dtype=torch.bool, device=qi.device
            )
        return kj + self.k_offset <= qi + self.q_offset

    def visible_keys(self, qi: Tensor) -> Tensor:
        """Number of keys visible to each query index in ``qi``."""
        if not self.causal:
            return torch.full_like(qi, self.lk)
        return (qi + self.q_offset - self.k_offset + 1).clamp(0, self.lk)

    def visible_range(self, qi: Tensor) -> tuple[Tensor | int, Tensor]:
        """(first, count) of the contiguous keys visible to each query index in ``qi`` (-1
        reads query 0): the query's part of a packed problem, else the causal prefix or all
        keys."""
        if self.packed is not None:
            at = qi.clamp_min(0)
            return self.packed.start[at], self.packed.length[at]
        return 0, self.visible_keys(qi)

    def q_positions(self, qi: Tensor) -> Tensor:
        """Absolute positions of query indices ``qi`` (-1 reads query 0 when packed)."""
        if self.packed is None:
            return qi + self.q_offset
        return self.packed.q_at[qi.clamp_min(0)] + self.q_offset

    def k_positions(self, kj: Tensor) -> Tensor:
        """Absolute positions of key indices ``kj`` (-1 reads key 0 when packed)."""
        if self.packed is None:
            return kj + self.k_offset
        return self.packed.k_at[kj.clamp_min(0)] + self.k_offset

    def memo(self, name: str, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()``, kept in the problem's workspace (:meth:`Workspace.memo`) for ``key``
        and this problem's rows, ranges and positions (a packing as itself): for what a call
        derives from them and its knobs alone, never from the data. Without a workspace,
        made in every call."""
        if self.workspace is None:
            return make()
        where = (self.q.shape[0], self.lq, self.lk, self.q_offset, self.k_offset, self.packed)
        return self.workspace.memo(name, (*key, *where, self.q.device), make)

    def generator(self, seed: int, *salt: Any) -> torch.Generator:
        """A generator on the problem's device, seeded from ``seed``, the ranges and ``salt``."""
        key = repr((seed, self.q_offset, self.k_offset, self.lq, self.lk, *salt)).encode()
        g = torch.Generator(device=self.q.device)
        g.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)
        return g


@dataclass
class Partial:
    """Attention of every query over a subset of keys: ``out`` [N, Lq, Dv], ``lse`` [N, Lq]."""

    out: Tensor
    lse: Tensor
    coverage: Coverage | None = None

    @staticmethod
    def empty(problem: Problem) -> Partial:
        n, lq = problem.q.shape[0], problem.lq
        out = problem.q.new_zeros(n, lq, problem.v.shape[-1], dtype=torch.float32)
        return Partial(out, problem.q.new_full((n, lq), float("-inf"), dtype=torch.float32))


@dataclass
class Covered:
    """The value of a step that only exclude ports read: the pairs it would attend, its
    attention not computed (``Block.coverage``)."""

    coverage: Coverage


@dataclass
class Tiles:
    """Work list of a block kernel: query tiles and the candidate keys of each.

    ``q_idx`` [N, T, bq] query indices, ``k_idx`` [N, T, nk] key indices; ``-1`` pads. A query
    appears in at most one tile. ``lse_shift`` [N, T] (optional) is added to each tile's lse
    (the sampler's reweighting). ``key_bias`` [N, T, nk] (optional) is added to the scores of
    each candidate key: a log-weight, ``-inf`` drops the key (a sampled residual fused into a
    detector's tile carries its reweighting and its exclusions here). ``exact``: every valid
    candidate pair is covered by the selection that made the tiles, so the kernel need not
    test coverage. ``shared``: a coverage under which all queries of a tile cover the same
    keys (the tiles group queries by it), so an exclusion by it is tested on one query a tile.
    ``k_start`` [T] (optional): the candidates of tile t are the key range ``k_start[t] + j``
    in every row (``-1`` in ``k_idx`` where the range leaves [0, Lk)), so a kernel may read
    them as a strided view instead of gathering (windows, sinks). ``every_query``: each
    query sits in exactly one tile (natural order, sortLSH's permutation), so a kernel need
    not initialise the rows of queries in no tile.
    """

    q_idx: Tensor
    k_idx: Tensor
    lse_shift: Tensor | None = None
    exact: bool = False
    key_bias: Tensor | None = None
    shared: Coverage | None = None
    k_start: Tensor | None = None
    every_query: bool = False


@dataclass(frozen=True)
class Predicate:
    """A coverage as kernel data, so a Triton kernel or a FlexAttention ``mask_mod`` can test
    "is (i, j) covered?": each query gets a group id ``q_ids[n, i]`` and each key a group id
    ``k_ids[n, j]`` (int32, [N or 1, Lq] and [N or 1, Lk]; 1: the same for every row). The
    pair is covered iff ``q_ids == k_ids`` (bucket form: sortLSH), iff ``table[n, a, b]``
    when ``table`` [N or 1, A, B] bool is set (table form: block tables), or iff
    ``0 <= q_ids - k_ids < band`` when ``band`` is set (band form on positions: windows,
    sinks)."""

    q_ids: Tensor
    k_ids: Tensor
    table: Tensor | None = None
    band: int | None = None


class Coverage:
    """The (query, key) pairs one kernel input computes exactly."""

    @property
    def row_invariant(self) -> bool:
        """Whether ``covers`` answers alike for every row n (static patterns: sinks, windows):
        a tile kernel may then build its pair mask once for all rows."""
        return False

    def tiles(self, problem: Problem) -> Tiles:
        """Tiles whose candidate keys include every covered pair of their queries."""
        raise NotImplementedError

    def covers(self, problem: Problem, qi: Tensor, kj: Tensor) -> Tensor:
        """Bool mask: is (qi, kj) covered? ``qi`` [N or 1, T, bq, 1], ``kj`` [N or 1, T, 1, nk]
        (1: the same indices for every row), may be -1."""
        raise NotImplementedError

    def tile_covers(self, problem: Problem, tiles: Tiles, kj: Tensor) -> Tensor:
        """Bool [N, T, K]: are keys ``kj`` [N, T, K] covered for the queries of tile t, where
        every query of a tile covers alike (a detector's exact tiles, beside which this
        coverage may be key-only)? Asks each tile's first query; a detector answers from
        its tiles' key blocks."""
        first = tiles.q_idx[..., :1, None]  # [N, T, 1, 1]
        return self.covers(problem, first, kj.unsqueeze(-2)).squeeze(-2)

    @property
    def key_only(self) -> bool:
        """Whether ``covers`` depends on the key alone (sinks): excluding such a coverage is
        a -inf bias on its keys, not a pair rule."""
        return False

    def key_exclusion(self, problem: Problem) -> Tensor:
        """float32 [Lk + 1] of a key-only coverage: -inf on the keys it covers, 0 on the
        others and last (where index -1, padding, reads): excluding it from keys ``kj`` is
        adding ``key_exclusion(problem)[kj]``, one lookup a call (kept per pattern and
        positions when the coverage is static)."""
        if not self.key_only:
            raise TypeError(f"{type(self).__name__} covers keys per query")

        def make() -> Tensor:
            keys = torch.arange(problem.lk, device=problem.q.device).view(1, 1, 1, -1)
            hit = self.covers(problem, keys[..., :1], keys).flatten()  # any query answers alike
            bias = torch.zeros(problem.lk + 1, dtype=torch.float32, device=keys.device)
            # a mask, not the indices of the hits (which the host would wait to count)
            bias[: problem.lk].masked_fill_(hit, float("-inf"))
            return bias

        key = self.static_key()
        return make() if key is None else problem.memo("key-exclusion", key, make)

    # -- kernel form (:class:`Predicate`) --------------------------------------------------

    @property
    def has_kernel_form(self) -> bool:
        """Whether :meth:`predicates` gives this coverage as kernel data."""
        return False

    def predicates(self, problem: Problem) -> list[Predicate]:
        """Predicates whose union is this coverage on ``problem`` (several only for a union,
        which kernels can then only exclude)."""
        raise TypeError(f"{type(self).__name__} has no kernel form")

    # -- block form (see :mod:`attncompose.primitives.plan`) ---------------------------------

    @property
    def has_block_form(self) -> bool:
        """Whether :meth:`block_states` describes this coverage on a block grid."""
        return False

    def block_states(self, problem: Problem, grid: BlockGrid) -> Tensor | None:
        """uint8 [R, nQB, nKB] on ``grid`` (R = 1 when the same for every row): 2 where the
        coverage holds every in-range pair of block (i, j), 1 where it holds some, 0 where
        none (causality is applied by the plan). None: no block form."""
        return None

    def block_grid(self) -> int | None:
        """A block size plan blocks must divide (a table's), or None if any grid fits."""
        return None

    def static_key(self) -> tuple | None:
        """A hashable description when the coverage depends on knobs and positions only (its
        plan can be built once per length and reused), else None (data-dependent)."""
        return None


class CompositeCoverage(Coverage):
    """A coverage made of others (:attr:`members`): what holds for each member holds for it
    (positions only, a block form, a common block grid, a static key tagged ``kind``); how
    it combines their pairs is the subclass's."""

    kind = "composite"

    @property
    def members(self) -> list[Coverage]:
        raise NotImplementedError

    @property
    def row_invariant(self) -> bool:
        return all(part.row_invariant for part in self.members)

    @property
    def key_only(self) -> bool:
        return all(part.key_only for part in self.members)

    @property
    def has_block_form(self) -> bool:
        return all(part.has_block_form for part in self.members)

    def _member_states(self, problem: Problem, grid: BlockGrid) -> list[Tensor] | None:
        states = [part.block_states(problem, grid) for part in self.members]
        return None if any(s is None for s in states) else states

    def block_grid(self) -> int | None:
        sizes = [s for s in (part.block_grid() for part in self.members) if s is not None]
        return math.gcd(*sizes) if sizes else None

    def static_key(self) -> tuple | None:
        keys = [part.static_key() for part in self.members]
        return None if any(k is None for k in keys) else (self.kind, *keys)


@dataclass
class UnionCoverage(CompositeCoverage):
    """Union of coverages: covered if any part covers the pair."""

    parts: list[Coverage] = field(default_factory=list)
    kind = "union"

    @property
    def members(self) -> list[Coverage]:
        return self.parts

    @property
    def has_kernel_form(self) -> bool:
        return all(part.has_kernel_form for part in self.parts)

    def predicates(self, problem: Problem) -> list[Predicate]:
        return [p for part in self.parts for p in part.predicates(problem)]

    def block_states(self, problem: Problem, grid: BlockGrid) -> Tensor | None:
        states = self._member_states(problem, grid)
        return None if states is None else functools.reduce(torch.maximum, states)

    def covers(self, problem: Problem, qi: Tensor, kj: Tensor) -> Tensor:
        mask = self.parts[0].covers(problem, qi, kj)
        for part in self.parts[1:]:
            mask = mask | part.covers(problem, qi, kj)
        return mask

    def tile_covers(self, problem: Problem, tiles: Tiles, kj: Tensor) -> Tensor:
        mask = self.parts[0].tile_covers(problem, tiles, kj)
        for part in self.parts[1:]:
            mask = mask | part.tile_covers(problem, tiles, kj)
        return mask


class Selection:
    """A detector's result; a block kernel binds it to its block size to get a Coverage."""

    def bind(self, block_size: int) -> Coverage:
        raise NotImplementedError


class Primitive:
    """Runtime of one step, and what its op folder declares: ``schema``, the step model (its
    ``op`` literal names the primitive), ``kernels``, the implementations of kernel-level ops
    it brings (:mod:`attncompose.primitives.dispatch`; per backend in preference order), and
    ``fusions``, the step patterns it runs fused (:mod:`attncompose.primitives.fusion`).
    Subclasses implement ``__call__``.

    ``__call__(problem, **ports)`` receives the values of the step's input ports (lists of
    values; a lazy port receives a function ``Problem -> value``) and returns a Selection or
    a Partial.
    """

    schema: ClassVar[type[StepSpec]]
    op: ClassVar[str]  # the schema's op name
    kernels: ClassVar[tuple[type[Kernel], ...]] = ()
    fusions: ClassVar[tuple[Pattern, ...]] = ()
    # On a non-causal problem, the result does not depend on where the problem sits in the
    # sequence (its offsets), random draws apart: independent problems of equal shape may be
    # stacked as rows of one problem (the causal splitter does so per level)
    offset_free: ClassVar[bool] = False
    # A selection step whose Selection has a block form (it can take part in a block plan)
    block_form: ClassVar[bool] = False
    # Runs a packed problem (:class:`Packing`) as its parts would run one by one, random
    # draws apart, provided every part's length is a multiple of :meth:`pack_quantum` (a
    # step may decide per instance, once its inputs are connected)
    packable: bool = False
    # Takes a problem whose queries and keys are rows of its tensors (:class:`RowMaps`): it
    # reads values only through the maps, else not at all (shapes, lq/lk, positions); the
    # compiler gives the others the problem gathered (:meth:`Problem.gathered`)
    reads_rows: ClassVar[bool] = False
    # Takes a problem with grouped keys and values (:attr:`Problem.kv_group`): it reads key
    # row n // kv_group for query row n, else no keys or values at all; the compiler gives the
    # others the problem expanded (:meth:`Problem.expanded`)
    reads_groups: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "schema" in vars(cls):
            cls.op = cls.schema.op_name()

    def __init__(self, step: StepSpec, backend: str = "torch"):
        self.step = step
        self.knobs = step.knobs()
        self.backend = backend

    def connect(self, inputs: dict[str, list[Primitive]]) -> None:
        """Called once at compile time with the runtimes wired into each port (a primitive
        whose implementation depends on its inputs' kinds reads them here)."""

    def bound_at(self, block_size: int) -> None:
        """Called at compile time by each block step that binds this step's selection
        (:meth:`Selection.bind`) at ``block_size``: a selection step may then leave out what
        no block of that size reads."""

    def kernel_name(self) -> str:
        """Which implementation runs (shown by ``attncompose show``)."""
        return f"{self.backend}:{self.op}"

    def pack_quantum(self) -> int:
        """What the parts of a packed problem must be a multiple of (its tiles' length: a
        tile never straddles two parts)."""
        return 1

    def __call__(self, problem: Problem, **ports: Any) -> Any:
        raise NotImplementedError


def _gather_rows(workspace: Workspace | None, name: str, x: Tensor, rows: Tensor) -> Tensor:
    """``x[:, rows]`` (into the workspace buffer ``rows.<name>`` where there is one)."""
    if workspace is None:
        return x.index_select(1, rows)
    buf = workspace.take(f"rows.{name}", (x.shape[0], rows.numel(), x.shape[-1]), x.dtype, x.device)
    return torch.index_select(x, 1, rows, out=buf)


def row_index(idx: Tensor, pitch: int, group: int = 1) -> Tensor:
    """The rows of x's row view (:func:`row_pitch`: row n, l of x [N', L, D] at n * pitch +
    l) that ``x[n // group, idx[n, ...]]`` reads, flat (-1 reads row 0 of its n; ``group``:
    the query rows per key row of grouped keys, :attr:`Problem.kv_group`): computed once for
    keys and values gathered alike (where their pitches agree)."""
    n = idx.shape[0]
    base = group_rows(n, group, idx.device, pitch).view(n, *([1] * (idx.dim() - 1)))
    return (idx.clamp_min(0) + base).reshape(-1)


def group_rows(count: int, group: int, device: torch.device, step: int = 1) -> Tensor:
    """``(arange(count) // group) * step`` (int64), made once per arguments: the key row
    each of ``count`` query rows reads, times ``step``. Do not modify."""
    if group == 1:
        return static_arange(count, device, step)
    return pinned(_group_rows(count, group, torch.device(device), step))


@functools.lru_cache(maxsize=64)
def _group_rows(count: int, group: int, device: torch.device, step: int) -> Tensor:
    return torch.arange(count, device=device).div_(group, rounding_mode="floor").mul_(step)


def row_pitch(x: Tensor) -> int:
    """Rows of D between x[n] and x[n+1] (x [N, L, D]) in the [*, D] view
    :func:`gather_rows` reads: its row stride where x's positions are consecutive D-vectors
    (a key range of a longer sequence, e.g. the causal splitter's rectangles), else L (a
    contiguous copy is read)."""
    n, length, d = x.shape
    if n > 1 and x.stride(-1) == 1 and x.stride(1) == d and x.stride(0) % d == 0:
        return x.stride(0) // d
    return length


def _row_view(x: Tensor) -> Tensor:
    """x [N, L, D] as [R, D] rows, row n, l at n * row_pitch(x) + l: a view of its storage
    where :func:`row_pitch` finds one, else of a contiguous copy."""
    n, length, d = x.shape
    pitch = row_pitch(x)
    if pitch == length:
        return x.reshape(n * length, d)
    return x.as_strided(((n - 1) * pitch + length, d), (d, 1))


def static_arange(count: int, device: torch.device, step: int = 1) -> Tensor:
    """``arange(count) * step`` (int64), made once per (count, step, device): index
    arithmetic that is the same in every call launches nothing. Do not modify."""
    return pinned(_static_arange(count, torch.device(device), step))


@functools.lru_cache(maxsize=64)
def _static_arange(count: int, device: torch.device, step: int) -> Tensor:
    return torch.arange(count, device=device) * step


def gather_rows(
    x: Tensor,
    idx: Tensor,
    out: Tensor | None = None,
    rows: Tensor | None = None,
    group: int = 1,
) -> Tensor:
    """``x[n // group, idx[n, ...]]`` for x [N / group, L, D] and idx [N, ...] (-1 reads row
    0); [N, ..., D]. ``group``: query rows per key row (grouped keys,
    :attr:`Problem.kv_group`); ``out``: a buffer of at least that many elements to write
    into (fresh memory costs page faults on CPU, more than the copy itself); ``rows``:
    :func:`row_index` of ``idx`` with x's :func:`row_pitch` and ``group``. A key range of a
    longer sequence is read where it lies (before, a gather of a few keys copied the whole
    range first)."""
    d = x.shape[-1]
    if x.shape[0] * group != idx.shape[0]:
        raise ValueError(f"{idx.shape[0]} index rows read x {tuple(x.shape)} in groups of {group}")
    rows = row_index(idx, row_pitch(x), group) if rows is None else rows
    flat = _row_view(x)
    if out is None:
        return flat.index_select(0, rows).view(*idx.shape, d)
    dest = out[: rows.numel() * d].view(rows.numel(), d)
    return torch.index_select(flat, 0, rows, out=dest).view(*idx.shape, d)


def group_views(x: Tensor, group: int) -> list[Tensor]:
    """x [N, ...] (per query row) as one view [N / group, ...] per query head g of a group
    of grouped keys (x itself when ``group`` is 1): the query rows that read key row j are
    j * group + g, so view g runs against the keys as they are."""
    if group == 1:
        return [x]
    return list(x.unflatten(0, (-1, group)).unbind(1))


def stack_heads(x: Tensor, group: int) -> Tensor:
    """x [N, ..., L, D] (per query row) as [N / group, ..., group * L, D]: the query heads of
    a group of grouped keys stacked as the rows of one attention against their shared key
    row (query head g's rows at g * L; a copy unless x is laid out so already). Where every
    head of a group attends the same keys, one call on these rows reads the keys once: on
    the CPU PyTorch's fused kernel takes a decode step of 3 heads at 32768 keys in ~0.6 of
    the time it takes them as heads, and tiles of 3 x 64 queries ~20% faster per product
    than 64. :func:`unstack_heads` undoes it."""
    return x.unflatten(0, (-1, group)).movedim(1, -3).flatten(-3, -2)


def stacking_fills_threads(key_rows: int, rows: int, pieces: int = 1) -> bool:
    """Whether one call with a group's query heads stacked (:func:`stack_heads`) still gives
    every CPU thread work: PyTorch's fused CPU kernel runs (batch, head, block of up to 256
    query rows) parts in parallel, here ``key_rows * pieces * ceil(rows / 256)`` of them
    (``rows``: stacked query rows a piece). With fewer parts than threads the heads run
    better as heads: one key/value head of 3 query heads at a decode step took 1.4-1.5x the
    time stacked on 2 threads (one part, one thread busy), where 3 or 8 key/value heads took
    0.6-1.0x (a stacked call reads each key row once)."""
    parts = key_rows * pieces * -(-rows // 256)
    return parts >= torch.get_num_threads()


def unstack_heads(
    out: Tensor, lse: Tensor, group: int, into: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`stack_heads` on a stacked call's results: out [N / group, ...,
    group * L, Dv] and lse [N / group, ..., group * L] as [N, ..., L, Dv] and [N, ..., L],
    written into ``into`` (out, lse) if given (else copies where needed)."""
    heads = lambda x: x.unflatten(-2, (group, -1)).movedim(-3, 1)  # [N / G, G, ..., L, D]
    pair = (heads(out), heads(lse.unsqueeze(-1)))
    if into is None:
        return pair[0].flatten(0, 1), pair[1].flatten(0, 1)[..., 0]
    into[0].unflatten(0, (-1, group)).copy_(pair[0])
    into[1].unsqueeze(-1).unflatten(0, (-1, group)).copy_(pair[1])
    return into


def take(meta: Tensor, idx: Tensor) -> Tensor:
    """``meta[n, idx[n, ...]]`` for per-row metadata meta [N, L] and idx [N, ...] (-1 -> 0)."""
    n = meta.shape[0]
    return meta.gather(1, idx.clamp_min(0).reshape(n, -1)).view(idx.shape)


def fitted_block(size: int, length: int) -> int:
    """A block (or tile) of ``size`` for a sequence of ``length``: cut to the power of two
    that holds the sequence (a larger one only adds padding), but not below 16 (a sequence
    of at most 16 is one block either way, and 16 is the least block the Triton kernels
    take)."""
    return min(size, max(16, 1 << max(0, length - 1).bit_length()))


def natural_tiles(n: int, length: int, tile: int, device: torch.device) -> Tensor:
    """Query indices [N, ceil(length/tile), tile] in natural order, -1 padded. Fewer queries
    than a tile make one smaller tile (:func:`fitted_block`: a decode step's one query is a
    tile of 16 rows, not of 127 padding rows that a kernel would compute as well). Made once
    per (length, tile, device), like :func:`static_arange`. Do not modify."""
    tile = fitted_block(tile, length)
    return pinned(_natural_tiles(length, tile, torch.device(device))).expand(n, -1, -1)


@functools.lru_cache(maxsize=64)
def _natural_tiles(length: int, tile: int, device: torch.device) -> Tensor:
    count = -(-length // tile)
    idx = torch.arange(count * tile, device=device).view(count, tile)
    return idx.masked_fill(idx >= length, -1).unsqueeze(0)


_PINS: ContextVar[list[Any] | None] = ContextVar("attncompose_pins", default=None)


@contextmanager
def pinning() -> Iterator[list[Any]]:
    """Collect what the caches hand out (static plans, memos, hash directions, ...) while a
    CUDA graph captures a call: the graph reads their memory in every replay, so its owner
    keeps the yielded list, and a cache that drops a value later frees no memory the graph
    still reads."""
    pins: list[Any] = []
    token = _PINS.set(pins)
    try:
        yield pins
    finally:
        _PINS.reset(token)


def pinned(value: Any) -> Any:
    """``value``, kept by the active :func:`pinning` block if there is one; every cache
    that outlives a call returns through this."""
    pins = _PINS.get()
    if pins is not None:
        pins.append(value)
    return value


_PRODUCTS: ContextVar[list[int] | None] = ContextVar("attncompose_products", default=None)


@contextmanager
def count_products() -> Iterator[list[int]]:
    """Count the query-key products the PyTorch kernels compute inside the block.

    Yields a one-element list holding the running total (unmasked pairs of block and sampler
    tiles, visible pairs of exact attention). Used to report "frac", the fraction of exact
    attention's products a recipe computes.
    """
    box = [0]
    token = _PRODUCTS.set(box)
    try:
        yield box
    finally:
        _PRODUCTS.reset(token)


def counting_products() -> bool:
    """Whether a :func:`count_products` block is active."""
    return _PRODUCTS.get() is not None


def add_products(count: int | Tensor) -> None:
    """Add to the active product count (no-op outside :func:`count_products`)."""
    box = _PRODUCTS.get()
    if box is not None:
        box[0] += int(count)
