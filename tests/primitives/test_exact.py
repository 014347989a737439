"""``exact``: the Triton flash kernel against the reference, its launch helpers, and
the one-step recipe against exact attention."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from contract import ReducesToExact
from on_device import (
    IDS,
    SHAPES,
    assert_same,
    nan_partial,
    padded_views,
    triton_module,
)
from on_device import make_problem as device_problem

from attncompose.primitives.exact import naive as exact_naive

exact_triton = triton_module("exact.triton")  # None where Triton cannot run


class TestExactRecipe(ReducesToExact):
    steps = {"out": {"op": "exact"}}


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("lq", "lk"), SHAPES, ids=IDS)
def test_exact_matches_reference(lq, lk, causal):
    problem = device_problem(2, lq, lk, 16, causal=causal)
    assert_same(exact_triton.exact_attention(problem), exact_naive.exact_attention(problem))


@pytest.mark.triton
@pytest.mark.parametrize("delta", [-20, 5, 40], ids=["rows-see-nothing", "shifted", "all"])
def test_exact_arbitrary_offsets(delta):
    problem = replace(device_problem(2, 33, 17, 16, causal=True), q_offset=delta)
    assert_same(exact_triton.exact_attention(problem), exact_naive.exact_attention(problem))


@pytest.mark.triton
def test_exact_nan_poisoned_buffers_and_inputs_equal_clean_run():
    problem = device_problem(2, 33, 33, 16, causal=True)
    clean = exact_triton.exact_attention(problem)
    poisoned = exact_triton.exact_attention(padded_views(problem), out=nan_partial(problem))
    assert torch.equal(poisoned.out, clean.out) and torch.equal(poisoned.lse, clean.lse)


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_exact_fp16_within_twice_torch_fp16_error(causal):
    problem = device_problem(2, 64, 64, 16, causal=causal)
    truth = exact_naive.exact_attention(problem).out
    half = replace(problem, q=problem.q.half(), k=problem.k.half(), v=problem.v.half())
    torch_err = (exact_naive.exact_attention(half).out.float() - truth).abs().max()
    kernel_err = (exact_triton.exact_attention(half).out - truth).abs().max()
    assert kernel_err <= 2 * torch_err + 1e-5


@pytest.mark.triton
def test_autotune_prunes_tile_sizes_to_the_buckets():
    configs = exact_triton._exact_tuned.configs
    kept = exact_triton.prune_configs(configs, {"ROWS_B": 16, "KEYS_B": 64})
    assert kept and all(c.kwargs["BQ"] <= 16 and c.kwargs["BK"] <= 64 for c in kept)
    assert len(kept) < len(configs)
    everything = {"ROWS_B": 1 << 17, "KEYS_B": 1 << 17}
    assert len(exact_triton.prune_configs(configs, everything)) == len(configs)
    assert exact_triton.bucket(1) == 16 and exact_triton.bucket(4097) == 8192


@pytest.mark.triton
def test_fp32_dots_follow_torchs_tf32_setting():
    """float32 inputs: full-precision dots unless PyTorch allows TF32 matmuls (Triton's own
    default would be TF32, ~1e-3 relative error, on every GPU run)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert exact_triton.dot_precision(torch.float32) == "ieee"
        assert exact_triton.dot_precision(torch.bfloat16) == "ieee"
        matmul.allow_tf32 = True
        assert exact_triton.dot_precision(torch.float32) == "tf32"
        assert exact_triton.dot_precision(torch.float16) == "ieee"
    finally:
        matmul.allow_tf32 = before
