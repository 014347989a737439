"""``topk``: block scores and tables, the tile kernels on its tables, its Triton scoring
kernel, and recipes whose knobs make it exact."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from contract import ReducesToExact, assert_partial_equal
from on_device import make_problem as device_problem
from on_device import (
    triton_module,
)
from oracle import dense_mask, make_problem, masked_attention

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


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(
    ("lq", "lk", "size"), [(33, 33, 16), (64, 64, 7), (17, 64, 16)], ids=["T33", "odd7", "decode"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_topk_block_scores_match_reference(lq, lk, size, causal, dtype):
    problem = device_problem(2, lq, lk, 16, causal=causal)
    half = replace(problem, q=problem.q.to(dtype), k=problem.k.to(dtype), v=problem.v.to(dtype))
    got = topk_triton.block_scores(half, size)
    want = topk_naive.block_scores(half, size)
    assert torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    assert torch.allclose(got[finite], want[finite], atol=1e-5)
