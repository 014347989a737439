"""Block plans in PyTorch: the reference walk and the CPU path through the fused kernel.

Two passes over a :class:`~attncompose.primitives.plan.BlockPlan`, merged by lse:

1. **full blocks**, with no pair mask: (row, query block)s are grouped by how many full key
   blocks they have, and each group's key blocks are read as one key sequence per query
   block: a strided view where they are consecutive ranges stepping evenly (a sliding
   window's interior), else gathered block by block (:class:`_KeyBlocks`: keys are read
   where they lie, never copied whole into a padded layout, so a decode step at a length
   that is no multiple of the key block reads only the blocks it takes). A key-level mask
   hides padding keys only where the counts within a group differ (a plan per row: chunks
   of equal counts, no mask);
2. **partial blocks**, with the plan's pair rule evaluated on them only (one mask for every
   row when the plan is the same for all rows, kept with a static plan; a data-dependent
   plan reads it from tiles built once per static pattern, :meth:`BlockPlan.partial_mask`).

Grouped keys and values (:attr:`~attncompose.primitives.base.Problem.kv_group`) are read
where they are: query row n takes its key blocks from row n // kv_group (a shared plan's
groups run one call per query head of the group, on the same key views or gathers).

Queries and outputs of consecutive query blocks are views, never gathered. ``chunk_fn(q, k,
v, mask, bias, scale, scratch) -> (out, lse)`` computes one group: the reference
(:func:`~attncompose.primitives.block.naive._softmax_chunk`) or PyTorch's fused CPU flash
kernel (:func:`~attncompose.primitives.block.fused._fused_chunk`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncompose.primitives.base import (
    Coverage,
    Partial,
    Problem,
    Workspace,
    group_rows,
    row_pitch,
)
from attncompose.primitives.block.naive import (
    SCORE_BUDGET,
    _softmax_chunk,
    grouped_chunk,
    key_ranges,
)
from attncompose.primitives.block.one_query import one_query_attention
from attncompose.primitives.merge.naive import merge_into
from attncompose.primitives.plan import (
    FULL,
    PARTIAL,
    BlockPlan,
    block_indices,
    selected_first,
)

EXACT_GROUPS = 8  # at most this many distinct counts: one group each, no padding keys
# key elements (and as many values) one call gathers or reads at most, 16 MiB in fp32: the
# fused kernel then finds them in cache (the score budget alone let topp at 16384 gather 67 MB
# of keys per call, and the kernel ran ~15% slower per product)
KEY_BUDGET = 1 << 22
MASK_MEMO = 1 << 24  # a static plan keeps its partial-block masks up to this many elements


def plan_attention(problem: Problem, plan: BlockPlan) -> Partial:
    """The reference: (out [N, Lq, Dv], lse [N, Lq]) over the pairs the plan selects."""
    return run_plan(problem, plan, _softmax_chunk)


def one_query(problem: Problem, select: list[Coverage], exclude: list[Coverage]) -> Partial:
    """The reference of a decode step's kept keys (:mod:`.one_query`)."""
    return one_query_attention(problem, select, exclude, _softmax_chunk)


def run_plan(problem: Problem, plan: BlockPlan, chunk_fn) -> Partial:
    """Drive ``chunk_fn`` over the plan's full, then partial blocks (see the module doc)."""
    plan = plan.natural_rows()
    g = plan.grid
    n, dv = problem.q.shape[0], problem.v.shape[-1]
    # rows a query block holds: one block holds just the queries there are (a decode step's
    # few, not a block of padding rows that the fused kernel would compute as well)
    bq = g.block_q if g.nqb > 1 else g.lq
    out = problem.q.new_zeros(n, g.nqb, bq, dv, dtype=torch.float32)
    lse = problem.q.new_full((n, g.nqb, bq), float("-inf"), dtype=torch.float32)
    walk = _Walk(problem, plan, chunk_fn, out, lse)
    state = plan.kernel_states()
    if plan.rows == 1:
        walk.full_shared(state[0] == FULL)
    else:
        walk.full_per_row(state == FULL)
    walk.partial(state == PARTIAL)
    return Partial(out.flatten(1, 2)[:, : g.lq], lse.flatten(1)[:, : g.lq])


class _Walk:
    """One call: inputs in blocks ([N, nQB, BQ, D], [N, nKB, BK, D], zero-padded), the
    results being written ([N, nQB, BQ, Dv], [N, nQB, BQ]) and the buffers groups reuse."""

    def __init__(self, problem: Problem, plan: BlockPlan, chunk_fn, out: Tensor, lse: Tensor):
        g = plan.grid
        self.problem, self.plan, self.chunk_fn = problem, plan, chunk_fn
        self.bq = out.shape[2]  # query rows a block holds (fewer than block_q: all of them)
        self.q = _blocks(problem.q, g.nqb, self.bq)
        self.k = _KeyBlocks(problem.k, g.nkb, g.block_k)
        self.v = _KeyBlocks(problem.v, g.nkb, g.block_k)
        self.out, self.lse = out, lse
        self.group = problem.kv_group  # query rows per key row
        self.scratch = problem.workspace or Workspace()
        self.dev = problem.q.device

    def _call(self, q, k, v, mask, bias, group: int = 1, into=None):
        """``chunk_fn`` on one group (k, v with one row per ``group`` query rows; ``into``:
        where its results go)."""
        if bias is not None:
            finite = torch.isfinite(bias).unsqueeze(-2)
            mask = finite if mask is None else mask & finite
        scale, scratch = self.problem.scale, self.scratch
        return grouped_chunk(self.chunk_fn, group, q, k, v, mask, bias, scale, scratch, into)

    def _step(self, rows: int, width: int) -> int:
        """Query blocks per call so that scores and keys stay within their budgets."""
        g = self.plan.grid
        keys = rows * width * g.block_k
        scores = SCORE_BUDGET // max(1, keys * self.bq)
        return max(1, min(scores, KEY_BUDGET // max(1, keys * self.k.dim)))

    # -- full blocks, the same plan for every row -------------------------------------------

    def full_shared(self, selected: Tensor) -> None:
        """Full blocks of a row-invariant plan: ``selected`` [nQB, nKB]."""
        num = selected.sum(-1)  # [nQB]
        if not bool(num.any()):
            return
        order = selected_first(selected, int(num.max()))  # [nQB, W]
        n = self.q.shape[0]
        for width, members in _groups(num):
            for i0, i1 in _runs(members.tolist()):
                step = self._step(n, width)
                for j0 in range(i0, i1, step):
                    j1 = min(i1, j0 + step)
                    self._full_range(j0, j1, order[j0:j1, :width], num[j0:j1])

    def _full_range(self, i0: int, i1: int, blocks: Tensor, count: Tensor) -> None:
        """Query blocks [i0, i1) of every row over their ``blocks`` [M, W] (``count`` [M]
        of them valid), written into the results."""
        width = blocks.shape[1]
        nk = width * self.plan.grid.block_k
        k, v = self._keys(blocks, nk)
        valid = _valid(count, width)  # [M, W]
        mask = None if bool(valid.all()) else self._key_mask(valid)[None]
        bias = self._bias(blocks[None], valid[None])
        into = (self.out[:, i0:i1], self.lse[:, i0:i1])  # k, v: one row per key row
        self._call(self.q[:, i0:i1], k, v, mask, bias, self.group, into)

    def _keys(self, blocks: Tensor, nk: int) -> tuple[Tensor, Tensor]:
        """K and V of ``blocks`` [M, W] for every key row: [N / G, M, W*BK, D]. Consecutive
        ranges stepping evenly are a view (nothing copied), the rest a gather into buffers."""
        bk = self.plan.grid.block_k
        m, width = blocks.shape
        starts = blocks[:, 0].long()
        step = int(starts[1] - starts[0]) if m > 1 else 0
        ranges = blocks == starts[:, None] + torch.arange(width, device=self.dev)
        even = starts == starts[0] + step * torch.arange(m, device=self.dev)
        if step >= 0 and bool(ranges.all()) and bool(even.all()):  # never past the last key
            return tuple(
                key_ranges(x.rows, int(starts[0]) * bk, step * bk, m, nk) for x in (self.k, self.v)
            )
        rows = self.k.rows.shape[0]
        at = torch.arange(rows, device=self.dev).repeat_interleave(blocks.numel())
        idx = blocks.reshape(-1).long().repeat(rows)
        shape = (rows, m, nk)
        return self._gather("k", self.k, at, idx, shape), self._gather("v", self.v, at, idx, shape)

    def _gather(self, name: str, x: _KeyBlocks, rows: Tensor, blocks: Tensor, shape) -> Tensor:
        """Key blocks ``blocks`` [P] of key rows ``rows`` [P] into the walk's buffer ``name``,
        viewed as ``shape + (D,)`` (fresh memory costs page faults on CPU: more than the
        copy)."""
        buf = self.scratch.take(name, [len(blocks), x.block, x.dim], x.rows.dtype, x.rows.device)
        return x.take(rows, blocks, buf).view(*shape, x.dim)

    def _key_mask(self, valid: Tensor) -> Tensor:
        """[M, 1, W*BK] bool from valid blocks [M, W]: padding blocks' keys masked."""
        return valid.repeat_interleave(self.plan.grid.block_k, -1)[:, None]

    # -- full blocks, a plan per row --------------------------------------------------------

    def full_per_row(self, selected: Tensor) -> None:
        """Full blocks of a plan per row: ``selected`` [N, nQB, nKB]; the (row, query block)s
        of a chunk (equal counts) are gathered as one batch."""
        num = selected.sum(-1)  # [N, nQB]
        if not bool(num.any()):
            return
        g = self.plan.grid
        order = selected_first(selected, int(num.max()))  # [N, nQB, W]
        flat_q = self.q.flatten(0, 1)  # [N*nQB, BQ, D]
        out, lse = self.out.flatten(0, 1), self.lse.flatten(0, 1)
        for width, members in _sorted_chunks(num, lambda w: self._step(1, w)):
            r, i = members.unbind(-1)
            blocks = order[r, i, :width]  # [M, W], all valid
            at = (r // self.group).repeat_interleave(width)  # each block's key row
            shape = (1, len(r), width * g.block_k)
            k = self._gather("k", self.k, at, blocks.reshape(-1), shape)
            v = self._gather("v", self.v, at, blocks.reshape(-1), shape)
            rows = r * g.nqb + i
            buf = self.scratch.take(
                "q", [len(r), self.bq, flat_q.shape[-1]], flat_q.dtype, self.dev
            )
            q = torch.index_select(flat_q, 0, rows, out=buf)[None]
            o, s = self._call(q, k, v, None, self._bias(blocks[None], None, r))
            out.index_copy_(0, rows, o[0])
            lse.index_copy_(0, rows, s[0])

    # -- partial blocks ---------------------------------------------------------------------

    def partial(self, selected: Tensor) -> None:
        """Partial key blocks of each query block (every row at once, padded to the largest
        count), with the pair rule, merged into the full pass's results in place."""
        num = selected.sum(-1)  # [R, nQB]
        busy = num.amax(0)  # [nQB]
        if not bool(busy.any()):
            return
        order = selected_first(selected, int(busy.max()))  # [R, nQB, W]
        members = torch.nonzero(busy).flatten().tolist()
        for i0, i1 in _runs(members):
            width = int(busy[i0:i1].max())
            step = self._step(self.q.shape[0], width)
            for j0 in range(i0, i1, step):
                j1 = min(i1, j0 + step)
                self._partial_range(j0, j1, order[:, j0:j1, :width], num[:, j0:j1])

    def _partial_range(self, i0: int, i1: int, blocks: Tensor, count: Tensor) -> None:
        g, n = self.plan.grid, self.q.shape[0]
        width = blocks.shape[-1]
        nk = width * g.block_k
        valid = _valid(count, width)  # [R, M, W]
        mask = self._pair_mask(i0, i1, blocks, valid)[:, :, : self.bq]  # [R, M, BQ, nk]
        # one plan for every row: the blocks of each key row once, its query heads stacked
        # (grouped_chunk); a plan per row: the blocks of each query row from its key row
        shared, group = blocks.shape[0] == 1, self.group
        rows = n // group if shared else n
        at = group_rows(rows, 1 if shared else group, self.dev)
        at = at.repeat_interleave((i1 - i0) * width)
        idx = blocks.expand(rows, -1, -1).reshape(-1)  # block j of row at[j]
        shape = (rows, i1 - i0, nk)
        k = self._gather("pk", self.k, at, idx, shape)
        v = self._gather("pv", self.v, at, idx, shape)
        bias = self._bias(blocks, valid)
        o, s = self._call(self.q[:, i0:i1], k, v, mask, bias, group if shared else 1)
        merge_into(Partial(self.out[:, i0:i1], self.lse[:, i0:i1]), Partial(o, s))

    def _pair_mask(self, i0: int, i1: int, blocks: Tensor, valid: Tensor) -> Tensor:
        """The plan's pair rule on query blocks [i0, i1) x their ``blocks`` (kept with a
        static plan when small)."""
        qb = torch.arange(i0, i1, device=self.dev)
        make = lambda: self.plan.partial_mask(self.problem, qb, blocks, valid)
        g = self.plan.grid
        size = blocks.shape[0] * (i1 - i0) * g.block_q * blocks.shape[-1] * g.block_k
        if self.plan.row_invariant and size <= MASK_MEMO:
            return self.plan.memo(("cpu-mask", i0, i1, blocks.shape[-1]), make)
        return make()

    # -- key bias -----------------------------------------------------------------------------

    def _bias(
        self, blocks: Tensor, valid: Tensor | None, rows: Tensor | None = None
    ) -> Tensor | None:
        """Key bias [R', M, W*BK] of ``blocks`` [R', M, W] (``rows`` [M]: the row of each of
        M members of one batch); None when the plan has none."""
        bias = self.plan.key_bias
        if bias is None:
            return None
        g = self.plan.grid
        idx = block_indices(blocks, g.block_k, g.lk, valid).flatten(-2).clamp_min(0)
        if rows is not None:
            at = rows if bias.shape[0] > 1 else torch.zeros_like(rows)
            return bias[at[:, None], idx[0]].unsqueeze(0)
        count = max(bias.shape[0], idx.shape[0])
        return (
            bias.expand(count, -1)
            .gather(1, idx.expand(count, -1, -1).flatten(1))
            .view(count, *idx.shape[1:])
        )


def _blocks(x: Tensor, count: int, size: int) -> Tensor:
    """Queries x [N, L, D] as float32 [N, count, size, D] (zero-padded to count*size rows
    when needed; half inputs upcast: PyTorch kernels compute in float32)."""
    x = x.float()
    n, length, d = x.shape
    if count * size != length:
        padded = x.new_zeros(n, count * size, d)
        padded[:, :length] = x
        x = padded
    return x.view(n, count, size, d)


class _KeyBlocks:
    """Keys (or values) x [R, Lk, D] read by key block of ``block`` keys, where they lie: no
    copy into a padded [R, count, block, D] layout (at a length that is no multiple of the
    block, that copy of every key cost a decode step more than the blocks it reads).

    ``take(rows, blocks, out)`` gathers block ``blocks[i]`` of key row ``rows[i]`` into
    ``out[i]`` [block, D], one contiguous copy each (a block's keys are consecutive in
    memory, read through a view of every ``block`` consecutive keys). The last block, cut by
    Lk, is read as the row's last ``block`` keys and rotated into place: its slots past Lk
    then hold real keys of the row (finite, masked by the plan's rule as padding was)."""

    def __init__(self, x: Tensor, count: int, block: int):
        x = x.float()
        self.dim = x.shape[2]
        if x.shape[1] < block:  # one short block: padded (a copy of fewer than ``block`` keys)
            x = _blocks(x, count, block).flatten(1, 2)
        elif x.stride(2) != 1 or x.stride(1) != self.dim or x.stride(0) % self.dim:
            x = x.contiguous()
        self.rows, self.block, self.count = x, block, count
        self.tail = x.shape[1] % block  # keys of a last block cut by Lk (0: none)

    def take(self, rows: Tensor, blocks: Tensor, out: Tensor) -> Tensor:
        x, bk, d = self.rows, self.block, self.dim
        length, pitch = x.shape[1], row_pitch(x)
        starts = blocks.long() * bk
        if self.tail:
            starts = starts.clamp_max(length - bk)
        windows = x.as_strided(((x.shape[0] - 1) * pitch + length - bk + 1, bk, d), (d, d, 1))
        torch.index_select(windows, 0, rows.long() * pitch + starts, out=out)
        if self.tail:
            cut = torch.nonzero(blocks == self.count - 1).flatten()
            if len(cut):
                out[cut] = out[cut].roll(self.tail, 1)
        return out


def _valid(count: Tensor, width: int) -> Tensor:
    """[..., width] bool: the first ``count`` of ``width`` block slots."""
    return torch.arange(width, device=count.device) < count[..., None]


def _groups(num: Tensor):
    """(width, members) groups of the (row, query block)s with blocks to compute: one group
    per distinct count when there are few, else counts rounded up to powers of two (the
    padding keys masked). ``members``: query blocks [M] for ``num`` [nQB], (row, query
    block) pairs [M, 2] for ``num`` [N, nQB]."""
    exact = len(torch.unique(num[num > 0])) <= EXACT_GROUPS
    width_of = num if exact else torch.minimum(_pow2(num), num.max())
    for width in torch.unique(width_of[num > 0]).tolist():
        members = torch.nonzero((width_of == width) & (num > 0))
        yield int(width), members.flatten() if num.dim() == 1 else members


def _sorted_chunks(num: Tensor, step_of):
    """(width, members [M, 2]) chunks of the (row, query block)s of ``num`` [N, nQB] with
    blocks to compute, grouped by their count: every member of a chunk has ``width`` blocks
    (no padding keys, so the fused kernel runs without a mask), at most ``step_of(width)``
    members each."""
    members = torch.nonzero(num > 0)  # [P, 2]
    counts = num[members[:, 0], members[:, 1]]
    counts, order = torch.sort(counts, stable=True)
    members = members[order]
    widths, sizes = torch.unique_consecutive(counts, return_counts=True)
    start = 0
    for width, size in zip(widths.tolist(), sizes.tolist(), strict=True):
        step = max(1, step_of(width))
        for j0 in range(start, start + size, step):
            yield width, members[j0 : min(start + size, j0 + step)]
        start += size


def _pow2(x: Tensor) -> Tensor:
    return torch.where(x > 0, 2 ** torch.ceil(torch.log2(x.clamp_min(1).float())), 0).long()


def _runs(members: list[int]) -> list[tuple[int, int]]:
    """Ascending indices as ranges [i0, i1) of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for i in members:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
