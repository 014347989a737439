"""``causal_split``: the recursive causal splitter, exact around an exact body, and its
unrolled form against the recursion."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from contract import TIGHT, ReducesToExact

import attncompose as ac
from attncompose.primitives import dispatch


class TestCausalSplitAroundExact(ReducesToExact):
    steps = {
        "body": {"op": "exact"},
        "out": {"op": "causal_split", "body": "body", "min_seq_len": 5},
    }


UNROLLED = {
    # packable body (every level in one packed call; stacked per level where the leaves are
    # not a multiple of its tiles) and a body with sinks (one call per rectangle)
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
    """All leaves in one exact call and the rectangles of all levels packed into one body
    call (level by level, one call per rectangle, where the body has a step that is not
    packable) give what the plain recursion gives: same pairs, same seeds where nothing is
    packed, lse merges in another order; fewer calls."""
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
        packed = name == "lsh-only" and split.leaf_length(lq, 128) % 64 == 0  # 768: 96
        assert (flat_calls["block"] == 1) == packed
        assert flat_calls["block"] < calls["block"] or not packed


def counted_calls(attn, q, k, v, monkeypatch) -> dict[str, int]:
    """Kernel-level calls (by op) of one causal call of ``attn``."""
    calls: dict[str, int] = {}
    choose = dispatch.choose

    def counting_choose(op, backend, problem, **inputs):
        calls[op] = calls.get(op, 0) + 1
        return choose(op, backend, problem, **inputs)

    monkeypatch.setattr(dispatch, "choose", counting_choose)
    attn(q, k, v, is_causal=True)
    monkeypatch.setattr(dispatch, "choose", choose)
    return calls


PACKED = {"out.min_seq_len": 128, "diag.block_size": 64, "residual.sample_size": 64}


@pytest.mark.parametrize("name", ["hyperattention", "lsh-only", "sampling-only"])
def test_every_level_goes_through_one_body_pass(make_qkv, name, monkeypatch):
    """The rectangles of every level in ONE body call (one hash-and-sort kernel for q and k,
    one tile pass, one exact call for the leaves), as many calls for 3 levels as for 5; the
    result as close to exact attention as the recursion's (other draws, same estimator)."""
    from attncompose.primitives import causal_split as split

    recipe = ac.load_recipe(name)
    recipe = recipe.with_knobs({k: v for k, v in PACKED.items() if k.split(".")[0] in recipe.steps})
    attn = ac.compile(recipe, backend="torch")
    counts = []
    for n in (1024, 4096):  # leaves of 128: 3 and 5 levels
        q, k, v = make_qkv(b=1, hq=2, hkv=2, lq=n, lk=n, d=16)
        counts.append(counted_calls(attn, q, k, v, monkeypatch))
    assert counts[0] == counts[1]
    assert counts[0]["block"] == 1 and counts[0]["exact"] == 1
    assert counts[0].get("lsh_sort", 0) == ("hash" in recipe.steps)  # chosen once, sorts q and k
    exact = ac.compile(ac.load_recipe("exact"), backend="torch")(q, k, v, is_causal=True)
    packed = ac.relative_error(attn(q, k, v, is_causal=True), exact)
    halve = split._halve
    recursion = lambda p, body, m, exact: exact(p) if p.lq <= m else halve(p, body, m, exact)
    monkeypatch.setattr(split, "_square", recursion)
    recursive = ac.relative_error(attn(q, k, v, is_causal=True), exact)
    assert packed < 1.1 * recursive + 1e-6
