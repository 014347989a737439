"""Capture of post-RoPE Q, K, V on a tiny Llama, and the capture file format."""

from __future__ import annotations

import os
import stat

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from tiny_models import tiny_llama  # noqa: E402

from attncompose.models.capture import capture_qkv  # noqa: E402
from attncompose.models.capture_file import CaptureError, load_capture, save_capture  # noqa: E402


@pytest.fixture(scope="module")
def model() -> transformers.LlamaForCausalLM:
    return tiny_llama(3)


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (1, 21), generator=torch.Generator().manual_seed(2))


def test_capture_shapes_and_layers(model, input_ids):
    captured = capture_qkv(model, input_ids, layers=[0, 2])
    assert sorted(captured) == [0, 2]
    q, k, v = captured[2]
    assert q.shape == (1, 4, 21, 16) and k.shape == v.shape == (1, 2, 21, 16)
    assert model.config._attn_implementation == "sdpa"


@torch.inference_mode()
def test_captured_tensors_are_what_attention_sees(model, input_ids):
    """Replaying layer 0's captured q, k, v reproduces the hidden state after its o_proj."""
    q, k, v = capture_qkv(model, input_ids, layers=[0])[0]
    attention = model.model.layers[0].self_attn
    seen: dict[str, torch.Tensor] = {}

    def keep_output(module, args, out) -> None:
        seen["o"] = out[0]

    handle = attention.register_forward_hook(keep_output)
    try:
        model(input_ids, use_cache=False)
    finally:
        handle.remove()
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    replayed = attention.o_proj(o.transpose(1, 2).reshape(1, 21, -1))
    torch.testing.assert_close(replayed, seen["o"], rtol=1e-5, atol=1e-5)


def test_capture_file_round_trip(model, input_ids, tmp_path):
    captured = capture_qkv(model, input_ids)
    path = tmp_path / "qkv.safetensors"
    saved = save_capture(path, captured, model="tiny", text_sha256="ab" * 32)
    loaded, metadata = load_capture(path)
    assert metadata == {**saved, "format": "attncompose.capture/1"}
    assert metadata["layers"] == [0, 1, 2] and metadata["length"] == 21
    assert (metadata["num_q_heads"], metadata["num_kv_heads"], metadata["head_dim"]) == (4, 2, 16)
    assert metadata["dtype"] == "float32"
    for layer in captured:
        for got, expected in zip(loaded[layer], captured[layer], strict=False):
            assert torch.equal(got, expected)


def test_load_capture_errors(model, input_ids, tmp_path):
    with pytest.raises(CaptureError, match="does not exist"):
        load_capture(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CaptureError, match="readable"):
        load_capture(corrupt)
    path = tmp_path / "partial.safetensors"
    save_capture(path, capture_qkv(model, input_ids, layers=[1]), model="tiny", text_sha256="0")
    tensors, metadata = load_capture(path)
    from safetensors.torch import save_file

    save_file(
        {"layer.1.q": tensors[1][0]},
        str(path),
        metadata={**{k: str(v) for k, v in metadata.items()}, "layers": "[1]"},
    )
    with pytest.raises(CaptureError, match=r"layer\.1\.k"):
        load_capture(path)
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(CaptureError, match="not an attncompose capture"):
        load_capture(path)


def test_capture_files_get_the_permissions_of_any_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        triple = tuple(torch.zeros(1, 1, 4, 2) for _ in range(3))
        save_capture(tmp_path / "c.safetensors", {0: triple}, model="m", text_sha256="0")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.safetensors").stat().st_mode) == 0o644
