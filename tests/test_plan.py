"""Block plans: the algebra against the dense oracle (states, lists, products, views), the
choice of the kernel that runs a plan, and an attention module's buffers across calls. The
kernels that walk plans are the block op's (tests/primitives/test_block.py)."""

from __future__ import annotations

import pytest
import torch
from oracle import dense_mask, make_problem
from plan_cases import CASES, PROBLEMS, plan_of, problem_named, small_recipe

import attncompose as ac
from attncompose.primitives import dispatch
from attncompose.primitives.base import UnionCoverage
from attncompose.primitives.plan import FULL, NONE, PARTIAL, BlockPlan
from attncompose.primitives.sink import SinkCoverage
from attncompose.primitives.window import WindowCoverage

# problems: (rows, Lq, Lk, causal); causal ones bottom-right aligned


@pytest.fixture(params=sorted(PROBLEMS), ids=sorted(PROBLEMS))
def problem(request):
    return problem_named(request.param)


# selections and exclusions of one block step: (select, exclude, block size)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_view_equals_the_pair_semantics(problem, case):
    plan, select, exclude = plan_of(case, problem)
    want = dense_mask(problem, UnionCoverage(select), tuple(exclude))  # [N, Lq, Lk]
    assert torch.equal(plan.to_dense(problem).expand_as(want), want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_blocks_hold_every_pair_and_skipped_blocks_none(problem, case):
    plan, select, exclude = plan_of(case, problem)
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
    plan, select, exclude = plan_of(case, problem)
    dense = dense_mask(problem, UnionCoverage(select), tuple(exclude))
    assert plan.products(problem) == int(dense.sum())


DATA_DEPENDENT = {"topk", "topp+sink+window", "topk-minus-window", "odd-table-7"}


@pytest.mark.parametrize("case", sorted(DATA_DEPENDENT))
def test_rule_tiles_give_the_pairs_of_every_partial_block(problem, case):
    """A data-dependent plan's partial blocks read their pair rule from tiles built once per
    static pattern: every partial block of every row equals the dense oracle there."""
    plan, select, exclude = plan_of(case, problem)
    dense = dense_mask(problem, UnionCoverage(select), tuple(exclude))  # [N, Lq, Lk]
    tiles, whole = plan.rule_tiles(problem)
    g = plan.grid
    state = plan.kernel_states().expand(dense.shape[0], -1, -1)
    lists = plan.lists(trim=True)
    for r in range(dense.shape[0]):
        part = torch.nonzero(state[r] == PARTIAL)  # [P, 2] (query block, key block)
        if not len(part):
            continue
        qb, kb = part.unbind(-1)
        mask = tiles.mask(
            qb,
            kb.view(1, -1, 1),
            torch.ones(1, len(qb), 1, dtype=torch.bool),
            whole[min(r, whole.shape[0] - 1)][None],
        )
        assert mask is not None, (case, lists.part_num)
        padded = torch.nn.functional.pad(
            dense[r], (0, g.nkb * g.block_k - g.lk, 0, g.nqb * g.block_q - g.lq)
        ).view(g.nqb, g.block_q, g.nkb, g.block_k)
        assert torch.equal(mask[0], padded[qb, :, kb]), (r, case)


@pytest.mark.parametrize("limit", [None, 0])
def test_rule_tiles_are_built_once_per_static_pattern_unless_too_large(monkeypatch, limit):
    from attncompose.primitives import plan as plan_module

    built = []
    real = plan_module._rule_tiles
    monkeypatch.setattr(plan_module, "_rule_tiles", lambda *a: built.append(1) or real(*a))
    plan_module._STATIC.clear()
    if limit is not None:
        monkeypatch.setattr(plan_module, "RULE_TILES_KEPT", limit)
    for seed in (1, 2):  # two calls: other data, the same static pattern
        problem = make_problem(2, 130, 130, causal=True, seed=seed)
        assert plan_of("topp+sink+window", problem)[0].rule_tiles(problem) is not None
    assert len(built) == (1 if limit is None else 2)


def test_rule_tiles_serve_data_dependent_plans_only():
    problem = problem_named("T130-causal")
    assert plan_of("sink+window", problem)[0].rule_tiles(problem) is None  # static: memo masks
    assert plan_of("topp+sink+window", problem)[0].rule_tiles(problem) is not None


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
    plan, _, _ = plan_of("topp+sink+window", p)
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


# ---------------------------------------------------------------- the block step


# ---------------------------------------------------------------- FlexAttention


def test_dispatch_explains_its_choice():
    p = make_problem(2, 64, 64, causal=True)
    plan = BlockPlan.build(p, [SinkCoverage(4), WindowCoverage(20)], [], 16, 16)
    lines = dispatch.explain("plan", "auto", p, plan=plan)
    assert lines[-1] == "torch:block-sparse-cpu: chosen"
    assert lines[0].startswith("triton:block-sparse: ") and "cuda" in lines[0].lower()
    odd = BlockPlan.build(p, [SinkCoverage(2)], [], 7, 7)
    with pytest.raises(dispatch.BackendNotSupportedError, match="7 is not a power of two"):
        dispatch.choose("plan", "triton", p, plan=odd)


@pytest.mark.parametrize("name", ["streaming", "topp", "hyperattention", "power"])
def test_buffers_reused_across_calls_change_no_result(name):
    """One module's workspace serves calls of several shapes in turn: results equal a module
    that allocates afresh, and a repeated shape takes no new memory."""
    recipe = (
        small_recipe(name)
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
    plan = plan_of("sink+window", p)[0]
    bias = torch.zeros(3, 100).masked_fill(torch.rand(3, 100) < 0.3, -torch.inf)
    dense = plan.to_dense(p).expand(3, -1, -1) & bias.isfinite()[:, None, :]
    assert plan.with_key_bias(bias).products(p) == int(dense.sum())
    one = bias[:1]
    dense_one = plan.to_dense(p).expand(3, -1, -1) & one.isfinite()[:, None, :]
    assert plan.with_key_bias(one).products(p) == int(dense_one.sum())
