"""Compiling the kernels a call launches for a GPU that is not here (attncompose.eval.aot)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton (any kernel module) imports

import pytest
import triton

pytest.importorskip("triton")

import attncompose as ac
from attncompose.eval.aot import LaunchRecorder, compile_variants
from attncompose.primitives.dispatch import triton_missing

# compiling for a GPU that is not here: checked with the Triton versions the kernels support
# (dispatch.OLDEST_TRITON on); 3.2 wants a GPU driver to compile
pytestmark = pytest.mark.skipif(triton_missing() is not None, reason=str(triton_missing()))

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
    assert bad["triton"] == good["triton"] == triton.__version__  # what compiled them


def test_compiles_run_in_a_cache_of_their_own(tmp_path, monkeypatch):
    """Each compile really compiles (its seconds are a compile's, not a cache hit's): the
    compile process neither reads nor fills the user's Triton cache."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "user"))
    (row,) = compile_variants([_merge_variant(16)], half="bf16")
    assert row["ok"] and row["seconds"] > 0 and not (tmp_path / "user").exists()


def test_a_folder_with_another_triton_compiles_instead(tmp_path):
    """``triton_path``: the compile process finds Triton there first (a stand-in package
    that says it is 0.0 and passes on to this environment's Triton)."""
    shim = tmp_path / "triton"
    shim.mkdir()
    real = str(Path(triton.__file__).parent.parent)
    (shim / "__init__.py").write_text(
        "import sys\n"
        f"sys.path.remove({str(tmp_path)!r}); del sys.modules['triton']\n"
        f"sys.path.insert(0, {real!r})\n"
        "import triton as _real\n"
        "_real.__version__ = '0.0'\n"
    )
    (row,) = compile_variants([_merge_variant(16)], half="bf16", triton_path=str(tmp_path))
    assert row["ok"] and row["triton"] == "0.0"


def test_specialization_follows_the_jit():
    """Arguments are specialized as Triton's JIT does (its own rule, asked directly): 1 as
    a constant, multiples of 16 and 16-byte aligned data as divisible, the rest not."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from attncompose.eval.aot import specialization

    data = torch.zeros(64)
    for value in (1, 0, 16, 48, 7, 2**40, 2**40 + 3, True, False, 0.5, data, data[1:]):
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        jit = "1" if kind == "constexpr" else spec or ""
        assert specialization(value) == jit, value


def test_a_recorded_launch_compiles_as_the_jit_would(make_qkv):
    """The exact kernel as a call launches it: unit strides recorded as "1", so its key and
    value loads compile to pipelined copies (cp.async) feeding Hopper's warpgroup MMA; the
    same variant without the specialization reads through runtime strides (no cp.async); its
    tensor-descriptor configs compile to TMA bulk copies."""
    attn = ac.compile(ac.load_recipe("exact"), backend="triton")
    q, k, v = (x.half() for x in make_qkv(b=1, hq=2, hkv=2, lq=256, lk=256, d=64))
    recorder = LaunchRecorder()
    with recorder:
        attn(q, k, v, is_causal=True)
    (variant,) = [x for x in recorder.variants if x["kernel"] == "_exact_fwd_kernel"]
    assert variant["specialized"]["s_kd"] == "1" and variant["specialized"]["k"] == "D"
    plain = {**variant, "specialized": {}}
    rows = compile_variants([variant, plain], half="bf16", every_config=False)
    # the first config of each kind of loads: pointers, then tensor descriptors
    assert [row["constexprs"]["TMA"] for row in rows] == [False, True, False, True]
    jit, descriptors, unspecialized, _ = rows
    assert all(row["ok"] for row in rows)
    assert jit["instructions"]["wgmma"] > 0 and jit["instructions"]["cp_async"] > 0
    assert descriptors["instructions"]["wgmma"] > 0 and descriptors["instructions"]["tma"] > 0
    assert unspecialized["instructions"]["cp_async"] == 0
