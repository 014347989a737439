"""Compiling the kernels a call launches for a GPU that is not here (attncompose.eval.aot)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton (any kernel module) imports

import pytest

pytest.importorskip("triton")

import attncompose as ac
from attncompose.eval.aot import LaunchRecorder, compile_variants

MERGE = "attncompose.primitives.merge.triton"


def _merge_variant(rows: int) -> dict:
    pointers = {"out": "*bf16", "lse": "*fp32", "p_out": "*bf16", "p_lse": "*fp32", "src": "*i32"}
    scalars = ["s_on", "s_ol", "s_od", "s_ln", "s_pn", "s_pm", "s_pd", "s_pln", "L", "DV", "K"]
    return {
        "module": MERGE,
        "kernel": "_merge_rows_kernel",
        "signature": pointers | dict.fromkeys(scalars, "i32"),
        "constexprs": {"BR": rows, "BD": 64},
        "tuning": {},
    }


def test_recorder_keeps_each_kernel_variant_once(make_qkv):
    """Two calls of one recipe record the variants of one: kernel, argument types (float16
    tensors as *fp16), constexprs; the exact kernel with the shape its autotuner keys on."""
    attn = ac.compile(ac.load_recipe("streaming"), backend="triton")
    q, k, v = (x.half() for x in make_qkv(b=1, hq=2, hkv=2, lq=256, lk=256, d=16))
    once, twice = LaunchRecorder(), LaunchRecorder()
    with once:
        attn(q, k, v, is_causal=True)
    with twice:
        attn(q, k, v, is_causal=True)
        attn(q, k, v, is_causal=True)
    assert once.variants and once.variants == twice.variants
    for variant in once.variants:
        assert variant["signature"]["q"] == "*fp16" and variant["constexprs"]["BD"] == 16


def test_a_variant_that_does_not_compile_is_reported_and_the_rest_compile():
    """Compiled for sm_90 without a GPU: a block of 3 rows (no power of two) fails with
    Triton's error, 16 rows compile with their resources."""
    bad, good = compile_variants([_merge_variant(3), _merge_variant(16)], half="bf16")
    assert not bad["ok"] and "power of 2" in bad["error"]
    assert good["ok"] and good["registers"] > 0 and good["spill_bytes"] == 0
    assert good["shared_bytes"] >= 0 and good["constexprs"] == {"BR": 16, "BD": 64}
