"""``block``: its tile kernels and plan kernels (PyTorch walks, FlexAttention lowering,
Triton) against the dense oracle and the references, the union of its selections, and the
step through recipes: one kernel pass, static plans built once, products counted by the
plan."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import replace

import pytest
import torch
from contract import WatchWrites, assert_partial_equal
from on_device import (
    DEVICE,
    IDS,
    SHAPES,
    assert_same,
    lsh_coverage,
    nan_partial,
    needs_flex,
    padded_views,
    triton_module,
    with_descriptor_loads,
)
from on_device import make_problem as device_problem
from oracle import dense_mask, make_problem, masked_attention
from plan_cases import CASES, PROBLEMS, _topk, plan_of, problem_named, small_recipe

import attncompose as ac
from attncompose.primitives import dispatch
from attncompose.primitives.base import (
    Partial,
    Tiles,
    UnionCoverage,
    count_products,
    gather_rows,
    natural_tiles,
    row_pitch,
)
from attncompose.primitives.block import naive as block_naive
from attncompose.primitives.block import plan_flex
from attncompose.primitives.block.fused import _fused_chunk as fused_chunk
from attncompose.primitives.block.fused import plan_attention as fused_plan_attention
from attncompose.primitives.block.one_query import (
    kept_keys,
    kept_ranges,
    one_query_attention,
)
from attncompose.primitives.block.plan_torch import plan_attention as naive_plan_attention
from attncompose.primitives.lsh import Lsh
from attncompose.primitives.lsh.schema import LshStep
from attncompose.primitives.plan import NONE, BlockPlan
from attncompose.primitives.sink import SinkCoverage
from attncompose.primitives.topk import Topk
from attncompose.primitives.topk.schema import TopkStep
from attncompose.primitives.uniform_sample.naive import (
    draw_uniforms,
    sample_tiles,
)
from attncompose.primitives.window import WindowCoverage
from attncompose.runtime.compiler import Pipeline

block_triton = triton_module("block.triton")  # None where Triton cannot run
plan_triton = triton_module("block.plan_triton")


@pytest.fixture(params=sorted(PROBLEMS), ids=sorted(PROBLEMS))
def problem(request):
    return problem_named(request.param)


@pytest.mark.parametrize("causal", [False, True])
def test_chunks_reusing_scratch_buffers_match_dense_mask(block_attention, causal, monkeypatch):
    """Many chunks of unequal sizes through one call's reused buffers (gathers, pair mask,
    additive mask): every chunk sees its own data, none of the previous chunk's."""
    from attncompose.primitives.block import naive

    monkeypatch.setattr(naive, "SCORE_BUDGET", 2 * 7 * 28 * 2 + 1)  # 2 tiles a chunk, 15 tiles
    p = make_problem(2, 101, 101, causal=causal, seed=4)
    lsh = Lsh(LshStep(num_projections=3))(p).bind(16)
    topk = Topk(TopkStep(block_size=7, k=3, max_k=4))(p)
    tiles = topk.tiles(p)
    assert tiles.q_idx.shape[1] == 15 and tiles.k_idx.shape[-1] == 21
    got = block_attention(p, tiles, own=topk, exclude=(lsh,))
    assert_partial_equal(got, masked_attention(p, dense_mask(p, topk, exclude=(lsh,))))


@pytest.mark.parametrize("causal", [False, True])
def test_key_bias_is_a_log_weight_per_key(block_attention, causal):
    """``Tiles.key_bias`` adds a log-weight to each candidate key's scores; -inf drops it."""
    p = make_problem(2, 70, 90, causal=causal, seed=4)
    g = torch.Generator().manual_seed(5)
    n, bq, nk = 2, 16, 24
    q_idx = natural_tiles(n, p.lq, bq, p.q.device).contiguous()
    t = q_idx.shape[1]
    k_idx = torch.stack([torch.randperm(p.lk, generator=g)[:nk] for _ in range(n * t)])
    k_idx = k_idx.view(n, t, nk).masked_fill(torch.rand(n, t, nk, generator=g) < 0.1, -1)
    bias = torch.randn(n, t, nk, generator=g)
    bias = bias.masked_fill(torch.rand(n, t, nk, generator=g) < 0.2, float("-inf"))
    got = block_attention(p, Tiles(q_idx, k_idx, key_bias=bias, exact=True))
    mask = torch.zeros(n, p.lq, p.lk, dtype=torch.bool)
    dense = torch.zeros(n, p.lq, p.lk)
    for r in range(n):
        for i in range(t):
            qs, ks = q_idx[r, i][q_idx[r, i] >= 0], k_idx[r, i]
            keep = (ks >= 0) & bias[r, i].isfinite()
            mask[r, qs[:, None], ks[keep][None, :]] = True
            dense[r, qs[:, None], ks[keep][None, :]] = bias[r, i][keep]
    mask &= dense_mask(p)  # causal visibility
    assert_partial_equal(got, masked_attention(p, mask, dense))


@pytest.mark.parametrize("layout", ["contiguous", "key-range", "broadcast", "strided"])
def test_gather_rows_reads_a_key_range_where_it_lies(layout):
    """Tiles gather a few keys of each row: from a key range of a longer sequence (the causal
    splitter's rectangles, a decode step's visible prefix) they are read in place, not after
    a copy of the whole range; a layout whose positions are not consecutive rows is copied;
    every layout gathers the same values."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 100, 8, generator=g)
    x = {
        "contiguous": full,
        "key-range": full[:, 10:50],
        "broadcast": full[:1, 10:50].expand(3, -1, -1),
        "strided": full.view(300, 8)[:120].view(40, 3, 8).transpose(0, 1),  # [3, 40, 8]
    }[layout]
    idx = torch.randint(-1, x.shape[1], (3, 5, 4), generator=g)
    want = torch.stack([x[n, idx[n].clamp_min(0)] for n in range(3)])
    with WatchWrites() as copied:
        got = gather_rows(x, idx)
    assert torch.equal(got, want)
    whole_range = max(copied) >= x.shape[0] * x.shape[1] * x.shape[2]
    assert whole_range == (layout == "strided")
    assert row_pitch(x) == {"contiguous": 100, "key-range": 100, "broadcast": 0}.get(layout, 40)


@pytest.mark.parametrize("causal", [False, True])
def test_union_of_detectors_counts_no_key_twice(causal):
    """block(select=[sink, window, lsh, topk]) equals attention over the union of their pairs."""
    from attncompose.primitives.block import Block
    from attncompose.primitives.block.schema import BlockStep
    from attncompose.primitives.sink import Sink
    from attncompose.primitives.sink.schema import SinkStep
    from attncompose.primitives.window import Window
    from attncompose.primitives.window.schema import WindowStep

    p = make_problem(2, 120, 120, causal=causal, seed=8)
    sels = [
        Sink(SinkStep(count=5))(p),
        Window(WindowStep(width=20))(p),
        Lsh(LshStep(num_projections=3))(p),
        Topk(TopkStep(block_size=8, k=3))(p),
    ]
    got = Block(BlockStep(select=["a"], block_size=16))(p, select=sels)
    union = torch.zeros(2, 120, 120, dtype=torch.bool)
    for sel in sels:
        union |= dense_mask(p, sel.bind(16))
    assert_partial_equal(got, masked_attention(p, union))


WALKS = {"reference": naive_plan_attention, "fused-cpu": fused_plan_attention}


@pytest.mark.parametrize("walk", sorted(WALKS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_walks_match_the_dense_oracle(problem, case, walk):
    plan = plan_of(case, problem)[0]
    want = masked_attention(problem, plan.to_dense(problem).expand(problem.q.shape[0], -1, -1))
    assert_walk_equal(WALKS[walk](problem, plan), want)


@pytest.mark.parametrize("walk", sorted(WALKS))
def test_walks_add_the_key_bias(walk):
    p = make_problem(2, 90, 90, causal=True, seed=5)
    plan, _, _ = plan_of("topp+sink+window", p)
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(2, 90, generator=g).masked_fill(
        torch.rand(2, 90, generator=g) < 0.2, -torch.inf
    )
    biased = plan.with_key_bias(bias)
    dense = plan.to_dense(p).expand(2, -1, -1)
    want = masked_attention(
        p, dense & bias.isfinite()[:, None, :], bias[:, None, :].expand(2, 90, 90)
    )
    assert_walk_equal(WALKS[walk](p, biased), want)


def test_many_groups_and_chunks_read_their_own_blocks(monkeypatch):
    """Small score budget: many chunks through the walk's reused buffers, views and gathers."""
    from attncompose.primitives.block import plan_torch

    monkeypatch.setattr(plan_torch, "SCORE_BUDGET", 3 * 16 * 48)
    p = make_problem(3, 150, 150, causal=True, seed=6)
    plan, _, _ = plan_of("topp+sink+window", p)
    want = masked_attention(p, plan.to_dense(p).expand(3, -1, -1))
    assert_walk_equal(fused_plan_attention(p, plan), want)


@pytest.mark.parametrize("case", ["topp+sink+window", "sink+window"])
def test_calls_read_at_most_the_key_budget(monkeypatch, case):
    """Every call of the walk reads at most KEY_BUDGET key elements (the fused kernel then
    finds them in cache), unless a single query block needs more; same result as one call."""
    from attncompose.primitives.block import plan_torch

    p = make_problem(3, 150, 150, causal=True, seed=6)
    plan, _, _ = plan_of(case, p)
    want = fused_plan_attention(p, plan)
    budget = 3 * 3 * plan.grid.block_k * p.k.shape[-1]  # 3 rows x 3 key blocks
    monkeypatch.setattr(plan_torch, "KEY_BUDGET", budget)
    seen = []

    def chunk(q, k, v, mask, bias, scale, scratch):
        seen.append((q.shape[1], k.numel()))
        return block_naive._softmax_chunk(q, k, v, mask, bias, scale, scratch)

    got = plan_torch.run_plan(p, plan, chunk)
    assert len(seen) > 3
    assert all(keys <= budget or blocks == 1 for blocks, keys in seen)
    assert_walk_equal(got, want)


@pytest.mark.parametrize("case", ["topp+sink+window", "sink+window", "power+sink"])
@pytest.mark.parametrize("problem", ["decode10x300", "decode1x129"])
def test_a_plan_of_fewer_queries_than_a_block_computes_only_them(case, problem):
    """A decode step's queries (fewer than a query block) are all its one query block holds:
    no call of the walk computes padding rows (at one query and blocks of 128 the fused
    kernel computed 128 rows for each real one); same result as the dense oracle."""
    from attncompose.primitives.block import plan_torch

    p = problem_named(problem)
    plan, _, _ = plan_of(case, p)
    assert plan.grid.block_q > p.lq
    rows = []

    def chunk(q, k, v, mask, bias, scale, scratch):
        rows.append(q.shape[-2])
        return block_naive._softmax_chunk(q, k, v, mask, bias, scale, scratch)

    got = plan_torch.run_plan(p, plan, chunk)
    assert rows and max(rows) == p.lq
    assert_walk_equal(got, masked_attention(p, plan.to_dense(p).expand(p.q.shape[0], -1, -1)))


@pytest.mark.parametrize("length", [96, 100, 7])
@pytest.mark.parametrize("layout", ["contiguous", "key-range", "strided"])
def test_key_blocks_are_read_where_they_lie(layout, length):
    """The walk reads key blocks from the keys as they lie (a key range of a longer sequence
    too): block b of row r is keys b*BK.. of row r, the last block cut by Lk holds its keys
    first and finite values after them (masked as padding was); only a layout whose
    positions are not consecutive rows, or keys shorter than a block, are copied."""
    from attncompose.primitives.block.plan_torch import _KeyBlocks

    g = torch.Generator().manual_seed(length)
    full = torch.randn(3, 2 * length, 8, generator=g)
    x = {
        "contiguous": full[:, :length],
        "key-range": full[:, 5 : 5 + length],
        "strided": full.transpose(0, 1)[:length].contiguous().transpose(0, 1),
    }[layout]
    bk = 16
    count = -(-length // bk)
    keys = _KeyBlocks(x, count, bk)
    rows = torch.arange(3).repeat_interleave(count)
    blocks = torch.arange(count).repeat(3).flip(0)  # every block, in another order
    got = keys.take(rows, blocks, torch.empty(len(rows), bk, 8))
    for i, (r, b) in enumerate(zip(rows.tolist(), blocks.tolist(), strict=True)):
        real = x[r, b * bk : (b + 1) * bk]
        assert torch.equal(got[i, : len(real)], real)
        assert got[i, len(real) :].isfinite().all()
    copied = keys.rows.data_ptr() != x.data_ptr()
    assert copied == (layout == "strided" or length < bk)


@pytest.mark.parametrize("lk", [1000, 1024])
@pytest.mark.parametrize("case", ["sink+window", "topp+sink+window"])
def test_a_decode_step_copies_no_more_than_its_blocks(case, lk):
    """A decode step reads the key blocks its plan takes, however long the keys: at a length
    that is no multiple of the key block the walk copied every key and value into a padded
    layout first (a decode step at 32769 keys took 2.5x its time at 32768); the dense
    oracle's result, with keys grouped (two query rows per key row) as well."""
    from attncompose.primitives.block import plan_torch

    p = make_problem(4, 1, lk, causal=True, seed=3)
    grouped = replace(p, k=p.k[::2].clone(), v=p.v[::2].clone(), kv_group=2)
    for problem in (p, grouped):
        plan, _, _ = plan_of(case, problem)
        with WatchWrites() as copied:
            got = plan_torch.run_plan(problem, plan, block_naive._softmax_chunk)
        blocks = int((plan.kernel_states() != NONE).sum(-1).max())  # a query row's most
        taken = p.q.shape[0] * blocks * plan.grid.block_k * p.k.shape[-1]
        assert taken < problem.k.numel()  # the copy of every key is more
        assert max(copied) <= taken, case
        dense = plan.to_dense(problem).expand(p.q.shape[0], -1, -1)
        assert_walk_equal(got, masked_attention(problem.expanded(), dense))


ONE_QUERY = {"reference": block_naive._softmax_chunk, "fused-cpu": fused_chunk}


@pytest.mark.parametrize("walk", sorted(ONE_QUERY))
@pytest.mark.parametrize("grouped", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize(
    "shape",
    [(129, True), (1000, True), (300, False), (300, 200)],
    ids=["129", "1000", "300-noncausal", "300-query-at-200"],
)
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_one_query_step_takes_the_plans_pairs(case, shape, grouped, walk):
    """A decode step (one query per row) runs on its kept keys, no plan built: the pairs
    of the plan the step would build (the dense oracle's result from them, each selection's
    rule on every key; per-row top-k tables), the same product count; causal (the query
    after every key, at lengths no multiple of the blocks, or before the last keys) and
    non-causal, keys grouped."""
    lk, causal = shape
    p = make_problem(4, 1, lk, causal=bool(causal), seed=lk)
    if causal is not True and causal:  # a causal query before the last keys: some unseen
        p = replace(p, q_offset=causal)
    if grouped:
        p = replace(p, k=p.k[::2].clone(), v=p.v[::2].clone(), kv_group=2)
    plan, select, exclude = plan_of(case, p)
    with count_products() as counted:
        got = one_query_attention(p, select, exclude, ONE_QUERY[walk])
    dense = plan.to_dense(p).expand(p.q.shape[0], -1, -1)
    assert_walk_equal(got, masked_attention(p.expanded(), dense))
    assert counted[0] == plan.products(p) == int(dense.sum())


@pytest.mark.parametrize("seed", range(6))
def test_a_decode_steps_key_bands_are_the_ranges_their_masks_keep(seed):
    """A decode step whose selections are all key bands takes its keys as index ranges
    worked out on positions (no mask over the keys): the same keys as the bands' rules on
    every key, for sinks longer than the keys, empty and overlapping windows, a query
    before the last keys, keys that start later (k_offset), causal or not."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda hi: int(torch.randint(hi, (1,), generator=g))
    for _ in range(40):
        lk = 1 + draw(90)
        p = make_problem(2, 1, lk, causal=bool(draw(2)), seed=seed)
        p = replace(p, q_offset=draw(lk + 20), k_offset=draw(8))
        bands = [SinkCoverage(draw(12)), WindowCoverage(draw(40)), WindowCoverage(draw(9))]
        select = [bands[i] for i in range(3) if draw(3)] or [bands[1]]
        ranges = kept_ranges(p, select)
        keep = torch.zeros(lk, dtype=torch.bool)
        for start, end in ranges:
            keep[start:end] = True
        assert torch.equal(keep, kept_keys(p, select)[0]), (select, p.q_offset, p.k_offset)
        starts = [start for start, _ in ranges]
        assert starts == sorted(starts) and all(
            end < after for (_, end), (after, _) in itertools.pairwise(ranges)
        ), ranges  # ascending, apart
    topk = _topk(make_problem(2, 1, 64, causal=True, seed=seed), block_size=16, k=2)
    assert kept_ranges(p, [bands[0], topk]) is None  # a table: its mask
    assert kept_ranges(p, [bands[1]], [bands[0]]) is None  # an exclusion: the mask


def test_a_decode_step_on_one_key_range_copies_no_key():
    """A window alone (or one that reaches the sinks) is one range of keys: read where they
    lie, nothing copied; sinks apart from the window: two ranges, copied into a buffer."""
    p = make_problem(4, 1, 500, causal=True, seed=2)
    grouped = replace(p, k=p.k[::2].clone(), v=p.v[::2].clone(), kv_group=2)
    for problem in (p, grouped):
        for select, copies in (
            ([WindowCoverage(64)], False),
            ([SinkCoverage(4), WindowCoverage(64)], True),
        ):
            with WatchWrites() as written:
                got = one_query_attention(problem, select, [], fused_chunk)
            kept = 64 + (4 if copies else 0)
            big = [w for w in written if w >= kept * problem.k.shape[-1]]
            assert bool(big) == copies, (select, written)
            plan = BlockPlan.build(problem, select, [], 16, 16)
            dense = plan.to_dense(problem).expand(p.q.shape[0], -1, -1)
            assert_walk_equal(got, masked_attention(problem.expanded(), dense))


def test_a_one_query_step_that_keeps_no_key_is_empty():
    """Nothing kept (a window excluding itself): output 0, lse -inf, no call made."""
    p = make_problem(3, 1, 200, causal=True, seed=1)
    calls = []
    chunk = lambda *args: calls.append(args) or block_naive._softmax_chunk(*args)
    got = one_query_attention(p, [WindowCoverage(8)], [WindowCoverage(8)], chunk)
    assert not calls and torch.equal(got.lse, torch.full((3, 1), -torch.inf))
    assert torch.equal(got.out, torch.zeros(3, 1, 16))


@pytest.mark.parametrize("name", ["streaming", "block-topk", "topp", "power"])
def test_a_decode_loop_builds_no_plan(name, monkeypatch):
    """Steps of a decode loop (one query after a key length that grows every step) run on
    their kept keys: a plan, reused per length, was built at every step (streaming at 4000
    keys: ~2 ms a step for ~0.2 of attention); a prefill still runs its plan."""
    built = []
    real = BlockPlan.build
    monkeypatch.setattr(
        BlockPlan, "build", lambda *a, **kw: built.append(a[0].lq) or real(*a, **kw)
    )
    attn = ac.compile(small_recipe(name), backend="torch")
    q, k, v = (torch.randn(1, 6, 300, 16) for _ in range(3))
    for n in range(250, 256):
        attn(q[:, :, n - 1 : n], k[:, :3, :n], v[:, :3, :n], is_causal=True, enable_gqa=True)
    assert built == []
    attn(q, k, v, is_causal=True)
    assert built and set(built) == {300}


@pytest.mark.parametrize(
    ("hkv", "lq", "shapes"),
    [(4, 1, [(4, 1, 3)]), (1, 1, [(1, 3, 1)]), (4, 200, None)],
    ids=["decode-stacked", "decode-one-kv-row", "prefill-stacked"],
)  # fmt: skip
def test_a_groups_heads_share_one_call_of_a_shared_plan(hkv, lq, shapes, monkeypatch):
    """A plan the same for every head (streaming) runs a group's query heads in one fused
    call: stacked as the rows of a tile where the key rows keep the threads busy (a decode
    step's kept keys read once per key/value head; a prefill's tiles of 3 x its query
    block), else, for one tile, as its tiles against the key row broadcast (before: one
    call per query head at prefill, or per group as heads). Same result as the keys
    repeated per head, to float rounding."""
    from attncompose.primitives.block import fused

    calls = []
    op = fused.fused_op()

    def watch(q, k, *args, **kwargs):
        calls.append((tuple(q.shape[:3]), k.stride(1) == 0))
        return op(q, k, *args, **kwargs)

    monkeypatch.setattr(fused, "fused_op", lambda: watch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # as on CI, whatever runs this
    g = torch.Generator().manual_seed(hkv)
    q = torch.randn(1, 3 * hkv, lq, 16, generator=g)
    k, v = (torch.randn(1, hkv, 600, 16, generator=g) for _ in range(2))
    attn = ac.compile(small_recipe("streaming"), backend="torch")
    grouped = attn(q, k, v, is_causal=True)
    if shapes is None:  # every call: query rows 3 x a query block, one call for all heads
        assert calls and all(rows % 3 == 0 and rows > 16 for (_, _, rows), _ in calls)
        assert all(heads == hkv for (heads, _, _), _ in calls)
    else:
        assert calls == [(shape, shape[1] > 1) for shape in shapes]
    calls.clear()
    repeated = attn(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    assert ac.relative_error(grouped, repeated) < 1e-6


def test_full_blocks_stepping_back_are_gathered(reference):
    """Full key blocks whose start steps evenly DOWN from one query block to the next (a
    top-k over every block less a window's: 2, 1, 0 past the diagonal) are gathered: they
    were read as a view of negative stride, a raw as_strided error (found by fuzzing user
    recipes). The union is every pair: exact attention."""
    steps = {"w": {"op": "window", "width": 16},
             "local": {"op": "block", "select": ["w"], "block_size": 32},
             "t": {"op": "topk", "block_size": 32, "k": 1000, "max_k": 1000},
             "rest": {"op": "block", "select": ["t"], "block_size": 32, "exclude": ["local"]},
             "out": {"op": "merge", "inputs": ["local", "rest"]}}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 100, 16, generator=g) for _ in range(3))
    attn = ac.compile({"name": "topk-less-window", "steps": steps}, backend="torch")
    want, _ = reference(q, k, v, False)
    assert ac.relative_error(attn(q, k, v), want) < 1e-5


NESTED = {  # A: the sinks less the window (C, not merged)
    "s": {"op": "sink", "count": 8},
    "w": {"op": "window", "width": 16},
    "C": {"op": "block", "select": ["w"], "block_size": 16},
    "A": {"op": "block", "select": ["s"], "exclude": ["C"], "block_size": 16},
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rest", ["sampled", "planned"])
def test_excluding_a_block_that_excludes_skips_only_what_it_attended(rest, causal):
    """A step that excludes block A, which itself excludes C, skips A's pairs (its
    selections less C's), not all of A's selections: the pairs A left to C (sinks inside
    the window) were computed by no step (found by fuzzing user recipes: a sampler taking
    every key gave a relative error of 0.16, and rows with no key, causal). ``sampled``:
    the residual sampler with m >= Lk, so the merge is exact attention; ``planned``: a block
    plan over a wider window less A. The Triton kernels refuse the difference, naming it."""
    steps = dict(NESTED)
    if rest == "sampled":
        steps["R"] = {"op": "uniform_sample", "exclude": ["A"], "sample_size": 100000}
    else:
        steps["W"] = {"op": "window", "width": 40}
        steps["R"] = {"op": "block", "select": ["W"], "exclude": ["A"], "block_size": 16}
    steps["out"] = {"op": "merge", "inputs": ["A", "R"]}
    recipe = {"name": "nested-exclude", "steps": steps}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    i, j = torch.arange(64)[:, None], torch.arange(64)[None, :]
    allowed = torch.ones(64, 64, dtype=torch.bool)
    if rest == "planned":  # sinks outside the window, and the wider window
        window = lambda width: (j <= i) & (j > i - width)
        allowed = ((j < 8) & ~window(16)) | window(40)
    if causal:
        allowed = allowed & (j <= i)
    scores = (q.double() @ k.double().transpose(-1, -2) / 4).masked_fill(~allowed, -torch.inf)
    want = torch.softmax(scores, -1) @ v.double()
    got = ac.compile(recipe, backend="torch")(q, k, v, is_causal=causal)
    assert ac.relative_error(got.double(), want) < 1e-5
    if block_triton is not None:
        with pytest.raises(ac.AttncomposeError, match="DifferenceCoverage has no kernel form"):
            ac.compile(recipe, backend="triton")(q, k, v, is_causal=causal)


def test_full_blocks_of_a_plan_per_row_run_without_a_mask(monkeypatch):
    """Top-p counts differ from query block to query block; full blocks are still computed
    with no mask (chunks of equal counts: no padding keys), masks only in partial blocks."""
    from attncompose.primitives.block import plan_torch

    masks = []

    def chunk(q, k, v, mask, bias, scale, scratch):
        masks.append(mask)
        return block_naive._softmax_chunk(q, k, v, mask, bias, scale, scratch)

    p = make_problem(3, 150, 150, causal=True, seed=6)
    plan, _, _ = plan_of("topp+sink+window", p)
    full = plan.kernel_states() == plan_torch.FULL
    assert len(torch.unique(full.sum(-1))) > 2  # counts that differ
    g = plan.grid
    pairs = full.repeat_interleave(g.block_q, 1).repeat_interleave(g.block_k, 2)
    want = masked_attention(p, pairs[:, : p.lq, : p.lk])  # the full blocks' pairs alone
    monkeypatch.setattr(plan_torch._Walk, "partial", lambda self, selected: None)
    got = plan_torch.run_plan(p, plan, chunk)
    assert masks and all(m is None for m in masks)
    assert_walk_equal(got, want)


def assert_walk_equal(got, want, tol: float = 1e-5) -> None:
    finite = want.lse.isfinite()
    assert torch.equal(got.lse.isinf(), ~finite)
    assert torch.allclose(got.lse[finite], want.lse[finite].float(), atol=tol)
    assert torch.allclose(got.out.float(), want.out.float(), atol=tol)


RECIPES = ["streaming", "block-topk", "topp", "power"]


@pytest.mark.parametrize("name", RECIPES)
def test_a_block_step_is_one_kernel_pass(name, monkeypatch):
    """Sinks + window + top-k (or power) run as ONE plan pass: no tile kernel, no merge."""
    calls = []
    real = dispatch.call
    monkeypatch.setattr(
        dispatch, "call", lambda op, *a, **kw: calls.append(op) or real(op, *a, **kw)
    )
    q, k, v = (torch.randn(1, 2, 150, 16) for _ in range(3))
    ac.compile(small_recipe(name), backend="torch")(q, k, v, is_causal=True)
    assert calls.count("plan") == 1 and "block" not in calls


def test_recipes_count_the_plans_products():
    """frac comes from the plan: sinks + a window of 40 on 150 causal tokens (2 heads)."""
    from attncompose.eval.products import products_fraction

    attn = ac.compile(small_recipe("streaming"), backend="torch")
    q, k, v = (torch.randn(1, 2, 150, 16) for _ in range(3))
    window = sum(min(i + 1, 40) for i in range(150))
    sinks = sum(min(4, i + 1 - 40) for i in range(150) if i + 1 > 40)  # not in the window
    assert products_fraction(attn, q, k, v, True) == (window + sinks) / (150 * 151 / 2)


def test_a_step_only_excluded_is_not_attended_nor_counted():
    """A block step that only exclude ports read gives its pairs, not its attention: its
    kernel does not run and frac counts only the pairs the output attends (it counted both,
    0.52 for 0.09 here; found by fuzzing user recipes), and the pipeline says so."""
    from attncompose.eval.products import products_fraction

    steps = {"w": {"op": "window", "width": 16},
             "guard": {"op": "block", "select": ["w"], "block_size": 16},
             "s": {"op": "sink", "count": 4},
             "out": {"op": "block", "select": ["s", "w"], "exclude": ["guard"],
                     "block_size": 16}}  # fmt: skip
    attn = ac.compile({"name": "exclude-only", "steps": steps}, backend="torch")
    assert attn.pipeline.kernels()["guard"].startswith("none: read only by exclude ports")
    q, k, v = (torch.randn(1, 1, 64, 16) for _ in range(3))
    sinks = sum(min(4, i + 1 - 16) for i in range(64) if i + 1 > 16)  # outside the window
    assert products_fraction(attn, q, k, v, True) == sinks / (64 * 65 / 2)


def test_static_plans_are_built_once_per_length(monkeypatch):
    built = []
    real = BlockPlan.build
    monkeypatch.setattr(
        BlockPlan, "build", lambda *a, **kw: built.append(a[0].lq) or real(*a, **kw)
    )
    attn = ac.compile(small_recipe("streaming"), backend="torch")
    for length in (100, 100, 130, 100):
        q, k, v = (torch.randn(1, 2, length, 16) for _ in range(3))
        attn(q, k, v, is_causal=True)
    assert built == [100, 130]


def test_show_names_the_block_plan():
    from click.testing import CliRunner

    from attncompose.cli import main

    done = CliRunner().invoke(main, ["show", "topp", "--backend", "torch"])
    assert done.exit_code == 0
    assert "block plan, one pass: torch:block-sparse-cpu" in done.output


FLEX_CASES = ["sink+window", "topp+sink+window", "topk-minus-window"]


@needs_flex
@pytest.mark.parametrize("case", FLEX_CASES)
@pytest.mark.parametrize("shape", ["T130-causal", "decode10x300", "rect200x77"])
def test_flex_lowering_matches_the_reference(case, shape):
    """FlexAttention's eager path (CPU) on the plan's BlockMask, mask_mod and score_mod."""
    n, lq, lk, causal = PROBLEMS[shape]
    p = make_problem(n, lq, lk, causal=causal, seed=7)
    plan, _, _ = plan_of(case, p)
    bias = torch.randn(1, lk).masked_fill(torch.rand(1, lk) < 0.1, -torch.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        for each in (plan, plan.with_key_bias(bias)):
            assert_walk_equal(plan_flex.plan_attention(p, each), naive_plan_attention(p, each))


@needs_flex
def test_flex_block_mask_lists_the_plans_blocks():
    p = make_problem(2, 130, 130, causal=True, seed=8)
    plan, _, _ = plan_of("topp+sink+window", p)
    mask = plan_flex.block_mask(p, plan)
    lists = plan.kernel_lists()
    assert torch.equal(mask.full_kv_num_blocks[0], lists.full_num)
    assert torch.equal(mask.kv_num_blocks[0], lists.part_num)
    assert mask.BLOCK_SIZE == (plan.grid.block_q, plan.grid.block_k) == (32, 32)


@needs_flex
def test_flex_compiles_once_for_every_length(monkeypatch):
    """Compiled (dynamo with its eager backend, to stay fast on CPU): new lengths reuse the
    compiled graph instead of recompiling, so the recompile limit is never reached."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    plan_flex._compiled.cache_clear()
    monkeypatch.setattr(plan_flex, "COMPILE_BACKEND", "eager")
    attn = ac.compile(small_recipe("streaming"), backend="flex")
    graphs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for length in (96, 130, 200, 257, 300, 411):
            q, k, v = (torch.randn(1, 2, length, 16) for _ in range(3))
            want = ac.compile(small_recipe("streaming"), backend="torch")(q, k, v, is_causal=True)
            assert ac.relative_error(attn(q, k, v, is_causal=True), want) < 1e-5
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[1] <= 2  # one dynamic graph after the first specialisation


@needs_flex
def test_flex_says_so_instead_of_falling_back_to_eager(monkeypatch):
    """Past dynamo's recompile limit FlexAttention would silently run its unfused eager path:
    here it is an error naming the cause."""
    torch._dynamo.reset()
    plan_flex._compiled.cache_clear()
    monkeypatch.setattr(plan_flex, "COMPILE_BACKEND", "eager")
    q, k, v = (torch.randn(1, 2, 96, 16) for _ in range(3))
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=1):
        warnings.simplefilter("ignore")
        ac.compile(small_recipe("streaming"), backend="flex")(q, k, v, is_causal=True)
        with pytest.raises(plan_flex.FlexFallbackError, match="recompile limit"):
            for name in ("topp", "power", "block-topk"):  # other rules: other graphs
                ac.compile(small_recipe(name), backend="flex")(q, k, v, is_causal=True)
    torch._dynamo.reset()


@needs_flex
@pytest.mark.parametrize(("n", "causal"), [(128, False), (512, True)])
def test_flex_runs_sorted_tiles_as_one_contiguous_plan(n, causal, packing_on_cpu):
    """backend="flex": sortLSH buckets with their sampled residual through FlexAttention's
    eager path equal the torch steps one by one; causal, the splitter's two levels packed
    into one body call."""
    recipe = ac.load_recipe("hyperattention").with_knobs(
        {"diag.block_size": 64, "residual.sample_size": 64, "out.min_seq_len": 128}
    )
    q, k, v = (
        torch.randn(1, 2, n, 16, generator=torch.Generator().manual_seed(9)) for _ in range(3)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ac.compile(recipe, backend="flex")(q, k, v, is_causal=causal, return_lse=True)
    want = ac.compile(recipe, backend="torch", fuse=False)(
        q, k, v, is_causal=causal, return_lse=True
    )
    assert "flex:contiguous-tiles" in Pipeline(recipe, backend="flex").kernels()["merged"]
    assert ac.relative_error(got[0], want[0]) < 1e-5
    assert torch.allclose(got[1], want[1], atol=1e-5)


@needs_flex
def test_contiguous_tiles_of_every_query_write_every_row(monkeypatch):
    """Tiles that hold every query leave the scattered result uninitialised: with fresh
    memory poisoned by NaN (odd length: padded slots; code pairing, whose tiles are exact at
    any length, with sinks), the flex pass still equals the torch steps, so every row is
    written."""
    real = torch.Tensor.new_empty

    def poisoned(self, *size, **kwargs):
        out = real(self, *size, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    recipe = ac.load_recipe("hyperattention-aligned").with_knobs(
        {"diag.block_size": 64, "residual.sample_size": 64}
    )
    q, k, v = (
        torch.randn(1, 2, 200, 16, generator=torch.Generator().manual_seed(4)) for _ in range(3)
    )
    want = ac.compile(recipe, backend="torch", fuse=False)(q, k, v, return_lse=True)
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ac.compile(recipe, backend="flex")(q, k, v, return_lse=True)
    assert ac.relative_error(got[0], want[0]) < 1e-5
    assert torch.allclose(got[1], want[1], atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("flex", marks=needs_flex)])
def test_a_cached_static_plan_serves_calls_of_more_rows(backend):
    """A static plan (power's table) built for one batch size serves a later call with more
    rows: its table is one for every row, never the first call's rows."""
    recipe = small_recipe("power")
    attn = ac.compile(recipe, backend=backend)
    g = torch.Generator().manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in (1, 3):
            q, k, v = (torch.randn(batch, 2, 160, 16, generator=g) for _ in range(3))
            fresh = ac.compile(recipe, backend="torch", reuse_buffers=False)
            want = masked_reference(fresh, q, k, v)
            assert ac.relative_error(attn(q, k, v, is_causal=True), want) < 1e-5


def masked_reference(attn, q, k, v):
    from attncompose.primitives import plan

    plan._STATIC.clear()  # a plan built for this call alone
    return attn(q, k, v, is_causal=True)


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("lq", "lk"), SHAPES, ids=IDS)
def test_block_lsh_tiles_match_reference(lq, lk, causal):
    problem = device_problem(2, lq, lk, 16, causal=causal)
    cov = lsh_coverage(problem, 16)
    tiles = cov.tiles(problem)
    assert_same(
        block_triton.block_attention(problem, tiles, own=cov),
        block_naive.block_attention(problem, tiles, own=cov),
    )


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_block_topk_table_excluding_lsh_matches_reference(causal):
    problem = device_problem(2, 33, 64, 16, causal=causal)
    top = Topk(TopkStep(op="topk", block_size=16, k=2))(problem)
    lsh = lsh_coverage(problem, 16)
    tiles = top.tiles(problem)
    assert_same(
        block_triton.block_attention(problem, tiles, own=top, exclude=(lsh,)),
        block_naive.block_attention(problem, tiles, own=top, exclude=(lsh,)),
    )


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("lq", "lk"), [(33, 33), (17, 64)], ids=["T33", "decode17x64"])
def test_sample_tiles_with_shift_and_union_exclude_match_reference(lq, lk, causal):
    problem = device_problem(2, lq, lk, 16, causal=causal)
    top = Topk(TopkStep(op="topk", block_size=16, k=1))(problem)
    union = UnionCoverage([lsh_coverage(problem, 16), top])
    tiles = sample_tiles(problem, draw_uniforms(problem, 16, seed=3))
    assert_same(
        block_triton.block_attention(problem, tiles, exclude=(union,)),
        block_naive.block_attention(problem, tiles, exclude=(union,)),
    )


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_key_bias_matches_reference(causal):
    """The fused block + residual tile: detector keys, then sampled keys with log-weights and
    -inf for the ones to drop (:class:`BlockWithResidual`'s joint tiles)."""
    problem = device_problem(2, 33, 40, 16, causal=causal)
    g = torch.Generator().manual_seed(1)
    q_idx = natural_tiles(2, 33, 16, problem.q.device).contiguous()
    k_idx = torch.stack([torch.randperm(40, generator=g)[:20] for _ in range(2 * 3)]).view(2, 3, 20)
    k_idx = k_idx.masked_fill(torch.rand(2, 3, 20, generator=g) < 0.1, -1)
    bias = torch.randn(2, 3, 20, generator=g)
    bias = bias.masked_fill(torch.rand(2, 3, 20, generator=g) < 0.2, float("-inf"))
    tiles = Tiles(q_idx, k_idx.to(DEVICE), key_bias=bias.to(DEVICE), exact=True)
    assert_same(
        block_triton.block_attention(problem, tiles),
        block_naive.block_attention(problem, tiles),
    )


@pytest.mark.triton
def test_block_nan_poisoned_buffers_and_inputs_equal_clean_run():
    problem = device_problem(2, 33, 33, 16, causal=True)
    cov = lsh_coverage(problem, 16)
    tiles = cov.tiles(problem)  # every query sits in one tile: the kernel writes every row
    clean = block_triton.block_attention(problem, tiles, own=cov)
    poisoned = block_triton.block_attention(
        padded_views(problem), tiles, own=cov, out=nan_partial(problem)
    )
    assert torch.equal(poisoned.out, clean.out) and torch.equal(poisoned.lse, clean.lse)


@pytest.mark.triton
def test_block_fp16_within_twice_torch_fp16_error():
    problem = device_problem(2, 64, 64, 16)
    cov = lsh_coverage(problem, 16)
    tiles = cov.tiles(problem)
    truth = block_naive.block_attention(problem, tiles, own=cov).out
    half = replace(problem, q=problem.q.half(), k=problem.k.half(), v=problem.v.half())
    torch_err = (block_naive.block_attention(half, tiles, own=cov).out.float() - truth).abs().max()
    kernel_err = (block_triton.block_attention(half, tiles, own=cov).out - truth).abs().max()
    assert kernel_err <= 2 * torch_err + 1e-5


def plan_cases(problem):
    """(name, plan) of block plans of every kind of selection on ``problem``."""
    from attncompose.primitives.plan import BlockPlan
    from attncompose.primitives.power import Power
    from attncompose.primitives.power.schema import PowerStep

    sink, window = SinkCoverage(3), WindowCoverage(17)
    topp = Topk(TopkStep(block_size=16, p=0.8, max_k=3))(problem)
    power = Power(PowerStep(block_size=32, max_distance=2))(problem)
    return [
        ("sink+window", BlockPlan.build(problem, [sink, window], [], 16, 16)),
        ("topp+sink+window", BlockPlan.build(problem, [sink, window, topp], [], 16, 16)),
        ("topp-minus-window", BlockPlan.build(problem, [topp], [window], 16, 16)),
        ("power+sink", BlockPlan.build(problem, [power, sink], [], 32, 32)),
    ]


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("lq", "lk"), [(33, 33), (64, 64), (17, 64)], ids=IDS[1:])
def test_plan_kernel_matches_reference(lq, lk, causal):
    from attncompose.primitives.block import plan_torch, plan_triton

    problem = device_problem(2, lq, lk, 16, causal=causal, seed=lq)
    g = torch.Generator().manual_seed(lk)
    bias = torch.randn(1, lk, generator=g).masked_fill(
        torch.rand(1, lk, generator=g) < 0.2, -torch.inf
    )
    for name, plan in plan_cases(problem):
        for each in (plan, plan.with_key_bias(bias.to(DEVICE))):
            want = plan_torch.plan_attention(problem, each)
            got = plan_triton.plan_attention(problem, each)
            assert got.out.dtype == problem.q.dtype, name
            assert_same(got, want)


@pytest.mark.triton
def test_plan_kernel_nan_poisoned_inputs_equal_clean_run():
    from attncompose.primitives.block import plan_triton

    problem = device_problem(2, 40, 40, 16, causal=True)
    for name, plan in plan_cases(problem):
        clean = plan_triton.plan_attention(problem, plan)
        poisoned = plan_triton.plan_attention(padded_views(problem), plan)
        assert torch.equal(poisoned.out, clean.out) and torch.equal(poisoned.lse, clean.lse), name


@pytest.mark.triton
@pytest.mark.parametrize("tma", ["auto", "on"])
@pytest.mark.parametrize("keys", [False, True], ids=["query-rows", "query-and-key-rows"])
@pytest.mark.parametrize("every", [True, False], ids=["every-query", "some-queries"])
def test_plan_kernel_walks_rows_in_permuted_order(every, keys, tma, monkeypatch):
    """A plan whose rows are the problem's queries in permuted order (a detector's tiles:
    ``BlockPlan.query_rows``) and, with ``keys``, whose keys are the problem's keys in
    permuted order, some twice, some absent (-1: no key; ``BlockPlan.key_rows``): the kernel
    reads each row's query and each key and value where they are and writes each result at
    its query, equal to the reference on copies in plan order scattered back; a query in no
    row (-1 rows, not ``every_query``) gets out 0 and lse -inf. On NaN-padded views; with
    ``tma`` "on" keys in place read through tensor descriptors, rows through pointers."""
    monkeypatch.setenv("ATTNCOMPOSE_TMA", tma)
    from attncompose.primitives.block import plan_torch, plan_triton
    from attncompose.primitives.block.contiguous import _diagonal
    from attncompose.primitives.plan import BlockGrid

    problem = device_problem(2, 96, 80, 16)
    g = torch.Generator().manual_seed(5)
    rows = torch.stack([torch.randperm(96, generator=g) for _ in range(2)]).to(DEVICE)
    if not every:
        rows = rows.masked_fill(rows % 5 == 0, -1)  # those queries sit in no row
    key_rows = None
    lk = 80
    if keys:  # 96 plan keys: each problem key once or twice, some slots none (the last block's)
        key_rows = torch.randint(0, 80, (2, 96), generator=g)
        key_rows[:, 64:] = key_rows[:, 64:].masked_fill(key_rows[:, 64:] % 3 == 0, -1)
        key_rows = key_rows.to(DEVICE)
        lk = 96
    bias = torch.randn(2, lk, generator=g).to(DEVICE)
    plan = _diagonal(BlockGrid(96, lk, 32, 32), 1).with_key_bias(bias)  # tile t: key block t
    mapped = plan.with_rows(rows, every, key_rows)
    got = plan_triton.plan_attention(padded_views(problem), mapped)
    take = lambda x, idx: x.gather(1, idx.clamp_min(0)[..., None].expand(-1, -1, x.shape[-1]))
    copy = replace(problem, q=take(problem.q, rows))
    if keys:  # a key of row -1 takes no part: its weight is -inf in the copy
        copy = replace(copy, k=take(problem.k, key_rows), v=take(problem.v, key_rows))
        plan = plan.with_key_bias(bias.masked_fill(key_rows < 0, float("-inf")))
    ordered = plan_torch.plan_attention(copy, plan)
    want = Partial(torch.zeros_like(got.out), torch.full_like(got.lse, float("-inf")))
    for n in range(2):
        mine = rows[n] >= 0
        want.out[n, rows[n][mine]] = ordered.out[n, mine].to(want.out.dtype)
        want.lse[n, rows[n][mine]] = ordered.lse[n, mine]
    assert_same(got, want)
    with pytest.raises(ValueError, match="permuted order"):
        plan_torch.plan_attention(problem, mapped)


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_plan_kernel_descriptor_loads_equal_pointer_loads(causal, monkeypatch):
    """The plan kernel's rows through tensor descriptors (full blocks, partial blocks past
    the last key, queries past the last row; ATTNCOMPOSE_TMA=on: the interpreter runs them)
    give the reference's result on NaN-padded views, bit for bit what pointer loads give
    under the interpreter; 64-blocks, so a Hopper GPU has descriptor configs to choose."""
    from attncompose.primitives.block import plan_torch, plan_triton

    problem = padded_views(device_problem(2, 150, 160, 16, causal=causal, seed=3))
    topp = Topk(TopkStep(block_size=64, p=0.8, max_k=1))(problem)
    bias = torch.randn(1, 160, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    plans = {
        "sink+window+topp": BlockPlan.build(
            problem, [SinkCoverage(5), WindowCoverage(40), topp], [], 64, 64
        ),
        "window-minus-sinks, bias": BlockPlan.build(
            problem, [WindowCoverage(70)], [SinkCoverage(9)], 64, 64
        ).with_key_bias(bias),
    }
    for name, plan in plans.items():
        pointers = plan_triton.plan_attention(problem, plan)
        run = lambda: plan_triton.plan_attention(problem, plan)  # noqa: B023
        got, used = with_descriptor_loads(run, plan_triton._plan_tuned, monkeypatch)
        monkeypatch.delenv("ATTNCOMPOSE_TMA")
        assert used and all(used), (name, used)
        assert_same(got, plan_torch.plan_attention(problem, plan))
        if dispatch.interpreting():
            assert torch.equal(got.out, pointers.out) and torch.equal(got.lse, pointers.lse)


@pytest.mark.triton
def test_plan_kernel_fp16_within_twice_torch_fp16_error():
    from attncompose.primitives.block import plan_torch, plan_triton

    problem = device_problem(2, 64, 64, 16, causal=True)
    half = replace(problem, q=problem.q.half(), k=problem.k.half(), v=problem.v.half())
    for name, plan in plan_cases(problem):
        truth = plan_torch.plan_attention(problem, plan).out
        torch_err = (plan_torch.plan_attention(half, plan).out - truth).abs().max()
        got = plan_triton.plan_attention(half, plan).out
        assert got.dtype == torch.float16, name
        assert (got.float() - truth).abs().max() <= 2 * torch_err + 1e-3, name


@pytest.mark.triton
def test_plan_autotuned_launch_matches_reference(monkeypatch):
    """The GPU launch path of the plan kernel under the interpreter: 16x16 plan blocks leave
    one config after pruning, so the autotuner takes it without benchmarking."""
    from attncompose.primitives.block import plan_torch, plan_triton
    from attncompose.primitives.plan import BlockPlan

    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    plan_triton._plan_tuned.cache.clear()
    problem = device_problem(2, 40, 40, 16, causal=True)
    plan = BlockPlan.build(problem, [SinkCoverage(3), WindowCoverage(9)], [], 16, 16)
    assert_same(plan_triton.plan_attention(problem, plan), plan_torch.plan_attention(problem, plan))
    (config,) = plan_triton._plan_tuned.cache.values()
    assert (config.kwargs["BQ"], config.kwargs["BK"]) == (16, 16)


@pytest.mark.triton
def test_tiles_that_say_every_query_hold_each_query_once():
    """``Tiles.every_query`` lets the contiguous pass leave its result uninitialised: each
    producer that sets it puts every query in exactly one tile (odd lengths, both pairings,
    lq != lk, tables, bands, the sampler's natural tiles)."""
    from attncompose.primitives.coverages import BlockTable

    for lq, lk in ((63, 63), (100, 37), (37, 100)):
        p = make_problem(2, lq, lk, causal=False, seed=lq)
        code = Lsh(LshStep(op="lsh", num_projections=3, seed=1, pairing="code"))(p).bind(16)
        table = BlockTable(torch.rand(2, -(-lq // 16), -(-lk // 16)) > 0.5, 16, most=3)
        made = [
            lsh_coverage(p, 16).tiles(p),
            code.tiles(p),
            table.tiles(p),
            SinkCoverage(4).bind(16).tiles(p),
            WindowCoverage(8).bind(16).tiles(p),
            sample_tiles(p, draw_uniforms(p, 8, seed=0)),
        ]
        for tiles in made:
            assert tiles.every_query
            q = tiles.q_idx.expand(2, -1, -1).reshape(2, -1)
            for row in q:
                assert torch.equal(row[row >= 0].sort().values, torch.arange(lq))


@pytest.mark.parametrize(
    ("width", "block"),
    [(512, 128), (516, 64), (260, 32), (256, 128), (100, 16), (5, 16), (1100, 128)],
)
def test_contiguous_key_blocks_are_large_unless_they_pad_much(width, block):
    """A tile's keys are cut into the largest block that pads at most an eighth of them
    (sortLSH 256 + sinks 4 + samples 256 = 516: 64-key blocks, not 16)."""
    from attncompose.primitives.block.contiguous import key_block

    assert key_block(width) == block


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["triton", pytest.param("flex", marks=needs_flex)])
def test_contiguous_tiles_never_wait_for_the_device(monkeypatch, backend):
    """Key bias, plan (Triton: query and key rows in permuted order), copies and the
    scatter back (FlexAttention: copies in tile order) use tensor operations only."""
    from attncompose.primitives.block import contiguous, kernels

    problem = device_problem(2, 64, 64, 16)
    tiles = lsh_coverage(problem, 16).tiles(problem)
    calls = []

    def fake_plan(sub, plan):
        calls.append(plan)
        n, lq = sub.q.shape[:2]
        return Partial(torch.zeros_like(sub.q), torch.zeros(n, lq, device=sub.q.device))

    if backend == "triton":
        monkeypatch.setattr(triton_module("block.plan_triton"), "plan_attention", fake_plan)
    else:
        monkeypatch.setattr(kernels.FlexBlockSparse, "function", staticmethod(fake_plan))

    def sync(*args, **kwargs):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    contiguous.run(problem, tiles, backend)
    assert len(calls) == 1
    assert (calls[0].query_rows is not None) == (backend == "triton")
    assert (calls[0].key_rows is not None) == (backend == "triton")
    assert calls[0].key_rows is None or calls[0].key_rows.shape == (2, tiles.k_idx[0].numel())


@pytest.mark.triton
def test_contiguous_tiles_copying_rows_equal_row_maps():
    """The copying form of a Triton tile pass (``contiguous.copying_rows``, the form
    ``bench_gpu.py --copies`` times) gives the row-map form's result."""
    from attncompose.primitives.block import contiguous

    problem = device_problem(2, 64, 64, 16)
    tiles = lsh_coverage(problem, 16).tiles(problem)
    mapped = contiguous.run(problem, tiles, "triton")
    with contiguous.copying_rows():
        copied = contiguous.run(problem, tiles, "triton")
    assert contiguous.ROW_MAPS
    assert_same(copied, mapped)


@pytest.mark.triton
@pytest.mark.parametrize("rows", [False, True], ids=["natural-plan", "plan-rows"])
def test_plan_kernel_reads_a_problem_through_its_row_maps(rows):
    """A problem whose queries and keys are rows of its tensors (``Problem.rows``: the causal
    splitter's packed levels, rows of the square): the kernel reads them where they are and
    gives what it gives on the problem gathered, with the plan's own query and key rows or
    without; its output has the problem's rows."""
    from attncompose.primitives.base import RowMaps
    from attncompose.primitives.block import plan_triton
    from attncompose.primitives.block.contiguous import _diagonal
    from attncompose.primitives.plan import BlockGrid

    source = device_problem(2, 120, 110, 16)
    g = torch.Generator().manual_seed(9)
    maps = RowMaps(torch.randint(0, 120, (96,), generator=g), torch.randperm(110, generator=g)[:96])
    problem = replace(source, rows=RowMaps(maps.q.to(DEVICE), maps.k.to(DEVICE)))
    assert (problem.lq, problem.lk) == (96, 96)
    plan = _diagonal(BlockGrid(96, 96, 32, 32), 1)
    if rows:
        q_rows = torch.stack([torch.randperm(96, generator=g) for _ in range(2)]).to(DEVICE)
        k_rows = torch.randint(-1, 96, (2, 96), generator=g).to(DEVICE)
        plan = plan.with_key_bias(torch.zeros(2, 96, device=DEVICE)).with_rows(q_rows, True, k_rows)
    got = plan_triton.plan_attention(problem, plan)
    want = plan_triton.plan_attention(problem.gathered(), plan)
    assert got.out.shape == (2, 96, 16) and torch.equal(got.out, want.out)
    assert torch.equal(got.lse, want.lse)
    assert torch.equal(problem.gathered().q, source.q[:, maps.q.to(DEVICE)])
