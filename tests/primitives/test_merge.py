"""``merge``: the lse combination of partials over disjoint keys."""

from __future__ import annotations

import pytest
import torch
from on_device import DEVICE, triton_module
from oracle import make_problem, masked_attention

from attncompose.primitives.base import Partial
from attncompose.primitives.exact.naive import exact_attention
from attncompose.primitives.merge import naive as merge_naive
from attncompose.primitives.merge.naive import merge_into, merge_partials

merge_triton = triton_module("merge.triton")  # None where Triton cannot run


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


MERGE_ROWS = {
    "torch": merge_naive.merge_rows_into,
    "triton": pytest.param(
        merge_triton and merge_triton.merge_rows_into,
        marks=[pytest.mark.triton, pytest.mark.skipif(merge_triton is None, reason="no triton")],
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("merge_rows", list(MERGE_ROWS.values()), ids=list(MERGE_ROWS))
def test_merge_rows_into_equals_merging_one_part_at_a_time(merge_rows, dtype):
    """The causal splitter's packed levels: several rows of the packed result land on one
    row of the target (one per level), in place, in the target's dtype."""
    device = DEVICE if merge_rows is not merge_naive.merge_rows_into else torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    target = Partial(torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, generator=g))
    part = Partial(torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, generator=g))
    rows = torch.tensor([1, 3, 5, 7, 3, 7])  # rows 3 and 7 get two each, 0 2 4 6 none
    sources = torch.tensor([[-1, 0, -1, 1, -1, 2, -1, 3], [-1, -1, -1, 4, -1, -1, -1, 5]])
    target.lse[0, 1] = part.lse[0, 0] = float("-inf")  # an empty row stays empty
    target.out[0, 1] = part.out[0, 0] = 0.0
    target.lse[1, 3] = float("-inf")  # empty before, filled by the part
    target.out[1, 3] = 0.0
    target.out, part.out = target.out.to(dtype), part.out.to(dtype)
    want = Partial(target.out.float(), target.lse.clone())
    for j, row in enumerate(rows.tolist()):
        one = merge_partials([Partial(want.out[:, row], want.lse[:, row]),
                              Partial(part.out[:, j].float(), part.lse[:, j])])  # fmt: skip
        want.out[:, row], want.lse[:, row] = one.out, one.lse
    on = lambda p: Partial(p.out.to(device), p.lse.to(device))
    target, part = on(target), on(part)
    problem = make_problem(2, 8, 8, d=16)
    merge_rows(problem, target, part, rows.to(device), sources.to(device, torch.int32))
    assert target.out.dtype == dtype
    out, lse = target.out.float().cpu(), target.lse.cpu()
    assert torch.isneginf(lse[0, 1]) and (out[0, 1] == 0).all()
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert torch.allclose(out, want.out, atol=tol)
    finite = torch.isfinite(want.lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite], want.lse[finite], atol=1e-6)


MERGE = {
    "torch": merge_naive.merge,
    "triton": pytest.param(
        merge_triton and merge_triton.merge_partials,
        marks=[pytest.mark.triton, pytest.mark.skipif(merge_triton is None, reason="no triton")],
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("merge", list(MERGE.values()), ids=list(MERGE))
def test_the_merge_op_equals_the_reference_fold(merge, parts, dtype):
    """The ``merge`` op (block passes, sampler residuals, the causal splitter's rectangle and
    square) against :func:`merge_partials`: float32 results from parts in a kernel's dtype,
    read through strided views; rows empty on one side, on every side, and -inf lse beside
    finite outputs (a part that saw no key)."""
    device = DEVICE if merge is not merge_naive.merge else torch.device("cpu")
    g = torch.Generator().manual_seed(parts)
    made = []
    for _ in range(parts):  # out [2, 9, 24] as a view of every other row of a larger buffer
        out = torch.randn(2, 18, 24, generator=g)[:, ::2]
        lse = torch.randn(2, 9, 3, generator=g)[..., 1] * 4
        made.append(Partial(out, lse))
    made[0].lse[0, 2] = float("-inf")  # empty on one side
    made[0].out[0, 2] = 0.0
    for part in made:  # empty on every side
        part.lse[1, 5] = float("-inf")
        part.out[1, 5] = 0.0
    made = [Partial(p.out.to(dtype), p.lse) for p in made]
    want = merge_partials([Partial(p.out.float(), p.lse) for p in made])
    given = [Partial(p.out.to(device), p.lse.to(device)) for p in made]
    kept = [(p.out.clone(), p.lse.clone()) for p in given]
    got = merge(make_problem(2, 9, 9, d=16), given)
    out, lse = got.out.cpu(), got.lse.cpu()
    assert out.dtype == lse.dtype == torch.float32 and out.shape == (2, 9, 24)
    assert torch.isneginf(lse[1, 5]) and (out[1, 5] == 0).all()
    finite = torch.isfinite(want.lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (out - want.out).abs().max() <= 1e-6 * want.out.abs().max()
    assert torch.allclose(lse[finite], want.lse[finite], atol=1e-6)
    assert all(  # the parts are read, never written
        torch.equal(p.out, out) and torch.equal(p.lse, lse)
        for p, (out, lse) in zip(given, kept, strict=True)
    )


@pytest.mark.parametrize("target", ["first", "other"])
@pytest.mark.parametrize("merge", list(MERGE.values()), ids=list(MERGE))
def test_the_merge_op_writes_into_a_target_with_two_row_dims(merge, target):
    """``merge(problem, parts, into=...)`` as the causal splitter's level loop calls it: the
    rows below each rectangle, [rows, rectangles, size, Dv] views of the square's result,
    take the level's rectangles (rectangle-major rows, transposed) in place; or a target
    apart from the parts, in half precision, takes the merge in its dtype."""
    device = DEVICE if merge is not merge_naive.merge else torch.device("cpu")
    g = torch.Generator().manual_seed(7)
    rows, rects, size, dv = 3, 4, 5, 24
    square = Partial(torch.randn(rows, rects * 2 * size, dv, generator=g),
                     torch.randn(rows, rects * 2 * size, generator=g) * 4)  # fmt: skip
    square.lse[1, 3 * 2 * size + size + 1] = float("-inf")  # a row below that saw no key yet
    square.out[1, 3 * 2 * size + size + 1] = 0.0
    level = Partial(torch.randn(rects * rows, size, dv, generator=g),
                    torch.randn(rects * rows, size, generator=g) * 4)  # fmt: skip
    below = lambda p: Partial(p.out.view(rows, rects, 2 * size, dv)[:, :, size:],
                              p.lse.view(rows, rects, 2 * size)[:, :, size:])  # fmt: skip
    stacked = lambda p: Partial(p.out.view(rects, rows, size, dv).transpose(0, 1),
                                p.lse.view(rects, rows, size).transpose(0, 1))  # fmt: skip
    want = merge_partials([below(square), stacked(level)])
    on = lambda p: Partial(p.out.to(device), p.lse.to(device))
    square_on, level_on = on(square), on(level)
    parts = [below(square_on), stacked(level_on)]
    if target == "first":
        into = parts[0]
        got = merge(make_problem(2, 9, 9, d=16), parts, into=into)
        assert got is into
        # the rows above each rectangle are left as they were
        above = square_on.out.view(rows, rects, 2 * size, dv)[:, :, :size].cpu()
        assert torch.equal(above, square.out.view(rows, rects, 2 * size, dv)[:, :, :size])
    else:
        into = Partial(torch.empty(rows, rects, size, dv, dtype=torch.float16, device=device),
                       torch.empty(rows, rects, size, device=device))  # fmt: skip
        got = merge(make_problem(2, 9, 9, d=16), parts, into=into)
        assert got.out.dtype == torch.float16
    out, lse = got.out.float().cpu(), got.lse.cpu()
    tol = 1e-6 if target == "first" else 2e-3
    assert (out - want.out).abs().max() <= tol * want.out.abs().max()
    assert torch.allclose(lse, want.lse, atol=1e-6)
