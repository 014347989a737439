"""``topk``: block scores and tables, the tile kernels on its tables, its Triton scoring
kernel, and recipes whose knobs make it exact."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from contract import ReducesToExact, WatchWrites, assert_partial_equal
from on_device import make_problem as device_problem
from on_device import (
    triton_module,
)
from oracle import dense_mask, make_problem, masked_attention

from attncompose.primitives.base import count_products
from attncompose.primitives.lsh import Lsh
from attncompose.primitives.lsh.schema import LshStep
from attncompose.primitives.topk import Topk
from attncompose.primitives.topk import naive as topk_naive
from attncompose.primitives.topk.schema import TopkStep

topk_triton = triton_module("topk.triton")  # None where Triton cannot run


class TestTopkEveryBlock(ReducesToExact):
    steps = {
        "heavy": {"op": "topk", "block_size": 8, "k": 1000},
        "blocks": {"op": "block", "select": ["heavy"]},
        "residual": {"op": "uniform_sample", "exclude": ["blocks"], "sample_size": 8},
        "out": {"op": "merge", "inputs": ["blocks", "residual"]},
    }


class TestTopkKeyScoresEveryBlock(ReducesToExact):
    steps = {
        "heavy": {"op": "topk", "block_size": 8, "k": 1000, "score": "keys"},
        "blocks": {"op": "block", "select": ["heavy"]},
    }


class TestTopkCoverageOne(ReducesToExact):
    steps = {
        "heavy": {"op": "topk", "block_size": 8, "p": 1.0, "max_k": 1000},
        "blocks": {"op": "block", "select": ["heavy"]},
    }


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("k", "p_cov"), [(2, None), (1, None), (3, 0.5), (8, 0.9)])
def test_topk_kernel_excluding_lsh_matches_dense_mask(block_attention, causal, k, p_cov):
    p = make_problem(2, 101, 101, causal=causal, seed=3)
    lsh = Lsh(LshStep(num_projections=3))(p).bind(16)
    topk = Topk(TopkStep(block_size=7, k=k, p=p_cov, max_k=4))(p)
    got = block_attention(p, topk.tiles(p), own=topk, exclude=(lsh,))
    want = masked_attention(p, dense_mask(p, topk, exclude=(lsh,)))
    assert_partial_equal(got, want)


def test_topk_picks_the_planted_block():
    p = make_problem(1, 64, 64, d=16, seed=1)
    target = p.k[0, 40:48].mean(0)
    p.q[0, :8] += 4 * target  # queries of block 0 lean on key block 5
    p.k[0, 40:48] += 3 * target
    table = Topk(TopkStep(block_size=8, k=1))(p).table
    assert table[0, 0].nonzero().flatten().tolist() == [5]


def test_topk_never_selects_future_blocks():
    p = make_problem(2, 80, 80, causal=True, seed=2)
    table = Topk(TopkStep(block_size=8, k=100))(p).table
    assert torch.equal(table, torch.ones(10, 10, dtype=torch.bool).tril().expand(2, -1, -1))


def brute_key_scores(p, size):
    """log sum over each key block of exp(scale * mean query . key), pair by pair; -inf for
    blocks whose first key the query block's last query does not see."""
    n, lq, _ = p.q.shape
    nqb, nkb = -(-lq // size), -(-p.lk // size)
    est = torch.full((n, nqb, nkb), float("-inf"))
    for i in range(nqb):
        qbar = p.q[:, i * size : (i + 1) * size].float().mean(1)  # [N, D]
        last = min(lq, (i + 1) * size) - 1
        for j in range(nkb):
            if not p.visible(torch.tensor(last), torch.tensor(j * size)):
                continue
            keys = p.k[:, j * size : (j + 1) * size].float()  # [N, <=size, D]
            s = torch.einsum("nd,nkd->nk", qbar, keys) * p.scale
            est[:, i, j] = torch.logsumexp(s, -1)
    return est


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("lq", "lk", "size"), [(33, 33, 16), (64, 64, 7), (17, 64, 16)])
def test_key_scores_match_pair_by_pair(monkeypatch, causal, lq, lk, size):
    monkeypatch.setattr(topk_naive, "SCORE_CHUNK", 2 * lk)  # several chunks of query blocks
    p = make_problem(2, lq, lk, causal=causal, seed=4)
    got = topk_naive.block_scores(p, size, "keys")
    want = brute_key_scores(p, size)
    assert torch.equal(got.isinf(), want.isinf())
    assert torch.allclose(got[want.isfinite()], want[want.isfinite()], atol=1e-5)


@pytest.mark.parametrize("length", [64, 70, 5])
@pytest.mark.parametrize("layout", ["contiguous", "key-range"])
def test_block_means_copy_only_a_cut_last_block(layout, length):
    """Block means sum full blocks where they lie (a decode step copied every key into a
    padded buffer first): the same values, bit for bit, as the whole input zero-padded, and
    no copy larger than one block."""
    g = torch.Generator().manual_seed(length)
    full = torch.randn(3, 2 * length, 4, generator=g)
    x = full[:, :length] if layout == "contiguous" else full[:, 3 : 3 + length]
    size = 8
    nb = -(-length // size)
    padded = torch.zeros(3, nb * size, 4)
    padded[:, :length] = x
    want = (
        padded.view(3, nb, size, 4).sum(2)
        / torch.tensor([size] * (nb - 1) + [length - (nb - 1) * size], dtype=x.dtype)[:, None]
    )
    with WatchWrites() as written:
        got, counts = topk_naive.block_means(x, size)
    assert torch.equal(got, want)
    assert counts.sum() == length
    assert max(written) <= max(3 * size * 4, got.numel())


def test_key_scores_find_a_single_heavy_key_that_block_means_miss():
    """One key that every query of block 0 attends to, in a block whose other keys point
    away: its block mean hides it, scoring against each key does not."""
    p = make_problem(1, 64, 64, d=16, seed=1)
    target = torch.nn.functional.normalize(p.q[0, :8].mean(0), dim=0)
    p.q[0, :8] += 3 * target
    p.k[0, 42] = 6 * target  # the heavy key, in block 5
    p.k[0, [40, 41, 43, 44, 45, 46, 47]] -= 2 * target  # its neighbours point away
    means = Topk(TopkStep(block_size=8, k=1))(p).table
    keys = Topk(TopkStep(block_size=8, k=1, score="keys"))(p).table
    assert keys[0, 0].nonzero().flatten().tolist() == [5]
    assert means[0, 0].nonzero().flatten().tolist() != [5]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_key_scores_count_their_products(causal):
    p = make_problem(2, 40, 40, causal=causal, seed=5)
    with count_products() as means:
        Topk(TopkStep(block_size=8, k=2))(p)
    with count_products() as keys:
        Topk(TopkStep(block_size=8, k=2, score="keys"))(p)
    # each row's 5 mean queries against the 40 keys, or (causal) the keys of the blocks
    # each sees: 8, 16, ..., 40
    assert means[0] == 0
    assert keys[0] == 2 * (5 * 40 if not causal else 8 + 16 + 24 + 32 + 40)


def test_unknown_score_is_a_clear_error():
    with pytest.raises(ValueError, match="'mean' is not one of \\['means', 'keys'\\]"):
        TopkStep(score="mean")
    with pytest.raises(ValueError, match="'max' is not one of"):
        TopkStep(score={"default": "means", "choices": ["means", "max"]})
    with pytest.raises(ValueError, match="default 'keys' is not one of the choices"):
        TopkStep(score={"default": "keys", "choices": ["means"]})


@pytest.mark.triton
@pytest.mark.parametrize("score", ["means", "keys"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(
    ("lq", "lk", "size"), [(33, 33, 16), (64, 64, 7), (17, 64, 16)], ids=["T33", "odd7", "decode"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_topk_block_scores_match_reference(lq, lk, size, causal, dtype, score):
    problem = device_problem(2, lq, lk, 16, causal=causal)
    half = replace(problem, q=problem.q.to(dtype), k=problem.k.to(dtype), v=problem.v.to(dtype))
    got = topk_triton.block_scores(half, size, score)
    want = topk_naive.block_scores(half, size, score)
    assert torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    assert torch.allclose(got[finite], want[finite], atol=1e-5)
