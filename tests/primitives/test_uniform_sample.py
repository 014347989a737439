"""``uniform_sample``: unbiased residual draws, and its fusion with the block step it
excludes (block + residual in one tile pass) against the steps one by one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from contract import TIGHT, ReducesToExact, recipe
from oracle import dense_mask, make_problem, masked_attention

import attncompose as ac
from attncompose.primitives import causal_split, dispatch
from attncompose.primitives.base import Partial, count_products
from attncompose.primitives.block.naive import block_attention as naive_block_attention
from attncompose.primitives.lsh import Lsh
from attncompose.primitives.lsh.schema import LshStep
from attncompose.primitives.uniform_sample import UniformSample
from attncompose.primitives.uniform_sample.naive import (
    MIN_GROUP,
    query_groups,
    sample_tiles,
)
from attncompose.primitives.uniform_sample.schema import UniformSampleStep
from attncompose.runtime.compiler import Pipeline


class TestSamplingEveryKey(ReducesToExact):
    steps = {
        "sampled": {"op": "uniform_sample", "sample_size": 4096},
        "out": {"op": "causal_split", "body": "sampled", "min_seq_len": 8},
    }


class TestSamplingEveryKeyMaskedCausal(ReducesToExact):
    steps = {"sampled": {"op": "uniform_sample", "sample_size": 4096}}


@pytest.mark.parametrize(
    ("causal", "lq", "lk", "block"),
    [(False, 20, 300, 32), (True, 20, 300, 32), (False, 128, 128, 64)],
    ids=["natural-tiles", "natural-tiles-causal", "detector-tiles"],
)
def test_sampled_residual_is_unbiased(causal, lq, lk, block):
    """Averaged over many independent draws, the sampled mass and numerator converge to the
    exact mass and numerator of the keys the sampler may count (visible, not covered), with
    natural query tiles and with draws that follow the detector's tiles."""
    draws = 4000
    base = make_problem(1, lq, lk, d=8, causal=causal, seed=6)
    rows = lambda t: t.expand(draws, -1, -1).contiguous()  # each row draws its own samples
    p = replace(base, q=rows(base.q), k=rows(base.k), v=rows(base.v))
    lsh_step = LshStep(num_projections=3)  # one head: every row hashes identically
    diag = Partial.empty(p)
    diag.coverage = Lsh(lsh_step)(p).bind(block)
    grouped = query_groups(p, [diag.coverage]) is not None
    assert grouped == (lq >= MIN_GROUP and not causal)
    est = UniformSample(UniformSampleStep(sample_size=24, seed=1))(p, exclude=[diag])
    weight = torch.exp(est.lse.double())  # [draws, Lq]
    mass = weight.mean(0)
    numer = (weight.unsqueeze(-1) * est.out.double()).mean(0)
    truth = masked_attention(base, dense_mask(base, exclude=(Lsh(lsh_step)(base).bind(block),)))
    true_mass = torch.exp(truth.lse[0])
    true_numer = true_mass.unsqueeze(-1) * truth.out[0]
    assert torch.allclose(mass, true_mass, rtol=0.05)
    assert (numer - true_numer).norm() / true_numer.norm() < 0.05
    assert len({tuple(r.tolist()) for r in est.lse[:10]}) == 10  # draws do differ


def test_sampled_keys_stay_in_range_when_uniforms_round_up():
    """float32 1023 + 0.99999994 is 1024: the last stratum's draw must still be a key
    (found by a tuning run: index 4096 out of bounds for 4096 keys)."""
    p = make_problem(1, 256, 4096, causal=False)
    top = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    uniforms = torch.full((1, 2, 1024), float(top))
    tiles = sample_tiles(p, uniforms)
    assert int(tiles.k_idx.max()) == p.lk - 1 and int(tiles.k_idx.min()) >= 0
    naive_block_attention(p, tiles)  # gathers in range


FUSION_CASES = {
    # (lq, lk, causal, block_size, sample_size, min_seq_len)
    "draws-follow-tiles": (512, 512, False, 64, 32, 64),
    "odd-length-steps-in-turn": (500, 500, False, 64, 32, 64),
    "causal-splitter": (1024, 1024, True, 64, 32, 256),
    "decode": (100, 1000, True, 64, 32, 256),
    "sample-everything": (256, 256, False, 64, 512, 64),
}


SINK_CASES = ("draws-follow-tiles", "causal-splitter", "sample-everything", "decode")
FUSED = ("draws-follow-tiles", "sample-everything", "causal-splitter", "topk-detector")


@pytest.mark.parametrize(
    "case",
    [
        *sorted(FUSION_CASES),
        "topk-detector",
        *(f"sinks:{c}" for c in SINK_CASES),
        "sinks:packed-splitter",
    ],
)
def test_fused_block_residual_equals_the_steps_one_by_one(make_qkv, case, monkeypatch):
    """The fused tile pass against the steps one by one: same output, same products, fewer
    passes; with sinks beside the detector (hyperattention-sinks) too, the splitter's levels
    packed as on a GPU included."""
    name = "hyperattention"
    if case.startswith("sinks:"):
        name, case = "hyperattention-sinks", case.removeprefix("sinks:")
    if case == "packed-splitter":
        monkeypatch.setattr(causal_split, "PACK_DEVICES", {"cpu", "cuda"})
        case = "causal-splitter"
    if case == "topk-detector":  # top-k tiles: natural query blocks of 64, exact
        lq, lk, causal = 512, 512, False
        q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=lq, lk=lk, d=16)
        recipe = ac.load_recipe("hyperattention-topk").with_knobs(
            {"heavy.block_size": 64, "heavy.k": 2, "residual.sample_size": 32}
        )
    else:
        lq, lk, causal, block, m, min_len = FUSION_CASES[case]
        q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=lq, lk=lk, d=16)
        recipe = ac.load_recipe(name).with_knobs(
            {"diag.block_size": block, "residual.sample_size": m, "out.min_seq_len": min_len}
        )
    fused = ac.compile(recipe, backend="torch")
    steps = ac.compile(recipe, backend="torch", fuse=False)
    assert set(fused.pipeline.fusions) == {"merged"} and not steps.pipeline.fusions
    calls = []
    original = dispatch.call
    monkeypatch.setattr(
        dispatch, "call", lambda op, *a, **kw: calls.append(op) or original(op, *a, **kw)
    )
    with count_products() as n_fused:
        o1, l1 = fused(q, k, v, is_causal=causal, return_lse=True)
    fused_calls, calls[:] = len(calls), []
    with count_products() as n_steps:
        o2, l2 = steps(q, k, v, is_causal=causal, return_lse=True)
    assert ac.relative_error(o1, o2) < TIGHT
    assert torch.allclose(l1, l2, atol=1e-5)
    assert n_fused == n_steps  # the same pairs
    if case in FUSED:
        assert fused_calls < len(calls)  # one tile pass where there were two (three)


def test_no_fusion_when_another_step_reads_the_block():
    steps = {
        "hash": {"op": "lsh", "num_projections": 3},
        "diag": {"op": "block", "select": ["hash"], "block_size": 16},
        # the sampler skips both blocks: the merges' inputs attend to disjoint keys
        "residual": {"op": "uniform_sample", "exclude": ["diag", "more"], "sample_size": 16},
        "merged": {"op": "merge", "inputs": ["diag", "residual"]},
        "sinks": {"op": "sink", "count": 4},
        "more": {"op": "block", "select": ["sinks"], "exclude": ["diag"], "block_size": 16},
        "out": {"op": "merge", "inputs": ["merged", "more"]},
    }
    assert Pipeline(recipe(steps)).fusions == {}
    del steps["more"], steps["sinks"]
    steps["residual"]["exclude"] = ["diag"]
    steps["out"] = {"op": "causal_split", "body": "merged", "min_seq_len": 64}
    assert set(Pipeline(recipe(steps)).fusions) == {"merged"}
