"""Block plans: the algebra against the dense oracle, the PyTorch walks and the FlexAttention
lowering against the reference, one kernel pass per block step, static plans built once."""

from __future__ import annotations

import warnings

import pytest
import torch
from oracle import dense_mask, make_problem, masked_attention

import attncompose as ac
from attncompose.primitives import dispatch
from attncompose.primitives.base import UnionCoverage
from attncompose.primitives.block import plan_flex
from attncompose.primitives.block.fused import plan_attention as fused_plan_attention
from attncompose.primitives.block.plan_torch import plan_attention as naive_plan_attention
from attncompose.primitives.plan import FULL, NONE, PARTIAL, BlockPlan, plan_block_size
from attncompose.primitives.power import Power
from attncompose.primitives.power.schema import PowerStep
from attncompose.primitives.sink import SinkCoverage
from attncompose.primitives.topk import Topk
from attncompose.primitives.topk.schema import TopkStep
from attncompose.primitives.window import WindowCoverage
from attncompose.runtime.compiler import Pipeline

# problems: (rows, Lq, Lk, causal); causal ones bottom-right aligned
PROBLEMS = {
    "T63": (2, 63, 63, False),
    "T130-causal": (2, 130, 130, True),
    "decode10x300": (2, 10, 300, True),
    "decode1x129": (2, 1, 129, True),
    "rect200x77": (2, 200, 77, False),
}


def _topk(problem, **knobs):
    return Topk(TopkStep(**knobs))(problem)


# selections and exclusions of one block step: (select, exclude, block size)
CASES = {
    "sink": lambda p: ([SinkCoverage(5)], [], 32),
    "window": lambda p: ([WindowCoverage(37)], [], 16),
    "sink+window": lambda p: ([SinkCoverage(4), WindowCoverage(20)], [], 16),
    "topk": lambda p: ([_topk(p, block_size=16, k=3)], [], 16),
    "topp+sink+window": lambda p: (
        [SinkCoverage(3), WindowCoverage(17), _topk(p, block_size=32, p=0.8, max_k=4)],
        [],
        16,
    ),
    "power+sink": lambda p: (
        [Power(PowerStep(block_size=32, max_distance=4))(p), SinkCoverage(3)],
        [],
        32,
    ),
    "topk-minus-window": lambda p: ([_topk(p, block_size=16, k=4)], [WindowCoverage(9)], 16),
    "window-minus-sink": lambda p: ([WindowCoverage(50)], [SinkCoverage(7)], 64),
    "odd-table-7": lambda p: ([_topk(p, block_size=7, k=2)], [SinkCoverage(2)], 128),
}


def _plan(case: str, problem):
    """The plan a block step would build: its block size, unless tables ask for theirs."""
    select, exclude, size = CASES[case](problem)
    size = plan_block_size(problem, [*select, *exclude], size)
    return BlockPlan.build(problem, select, exclude, size, size), select, exclude


@pytest.fixture(params=sorted(PROBLEMS), ids=sorted(PROBLEMS))
def problem(request):
    n, lq, lk, causal = PROBLEMS[request.param]
    return make_problem(n, lq, lk, causal=causal, seed=len(request.param))


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_view_equals_the_pair_semantics(problem, case):
    plan, select, exclude = _plan(case, problem)
    want = dense_mask(problem, UnionCoverage(select), tuple(exclude))  # [N, Lq, Lk]
    assert torch.equal(plan.to_dense(problem).expand_as(want), want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_blocks_hold_every_pair_and_skipped_blocks_none(problem, case):
    plan, select, exclude = _plan(case, problem)
    dense = dense_mask(problem, UnionCoverage(select), tuple(exclude))
    g = plan.grid
    state = plan.state.expand(dense.shape[0], -1, -1)
    for i in range(g.nqb):
        for j in range(g.nkb):
            block = dense[
                :, i * g.block_q : (i + 1) * g.block_q, j * g.block_k : (j + 1) * g.block_k
            ]
            full = state[:, i, j] == FULL
            assert bool(block[full].all()), (i, j)
            assert not bool(block[state[:, i, j] == NONE].any()), (i, j)


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_counts_its_products(problem, case):
    plan, select, exclude = _plan(case, problem)
    dense = dense_mask(problem, UnionCoverage(select), tuple(exclude))
    assert plan.products(problem) == int(dense.sum())


def test_union_keeps_full_and_exclusion_subtracts():
    """States of a union are the strongest part's; an exclusion drops what it holds whole and
    makes what it holds in part partial."""
    p = make_problem(1, 64, 64, causal=False)
    sink, window = SinkCoverage(16), WindowCoverage(40)
    both = BlockPlan.build(p, [sink, window], [], 16, 16).state[0]
    alone = [BlockPlan.build(p, [c], [], 16, 16).state[0] for c in (sink, window)]
    assert torch.equal(both, torch.maximum(*alone))
    minus = BlockPlan.build(p, [window], [sink], 16, 16).state[0]
    assert torch.equal(minus[:, 0], torch.zeros(4, dtype=torch.uint8))  # sink block 0: whole
    cut = BlockPlan.build(p, [window], [SinkCoverage(5)], 16, 16).state[0]
    assert set(cut[:, 0].tolist()) <= {NONE, PARTIAL}  # sink cuts block 0: partial at most


def test_lists_are_the_states_in_block_mask_layout():
    p = make_problem(3, 100, 100, causal=True, seed=2)
    plan, _, _ = _plan("topp+sink+window", p)
    lists = plan.lists()
    for kind, num, idx in (
        (FULL, lists.full_num, lists.full_idx),
        (PARTIAL, lists.part_num, lists.part_idx),
    ):
        rebuilt = torch.zeros_like(plan.state)
        for r in range(plan.rows):
            for i in range(plan.grid.nqb):
                chosen = idx[r, i, : num[r, i]].long()
                assert torch.equal(chosen, chosen.sort().values)  # ascending
                rebuilt[r, i, chosen] = kind
        assert torch.equal(rebuilt == kind, plan.state == kind)


def test_building_a_data_dependent_plan_never_waits_for_the_device(monkeypatch):
    """Top-k tables become plans and index lists with tensor ops only: no .item(), bool(),
    int() or .tolist() (each would be a host synchronisation on a GPU)."""
    p = make_problem(2, 130, 130, causal=True, seed=3)
    select = CASES["topp+sink+window"](p)[0]

    def sync(*args, **kwargs):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    plan = BlockPlan.build(p, select, [], 16, 16)
    plan.kernel_lists()


def test_to_string_draws_full_partial_and_skipped_blocks():
    p = make_problem(1, 96, 96, causal=True)
    text = BlockPlan.build(p, [SinkCoverage(4), WindowCoverage(40)], [], 16, 16).to_string()
    lines = text.splitlines()
    assert "96x96 in 16x16 blocks" in lines[0] and len(lines) == 1 + 6
    assert lines[1] == "░·····"  # query block 0: the sink and the diagonal, both cut
    assert "█" in lines[-1] and "·" in lines[-1]


# ---------------------------------------------------------------- the PyTorch walks

WALKS = {"reference": naive_plan_attention, "fused-cpu": fused_plan_attention}


@pytest.mark.parametrize("walk", sorted(WALKS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_walks_match_the_dense_oracle(problem, case, walk):
    plan = _plan(case, problem)[0]
    want = masked_attention(problem, plan.to_dense(problem).expand(problem.q.shape[0], -1, -1))
    _assert_partial_equal(WALKS[walk](problem, plan), want)


@pytest.mark.parametrize("walk", sorted(WALKS))
def test_walks_add_the_key_bias(walk):
    p = make_problem(2, 90, 90, causal=True, seed=5)
    plan, _, _ = _plan("topp+sink+window", p)
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(2, 90, generator=g).masked_fill(
        torch.rand(2, 90, generator=g) < 0.2, -torch.inf
    )
    biased = plan.with_key_bias(bias)
    dense = plan.to_dense(p).expand(2, -1, -1)
    want = masked_attention(
        p, dense & bias.isfinite()[:, None, :], bias[:, None, :].expand(2, 90, 90)
    )
    _assert_partial_equal(WALKS[walk](p, biased), want)


def test_many_groups_and_chunks_read_their_own_blocks(monkeypatch):
    """Small score budget: many chunks through the walk's reused buffers, views and gathers."""
    from attncompose.primitives.block import plan_torch

    monkeypatch.setattr(plan_torch, "SCORE_BUDGET", 3 * 16 * 48)
    p = make_problem(3, 150, 150, causal=True, seed=6)
    plan, _, _ = _plan("topp+sink+window", p)
    want = masked_attention(p, plan.to_dense(p).expand(3, -1, -1))
    _assert_partial_equal(fused_plan_attention(p, plan), want)


def _assert_partial_equal(got, want, tol: float = 1e-5) -> None:
    finite = want.lse.isfinite()
    assert torch.equal(got.lse.isinf(), ~finite)
    assert torch.allclose(got.lse[finite], want.lse[finite].float(), atol=tol)
    assert torch.allclose(got.out.float(), want.out.float(), atol=tol)


# ---------------------------------------------------------------- the block step


RECIPES = ["streaming", "block-topk", "topp", "power"]


def _small(name: str):
    knobs = {"streaming": {"local.width": 40}, "power": {"pattern.block_size": 32}}
    knobs |= {r: {"local.width": 24, "heavy.block_size": 16} for r in ("block-topk", "topp")}
    return ac.load_recipe(name).with_knobs(knobs[name])


@pytest.mark.parametrize("name", RECIPES)
def test_a_block_step_is_one_kernel_pass(name, monkeypatch):
    """Sinks + window + top-k (or power) run as ONE plan pass: no tile kernel, no merge."""
    calls = []
    real = dispatch.call
    monkeypatch.setattr(
        dispatch, "call", lambda op, *a, **kw: calls.append(op) or real(op, *a, **kw)
    )
    q, k, v = (torch.randn(1, 2, 150, 16) for _ in range(3))
    ac.compile(_small(name), backend="torch")(q, k, v, is_causal=True)
    assert calls.count("plan") == 1 and "block" not in calls


def test_recipes_count_the_plans_products():
    """frac comes from the plan: sinks + a window of 40 on 150 causal tokens (2 heads)."""
    from attncompose.evaluation import products_fraction

    attn = ac.compile(_small("streaming"), backend="torch")
    q, k, v = (torch.randn(1, 2, 150, 16) for _ in range(3))
    window = sum(min(i + 1, 40) for i in range(150))
    sinks = sum(min(4, i + 1 - 40) for i in range(150) if i + 1 > 40)  # not in the window
    assert products_fraction(attn, q, k, v, True) == (window + sinks) / (150 * 151 / 2)


def test_static_plans_are_built_once_per_length(monkeypatch):
    built = []
    real = BlockPlan.build
    monkeypatch.setattr(
        BlockPlan, "build", lambda *a, **kw: built.append(a[0].lq) or real(*a, **kw)
    )
    attn = ac.compile(_small("streaming"), backend="torch")
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


# ---------------------------------------------------------------- FlexAttention


FLEX_CASES = ["sink+window", "topp+sink+window", "topk-minus-window"]


@pytest.mark.parametrize("case", FLEX_CASES)
@pytest.mark.parametrize("shape", ["T130-causal", "decode10x300", "rect200x77"])
def test_flex_lowering_matches_the_reference(case, shape):
    """FlexAttention's eager path (CPU) on the plan's BlockMask, mask_mod and score_mod."""
    n, lq, lk, causal = PROBLEMS[shape]
    p = make_problem(n, lq, lk, causal=causal, seed=7)
    plan, _, _ = _plan(case, p)
    bias = torch.randn(1, lk).masked_fill(torch.rand(1, lk) < 0.1, -torch.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        for each in (plan, plan.with_key_bias(bias)):
            _assert_partial_equal(plan_flex.plan_attention(p, each), naive_plan_attention(p, each))


def test_flex_block_mask_lists_the_plans_blocks():
    p = make_problem(2, 130, 130, causal=True, seed=8)
    plan, _, _ = _plan("topp+sink+window", p)
    mask = plan_flex.block_mask(p, plan)
    lists = plan.kernel_lists()
    assert torch.equal(mask.full_kv_num_blocks[0], lists.full_num)
    assert torch.equal(mask.kv_num_blocks[0], lists.part_num)
    assert mask.BLOCK_SIZE == (plan.grid.block_q, plan.grid.block_k) == (32, 32)


def test_flex_compiles_once_for_every_length(monkeypatch):
    """Compiled (dynamo with its eager backend, to stay fast on CPU): new lengths reuse the
    compiled graph instead of recompiling, so the recompile limit is never reached."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    plan_flex._compiled.cache_clear()
    monkeypatch.setattr(plan_flex, "COMPILE_BACKEND", "eager")
    attn = ac.compile(_small("streaming"), backend="flex")
    graphs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for length in (96, 130, 200, 257, 300, 411):
            q, k, v = (torch.randn(1, 2, length, 16) for _ in range(3))
            want = ac.compile(_small("streaming"), backend="torch")(q, k, v, is_causal=True)
            assert ac.relative_error(attn(q, k, v, is_causal=True), want) < 1e-5
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[1] <= 2  # one dynamic graph after the first specialisation


def test_flex_says_so_instead_of_falling_back_to_eager(monkeypatch):
    """Past dynamo's recompile limit FlexAttention would silently run its unfused eager path:
    here it is an error naming the cause."""
    torch._dynamo.reset()
    plan_flex._compiled.cache_clear()
    monkeypatch.setattr(plan_flex, "COMPILE_BACKEND", "eager")
    q, k, v = (torch.randn(1, 2, 96, 16) for _ in range(3))
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=1):
        warnings.simplefilter("ignore")
        ac.compile(_small("streaming"), backend="flex")(q, k, v, is_causal=True)
        with pytest.raises(plan_flex.FlexFallbackError, match="recompile limit"):
            for name in ("topp", "power", "block-topk"):  # other rules: other graphs
                ac.compile(_small(name), backend="flex")(q, k, v, is_causal=True)
    torch._dynamo.reset()


def test_dispatch_explains_its_choice():
    p = make_problem(2, 64, 64, causal=True)
    plan = BlockPlan.build(p, [SinkCoverage(4), WindowCoverage(20)], [], 16, 16)
    lines = dispatch.explain("plan", "auto", p, plan=plan)
    assert lines[-1] == "torch:block-sparse-cpu: chosen"
    assert lines[0].startswith("triton:block-sparse: ") and "cuda" in lines[0].lower()
    odd = BlockPlan.build(p, [SinkCoverage(2)], [], 7, 7)
    with pytest.raises(dispatch.BackendNotSupportedError, match="7 is not a power of two"):
        dispatch.choose("plan", "triton", p, plan=odd)


def test_flex_runs_sorted_tiles_as_one_contiguous_plan():
    """backend="flex": sortLSH buckets with their sampled residual through FlexAttention's
    eager path equal the torch steps one by one."""
    recipe = ac.load_recipe("hyperattention").with_knobs(
        {"diag.block_size": 64, "residual.sample_size": 64}
    )
    q, k, v = (
        torch.randn(1, 2, 128, 16, generator=torch.Generator().manual_seed(9)) for _ in range(3)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ac.compile(recipe, backend="flex")(q, k, v, return_lse=True)
    want = ac.compile(recipe, backend="torch", fuse=False)(q, k, v, return_lse=True)
    assert "flex:contiguous-tiles" in Pipeline(recipe, backend="flex").kernels()["merged"]
    assert ac.relative_error(got[0], want[0]) < 1e-5
    assert torch.allclose(got[1], want[1], atol=1e-5)


@pytest.mark.parametrize("name", ["streaming", "topp", "hyperattention", "power"])
def test_buffers_reused_across_calls_change_no_result(name):
    """One module's workspace serves calls of several shapes in turn: results equal a module
    that allocates afresh, and a repeated shape takes no new memory."""
    recipe = (
        _small(name)
        if name != "hyperattention"
        else ac.load_recipe(name).with_knobs(
            {"diag.block_size": 64, "residual.sample_size": 32, "out.min_seq_len": 64}
        )
    )
    reuse = ac.compile(recipe, backend="torch")
    fresh = ac.compile(recipe, backend="torch", reuse_buffers=False)
    g = torch.Generator().manual_seed(0)
    sizes = []
    for length, causal in ((256, True), (150, False), (256, True)):
        q, k, v = (torch.randn(1, 2, length, 16, generator=g) for _ in range(3))
        assert torch.equal(reuse(q, k, v, is_causal=causal), fresh(q, k, v, is_causal=causal))
        sizes.append(reuse.workspace.nbytes())
    assert sizes[0] > 0 and sizes[2] == sizes[1]


@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_a_cached_static_plan_serves_calls_of_more_rows(backend):
    """A static plan (power's table) built for one batch size serves a later call with more
    rows: its table is one for every row, never the first call's rows."""
    recipe = _small("power")
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


@pytest.mark.parametrize("name", ["streaming", "topp", "hyperattention"])
def test_a_module_serves_calls_in_and_out_of_inference_mode(name):
    """Buffers kept from a call under torch.inference_mode are not written outside it (such
    tensors cannot be): eval ran a model under inference_mode, then the recipe again."""
    attn = ac.compile(name, backend="torch")
    q, k, v = (
        torch.randn(1, 2, 256, 16, generator=torch.Generator().manual_seed(1)) for _ in range(3)
    )
    with torch.inference_mode():
        inside = attn(q, k, v, is_causal=True)
    with torch.no_grad():
        outside = attn(q, k, v, is_causal=True)
    with torch.inference_mode():
        inside_again = attn(q, k, v, is_causal=True)
    assert torch.equal(inside, outside) and torch.equal(outside, inside_again)


def test_plan_counts_no_products_for_keys_weighted_out():
    """Keys with a -inf weight take no part: the plan's count drops them, full and partial
    blocks alike, whatever the rows of the weights."""
    p = make_problem(3, 100, 100, causal=True, seed=11)
    plan = _plan("sink+window", p)[0]
    bias = torch.zeros(3, 100).masked_fill(torch.rand(3, 100) < 0.3, -torch.inf)
    dense = plan.to_dense(p).expand(3, -1, -1) & bias.isfinite()[:, None, :]
    assert plan.with_key_bias(bias).products(p) == int(dense.sum())
    one = bias[:1]
    dense_one = plan.to_dense(p).expand(3, -1, -1) & one.isfinite()[:, None, :]
    assert plan.with_key_bias(one).products(p) == int(dense_one.sum())
