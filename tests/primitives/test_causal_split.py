"""``causal_split``: the recursive causal splitter, exact around an exact body, and its
unrolled form against the recursion."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from contract import TIGHT, ReducesToExact, assert_reads_no_later_key, recipe

import attncompose as ac
from attncompose.eval.data import load_qkv
from attncompose.primitives import dispatch
from attncompose.runtime.compiler import Pipeline


class TestCausalSplitAroundExact(ReducesToExact):
    steps = {
        "body": {"op": "exact"},
        "out": {"op": "causal_split", "body": "body", "min_seq_len": 5},
    }


SMALL = {"diag.block_size": 64, "out.min_seq_len": 128}
UNROLLED = {  # recipe, knobs (no random draws: the same pairs whatever the path), how it runs
    # packable bodies (every level in one packed call; level by level where the leaves are
    # not a multiple of the body's tiles, 768 = 96 * 2**3)
    "lsh-only": ("lsh-only", SMALL, "packed"),
    "sinks+lsh": (
        "hyperattention-sinks",
        {**SMALL, "residual.sample_size": 0, "sinks.count": 4},
        "packed",
    ),
    "window+lsh": (
        {
            "name": "window-lsh",
            "steps": {
                "window": {"op": "window", "width": 40},
                "hash": {"op": "lsh", "num_projections": 3},
                "diag": {"op": "block", "select": ["window", "hash"], "block_size": 64},
                "out": {"op": "causal_split", "body": "diag", "min_seq_len": 128},
            },
        },
        {},
        "packed",
    ),
    # offset-free, not packable (top-k scores every key of a row): stacked per level
    "topk": ("hyperattention-topk", {"residual.sample_size": 0, "out.min_seq_len": 128}, "stacked"),
    # a block plan (sinks alone) is neither: one call per rectangle
    "sinks-plan": (
        {
            "name": "sinks-plan",
            "steps": {
                "sinks": {"op": "sink", "count": 4},
                "diag": {"op": "block", "select": ["sinks"], "block_size": 64},
                "out": {"op": "causal_split", "body": "diag", "min_seq_len": 128},
            },
        },
        {},
        "each",
    ),
}


@pytest.mark.parametrize("pack", [True, False], ids=["packing", "cpu-default"])
@pytest.mark.parametrize("case", sorted(UNROLLED))
@pytest.mark.parametrize(
    ("lq", "lk"), [(1024, 1024), (768, 768), (1000, 1000), (200, 1224), (512, 1000)]
)
def test_unrolled_splitter_equals_the_recursion(make_qkv, case, lq, lk, pack, request, monkeypatch):
    """All leaves in one exact call and the rectangles of all levels packed into one body
    call (level by level where the body has a step that is not packable, stacked where its
    steps are offset-free, else one call per rectangle) give what the plain recursion gives:
    same pairs (sinks and windows at their positions), lse merges in another order; fewer
    calls. A square whose leaves are no multiple of the body's tiles is packed as the first
    rows of a longer one: other rectangles, as close to exact attention."""
    from attncompose.primitives import causal_split as split

    if pack:
        request.getfixturevalue("packing_on_cpu")  # as on CUDA
    name, knobs, path = UNROLLED[case]
    recipe = ac.load_recipe(name).with_knobs(knobs)
    q, k, v = make_qkv(b=1, hq=2, hkv=1, lq=lq, lk=lk, d=16)
    attn = ac.compile(recipe, backend="torch")
    body = recipe.steps[recipe.output_id].body
    quantum, offset_free = (
        getattr(attn.pipeline, f)[body] for f in ("pack_quantum", "offset_free")
    )
    assert path == ("packed" if quantum else "stacked" if offset_free else "each")
    calls = {"exact": 0, "body": 0}
    exact_choice, lazy = dispatch.choose, Pipeline._lazy

    def counting_choose(op, backend, problem, **inputs):
        impl = exact_choice(op, backend, problem, **inputs)
        if op != "exact":
            return impl
        exact = impl.load()  # chosen per exact call: count them
        counted = lambda p, **kw: calls.update(exact=calls["exact"] + 1) or exact(p, **kw)
        return SimpleNamespace(load=lambda: counted)

    def counting_lazy(pipeline, sid):
        fn = lazy(pipeline, sid)
        counted = lambda sub: calls.update(body=calls["body"] + 1) or fn(sub)
        counted.offset_free, counted.pack_quantum = fn.offset_free, fn.pack_quantum
        return counted

    monkeypatch.setattr(dispatch, "choose", counting_choose)
    monkeypatch.setattr(Pipeline, "_lazy", counting_lazy)
    flat, flat_lse = attn(q, k, v, is_causal=True, return_lse=True)
    flat_calls = dict(calls)
    halve = split._halve
    recursion = lambda p, body, m, ks: ks.exact(p) if p.lq <= m else halve(p, body, m, ks)
    monkeypatch.setattr(split, "_square", recursion)  # the recursion at every level
    calls.update(exact=0, body=0)
    rec, rec_lse = attn(q, k, v, is_causal=True, return_lse=True)
    leaf = split.leaf_length(lq, 128)  # of the causal square (decode: the last Lq keys)
    if pack and quantum and split.padding(lq, 128, quantum):  # padded to a square that packs
        assert flat_calls["body"] == 1 + (lq < lk)  # (decode: the key prefix, then the square)
        exact = ac.compile(ac.load_recipe("exact"), backend="torch")(q, k, v, is_causal=True)
        error = lambda out: ac.relative_error(out, exact)
        assert error(flat) < 1.25 * error(rec) + TIGHT
        return
    assert ac.relative_error(flat, rec) < TIGHT
    assert torch.allclose(flat_lse, rec_lse, atol=1e-5)
    if lq == lk and lq % 128 == 0:  # n halves evenly down to the leaves
        assert flat_calls["exact"] < calls["exact"]
        rects = lq // leaf - 1
        assert calls["body"] == rects  # the recursion: one body call per rectangle
        if pack and quantum and leaf % quantum == 0:  # not 768 = 96 * 2**3 (1024: +1/3)
            assert flat_calls["body"] == 1
        elif offset_free:
            assert flat_calls["body"] == (lq // leaf).bit_length() - 1  # one per level
        else:
            assert flat_calls["body"] == rects


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
def test_every_level_goes_through_one_body_pass(make_qkv, name, monkeypatch, packing_on_cpu):
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
    recursion = lambda p, body, m, ks: ks.exact(p) if p.lq <= m else halve(p, body, m, ks)
    monkeypatch.setattr(split, "_square", recursion)
    recursive = ac.relative_error(attn(q, k, v, is_causal=True), exact)
    assert packed < 1.1 * recursive + 1e-6


def _around_a_splitter(name: str) -> bool:
    built_in = ac.load_recipe(name)
    return built_in.steps[built_in.output_id].op_name() == "causal_split"


SPLIT_RECIPES = [name for name in ac.builtin_recipes() if _around_a_splitter(name)]


def _packed_recipe(name: str):
    """A built-in recipe with :data:`PACKED`'s knobs where it has them."""
    recipe = ac.load_recipe(name)
    return recipe.with_knobs({k: v for k, v in PACKED.items() if k in recipe.knob_values()})


@pytest.mark.parametrize("packs", [True, False], ids=["packing", "cpu-default"])
@pytest.mark.parametrize("name", SPLIT_RECIPES)
def test_no_query_reads_a_later_key(name, packs, request):
    """Changing the values of keys from position c on leaves every output before c as it
    was: on real attention (the built-in capture, whose codes fall outside their
    rectangle's keys: code pairing once paired such tiles with the next rectangle's keys,
    later ones included, when the levels were packed), at a length that packs and one that
    is padded to pack."""
    if packs:
        request.getfixturevalue("packing_on_cpu")  # as on CUDA
    attn = ac.compile(_packed_recipe(name), backend="torch")
    for n in (1024, 1000):
        item = load_qkv(None, n)[1]
        assert_reads_no_later_key(attn, item.q, item.k, item.v, range(128, n, 128), n)


@pytest.mark.parametrize("name", ["hyperattention", "sampling-only"])
def test_stacked_levels_keep_each_query_row_over_its_key_row(make_qkv, name, monkeypatch):
    """A level's rectangles stacked as rows (an offset-free body, level by level) are
    stacked rectangle-major, so grouped keys and values stay where query row n finds them,
    at row n // group: the same result bit for bit as the keys repeated per query head."""
    from attncompose.primitives import causal_split

    stacked = []
    stack = causal_split._stacked
    monkeypatch.setattr(causal_split, "_stacked", lambda *a: stacked.append(1) or stack(*a))
    attn = ac.compile(ac.load_recipe(name).with_knobs({"out.min_seq_len": 256}), backend="torch")
    q, k, v = make_qkv(b=1, hq=6, hkv=2, lq=2048, lk=2048, d=16)
    grouped = attn(q, k, v, is_causal=True)
    assert len(stacked) == 2  # levels of 4 and 2 rectangles (leaves of 256; 1 runs alone)
    repeated = attn(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    assert torch.equal(grouped, repeated)


@pytest.mark.parametrize(
    ("n", "min_seq_len", "quantum", "want"),
    [
        (100000, 4096, 256, (3328, 5)),  # 100000 = 3125 * 2**5: leaves of 3125 do not pack
        (1000, 128, 64, (128, 3)),
        (1100, 128, 128, (128, 4)),  # 1100 = 275 * 4: halving meets an odd 275 > 128
        (200, 128, 64, (128, 1)),
        (300, 128, 256, None),  # no leaf of at most 128 is a multiple of 256
    ],
)
def test_packed_length_is_the_shortest_square_that_packs(n, min_seq_len, quantum, want):
    from attncompose.primitives.causal_split import packed_length

    got = packed_length(n, min_seq_len, quantum)
    assert got == want
    if got is not None:
        leaf, levels = got
        assert leaf % quantum == 0 and leaf <= min_seq_len and leaf << levels >= n
        assert leaf << (levels - 1) < n or levels == 1  # no fewer levels would do


SAMPLE_ALL = {  # packable, and exact: every key is sampled (once, with weight 1)
    "hash": {"op": "lsh", "num_projections": 3},
    "diag": {"op": "block", "select": ["hash"], "block_size": 64},
    "residual": {"op": "uniform_sample", "exclude": ["diag"], "sample_size": 4096},
    "merged": {"op": "merge", "inputs": ["diag", "residual"]},
    "out": {"op": "causal_split", "body": "merged", "min_seq_len": 256},
}


# 1000 = 250 * 4 (leaves of 256 would pack), 411 halves to an odd 411 > 256 (both: 512 * 2),
# decode 435 of 1300 keys (the trailing square of 435 as 512)
@pytest.mark.parametrize(("lq", "lk"), [(1000, 1000), (411, 411), (435, 1300)])
def test_a_padded_square_computes_its_real_rows_exactly(
    make_qkv, reference, lq, lk, packing_on_cpu, monkeypatch
):
    """A square whose leaves do not pack goes through ONE body call as the first rows of a
    longer square: the rows after it take no part in a real query's result (a body that
    is exact gives exact attention), and what comes back has the square's rows only. One
    that would need more than a quarter more rows runs level by level (1300 = 325 * 4:
    leaves of 256, 2048 rows)."""
    from attncompose.primitives import causal_split as split

    attn = ac.compile(recipe(SAMPLE_ALL), backend="torch")
    q, k, v = make_qkv(b=1, hq=2, hkv=1, lq=lq, lk=lk, d=16)
    padded = []
    square = split._padded_square
    monkeypatch.setattr(split, "_padded_square", lambda *a: padded.append(a[2:4]) or square(*a))
    out, lse = attn(q, k, v, is_causal=True, return_lse=True)
    ref, ref_lse = reference(q, k, v, is_causal=True)
    assert padded and out.shape == ref.shape and lse.shape == ref_lse.shape
    assert ac.relative_error(out, ref) < TIGHT
    assert torch.allclose(lse.double(), ref_lse, atol=1e-4)
    q, k, v = make_qkv(b=1, hq=2, hkv=1, lq=1300, lk=1300, d=16)
    padded.clear()
    out, lse = attn(q, k, v, is_causal=True, return_lse=True)
    assert not padded and ac.relative_error(out, reference(q, k, v, is_causal=True)[0]) < TIGHT


def test_padding_adds_at_most_a_quarter_and_any_length_pads_at_the_papers_knobs():
    """A square that packs as it is is not padded; one that needs more than n / MAX_PAD
    more rows runs level by level; at the paper's knobs (leaves up to 4096, blocks of 256)
    every length from 4097 to 300000 packs, padded by at most 13%."""
    from attncompose.primitives.causal_split import MAX_PAD, leaf_length, padding

    assert padding(1024, 128, 128) is None and padding(1000, 128, 64) == (128, 3)
    assert padding(768, 128, 64) is None  # 1024 rows: a third more
    worst = 0.0
    for n in range(4097, 300001, 7):
        leaf = leaf_length(n, 4096)
        padded = padding(n, 4096, 256)
        assert padded is not None or leaf % 256 == 0, n
        if padded is not None:
            worst = max(worst, ((padded[0] << padded[1]) - n) / n)
    assert worst <= 0.135 and worst <= 1 / MAX_PAD
