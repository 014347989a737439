"""Primitive contract: reference semantics, degenerate knobs equal exact attention, GQA,
causal/decode, odd shapes, determinism. Every recipe case subclasses one contract."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from oracle import dense_mask, make_problem, masked_attention

import attncompose as ac
from attncompose.primitives import dispatch
from attncompose.primitives.base import Partial, Tiles, count_products, natural_tiles
from attncompose.primitives.block.fused import block_attention as fused_block_attention
from attncompose.primitives.block.naive import block_attention as naive_block_attention
from attncompose.primitives.exact.naive import exact_attention
from attncompose.primitives.lsh import Lsh
from attncompose.primitives.lsh.naive import gray_code, gray_rank
from attncompose.primitives.lsh.schema import LshStep
from attncompose.primitives.merge.naive import merge_into, merge_partials
from attncompose.primitives.topk import Topk
from attncompose.primitives.topk.schema import TopkStep
from attncompose.primitives.uniform_sample import UniformSample
from attncompose.primitives.uniform_sample.naive import MIN_GROUP, query_groups, sample_tiles
from attncompose.primitives.uniform_sample.schema import UniformSampleStep
from attncompose.runtime.compiler import Pipeline

TIGHT = 1e-5  # relative error of float32 against the float64 reference


def _recipe(steps, **extra):
    return ac.load_recipe({"name": "case", "steps": steps, **extra})


class ReducesToExact:
    """A recipe whose knobs make it exact: it must equal exact attention everywhere."""

    steps: dict

    def attn(self):
        return ac.compile(_recipe(self.steps))

    @pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
    @pytest.mark.parametrize(
        ("lq", "lk"),
        [(63, 63), (130, 130), (1, 97), (17, 130)],
        ids=["T63", "T130", "decode1", "decode17"],
    )
    def test_equals_exact(self, make_qkv, reference, causal, lq, lk):
        if not causal and lq != lk and lq == 1:
            pytest.skip("covered by the causal case")
        q, k, v = make_qkv(b=2, hq=4, hkv=2, lq=lq, lk=lk, d=16)
        out, lse = self.attn()(q, k, v, is_causal=causal, return_lse=True)
        ref, ref_lse = reference(q, k, v, is_causal=causal)
        assert ac.relative_error(out, ref) < TIGHT
        assert torch.allclose(lse.double(), ref_lse, atol=1e-4)

    def test_gqa_equals_repeated_kv(self, make_qkv):
        q, k, v = make_qkv(b=1, hq=6, hkv=2, lq=70, d=16)
        attn = self.attn()
        grouped = attn(q, k, v, is_causal=True)
        repeated = attn(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
        assert torch.equal(grouped, repeated)

    def test_decode_equals_last_rows_of_full_causal(self, make_qkv):
        q, k, v = make_qkv(b=1, hq=2, hkv=2, lq=90, d=16)
        attn = self.attn()
        full = attn(q, k, v, is_causal=True)
        last = attn(q[:, :, -5:], k, v, is_causal=True)
        assert ac.relative_error(last, full[:, :, -5:]) < TIGHT


class TestOneBlockCoversAllKeys(ReducesToExact):
    steps = {
        "hash": {"op": "lsh", "num_projections": 5},
        "diag": {"op": "block", "select": ["hash"], "block_size": 4096},
        "residual": {"op": "uniform_sample", "exclude": ["diag"], "sample_size": 16},
        "merged": {"op": "merge", "inputs": ["diag", "residual"]},
        "out": {"op": "causal_split", "body": "merged", "min_seq_len": 8},
    }


class TestSamplingEveryKey(ReducesToExact):
    steps = {
        "sampled": {"op": "uniform_sample", "sample_size": 4096},
        "out": {"op": "causal_split", "body": "sampled", "min_seq_len": 8},
    }


class TestSamplingEveryKeyMaskedCausal(ReducesToExact):
    steps = {"sampled": {"op": "uniform_sample", "sample_size": 4096}}


class TestCausalSplitAroundExact(ReducesToExact):
    steps = {
        "body": {"op": "exact"},
        "out": {"op": "causal_split", "body": "body", "min_seq_len": 5},
    }


class TestTopkEveryBlock(ReducesToExact):
    steps = {
        "heavy": {"op": "topk", "block_size": 8, "k": 1000},
        "blocks": {"op": "block", "select": ["heavy"]},
        "residual": {"op": "uniform_sample", "exclude": ["blocks"], "sample_size": 8},
        "out": {"op": "merge", "inputs": ["blocks", "residual"]},
    }


class TestTopkCoverageOne(ReducesToExact):
    steps = {
        "heavy": {"op": "topk", "block_size": 8, "p": 1.0, "max_k": 1000},
        "blocks": {"op": "block", "select": ["heavy"]},
    }


class TestLshThenSampleEverything(ReducesToExact):
    """Block-diagonal part plus a sampler that takes every other key: exact, no overlap."""

    steps = {
        "hash": {"op": "lsh", "num_projections": 4},
        "diag": {"op": "block", "select": ["hash"], "block_size": 16},
        "residual": {"op": "uniform_sample", "exclude": ["diag"], "sample_size": 4096},
        "merged": {"op": "merge", "inputs": ["diag", "residual"]},
        "out": {"op": "causal_split", "body": "merged", "min_seq_len": 32},
    }


# -- the kernels against the dense specification ---------------------------------------------


BLOCK_KERNELS = {"naive": naive_block_attention, "fused-cpu": fused_block_attention}


@pytest.fixture(params=sorted(BLOCK_KERNELS))
def block_attention(request):
    """Every torch implementation of the block kernel must match the dense specification."""
    return BLOCK_KERNELS[request.param]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("lq", "lk"), [(63, 63), (200, 200), (10, 300), (1, 129), (300, 77)])
@pytest.mark.parametrize("block", [8, 32, 1000])
@pytest.mark.parametrize(
    ("pairing", "align"), [("rank", "none"), ("code", "none"), ("code", "mips")]
)
def test_lsh_block_kernel_matches_dense_mask(
    block_attention, causal, lq, lk, block, pairing, align
):
    if causal and lq > lk:
        pytest.skip("causal needs Lq <= Lk")
    p = make_problem(3, lq, lk, causal=causal)
    cov = Lsh(LshStep(num_projections=3, pairing=pairing, align=align))(p).bind(block)
    got = block_attention(p, cov.tiles(p), own=cov)
    want = masked_attention(p, dense_mask(p, cov))
    _assert_partial_equal(got, want)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("k", "p_cov"), [(2, None), (1, None), (3, 0.5), (8, 0.9)])
def test_topk_kernel_excluding_lsh_matches_dense_mask(block_attention, causal, k, p_cov):
    p = make_problem(2, 101, 101, causal=causal, seed=3)
    lsh = Lsh(LshStep(num_projections=3))(p).bind(16)
    topk = Topk(TopkStep(block_size=7, k=k, p=p_cov, max_k=4))(p)
    got = block_attention(p, topk.tiles(p), own=topk, exclude=(lsh,))
    want = masked_attention(p, dense_mask(p, topk, exclude=(lsh,)))
    _assert_partial_equal(got, want)


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
    _assert_partial_equal(got, masked_attention(p, dense_mask(p, topk, exclude=(lsh,))))


def test_topk_picks_the_planted_block():
    p = make_problem(1, 64, 64, d=16, seed=1)
    target = p.k[0, 40:48].mean(0)
    p.q[0, :8] += 4 * target  # queries of block 0 lean on key block 5
    p.k[0, 40:48] += 3 * target
    table = Topk(TopkStep(block_size=8, k=1))(p).table
    assert table[0, 0].nonzero().flatten().tolist() == [5]


def test_topk_never_selects_future_blocks():
    p = make_problem(2, 80, 80, causal=True, seed=2)
    table = Topk(TopkStep(block_size=8, k=100))(p).table
    assert torch.equal(table, torch.ones(10, 10, dtype=torch.bool).tril().expand(2, -1, -1))


def _assert_partial_equal(got: Partial, want: Partial) -> None:
    finite = torch.isfinite(want.lse)
    assert torch.equal(torch.isfinite(got.lse), finite)
    assert torch.allclose(got.out.double()[finite], want.out[finite], atol=1e-5)
    assert torch.allclose(got.lse.double()[finite], want.lse[finite], atol=1e-5)


# -- merge, Gray order, sampler ---------------------------------------------------------------


def test_lse_merge_of_a_key_partition_equals_exact():
    p = make_problem(2, 50, 120, seed=4)
    parts = torch.randperm(120, generator=torch.Generator().manual_seed(0)).chunk(3)
    partials = []
    for keys in parts:
        mask = torch.zeros(2, 50, 120, dtype=torch.bool)
        mask[..., keys] = True
        partials.append(masked_attention(p, mask))
    merged = merge_partials(partials)
    exact = exact_attention(p)
    assert torch.allclose(merged.out, exact.out.double(), atol=1e-5)
    assert torch.allclose(merged.lse, exact.lse.double(), atol=1e-5)


def test_merge_keeps_empty_rows_empty():
    p = make_problem(1, 4, 4)
    empty = Partial.empty(p)
    merged = merge_partials([empty, empty])
    assert torch.isneginf(merged.lse).all() and (merged.out == 0).all()


def test_merge_into_a_strided_view_equals_merge_partials():
    """The splitter merges a level's rectangles into strided views of its result buffers."""
    p = make_problem(2, 64, 64, seed=5)
    full = exact_attention(p)
    target = Partial(full.out.clone(), full.lse.clone())
    target.lse[0, 16:24] = float("-inf")  # rows still empty: on one side, and on both
    target.out[0, 16:24] = 0.0
    part = exact_attention(make_problem(2, 32, 40, seed=6))
    part.lse[0, :4] = float("-inf")
    part.out[0, :4] = 0.0
    view = lambda x: x.view(2, 2, 32, *x.shape[2:])[:, :, 16:]  # rows 16-31 and 48-63
    below = Partial(view(target.out), view(target.lse))
    other = Partial(part.out.view(2, 2, 16, -1), part.lse.view(2, 2, 16))
    want = merge_partials([Partial(below.out.clone(), below.lse.clone()), other])
    before = target.out.clone()
    merge_into(below, other)
    assert torch.allclose(view(target.out), want.out, atol=1e-6)
    assert torch.equal(torch.isneginf(view(target.lse)), torch.isneginf(want.lse))
    assert torch.isneginf(target.lse[0, 16:20]).all() and (target.out[0, 16:20] == 0).all()
    finite = torch.isfinite(want.lse)
    assert torch.allclose(view(target.lse)[finite], want.lse[finite], atol=1e-6)
    above = lambda x: x.view(2, 2, 32, -1)[:, :, :16]  # rows outside the view: untouched
    assert torch.equal(above(target.out), above(before))


@pytest.mark.parametrize("bits", range(1, 13))
def test_neighbouring_buckets_differ_in_exactly_one_bit(bits):
    codes = torch.arange(1 << bits)
    ranks = gray_rank(codes, bits)
    assert torch.equal(torch.sort(ranks).values, codes)  # a bijection on r-bit codes
    ordered = codes[torch.argsort(ranks)]
    flips = ordered[1:] ^ ordered[:-1]
    assert ((flips & (flips - 1)) == 0).all() and (flips > 0).all()
    assert torch.equal(gray_code(ranks), codes)


def test_sort_puts_equal_codes_together_in_gray_order():
    p = make_problem(2, 300, 300, seed=5)
    sel = Lsh(LshStep(num_projections=6))(p)
    from attncompose.primitives.lsh.naive import hash_codes

    dirs = Lsh(LshStep(num_projections=6)).directions(p)
    ranks = gray_rank(hash_codes(p.k, dirs), 6)
    sorted_ranks = ranks.gather(1, sel.k_order)
    assert (sorted_ranks[:, 1:] >= sorted_ranks[:, :-1]).all()


@pytest.mark.parametrize(
    ("causal", "lq", "lk", "block"),
    [(False, 20, 300, 32), (True, 20, 300, 32), (False, 128, 128, 64)],
    ids=["natural-tiles", "natural-tiles-causal", "detector-tiles"],
)
def test_sampled_residual_is_unbiased(causal, lq, lk, block):
    """Averaged over many independent draws, the sampled mass and numerator converge to the
    exact mass and numerator of the keys the sampler may count (visible, not covered), with
    natural query tiles and with draws that follow the detector's tiles."""
    draws = 4000
    base = make_problem(1, lq, lk, d=8, causal=causal, seed=6)
    rows = lambda t: t.expand(draws, -1, -1).contiguous()  # each row draws its own samples
    p = replace(base, q=rows(base.q), k=rows(base.k), v=rows(base.v))
    lsh_step = LshStep(num_projections=3)  # one head: every row hashes identically
    diag = Partial.empty(p)
    diag.coverage = Lsh(lsh_step)(p).bind(block)
    grouped = query_groups(p, [diag.coverage]) is not None
    assert grouped == (lq >= MIN_GROUP and not causal)
    est = UniformSample(UniformSampleStep(sample_size=24, seed=1))(p, exclude=[diag])
    weight = torch.exp(est.lse.double())  # [draws, Lq]
    mass = weight.mean(0)
    numer = (weight.unsqueeze(-1) * est.out.double()).mean(0)
    truth = masked_attention(base, dense_mask(base, exclude=(Lsh(lsh_step)(base).bind(block),)))
    true_mass = torch.exp(truth.lse[0])
    true_numer = true_mass.unsqueeze(-1) * truth.out[0]
    assert torch.allclose(mass, true_mass, rtol=0.05)
    assert (numer - true_numer).norm() / true_numer.norm() < 0.05
    assert len({tuple(r.tolist()) for r in est.lse[:10]}) == 10  # draws do differ


def test_sampled_keys_stay_in_range_when_uniforms_round_up():
    """float32 1023 + 0.99999994 is 1024: the last stratum's draw must still be a key
    (found by a tuning run: index 4096 out of bounds for 4096 keys)."""
    p = make_problem(1, 256, 4096, causal=False)
    top = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    uniforms = torch.full((1, 2, 1024), float(top))
    tiles = sample_tiles(p, uniforms)
    assert int(tiles.k_idx.max()) == p.lk - 1 and int(tiles.k_idx.min()) >= 0
    naive_block_attention(p, tiles)  # gathers in range


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
    _assert_partial_equal(got, masked_attention(p, mask, dense))


# -- fused step patterns against the steps one by one -----------------------------------------


FUSION_CASES = {
    # (lq, lk, causal, block_size, sample_size, min_seq_len)
    "draws-follow-tiles": (512, 512, False, 64, 32, 64),
    "odd-length-steps-in-turn": (500, 500, False, 64, 32, 64),
    "causal-splitter": (1024, 1024, True, 64, 32, 256),
    "decode": (100, 1000, True, 64, 32, 256),
    "sample-everything": (256, 256, False, 64, 512, 64),
}


@pytest.mark.parametrize("case", [*sorted(FUSION_CASES), "topk-detector"])
def test_fused_block_residual_equals_the_steps_one_by_one(make_qkv, case, monkeypatch):
    if case == "topk-detector":  # top-k tiles: natural query blocks of 64, exact
        lq, lk, causal = 512, 512, False
        q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=lq, lk=lk, d=16)
        recipe = ac.load_recipe("hyperattention-topk").with_knobs(
            {"heavy.block_size": 64, "heavy.k": 2, "residual.sample_size": 32}
        )
    else:
        lq, lk, causal, block, m, min_len = FUSION_CASES[case]
        q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=lq, lk=lk, d=16)
        recipe = ac.load_recipe("hyperattention").with_knobs(
            {"diag.block_size": block, "residual.sample_size": m, "out.min_seq_len": min_len}
        )
    fused = ac.compile(recipe, backend="torch")
    steps = ac.compile(recipe, backend="torch", fuse=False)
    assert set(fused.pipeline.fusions) == {"merged"} and not steps.pipeline.fusions
    calls = []
    original = dispatch.call
    monkeypatch.setattr(
        dispatch, "call", lambda op, *a, **kw: calls.append(op) or original(op, *a, **kw)
    )
    with count_products() as n_fused:
        o1, l1 = fused(q, k, v, is_causal=causal, return_lse=True)
    fused_calls, calls[:] = len(calls), []
    with count_products() as n_steps:
        o2, l2 = steps(q, k, v, is_causal=causal, return_lse=True)
    assert ac.relative_error(o1, o2) < TIGHT
    assert torch.allclose(l1, l2, atol=1e-5)
    assert n_fused == n_steps  # the same pairs
    if case in ("draws-follow-tiles", "sample-everything", "causal-splitter", "topk-detector"):
        assert fused_calls < len(calls)  # one tile pass where there were two


def test_no_fusion_when_another_step_reads_the_block():
    steps = {
        "hash": {"op": "lsh", "num_projections": 3},
        "diag": {"op": "block", "select": ["hash"], "block_size": 16},
        # the sampler skips both blocks: the merges' inputs attend to disjoint keys
        "residual": {"op": "uniform_sample", "exclude": ["diag", "more"], "sample_size": 16},
        "merged": {"op": "merge", "inputs": ["diag", "residual"]},
        "sinks": {"op": "sink", "count": 4},
        "more": {"op": "block", "select": ["sinks"], "exclude": ["diag"], "block_size": 16},
        "out": {"op": "merge", "inputs": ["merged", "more"]},
    }
    assert Pipeline(_recipe(steps)).fusions == {}
    del steps["more"], steps["sinks"]
    steps["residual"]["exclude"] = ["diag"]
    steps["out"] = {"op": "causal_split", "body": "merged", "min_seq_len": 64}
    assert set(Pipeline(_recipe(steps)).fusions) == {"merged"}


UNROLLED = {
    # offset-free body (stacked per level) and a body with sinks (one call per rectangle)
    "lsh-only": {"diag.block_size": 64, "out.min_seq_len": 128},
    "hyperattention-sinks": {
        "diag.block_size": 64,
        "residual.sample_size": 32,
        "out.min_seq_len": 128,
        "sinks.count": 4,
    },
}


@pytest.mark.parametrize("name", sorted(UNROLLED))
@pytest.mark.parametrize(("lq", "lk"), [(1024, 1024), (768, 768), (1000, 1000), (200, 1224)])
def test_unrolled_splitter_equals_the_recursion(make_qkv, name, lq, lk, monkeypatch):
    """All leaves in one exact call and the rectangles level by level (stacked into one body
    call per level where the body is offset-free) give what the plain recursion gives: same
    pairs, same seeds where nothing is stacked, same merge order; fewer calls."""
    from attncompose.primitives import causal_split as split

    recipe = ac.load_recipe(name).with_knobs(UNROLLED[name])
    q, k, v = make_qkv(b=1, hq=2, hkv=1, lq=lq, lk=lk, d=16)
    attn = ac.compile(recipe, backend="torch")
    calls = {"exact": 0, "block": 0}
    choose = dispatch.choose

    def counting_choose(op, backend, problem, **inputs):
        impl = choose(op, backend, problem, **inputs)
        if op != "exact":
            calls[op] = calls.get(op, 0) + 1  # one choice per block kernel call
            return impl
        exact = impl.load()  # chosen once per attention call: count the calls it makes
        counted = lambda p: calls.update(exact=calls["exact"] + 1) or exact(p)
        return SimpleNamespace(load=lambda: counted)

    monkeypatch.setattr(dispatch, "choose", counting_choose)
    flat, flat_lse = attn(q, k, v, is_causal=True, return_lse=True)
    flat_calls = dict(calls)
    halve = split._halve
    recursion = lambda p, body, m, exact: exact(p) if p.lq <= m else halve(p, body, m, exact)
    monkeypatch.setattr(split, "_square", recursion)  # the recursion at every level
    calls.update(exact=0, block=0)
    rec, rec_lse = attn(q, k, v, is_causal=True, return_lse=True)
    assert ac.relative_error(flat, rec) < TIGHT
    assert torch.allclose(flat_lse, rec_lse, atol=1e-5)
    if lq == lk and lq % 128 == 0:  # n halves evenly down to the leaves
        assert flat_calls["exact"] < calls["exact"]
        stacked = name == "lsh-only"
        assert (flat_calls["block"] < calls["block"]) == stacked


# -- the attention call ------------------------------------------------------------------------


def test_same_seed_same_output_and_seed_matters(make_qkv):
    q, k, v = make_qkv(b=1, hq=2, hkv=2, lq=300, d=16)
    recipe = ac.load_recipe("hyperattention").with_knobs(
        {"diag.block_size": 32, "residual.sample_size": 32, "out.min_seq_len": 64}
    )
    a, b = ac.compile(recipe), ac.compile(recipe)
    assert torch.equal(a(q, k, v, is_causal=True), b(q, k, v, is_causal=True))
    other = ac.compile(recipe.with_knobs({"residual.seed": 1}))
    assert not torch.equal(a(q, k, v, is_causal=True), other(q, k, v, is_causal=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_their_dtype(make_qkv, reference, dtype):
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=77, d=16, dtype=dtype)
    for name in ("exact", "hyperattention"):
        out = ac.compile(name)(q, k, v, is_causal=True)
        assert out.dtype == dtype
        ref, _ = reference(q.float(), k.float(), v.float(), is_causal=True)
        assert ac.relative_error(out, ref) < 1e-2  # n=77 < min_seq_len: exact path


def test_approximate_path_never_builds_an_n_by_n_matrix():
    """n = 2^17: an n x n float32 matrix per head would need 64 GiB; this machine has 24."""
    n = 1 << 17
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 16, generator=g) for _ in range(3))
    out = ac.compile("hyperattention")(q, k, v)
    assert out.shape == (1, 1, n, 16) and torch.isfinite(out).all()


# -- sinks and windows ---------------------------------------------------------------------


class TestSinksCoverEverything(ReducesToExact):
    steps = {
        "sinks": {"op": "sink", "count": 4096},
        "local": {"op": "window", "width": 8},
        "out": {"op": "block", "select": ["sinks", "local"], "block_size": 16},
    }


class TestWindowThenSampleEverything(ReducesToExact):
    steps = {
        "sinks": {"op": "sink", "count": 3},
        "local": {"op": "window", "width": 7},
        "near": {"op": "block", "select": ["sinks", "local"], "block_size": 16},
        "rest": {"op": "uniform_sample", "exclude": ["near"], "sample_size": 4096},
        "out": {"op": "merge", "inputs": ["near", "rest"]},
    }


class TestZeroSwitchesPartsOff(ReducesToExact):
    steps = {
        "sinks": {"op": "sink", "count": 0},
        "local": {"op": "window", "width": 0},
        "heavy": {"op": "topk", "block_size": 8, "k": 0},
        "near": {"op": "block", "select": ["sinks", "local", "heavy"], "block_size": 16},
        "rest": {"op": "uniform_sample", "exclude": ["near"], "sample_size": 4096},
        "out": {"op": "merge", "inputs": ["near", "rest"]},
    }


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("lq", "lk"), [(63, 63), (10, 300), (1, 129)])
@pytest.mark.parametrize("width", [0, 1, 5, 40])
def test_window_and_sink_kernels_match_dense_mask(block_attention, causal, lq, lk, width):
    from attncompose.primitives.sink import Sink
    from attncompose.primitives.sink.schema import SinkStep
    from attncompose.primitives.window import Window
    from attncompose.primitives.window.schema import WindowStep

    p = make_problem(2, lq, lk, causal=causal)
    win = Window(WindowStep(width=width))(p).bind(16)
    sink = Sink(SinkStep(count=3))(p).bind(16)
    _assert_partial_equal(
        block_attention(p, win.tiles(p), own=win, exclude=(sink,)),
        masked_attention(p, dense_mask(p, win, exclude=(sink,))),
    )
    _assert_partial_equal(
        block_attention(p, sink.tiles(p), own=sink, exclude=(win,)),
        masked_attention(p, dense_mask(p, sink, exclude=(win,))),
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("lq", "lk"), [(200, 200), (207, 207), (100, 230)])
def test_key_ranges_read_as_views_equal_gathers(block_attention, causal, lq, lk, monkeypatch):
    """Window and sink tiles are key ranges: in-bounds chunks read K/V through overlapping
    views (edge tiles, with keys outside [0, Lk), are gathered); same result as gathering
    every chunk, and as the dense specification."""
    from attncompose.primitives.block import naive
    from attncompose.primitives.sink import SinkCoverage
    from attncompose.primitives.window import WindowCoverage

    monkeypatch.setattr(naive, "SCORE_BUDGET", 2 * 16 * 40 * 3)  # three tiles a chunk
    views = []
    key_ranges = naive.key_ranges
    monkeypatch.setattr(naive, "key_ranges", lambda *a: views.append(a) or key_ranges(*a))
    p = make_problem(2, lq, lk, causal=causal, seed=3)
    win, sink = WindowCoverage(25).bind(16), SinkCoverage(4).bind(16)
    for own, exclude in ((win, (sink,)), (sink, (win,))):
        tiles = own.tiles(p)
        got = block_attention(p, tiles, own=own, exclude=exclude)
        gathered = block_attention(p, replace(tiles, k_start=None), own=own, exclude=exclude)
        assert torch.allclose(got.out, gathered.out, atol=1e-6)
        assert torch.equal(got.lse.isinf(), gathered.lse.isinf())
        _assert_partial_equal(got, masked_attention(p, dense_mask(p, own, exclude=exclude)))
    assert views  # some chunks were read as views


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
    _assert_partial_equal(got, masked_attention(p, union))


@pytest.mark.parametrize("causal", [False, True])
def test_products_fraction(make_qkv, causal):
    from attncompose.evaluation import products_fraction

    q, k, v = make_qkv(b=1, hq=2, hkv=1, lq=256, d=16)
    assert products_fraction(ac.compile("exact"), q, k, v, causal) == 1.0
    window = ac.load_recipe("streaming").with_knobs({"sinks.count": 0, "local.width": 16})
    frac = products_fraction(ac.compile(window), q, k, v, True)
    expected = (16 * 17 / 2 + (256 - 16) * 16) / (256 * 257 / 2)  # a 16-key band
    assert frac == pytest.approx(expected)
    hyper = ac.load_recipe("hyperattention").with_knobs(
        {"diag.block_size": 32, "residual.sample_size": 0, "out.min_seq_len": 64}
    )
    frac = products_fraction(ac.compile(hyper), q, k, v, causal)
    assert 0.0 < frac < 1.0


def test_power_pattern_picks_power_of_two_distances():
    from attncompose.primitives.power import power_table

    p = make_problem(1, 80, 80, causal=True)
    rows = power_table(p, 8, max_distance=1 << 20)[0]
    assert rows[9].nonzero().flatten().tolist() == [1, 5, 7, 8, 9]  # distances 8, 4, 2, 1, 0
    assert power_table(p, 8, max_distance=0).sum() == 0


@pytest.mark.parametrize("causal", [False, True])
def test_static_table_tiles_share_one_mask_across_rows(block_attention, causal):
    """A static block table (power) is the same for every head: its tiles stay expanded along
    rows, so the kernel builds one pair mask for all of them; same pairs as the dense mask."""
    from attncompose.primitives.coverages import BlockTable
    from attncompose.primitives.power import power_table
    from attncompose.primitives.window import WindowCoverage

    p = make_problem(3, 90, 90, causal=causal, seed=6)
    cov = BlockTable(power_table(p, 8, max_distance=32), 8)
    tiles = cov.tiles(p)
    assert cov.row_invariant and tiles.k_idx.stride(0) == 0
    window = WindowCoverage(5).bind(16)
    got = block_attention(p, tiles, own=cov, exclude=(window,))
    _assert_partial_equal(got, masked_attention(p, dense_mask(p, cov, exclude=(window,))))


class TestPowerWithSamplingEverything(ReducesToExact):
    steps = {
        "pattern": {"op": "power", "block_size": 8},
        "near": {"op": "block", "select": ["pattern"], "block_size": 16},
        "rest": {"op": "uniform_sample", "exclude": ["near"], "sample_size": 4096},
        "out": {"op": "merge", "inputs": ["near", "rest"]},
    }


def test_code_pairing_meets_the_keys_of_the_same_code():
    """Queries far from the keys (a shifted distribution): rank pairing sends them to key
    blocks by quantile, code pairing to the keys sharing their bucket."""
    from attncompose.primitives.lsh.naive import gray_rank, hash_codes

    p = make_problem(1, 256, 256, d=16, seed=9)
    step = LshStep(num_projections=4, pairing="code")
    lsh = Lsh(step)
    cov = lsh(p).bind(32)
    dirs = lsh.directions(p)
    q_rank = gray_rank(hash_codes(p.q, dirs), 4)[0]
    k_rank = gray_rank(hash_codes(p.k, dirs), 4)[0]
    mask = dense_mask(p, cov)[0]
    same = q_rank[:, None] == k_rank[None, :]
    assert (mask & same).sum() > 0.5 * (mask.sum() * same.float().mean())  # far above chance
