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
