"""Exact tiles run as a block plan in tile order: the GPU form of a tile pass.

A tile pass whose tiles are exact (all queries of a tile take every candidate key: sortLSH
buckets, and the joint tiles of a detector with its sampled residual) and that tests no pair
rule (no own coverage, no exclusion) is a block-diagonal plan once its inputs are laid out in
tile order: the queries ([N, T*bq]: sortLSH's sorted order), each tile's candidate keys after
the previous tile's ([N, T*L]: the key block of its bucket, then its sampled keys). ONE launch
of the plan kernel walks it, with the key bias carrying the sampler's log(R/m), the tile's lse
shift, and -inf for padding and covered samples. The Triton kernel reads the layout through
row maps (``BlockPlan.query_rows``, ``BlockPlan.key_rows``): each tile's queries, keys and
values where they are, and writes the results in query order, so nothing is copied into tile
order and nothing scattered back (a copy would write and read every gathered row once more
than the kernel reads it). For FlexAttention, q, k and v are copied in tile order (one gather
each) and the results scattered back once; :func:`copying_rows` makes the Triton path do the
same (``benchmarks/bench_gpu.py --copies`` times both forms). No host synchronisation either
way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor

from attncompose.primitives import dispatch
from attncompose.primitives.base import (
    Coverage,
    Partial,
    Problem,
    Tiles,
    add_products,
    counting_products,
    gather_rows,
    row_index,
    row_pitch,
    static_arange,
)
from attncompose.primitives.plan import FULL, BlockGrid, BlockPlan, static_plan

ROW_MAPS = True  # whether an implementation that reads row maps is given them (else copies)
KEY_BLOCKS = (128, 64, 32, 16)  # key block sizes a tile's keys may be cut into
PAD_SHARE = 8  # a larger key block is worth up to 1/PAD_SHARE of the keys in padding


def key_block(width: int) -> int:
    """The key block size for ``width`` candidate keys a tile: the largest that pads at most
    1/:data:`PAD_SHARE` of them (the kernel runs larger blocks faster; padded keys cost
    products), else the one that pads least. E.g. 512 keys: 128; sortLSH's 256 + 4 sinks
    + 256 samples: 64 (60 padded; 16 would pad 12 but run 16-key blocks)."""
    for g in KEY_BLOCKS:
        if (-(-width // g) * g - width) * PAD_SHARE <= width:
            return g
    return min(KEY_BLOCKS, key=lambda g: (-(-width // g) * g, -g))


@contextmanager
def copying_rows() -> Iterator[None]:
    """Inside the block, tile passes copy q, k and v in tile order for every implementation
    (the form FlexAttention runs; the benchmarks time both forms)."""
    global ROW_MAPS
    saved, ROW_MAPS = ROW_MAPS, False
    try:
        yield
    finally:
        ROW_MAPS = saved


def run(problem: Problem, tiles: Tiles, backend: str) -> Partial:
    """(out [N, Lq, Dv], lse [N, Lq]) of the tile pass, through the ``plan`` op of
    ``backend`` ("triton" or "flex")."""
    n, t, bq = tiles.q_idx.shape
    width = tiles.k_idx.shape[-1]
    block = key_block(width)
    span = -(-width // block) * block  # keys per tile, padded to whole blocks
    q_idx = tiles.q_idx.expand(n, t, bq)
    k_idx = tiles.k_idx.expand(n, t, width)
    if span > width:
        k_idx = torch.nn.functional.pad(k_idx, (0, span - width), value=-1)
    flat = lambda idx: idx.reshape(n, -1)
    sub = Problem(
        q=problem.q,
        k=problem.k,
        v=problem.v,
        scale=problem.scale,
        causal=False,
        heads=problem.heads,
        kv_group=problem.kv_group,
        workspace=problem.workspace,
        rows=problem.rows,  # a packed problem's rows, where they are
    )
    grid = BlockGrid(t * bq, t * span, bq, block)
    plan = static_plan(("diagonal", grid, problem.q.device), lambda: _diagonal(grid, span // block))
    impl = dispatch.choose("plan", backend, sub, plan=plan)
    maps = impl.row_maps and ROW_MAPS  # the kernel reads the layout where it is
    bias = _key_bias(tiles, k_idx, absent=not maps)  # [N, T, span] float32, or None
    if counting_products():  # valid queries x kept keys, per tile
        kept = k_idx >= 0 if bias is None else (k_idx >= 0) & torch.isfinite(bias)
        add_products(((q_idx >= 0).sum(-1) * kept.sum(-1)).sum())
    if bias is not None:
        plan = plan.with_key_bias(flat(bias))
    if maps:  # query row n's plan keys: rows of key row n // kv_group
        plan = plan.with_rows(flat(q_idx), tiles.every_query, flat(k_idx))
        return impl.load()(sub.for_reader(impl), plan=plan)
    problem = problem.gathered()  # copied in tile order below: from the rows in order
    group = problem.kv_group  # query row n's tile keys come from key row n // group
    copy = lambda name, x, idx, rows=None, group=1: gather_rows(
        x, flat(idx), _buffer(problem, name, x, idx), rows, group
    )
    k_rows = row_index(flat(k_idx), row_pitch(problem.k), group)  # keys and values alike
    v_rows = k_rows if row_pitch(problem.v) == row_pitch(problem.k) else None
    sub = replace(
        sub,
        q=copy("q", problem.q, q_idx),  # [N, T*bq, D]: e.g. sortLSH's order
        k=copy("k", problem.k, k_idx, k_rows, group),  # [N, T*span, D]: a tile's keys in a row
        v=copy("v", problem.v, k_idx, v_rows, group),
        kv_group=1,
        rows=None,
    )
    return _scatter(problem, q_idx, impl.load()(sub, plan=plan), tiles.every_query)


def _buffer(problem: Problem, name: str, x: Tensor, idx: Tensor) -> Tensor | None:
    """The workspace buffer a copy of ``x``'s rows ``idx`` goes into (None: fresh memory)."""
    if problem.workspace is None:
        return None
    size = (idx.numel() * x.shape[-1],)
    return problem.workspace.take(f"contiguous.{name}", size, x.dtype, x.device)


def _key_bias(tiles: Tiles, k_idx: Tensor, absent: bool) -> Tensor | None:
    """[N, T, span]: the tiles' key bias plus their lse shift, with -inf on padding keys
    when ``absent`` (a kernel reading row maps skips keys of row -1 itself); None when that
    leaves nothing to add."""
    n, t, span = k_idx.shape
    bias = None
    if tiles.key_bias is not None:  # keys past the bias's columns take 0
        bias = tiles.key_bias.float()
        if bias.shape[-1] < span:
            bias = torch.nn.functional.pad(bias, (0, span - bias.shape[-1]))
        if absent:
            bias = bias.masked_fill(k_idx < 0, float("-inf"))
    elif absent:
        bias = torch.where(k_idx < 0, float("-inf"), 0.0)  # float32
    if tiles.lse_shift is not None:  # a tile's lse shift is a log-weight on all its keys
        shift = tiles.lse_shift.float().expand(n, t).unsqueeze(-1)
        bias = shift if bias is None else bias + shift
    return None if bias is None else bias.expand(n, t, span)


def _diagonal(grid: BlockGrid, blocks_per_tile: int) -> BlockPlan:
    """Query block t takes key blocks [t*w, (t+1)*w), all full (one plan for every row)."""
    qb = torch.arange(grid.nqb)[:, None]
    kb = torch.arange(grid.nkb)[None, :]
    mine = (kb >= qb * blocks_per_tile) & (kb < (qb + 1) * blocks_per_tile)
    return BlockPlan(grid, False, (mine.to(torch.uint8) * FULL)[None])


def _scatter(problem: Problem, q_idx: Tensor, part: Partial, every_query: bool) -> Partial:
    """Rows of ``part`` (tile order) back to query order; padded rows (-1) land in a spare
    row that is cut off, so nothing waits for the device. ``every_query``: every row is
    written, so the result starts uninitialised (no fill of out and lse)."""
    n, lq = problem.q.shape[:2]
    dv = problem.v.shape[-1]
    rows = q_idx.reshape(n, -1).remainder(lq + 1)  # -1 -> lq, the spare row
    flat = (rows + static_arange(n, rows.device, lq + 1)[:, None]).reshape(-1)
    if every_query:
        out = part.out.new_empty(n * (lq + 1), dv)
        lse = part.lse.new_empty(n * (lq + 1))
    else:
        out = part.out.new_zeros(n * (lq + 1), dv)
        lse = part.lse.new_full((n * (lq + 1),), float("-inf"))
    out.index_copy_(0, flat, part.out.reshape(-1, dv))
    lse.index_copy_(0, flat, part.lse.reshape(-1))
    return Partial(out.view(n, lq + 1, dv)[:, :lq], lse.view(n, lq + 1)[:, :lq])


def triton_block_attention(
    problem: Problem, tiles: Tiles, own: Coverage | None = None, exclude: tuple = ()
) -> Partial:
    """The tile pass as one Triton block-sparse launch over the tiles' row maps."""
    return run(problem, tiles, "triton")


def flex_block_attention(
    problem: Problem, tiles: Tiles, own: Coverage | None = None, exclude: tuple = ()
) -> Partial:
    """The tile pass as one FlexAttention call over copies in tile order."""
    return run(problem, tiles, "flex")
