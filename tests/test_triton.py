"""Triton kernels against their PyTorch references, under the CPU interpreter or on a GPU.

Same seeded hash directions and samples for kernel and reference, so results compare
exactly (up to float rounding). Tiny shapes: the interpreter runs one program at a time.
On a CUDA machine, ``TRITON_INTERPRET=0 pytest tests/test_triton.py`` compiles the kernels
and runs every test on CUDA tensors (through the autotuned launch path).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton (any kernel module) imports

from dataclasses import replace

import pytest
import torch
from oracle import make_problem as cpu_problem

pytest.importorskip("triton")

import triton
import triton.runtime.interpreter

import attncompose as ac
from attncompose.primitives import dispatch
from attncompose.primitives.base import Coverage, Partial, Tiles, UnionCoverage, natural_tiles
from attncompose.primitives.block import naive as block_naive
from attncompose.primitives.block import triton as block_triton
from attncompose.primitives.exact import naive as exact_naive
from attncompose.primitives.exact import triton as exact_triton
from attncompose.primitives.lsh import Lsh
from attncompose.primitives.lsh import naive as lsh_naive
from attncompose.primitives.lsh import triton as lsh_triton
from attncompose.primitives.lsh.schema import LshStep
from attncompose.primitives.sink import SinkCoverage
from attncompose.primitives.topk import Topk
from attncompose.primitives.topk import naive as topk_naive
from attncompose.primitives.topk import triton as topk_triton
from attncompose.primitives.topk.schema import TopkStep
from attncompose.primitives.uniform_sample.naive import draw_uniforms, sample_tiles
from attncompose.primitives.window import WindowCoverage
from attncompose.runtime.compiler import Pipeline

pytestmark = pytest.mark.triton

if not torch.cuda.is_available() and not isinstance(
    triton.language.zeros, triton.runtime.interpreter.InterpretedFunction
):  # triton.language was imported (e.g. by transformers) before TRITON_INTERPRET=1
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1: set it in conftest.py or the environment",
        allow_module_level=True,
    )

# compiled kernels on CUDA tensors when not interpreting, else the interpreter on CPU tensors
DEVICE = torch.device("cuda" if os.environ["TRITON_INTERPRET"] == "0" else "cpu")


def make_problem(*args, **kwargs):
    """The oracle's problem on DEVICE."""
    p = cpu_problem(*args, **kwargs)
    return replace(p, q=p.q.to(DEVICE), k=p.k.to(DEVICE), v=p.v.to(DEVICE))


@pytest.fixture
def make_qkv(make_qkv):
    """conftest's q, k, v on DEVICE."""
    return lambda *args, **kwargs: tuple(x.to(DEVICE) for x in make_qkv(*args, **kwargs))


SHAPES = [(17, 17), (33, 33), (64, 64), (17, 64)]  # (Lq, Lk); Lq < Lk is decode
IDS = ["T17", "T33", "T64", "decode17x64"]


def assert_same(got: Partial, want: Partial, tol: float = 1e-5) -> None:
    assert not got.out.isnan().any() and not got.lse.isnan().any()
    assert torch.equal(got.lse.isinf(), want.lse.isinf())
    finite = want.lse.isfinite()
    assert torch.allclose(got.lse[finite], want.lse[finite].float(), atol=tol)
    assert torch.allclose(got.out, want.out.float(), atol=tol)


def nan_partial(problem) -> Partial:
    n, lq = problem.q.shape[:2]
    nan = lambda *shape: torch.full(shape, float("nan"), device=problem.q.device)
    return Partial(nan(n, lq, problem.v.shape[-1]), nan(n, lq))


def padded_views(problem):
    """The problem on strided views into NaN storage: reading out of range poisons results."""

    def pad(x):
        n, length, d = x.shape
        store = torch.full((n + 1, length + 3, 2 * d), float("nan"), device=x.device)
        store[1:, 1 : length + 1, :d] = x
        return store[1:, 1 : length + 1, :d]

    return replace(problem, q=pad(problem.q), k=pad(problem.k), v=pad(problem.v))


def lsh_coverage(problem, block):
    sel = Lsh(LshStep(op="lsh", num_projections=3, seed=1))(problem)
    return sel.bind(block)


# ---------------------------------------------------------------- exact


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("lq", "lk"), SHAPES, ids=IDS)
def test_exact_matches_reference(lq, lk, causal):
    problem = make_problem(2, lq, lk, 16, causal=causal)
    assert_same(exact_triton.exact_attention(problem), exact_naive.exact_attention(problem))


@pytest.mark.parametrize("delta", [-20, 5, 40], ids=["rows-see-nothing", "shifted", "all"])
def test_exact_arbitrary_offsets(delta):
    problem = replace(make_problem(2, 33, 17, 16, causal=True), q_offset=delta)
    assert_same(exact_triton.exact_attention(problem), exact_naive.exact_attention(problem))


def test_exact_nan_poisoned_buffers_and_inputs_equal_clean_run():
    problem = make_problem(2, 33, 33, 16, causal=True)
    clean = exact_triton.exact_attention(problem)
    poisoned = exact_triton.exact_attention(padded_views(problem), out=nan_partial(problem))
    assert torch.equal(poisoned.out, clean.out) and torch.equal(poisoned.lse, clean.lse)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_exact_fp16_within_twice_torch_fp16_error(causal):
    problem = make_problem(2, 64, 64, 16, causal=causal)
    truth = exact_naive.exact_attention(problem).out
    half = replace(problem, q=problem.q.half(), k=problem.k.half(), v=problem.v.half())
    torch_err = (exact_naive.exact_attention(half).out.float() - truth).abs().max()
    kernel_err = (exact_triton.exact_attention(half).out - truth).abs().max()
    assert kernel_err <= 2 * torch_err + 1e-5


# ---------------------------------------------------------------- block


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("lq", "lk"), SHAPES, ids=IDS)
def test_block_lsh_tiles_match_reference(lq, lk, causal):
    problem = make_problem(2, lq, lk, 16, causal=causal)
    cov = lsh_coverage(problem, 16)
    tiles = cov.tiles(problem)
    assert_same(
        block_triton.block_attention(problem, tiles, own=cov),
        block_naive.block_attention(problem, tiles, own=cov),
    )


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_block_topk_table_excluding_lsh_matches_reference(causal):
    problem = make_problem(2, 33, 64, 16, causal=causal)
    top = Topk(TopkStep(op="topk", block_size=16, k=2))(problem)
    lsh = lsh_coverage(problem, 16)
    tiles = top.tiles(problem)
    assert_same(
        block_triton.block_attention(problem, tiles, own=top, exclude=(lsh,)),
        block_naive.block_attention(problem, tiles, own=top, exclude=(lsh,)),
    )


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("lq", "lk"), [(33, 33), (17, 64)], ids=["T33", "decode17x64"])
def test_sample_tiles_with_shift_and_union_exclude_match_reference(lq, lk, causal):
    problem = make_problem(2, lq, lk, 16, causal=causal)
    top = Topk(TopkStep(op="topk", block_size=16, k=1))(problem)
    union = UnionCoverage([lsh_coverage(problem, 16), top])
    tiles = sample_tiles(problem, draw_uniforms(problem, 16, seed=3))
    assert_same(
        block_triton.block_attention(problem, tiles, exclude=(union,)),
        block_naive.block_attention(problem, tiles, exclude=(union,)),
    )


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(
    ("lq", "lk", "size"), [(33, 33, 16), (64, 64, 7), (17, 64, 16)], ids=["T33", "odd7", "decode"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_topk_block_scores_match_reference(lq, lk, size, causal, dtype):
    problem = make_problem(2, lq, lk, 16, causal=causal)
    half = replace(problem, q=problem.q.to(dtype), k=problem.k.to(dtype), v=problem.v.to(dtype))
    got = topk_triton.block_scores(half, size)
    want = topk_naive.block_scores(half, size)
    assert torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    assert torch.allclose(got[finite], want[finite], atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_key_bias_matches_reference(causal):
    """The fused block + residual tile: detector keys, then sampled keys with log-weights and
    -inf for the ones to drop (:class:`BlockWithResidual`'s joint tiles)."""
    problem = make_problem(2, 33, 40, 16, causal=causal)
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


@pytest.mark.parametrize(("lq", "lk"), [(33, 33), (17, 64)], ids=["T33", "decode17x64"])
def test_window_band_and_sink_bucket_forms_match_reference(lq, lk):
    problem = replace(make_problem(2, lq, lk, 16, causal=True), k_offset=3)
    window, sink = WindowCoverage(5).bind(16), SinkCoverage(6).bind(16)
    tiles = lsh_coverage(problem, 16).tiles(problem)
    for own, exclude in ((window, (sink,)), (sink, (window,)), (None, (window, sink))):
        assert_same(
            block_triton.block_attention(problem, tiles, own=own, exclude=exclude),
            block_naive.block_attention(problem, tiles, own=own, exclude=exclude),
        )


def test_block_nan_poisoned_buffers_and_inputs_equal_clean_run():
    problem = make_problem(2, 33, 33, 16, causal=True)
    cov = lsh_coverage(problem, 16)
    tiles = cov.tiles(problem)  # every query sits in one tile: the kernel writes every row
    clean = block_triton.block_attention(problem, tiles, own=cov)
    poisoned = block_triton.block_attention(
        padded_views(problem), tiles, own=cov, out=nan_partial(problem)
    )
    assert torch.equal(poisoned.out, clean.out) and torch.equal(poisoned.lse, clean.lse)


def test_block_fp16_within_twice_torch_fp16_error():
    problem = make_problem(2, 64, 64, 16)
    cov = lsh_coverage(problem, 16)
    tiles = cov.tiles(problem)
    truth = block_naive.block_attention(problem, tiles, own=cov).out
    half = replace(problem, q=problem.q.half(), k=problem.k.half(), v=problem.v.half())
    torch_err = (block_naive.block_attention(half, tiles, own=cov).out.float() - truth).abs().max()
    kernel_err = (block_triton.block_attention(half, tiles, own=cov).out - truth).abs().max()
    assert kernel_err <= 2 * torch_err + 1e-5


# ---------------------------------------------------------------- autotune (the GPU path)


def test_autotune_prunes_tile_sizes_to_the_buckets():
    configs = exact_triton._exact_tuned.configs
    kept = exact_triton.prune_configs(configs, {"ROWS_B": 16, "KEYS_B": 64})
    assert kept and all(c.kwargs["BQ"] <= 16 and c.kwargs["BK"] <= 64 for c in kept)
    assert len(kept) < len(configs)
    everything = {"ROWS_B": 1 << 17, "KEYS_B": 1 << 17}
    assert len(exact_triton.prune_configs(configs, everything)) == len(configs)
    assert exact_triton.bucket(1) == 16 and exact_triton.bucket(4097) == 8192


def test_autotuned_launch_matches_reference(monkeypatch):
    """The GPU launch path (autotuned wrapper, grid from the chosen config, bucketed keys)
    under the interpreter: with 16 rows and 16 keys pruning leaves one config, so the
    autotuner takes it without benchmarking (which needs a GPU)."""
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    for tuned in (exact_triton._exact_tuned, block_triton._block_tuned):
        tuned.cache.clear()
    problem = make_problem(2, 16, 16, 16, causal=True)
    assert_same(exact_triton.exact_attention(problem), exact_naive.exact_attention(problem))
    cov = lsh_coverage(problem, 16)
    tiles = cov.tiles(problem)
    assert_same(
        block_triton.block_attention(problem, tiles, own=cov),
        block_naive.block_attention(problem, tiles, own=cov),
    )
    for tuned in (exact_triton._exact_tuned, block_triton._block_tuned):
        (config,) = tuned.cache.values()  # the autotuner ran and chose the one config
        assert (config.kwargs["BQ"], config.kwargs["BK"]) == (16, 16)


def test_fp32_dots_follow_torchs_tf32_setting():
    """float32 inputs: full-precision dots unless PyTorch allows TF32 matmuls (Triton's own
    default would be TF32, ~1e-3 relative error, on every GPU run)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert exact_triton.dot_precision(torch.float32) == "ieee"
        assert exact_triton.dot_precision(torch.bfloat16) == "ieee"
        matmul.allow_tf32 = True
        assert exact_triton.dot_precision(torch.float32) == "tf32"
        assert exact_triton.dot_precision(torch.float16) == "ieee"
    finally:
        matmul.allow_tf32 = before


# ---------------------------------------------------------------- lsh


@pytest.mark.parametrize("bits", [1, 7, 12])
def test_lsh_ranks_and_sort_match_reference(bits):
    x = torch.randn(2, 33, 16, generator=torch.Generator().manual_seed(bits)).to(DEVICE)
    dirs = lsh_naive.projections(2, 16, bits, seed=5).to(DEVICE)
    want = lsh_naive.gray_rank(lsh_naive.hash_codes(x, dirs), bits)
    assert torch.equal(lsh_triton.gray_ranks(x, dirs).long(), want)
    for got, ref in zip(
        lsh_triton.sort_positions(x, dirs), lsh_naive.sort_positions(x, dirs), strict=True
    ):
        assert torch.equal(got, ref)


# ---------------------------------------------------------------- pipeline and dispatch

SMALL = {
    "hash": {"op": "lsh", "num_projections": 3},
    "diag": {"op": "block", "select": ["hash"], "block_size": 16},
    "residual": {"op": "uniform_sample", "exclude": ["diag"], "sample_size": 16},
    "merged": {"op": "merge", "inputs": ["diag", "residual"]},
    "out": {"op": "causal_split", "body": "merged", "min_seq_len": 16},
}


@pytest.mark.parametrize(
    ("lq", "lk", "causal"),
    [(33, 33, False), (64, 64, True), (17, 64, True)],
    ids=["T33-noncausal", "T64-causal", "decode17x64"],
)
def test_pipeline_triton_equals_torch_with_gqa(make_qkv, lq, lk, causal):
    recipe = ac.load_recipe({"name": "small", "steps": SMALL})
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=lq, lk=lk, d=16)
    want, want_lse = ac.compile(recipe, backend="torch")(q, k, v, is_causal=causal, return_lse=True)
    got, got_lse = ac.compile(recipe, backend="triton")(q, k, v, is_causal=causal, return_lse=True)
    assert ac.relative_error(got, want) < 1e-5
    assert torch.allclose(got_lse, want_lse, atol=1e-5)


def test_fused_block_residual_pipeline_triton_equals_torch(make_qkv):
    """Draws that follow 64-query detector tiles: the triton tile kernel runs the joint tile
    (detector keys + weighted samples) and matches the torch steps run one by one."""
    recipe = ac.load_recipe({"name": "small", "steps": SMALL}).with_knobs({"diag.block_size": 64})
    q, k, v = make_qkv(b=1, hq=2, hkv=1, lq=128, lk=128, d=16)
    want = ac.compile(recipe, backend="torch", fuse=False)(q, k, v, return_lse=True)
    got = ac.compile(recipe, backend="triton")(q, k, v, return_lse=True)
    assert "one tile pass" in Pipeline(recipe, backend="triton").kernels()["merged"]
    assert ac.relative_error(got[0], want[0]) < 1e-5
    assert torch.allclose(got[1], want[1], atol=1e-5)


HALF = [
    pytest.param(torch.float16, 2e-3, id="fp16"),
    pytest.param(
        torch.bfloat16,
        2e-2,  # 8 significant bits against fp16's 11
        id="bf16",
        marks=pytest.mark.skipif(DEVICE.type != "cuda", reason="the interpreter miscomputes bf16"),
    ),
]


@pytest.mark.parametrize(("dtype", "tol"), HALF)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_triton_backend_reads_half_precision_as_it_is(make_qkv, monkeypatch, causal, dtype, tol):
    """Half-precision inputs reach the Triton kernels uncast (they accumulate in float32) and
    give what the float32 torch path gives, to half precision."""
    recipe = ac.load_recipe({"name": "small", "steps": SMALL}).with_knobs({"diag.block_size": 32})
    q, k, v = make_qkv(b=1, hq=2, hkv=1, lq=64, lk=64, d=16, dtype=dtype)
    seen = []
    tile_kernel = block_triton.block_attention
    spy = lambda problem, *a, **kw: seen.append(problem.q.dtype) or tile_kernel(problem, *a, **kw)
    monkeypatch.setattr(block_triton, "block_attention", spy)
    got, got_lse = ac.compile(recipe, backend="triton")(q, k, v, is_causal=causal, return_lse=True)
    want, want_lse = ac.compile(recipe, backend="torch")(q, k, v, is_causal=causal, return_lse=True)
    assert seen and set(seen) == {dtype}
    assert got.dtype == dtype and got_lse.dtype == torch.float32
    assert ac.relative_error(got.float(), want.float()) < tol
    assert torch.allclose(got_lse, want_lse, atol=tol)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_block_topk_pipeline_triton_equals_torch(make_qkv, causal):
    """Sinks + window + top-k blocks: scores, tables and tiles all through Triton kernels."""
    recipe = ac.load_recipe("block-topk").with_knobs(
        {"sinks.count": 4, "local.width": 16, "heavy.block_size": 16, "heavy.k": 2}
    )
    q, k, v = make_qkv(b=1, hq=2, hkv=1, lq=64, lk=64, d=16)
    assert Pipeline(recipe, backend="triton").kernels()["heavy"].startswith("triton:")
    want = ac.compile(recipe, backend="torch")(q, k, v, is_causal=causal, return_lse=True)
    got = ac.compile(recipe, backend="triton")(q, k, v, is_causal=causal, return_lse=True)
    assert ac.relative_error(got[0], want[0]) < 1e-5
    assert torch.allclose(got[1], want[1], atol=1e-5)


def test_kernels_say_which_implementation_runs():
    recipe = ac.load_recipe({"name": "small", "steps": SMALL})
    tiles = "triton:contiguous-tiles else triton:tile-attention"
    assert Pipeline(recipe, backend="triton").kernels()["diag"] == tiles
    assert Pipeline(recipe, backend="torch").kernels()["out"].endswith("torch:sdpa-with-lse")
    auto = Pipeline(recipe, backend="auto").kernels()["diag"]
    assert auto == (
        tiles + " else flex:contiguous-tiles"
        if torch.cuda.is_available()
        else "torch:block-fused-cpu else torch:block"
    )


def test_triton_backend_lists_every_reason():
    problem = make_problem(2, 17, 17, 24)
    problem = replace(problem, q=problem.q.double(), k=problem.k.double(), v=problem.v.double())
    with pytest.raises(dispatch.BackendNotSupportedError) as err:
        dispatch.choose("exact", "triton", problem)
    assert "float64" in str(err.value) and "head dim 24" in str(err.value)


def test_auto_uses_torch_on_cpu_and_triton_refuses_unknown_coverage():
    on_cpu = cpu_problem(2, 17, 17, 16)  # CPU tensors whatever DEVICE is
    assert dispatch.choose("block", "auto", on_cpu).backend == "torch"
    problem = make_problem(2, 17, 17, 16)
    if problem.q.device.type == "cuda":  # compiled run: auto takes Triton for CUDA tensors
        assert dispatch.choose("block", "auto", problem).backend == "triton"

    class Opaque(Coverage):
        pass

    (tile_kernel,) = [i for i in dispatch.KERNELS["block"] if i.name == "triton:tile-attention"]
    reasons = tile_kernel.not_supported_reasons(problem, own=None, exclude=(Opaque(),))
    assert any("Opaque has no kernel form" in r for r in reasons)


# ---------------------------------------------------------------- block plans


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


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("lq", "lk"), [(33, 33), (64, 64), (17, 64)], ids=IDS[1:])
def test_plan_kernel_matches_reference(lq, lk, causal):
    from attncompose.primitives.block import plan_torch, plan_triton

    problem = make_problem(2, lq, lk, 16, causal=causal, seed=lq)
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


def test_plan_kernel_nan_poisoned_inputs_equal_clean_run():
    from attncompose.primitives.block import plan_triton

    problem = make_problem(2, 40, 40, 16, causal=True)
    for name, plan in plan_cases(problem):
        clean = plan_triton.plan_attention(problem, plan)
        poisoned = plan_triton.plan_attention(padded_views(problem), plan)
        assert torch.equal(poisoned.out, clean.out) and torch.equal(poisoned.lse, clean.lse), name


def test_plan_kernel_fp16_within_twice_torch_fp16_error():
    from attncompose.primitives.block import plan_torch, plan_triton

    problem = make_problem(2, 64, 64, 16, causal=True)
    half = replace(problem, q=problem.q.half(), k=problem.k.half(), v=problem.v.half())
    for name, plan in plan_cases(problem):
        truth = plan_torch.plan_attention(problem, plan).out
        torch_err = (plan_torch.plan_attention(half, plan).out - truth).abs().max()
        got = plan_triton.plan_attention(half, plan).out
        assert got.dtype == torch.float16, name
        assert (got.float() - truth).abs().max() <= 2 * torch_err + 1e-3, name


def _small_recipe(name):
    knobs = {"streaming": {"local.width": 24}, "power": {"pattern.block_size": 32}}
    knobs |= {r: {"local.width": 24, "heavy.block_size": 16} for r in ("block-topk", "topp")}
    return ac.load_recipe(name).with_knobs(knobs[name])


@pytest.mark.parametrize("name", ["streaming", "topp", "block-topk", "power"])
@pytest.mark.parametrize(
    ("lq", "lk", "causal"),
    [(50, 50, False), (64, 64, True), (17, 64, True)],
    ids=["T50-noncausal", "T64-causal", "decode17x64"],
)
def test_plan_recipes_triton_equal_torch_with_gqa(make_qkv, name, lq, lk, causal):
    recipe = _small_recipe(name)
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=lq, lk=lk, d=16)
    want, want_lse = ac.compile(recipe, backend="torch")(q, k, v, is_causal=causal, return_lse=True)
    got, got_lse = ac.compile(recipe, backend="triton")(q, k, v, is_causal=causal, return_lse=True)
    assert ac.relative_error(got, want) < 1e-5
    assert torch.allclose(got_lse, want_lse, atol=1e-5)


@pytest.mark.parametrize("name", ["streaming", "topp"])
def test_a_block_step_is_one_kernel_launch(make_qkv, name, monkeypatch):
    """Sinks + window (+ top-p blocks) in ONE launch of the plan kernel: no tile kernel."""
    from attncompose.primitives.block import plan_triton

    launches = []
    real = plan_triton.launch
    monkeypatch.setattr(
        plan_triton, "launch", lambda k, *a, **kw: launches.append(k) or real(k, *a, **kw)
    )
    monkeypatch.setattr(block_triton, "launch", lambda *a, **kw: pytest.fail("tile kernel ran"))
    q, k, v = make_qkv(b=1, hq=2, hkv=1, lq=64, lk=64, d=16)
    ac.compile(_small_recipe(name), backend="triton")(q, k, v, is_causal=True)
    assert launches == [plan_triton._plan_fwd_kernel]


def test_plan_autotuned_launch_matches_reference(monkeypatch):
    """The GPU launch path of the plan kernel under the interpreter: 16x16 plan blocks leave
    one config after pruning, so the autotuner takes it without benchmarking."""
    from attncompose.primitives.block import plan_torch, plan_triton
    from attncompose.primitives.plan import BlockPlan

    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    plan_triton._plan_tuned.cache.clear()
    problem = make_problem(2, 40, 40, 16, causal=True)
    plan = BlockPlan.build(problem, [SinkCoverage(3), WindowCoverage(9)], [], 16, 16)
    assert_same(plan_triton.plan_attention(problem, plan), plan_torch.plan_attention(problem, plan))
    (config,) = plan_triton._plan_tuned.cache.values()
    assert (config.kwargs["BQ"], config.kwargs["BK"]) == (16, 16)


# ---------------------------------------------------------------- contiguous tiles


@pytest.mark.parametrize(
    ("name", "knobs", "lq"),
    [
        ("hyperattention", {"diag.block_size": 64, "residual.sample_size": 64}, 128),
        ("lsh-only", {"diag.block_size": 32}, 96),
        ("sampling-only", {"sampled.sample_size": 32}, 70),
    ],
    ids=["hyper-fused", "lsh-only", "sampling-only"],
)
def test_exact_tiles_run_as_one_contiguous_plan(make_qkv, monkeypatch, name, knobs, lq):
    """sortLSH's sorted copies (and each tile's sampled keys laid out after its bucket) run
    as ONE block-sparse launch per tile pass, equal to the torch steps one by one."""
    from attncompose.primitives.block import plan_triton

    recipe = ac.load_recipe(name).with_knobs(knobs)
    launches = []
    real = plan_triton.launch
    monkeypatch.setattr(
        plan_triton, "launch", lambda k, *a, **kw: launches.append(k) or real(k, *a, **kw)
    )
    monkeypatch.setattr(block_triton, "launch", lambda *a, **kw: pytest.fail("tile kernel ran"))
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=lq, lk=lq, d=16)
    got = ac.compile(recipe, backend="triton")(q, k, v, return_lse=True)
    want = ac.compile(recipe, backend="torch", fuse=False)(q, k, v, return_lse=True)
    assert launches  # one per tile pass
    assert ac.relative_error(got[0], want[0]) < 1e-5
    assert torch.allclose(got[1], want[1], atol=1e-5)


def test_contiguous_tiles_count_the_products_the_tile_kernel_counts(make_qkv):
    from attncompose.evaluation import products_fraction

    recipe = ac.load_recipe("hyperattention").with_knobs(
        {"diag.block_size": 64, "residual.sample_size": 64}
    )
    q, k, v = make_qkv(b=1, hq=2, hkv=1, lq=128, lk=128, d=16)
    fracs = [
        products_fraction(ac.compile(recipe, backend=b), q, k, v, False)
        for b in ("torch", "triton")
    ]
    assert fracs[0] == fracs[1] < 1


def test_contiguous_tiles_never_wait_for_the_device(monkeypatch):
    """Copies, key bias, plan and the scatter back use tensor operations only."""
    from attncompose.primitives.block import contiguous

    problem = make_problem(2, 64, 64, 16)
    tiles = lsh_coverage(problem, 16).tiles(problem)
    calls = []

    def fake_plan(op, backend, sub, plan):
        calls.append(plan)
        return Partial(torch.zeros_like(sub.q), torch.zeros(sub.q.shape[:2], device=sub.q.device))

    monkeypatch.setattr(dispatch, "call", fake_plan)

    def sync(*args, **kwargs):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    contiguous.run(problem, tiles, "triton")
    assert len(calls) == 1


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["streaming", "topp", "hyperattention"])
def test_cuda_graph_replay_equals_eager(make_qkv, name):
    recipe = ac.load_recipe(name)
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=1024, lk=1024, d=64, dtype=torch.bfloat16)
    eager = ac.compile(recipe, backend="auto")
    graphed = ac.compile(recipe, backend="auto", cuda_graphs=True)
    with torch.no_grad():
        want = eager(q, k, v, is_causal=True)
        for _ in range(2):  # capture, then replay
            got = graphed(q, k, v, is_causal=True)
            assert torch.equal(got, want)
        other = [x * 0.5 for x in (q, k, v)]  # new values in the same static buffers
        assert torch.equal(graphed(*other, is_causal=True), eager(*other, is_causal=True))
    assert all(g is not None for g in graphed.graphs.graphs.values()), "capture fell back"


def test_sinks_excluded_by_key_bias_keep_lsh_tiles_contiguous(make_qkv, monkeypatch):
    """hyperattention-sinks' block step: the sinks pass and the sortLSH pass (sinks excluded
    as a -inf bias on their keys, not a pair rule) both run as contiguous plans; only the
    sampler, whose exclusion is per pair, takes the tile kernel."""
    recipe = ac.load_recipe("hyperattention-sinks").with_knobs(
        {"diag.block_size": 64, "residual.sample_size": 64, "out.min_seq_len": 64}
    )
    chosen = []
    real = dispatch.choose
    monkeypatch.setattr(
        dispatch,
        "choose",
        lambda op, *a, **kw: chosen.append((op, real(op, *a, **kw).name)) or real(op, *a, **kw),
    )
    q, k, v = make_qkv(b=1, hq=2, hkv=1, lq=128, lk=128, d=16)
    got = ac.compile(recipe, backend="triton")(q, k, v, is_causal=True, return_lse=True)
    monkeypatch.setattr(dispatch, "choose", real)
    want = ac.compile(recipe, backend="torch")(q, k, v, is_causal=True, return_lse=True)
    blocks = [name for op, name in chosen if op == "block"]
    assert blocks.count("triton:contiguous-tiles") == 2 and blocks[-1] == "triton:tile-attention"
    assert ac.relative_error(got[0], want[0]) < 1e-5
    assert torch.allclose(got[1], want[1], atol=1e-5)


def test_a_cached_static_plan_serves_calls_of_more_rows(make_qkv):
    """power's static table, cached with the plan of a 1-row call, in a 3-row call: one table
    for every row (the packed rules once read rows past the first call's)."""
    from attncompose.primitives import plan

    recipe = _small_recipe("power")
    attn = ac.compile(recipe, backend="triton")
    for batch in (1, 3):
        q, k, v = make_qkv(b=batch, hq=2, hkv=2, lq=64, lk=64, d=16, seed=batch)
        got = attn(q, k, v, is_causal=True)
        plan._STATIC.clear()
        want = ac.compile(recipe, backend="torch")(q, k, v, is_causal=True)
        assert ac.relative_error(got, want) < 1e-5
