"""``merge``: the lse combination of partials over disjoint keys."""

from __future__ import annotations

import torch
from oracle import make_problem, masked_attention

from attncompose.primitives.base import Partial
from attncompose.primitives.exact.naive import exact_attention
from attncompose.primitives.merge.naive import merge_into, merge_partials


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
