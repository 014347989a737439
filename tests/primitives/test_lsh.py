"""``lsh``: Gray order, sorting, pairing, the tile kernels on its tiles, its Triton hashing
kernel, and recipes whose knobs make it exact."""

from __future__ import annotations

import pytest
import torch
from contract import ReducesToExact, assert_partial_equal
from on_device import (
    DEVICE,
    triton_module,
)
from oracle import dense_mask, make_problem, masked_attention

import attncompose as ac
from attncompose.primitives.lsh import Lsh
from attncompose.primitives.lsh import naive as lsh_naive
from attncompose.primitives.lsh.naive import gray_code, gray_rank
from attncompose.primitives.lsh.schema import LshStep

lsh_triton = triton_module("lsh.triton")  # None where Triton cannot run


class TestOneBlockCoversAllKeys(ReducesToExact):
    steps = {
        "hash": {"op": "lsh", "num_projections": 5},
        "diag": {"op": "block", "select": ["hash"], "block_size": 4096},
        "residual": {"op": "uniform_sample", "exclude": ["diag"], "sample_size": 16},
        "merged": {"op": "merge", "inputs": ["diag", "residual"]},
        "out": {"op": "causal_split", "body": "merged", "min_seq_len": 8},
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
    assert_partial_equal(got, want)


@pytest.mark.parametrize(("lq", "lk"), [(64, 64), (200, 200), (256, 128), (96, 300)])
@pytest.mark.parametrize("pairing", ["rank", "code"])
def test_tile_covers_equals_each_tiles_queries_covers(lq, lk, pairing):
    """sortLSH answers which keys its exact tiles cover from each tile's key block: the
    same as asking every query of the tile pair by pair (``covers``); with repeats, -1."""
    p = make_problem(2, lq, lk)
    cov = Lsh(LshStep(num_projections=4, pairing=pairing))(p).bind(32)
    tiles = cov.tiles(p)
    n, t = tiles.q_idx.shape[:2]
    kj = torch.randint(-1, lk, (n, t, 40), generator=torch.Generator().manual_seed(lq))
    got = cov.tile_covers(p, tiles, kj)
    each = cov.covers(p, tiles.q_idx.unsqueeze(-1), kj.unsqueeze(-2))  # [N, T, bq, K]
    real = (tiles.q_idx >= 0).unsqueeze(-1)
    if tiles.exact:  # every real query of a tile covers alike
        alike = (each & real).any(-2, keepdim=True).expand_as(each)
        assert torch.equal(each | ~real, alike | ~real)
    first = cov.covers(p, tiles.q_idx[..., :1, None], kj.unsqueeze(-2)).squeeze(-2)
    assert torch.equal(got, first) and got.any() and not got.all()


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


@pytest.mark.triton
@pytest.mark.parametrize("bits", [1, 7, 12])
def test_lsh_ranks_and_sort_match_reference(bits):
    """Queries and keys hashed in one launch and sorted in one sort equal each input sorted
    by itself (reference and kernel; a packed problem's parts; one input; two lengths)."""
    g = torch.Generator().manual_seed(bits)
    q, k = (torch.randn(2, 33, 16, generator=g).to(DEVICE) for _ in range(2))
    dirs = lsh_naive.projections(2, 16, bits, seed=5).to(DEVICE)
    rank = lambda x: lsh_naive.gray_rank(lsh_naive.hash_codes(x, dirs), bits)
    assert torch.equal(lsh_triton.gray_ranks([q, k], dirs).long(), torch.cat([rank(q), rank(k)]))
    part = torch.tensor([0] * 16 + [1] * 17, device=DEVICE)
    for xs in ([q, k], [q], [q[:, :20], k]):
        for parts in (None, part) if all(x.shape[1] == 33 for x in xs) else (None,):
            alone = [lsh_naive.sorted_order(rank(x), parts) for x in xs]
            for sort in (lsh_triton.sort_positions, lsh_naive.sort_positions):
                got = sort(xs, dirs, parts)
                for mine, want in zip(got, alone, strict=True):
                    for a, b in zip(mine, want, strict=True):
                        assert torch.equal(a.long(), b)  # sorted keys: int32 from the kernel


@pytest.mark.triton
@pytest.mark.parametrize("group", [2, 3])
def test_lsh_hashes_grouped_keys_as_the_keys_repeated(group):
    """Grouped keys (one row per ``group`` query rows) hash row n // group with query row
    n's directions where they are: the same ranks and sorts as the keys repeated for every
    query row, kernel and reference; with parts, alone, with row maps."""
    g = torch.Generator().manual_seed(group)
    n = 2 * group
    q = torch.randn(n, 33, 16, generator=g).to(DEVICE)
    k = torch.randn(2, 33, 16, generator=g).to(DEVICE)
    repeat = lambda x: x.repeat_interleave(group, 0)
    dirs = lsh_naive.projections(n, 16, 7, seed=5).to(DEVICE)  # one set per query row
    assert torch.equal(
        lsh_triton.gray_ranks([q, k], dirs), lsh_triton.gray_ranks([q, repeat(k)], dirs)
    )
    assert torch.equal(lsh_triton.gray_ranks([k], dirs), lsh_triton.gray_ranks([repeat(k)], dirs))
    part = torch.tensor([0] * 16 + [1] * 17, device=DEVICE)
    rows = [torch.randperm(33, generator=g)[:30].to(DEVICE) for _ in range(2)]
    for xs, parts, maps in (([q, k], None, None), ([q, k], part, None), ([k], None, None),
                            ([q, k], None, rows)):  # fmt: skip
        want = lsh_naive.sort_positions([*xs[:-1], repeat(xs[-1])], dirs, parts, maps)
        for sort in (lsh_triton.sort_positions, lsh_naive.sort_positions):
            got = sort(xs, dirs, parts, maps)
            for mine, theirs in zip(got, want, strict=True):
                for a, b in zip(mine, theirs, strict=True):
                    assert torch.equal(a.long(), b.long())


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_keeping_the_first_sorted_slots_equals_the_stable_sort(dtype):
    """A top-k of the first ``keep`` sorted slots (ranks with many ties) gives the stable
    sort's first slots, in its order, and their sorted ranks; every index past them sits
    at position ``keep``, in no block a reader of the first ``keep`` slots takes."""
    g = torch.Generator().manual_seed(4)
    rank = torch.randint(0, 8, (3, 500), generator=g).to(dtype)
    order, position, key = lsh_naive.sorted_order(rank)
    for keep in (1, 64, 499):
        o, p, k = lsh_naive.sorted_order(rank, keep=keep)
        assert torch.equal(o, order[:, :keep]) and torch.equal(k, key[:, :keep])
        assert k.dtype == dtype and p.dtype == position.dtype
        assert torch.equal(p, torch.where(position < keep, position, keep))
    assert torch.equal(lsh_naive.sorted_order(rank, keep=500)[0], order)  # all: the sort


@pytest.mark.parametrize("name", ["hyperattention", "hyperattention-sinks", "lsh-only"])
def test_a_decode_step_sorts_only_the_keys_its_query_takes(name, monkeypatch):
    """One query after its keys, rank pairing: its tile takes the first key block in sorted
    order, so the step finds those keys alone (a top-k of block-size keys, not a sort of
    all of them); the result is bit for bit the full sort's."""
    from attncompose.primitives.lsh import Lsh

    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 1, 16, generator=g)
    k, v = (torch.randn(1, 2, 3000, 16, generator=g) for _ in range(2))
    attn = ac.compile(ac.load_recipe(name).with_knobs({"out.min_seq_len": 512}), backend="torch")
    kept = []
    keys = Lsh.kept_keys
    monkeypatch.setattr(Lsh, "kept_keys", lambda self, p: kept.append(keys(self, p)) or kept[-1])
    partial = attn(q, k, v, is_causal=True)
    assert kept == [attn.pipeline.nodes["diag"].knobs["block_size"]]  # of 2999 keys before it
    monkeypatch.setattr(Lsh, "kept_keys", lambda self, p: None)
    assert torch.equal(partial, attn(q, k, v, is_causal=True))


@pytest.mark.triton
def test_lsh_reads_row_mapped_inputs_where_they_are():
    """Inputs given as rows of other tensors (``RowMaps``: a packed problem's levels are rows
    of the square) hash and sort as those rows gathered, in one launch for q and k; rows
    repeat and skip, with parts."""
    g = torch.Generator().manual_seed(3)
    q_src, k_src = (torch.randn(2, 40, 16, generator=g).to(DEVICE) for _ in range(2))
    q_rows = torch.randint(0, 40, (32,), generator=g).to(DEVICE)
    k_rows = torch.randperm(40, generator=g)[:32].to(DEVICE)
    dirs = lsh_naive.projections(2, 16, 6, seed=5).to(DEVICE)
    part = torch.tensor([0] * 16 + [1] * 16, device=DEVICE)
    gathered = [q_src[:, q_rows], k_src[:, k_rows]]
    for parts in (None, part):
        want = lsh_naive.sort_positions(gathered, dirs, parts)
        for sort in (lsh_triton.sort_positions, lsh_naive.sort_positions):
            got = sort([q_src, k_src], dirs, parts, [q_rows, k_rows])
            for mine, theirs in zip(got, want, strict=True):
                for a, b in zip(mine, theirs, strict=True):
                    assert torch.equal(a.long(), b.long())
