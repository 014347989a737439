"""The attention call across recipes: determinism, the inputs' dtype kept, memory that never
holds an n x n matrix, the fraction of products computed. Each primitive's own tests, on the
shared contract (tests/contract.py), are in tests/primitives/test_<op>.py."""

from __future__ import annotations

import pytest
import torch
from contract import FLOAT_ROUNDING, assert_reads_no_later_key, watch_expansions
from on_device import needs_flex

import attncompose as ac
from attncompose.eval.products import products_fraction
from attncompose.spec.recipe import builtin_recipes

# -- the kernels against the dense specification ---------------------------------------------


# -- merge, Gray order, sampler ---------------------------------------------------------------


# -- fused step patterns against the steps one by one -----------------------------------------


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


@pytest.mark.parametrize("name", [*builtin_recipes(), "topp:keys"])  # topp, score: keys
@pytest.mark.parametrize(
    ("lq", "causal"), [(2500, True), (2500, False), (1, True), (37, True)],
    ids=["causal", "noncausal", "decode1", "decode37"],
)  # fmt: skip
def test_grouped_heads_equal_their_keys_repeated_for_every_query_head(make_qkv, name, lq, causal):
    """Grouped-query attention is attention with each key/value head repeated for the query
    heads of its group, whether a step reads the groups where they are, stacks a group's
    query heads as the rows of one call (to float rounding: the CPU kernel's matrix
    products block other row counts differently) or expands them; at 2500 keys every
    built-in recipe computes a fraction of the products (the causal splitter's from 512
    up)."""
    q, k, v = make_qkv(b=1, hq=6, hkv=2, lq=lq, lk=2500, d=16)
    recipe = ac.load_recipe(name.split(":")[0])
    if name == "topp:keys":
        recipe = recipe.with_knobs({"heavy.score": "keys", "heavy.max_k": 4})
    if "out" in recipe.steps and recipe.steps["out"].op == "causal_split":
        recipe = recipe.with_knobs({"out.min_seq_len": 512})
    attn = ac.compile(recipe, backend="torch")
    grouped = attn(q, k, v, is_causal=causal)
    repeated = attn(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=causal)
    assert ac.relative_error(grouped, repeated) < FLOAT_ROUNDING
    if name != "exact" and lq > 1 and causal:
        assert products_fraction(attn, q, k, v, causal) < 1.0


@pytest.mark.parametrize("name", builtin_recipes())
def test_grouped_keys_are_read_where_they_are_on_the_cpu(make_qkv, name, monkeypatch):
    """Every built-in recipe reads key/value row n // group for query row n (exact
    attention, block plans, sortLSH's hashing, the tile pass, the sampler, the causal
    splitter's leaves and levels): no call copies the keys and values per query head, in
    prefill (the splitter from 512 up), non-causal or decode. The watch sees a copy where
    one is made: the reference exact kernel's, which runs value dims unlike the key dims."""
    copies = watch_expansions(monkeypatch)
    q, k, v = make_qkv(b=1, hq=6, hkv=2, lq=2500, d=16)
    recipe = ac.load_recipe(name)
    if "out" in recipe.steps and recipe.steps["out"].op == "causal_split":
        recipe = recipe.with_knobs({"out.min_seq_len": 512})
    attn = ac.compile(recipe, backend="torch")
    attn(q, k, v, is_causal=True)  # prefill
    attn(q, k, v, is_causal=False)
    attn(q[:, :, -1:], k, v, is_causal=True)  # a decode step
    attn(q[:, :, -37:], k, v, is_causal=True)
    assert copies == []
    ac.compile("exact", backend="torch")(q, k, v[..., :8], is_causal=True)
    assert copies == [(2, 2500, 16)]


@pytest.mark.parametrize("name", builtin_recipes())
@pytest.mark.parametrize("lq", [1, 37])
def test_a_decode_step_computes_only_its_queries(make_qkv, name, lq, monkeypatch):
    """A decode step (fewer queries than a tile or block) runs tiles and plan blocks of
    hardly more rows than its queries in PyTorch's fused CPU kernel: a sampler tile of one
    query computed 128 rows; now the least power of two >= 16 that holds them (the tiles
    the Triton plan kernel takes), the plan walk's blocks and sortLSH's tiles just them
    (per query head: grouped keys stack a group's heads as the rows of one call,
    base.stack_heads)."""
    from attncompose.primitives.block import fused

    rows = []
    op = fused.fused_op()

    def counting(q, *args, **kwargs):
        rows.append(q.shape[-2])
        return op(q, *args, **kwargs)

    monkeypatch.setattr(fused, "fused_op", lambda: counting)
    q, k, v = make_qkv(b=1, hq=4, hkv=4, lq=lq, lk=3000, d=16)
    recipe = ac.load_recipe(name)
    if "out" in recipe.steps and recipe.steps["out"].op == "causal_split":
        recipe = recipe.with_knobs({"out.min_seq_len": 512})
    ac.compile(recipe, backend="torch")(q, k, v, is_causal=True)
    assert max(rows, default=lq) <= max(16, 1 << (lq - 1).bit_length())


@needs_flex
@pytest.mark.parametrize("name", ["streaming", "topp"])
def test_flexattention_reads_grouped_keys_where_they_are(make_qkv, name, monkeypatch):
    """The block plan through FlexAttention takes grouped keys and values as they are
    (enable_gqa: query head h reads key/value head h // group): no copy per query head, and
    the result of the keys repeated per head, to the torch path's float32 rounding."""
    copies = watch_expansions(monkeypatch)
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=300, d=16)
    grouped = ac.compile(name, backend="flex")(q, k, v, is_causal=True)
    assert copies == []
    repeated = ac.compile(name, backend="flex")(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    assert torch.equal(grouped, repeated)
    torch_path = ac.compile(name, backend="torch")(q, k, v, is_causal=True)
    assert ac.relative_error(grouped, torch_path) < 1e-6


# -- sinks and windows ---------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_products_fraction(make_qkv, causal):
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


def test_release_memory_empties_the_buffers_and_calls_go_on_alike(make_qkv):
    """What a module holds between calls (reused buffers, the sampler's draws kept per
    shape) is dropped by release_memory; the next call makes it again, same result."""
    recipe = ac.load_recipe("hyperattention").with_knobs({"out.min_seq_len": 64})
    attn = ac.compile(recipe, backend="torch")
    q, k, v = make_qkv(b=1, hq=2, hkv=2, lq=256, d=16)
    want = attn(q, k, v, is_causal=True)
    assert attn.workspace.nbytes() > 0 and attn.workspace._memos
    attn.release_memory()
    assert attn.workspace.nbytes() == 0 and not attn.workspace._memos
    assert torch.equal(attn(q, k, v, is_causal=True), want)


@pytest.mark.parametrize("name", ac.builtin_recipes())
def test_no_recipe_reads_a_later_key(name):
    """Causal calls of every built-in recipe at its default knobs, on real attention (the
    built-in capture): changing the values from position c on leaves every output before c
    as it was. (Recipes around the causal splitter, packed as on a GPU too:
    tests/primitives/test_causal_split.py.)"""
    from attncompose.eval.data import load_qkv

    attn = ac.compile(ac.load_recipe(name), backend="torch")
    item = load_qkv(None, 1000)[1]
    assert_reads_no_later_key(attn, item.q, item.k, item.v, (100, 333, 512, 800))


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("triton", marks=pytest.mark.triton),
        pytest.param("flex", marks=needs_flex),
    ],
)
@pytest.mark.parametrize("name", ["streaming", "power"])
def test_the_last_queries_of_a_prefill_alone_equal_its_rows(make_qkv, name, backend):
    """A chunk of queries after a prefix of keys (a chunked prefill, bottom-right aligned)
    gets the rows the whole prefill gives them, for recipes whose pattern lies in absolute
    positions, where the chunk's first query is no multiple of a block (power's blocks then
    straddle the chunk's: its table shifted, BlockTable.shift; a plan kernel tile across two
    table blocks read pair by pair)."""
    from plan_cases import small_recipe

    recipe = small_recipe(name).with_knobs({"sinks.count": 1, "out.block_size": 16})
    attn = ac.compile(recipe, backend=backend, check_finite=False)
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=200, lk=200, d=16)
    whole = attn(q, k, v, is_causal=True)
    for m in (1, 17, 57, 100):  # chunks from positions 199, 183, 143, 100
        chunk = attn(q[:, :, -m:].contiguous(), k, v, is_causal=True)
        assert ac.relative_error(chunk, whole[:, :, -m:]) < FLOAT_ROUNDING, m


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("triton", marks=pytest.mark.triton),
        pytest.param("flex", marks=needs_flex),
    ],
)
@pytest.mark.parametrize("causal", [True, False])
def test_a_scale_of_zero_or_below_gives_softmax_of_the_scaled_scores(
    make_qkv, reference, backend, causal
):
    """SDPA takes any finite scale. PyTorch's fused CPU kernel masks (-inf) and takes row
    maxima before it scales, so causal calls at scale 0 or below gave NaN rows (exact
    attention, and every recipe's exact parts); the sign now goes into the queries: scale 0
    averages the visible values, -s attends as -q at s, approximations included."""
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=40, lk=64, d=16)
    exact = ac.compile("exact", backend=backend)
    for scale in (0.0, -0.0, -0.3):
        out, lse = exact(q, k, v, is_causal=causal, scale=scale, return_lse=True)
        ref, ref_lse = reference(q, k, v, is_causal=causal, scale=scale)
        assert ac.relative_error(out, ref) < FLOAT_ROUNDING, scale
        assert torch.allclose(lse.double(), ref_lse, atol=1e-5), scale
    recipe = ac.load_recipe("hyperattention-sinks").with_knobs(
        {"diag.block_size": 16, "residual.sample_size": 8, "out.min_seq_len": 16}
    )
    approx = ac.compile(recipe, backend="torch")
    negative = approx(q, k, v, is_causal=causal, scale=-0.3)
    assert negative.isfinite().all()
    assert torch.equal(negative, approx(-q, k, v, is_causal=causal, scale=0.3))
