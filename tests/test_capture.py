"""Capture of post-RoPE Q, K, V on a tiny Llama, and the capture file format."""

from __future__ import annotations

import os
import re
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


def _layer(hq: int = 4, hkv: int = 2, n: int = 8, d: int = 4) -> tuple[torch.Tensor, ...]:
    """One layer's q [1, hq, n, d], k and v [1, hkv, n, d] (random, float32)."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, n, d, generator=g) for h in (hq, hkv, hkv))


def _with(triple: tuple[torch.Tensor, ...], name: str, t: torch.Tensor) -> tuple:
    return tuple(t if n == name else old for n, old in zip("qkv", triple, strict=True))


BAD_LAYERS = {  # a capture's layer 3 that attention cannot take, and what the error says
    "q-3D": (_with(_layer(), "q", torch.zeros(4, 8, 4)), r"layer\.3\.q \(4, 8, 4\) is 3-D"),
    "v-5D": (_with(_layer(), "v", torch.zeros(1, 2, 8, 4, 1)), r"layer\.3\.v .* is 5-D"),
    "k-int": (
        _with(_layer(), "k", torch.zeros(1, 2, 8, 4, dtype=torch.int64)),
        r"layer\.3\.k .* has dtype int64, not one of float32",
    ),
    "k-short": (_with(_layer(), "k", torch.zeros(1, 2, 5, 4)), r"layer\.3\.k .* holds 5 positions"),
    "heads-5-over-3": (_layer(5, 3), r"layer 3: query heads \(5\) are not a multiple of .* \(3\)"),
    "head-dim": (
        _with(_layer(), "q", torch.zeros(1, 4, 8, 6)),
        r"layer 3: q and k differ in head_dim: layer\.3\.q \(1, 4, 8, 6\), "
        r"layer\.3\.k \(1, 2, 8, 4\)",
    ),
    "kv-heads": (
        _with(_layer(), "v", torch.zeros(1, 1, 8, 4)),
        r"layer 3: k and v differ in heads",
    ),
    "batch": (
        _with(_layer(), "k", torch.zeros(2, 2, 8, 4)),
        r"layer 3: q, k and v differ in batch",
    ),
    "no-heads": (_layer(0, 2), r"layer\.3\.q \(1, 0, 8, 4\) is empty"),
}


@pytest.mark.parametrize("case", BAD_LAYERS, ids=list(BAD_LAYERS))
def test_load_capture_names_the_file_and_tensor_that_do_not_fit(tmp_path, case):
    """Tensors that attention cannot take, or that disagree with each other, are a
    CaptureError naming the file, the tensor and what is wrong (they were read as they
    were: a raw error from inside attention, or a silent wrong answer)."""
    triple, said = BAD_LAYERS[case]
    path = tmp_path / "bad.safetensors"
    save_capture(path, {0: _layer(), 3: triple}, model="m", text_sha256="0")
    with pytest.raises(CaptureError, match=rf"^{re.escape(str(path))}: {said}"):
        load_capture(path)


def test_load_capture_refuses_a_length_the_tensors_do_not_hold(tmp_path):
    """Metadata of 4096 positions over tensors of 8: `run --seq-len 1000` measured 8
    positions under a table titled n=1000, and `tune` died with a raw KeyError."""
    path = tmp_path / "lies.safetensors"
    save_capture(path, {2: _layer()}, model="m", text_sha256="0", extra={"length": "4096"})
    said = r"layer\.2\.q \(1, 4, 8, 4\) holds 8 positions, but the metadata states length 4096$"
    with pytest.raises(CaptureError, match=rf"^{re.escape(str(path))}: {said}"):
        load_capture(path)


def test_load_capture_refuses_layers_that_are_no_list_of_numbers(tmp_path):
    path = tmp_path / "layers.safetensors"
    save_capture(path, {2: _layer()}, model="m", text_sha256="0", extra={"layers": "2"})
    with pytest.raises(CaptureError, match=r"metadata 'layers' must be a list"):
        load_capture(path)


def test_load_qkv_names_the_file_and_layer_of_a_nan_and_the_lengths_it_lacks(tmp_path):
    from attncompose.eval.data import DataError, load_qkv

    q, k, v = _layer()
    k[0, 1, 6, 2] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_capture(path, {0: _layer(), 5: (q, k, v)}, model="m", text_sha256="0")
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}: layer\.5\.k contains NaN or Inf values$"
    ):
        load_qkv(path, 8)
    assert [item.seq_len for item in load_qkv(path, 6)] == [6, 6]  # the NaN lies past 6
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}: holds 8 positions, fewer than the 9 asked$"
    ):
        load_qkv(path, 9)


@pytest.mark.parametrize("command", ["run", "tune"])
def test_cli_refuses_a_bad_capture_in_one_line(tmp_path, command):
    from click.testing import CliRunner

    from attncompose.cli import main

    path = tmp_path / "bad.safetensors"
    save_capture(path, {2: _layer(5, 3)}, model="m", text_sha256="0")
    args = {
        "run": ["run", "streaming", "--seq-len", "8", "--repeats", "1"],
        "tune": ["tune", "streaming", "--target-err", "0.3", "--seq-lens", "8", "--trials", "1"],
    }[command]
    out = ["--out", str(tmp_path / "t.yaml")] if command == "tune" else []
    result = CliRunner().invoke(main, [*args, *out, "--data", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: {path}: layer 2: query heads (5) are not a multiple of key/value heads (3): "
        "layer.2.q (1, 5, 8, 4), layer.2.k (1, 3, 8, 4), layer.2.v (1, 3, 8, 4)"
    ]
