"""The capture file format: post-RoPE Q, K, V per layer in safetensors, with metadata.

Layout: ``layer.{i}.q`` [1, Hq, L, D], ``layer.{i}.k`` and ``layer.{i}.v`` [1, Hkv, L, D],
plus string metadata (format, model, text hash, length, layers, heads, head dim, dtype).
Reading and writing need safetensors only, not transformers. Reading checks each layer's
tensors against each other and against the metadata's length, naming the file and tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from attncompose.errors import AttncomposeError
from attncompose.runtime.checks import SUPPORTED_DTYPES
from attncompose.runtime.files import default_permissions

QKVTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # one layer's q, k, v [1, H, L, D]
FORMAT = "attncompose.capture/1"
_INT_FIELDS = ("length", "num_q_heads", "num_kv_heads", "head_dim")


class CaptureError(AttncomposeError, ValueError):
    """A capture file is missing, unreadable, lacks tensors its metadata promises, or holds
    tensors that do not fit it (shapes, dtype), naming the file and the tensor."""


def save_capture(
    path: str | Path,
    qkv: dict[int, QKVTensors],
    *,
    model: str,
    text_sha256: str,
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write captured tensors and their metadata to a safetensors file; returns the metadata.

    Metadata: format, model, text_sha256, length, layers, num_q_heads, num_kv_heads, head_dim,
    dtype, and the string fields of ``extra`` (e.g. where in the text, exact perplexity).
    """
    if not qkv:
        raise ValueError("nothing to save: no layers were captured")
    q, k, _ = next(iter(qkv.values()))
    metadata = {
        "format": FORMAT,
        "model": model,
        "text_sha256": text_sha256,
        "length": q.shape[2],
        "layers": sorted(qkv),
        "num_q_heads": q.shape[1],
        "num_kv_heads": k.shape[1],
        "head_dim": q.shape[3],
        "dtype": str(q.dtype).removeprefix("torch."),
        **(extra or {}),
    }
    tensors = {
        f"layer.{i}.{name}": t.cpu()
        for i, triple in qkv.items()
        for name, t in zip("qkv", triple, strict=True)
    }
    text = {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in metadata.items()
    }
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=text)
        default_permissions(path)  # safetensors writes 0600
    except (SafetensorError, OSError) as error:
        raise CaptureError(f"cannot write {path}: {error}") from None
    return metadata


def _parse_metadata(path: Path, raw: dict[str, str] | None) -> dict[str, Any]:
    """Metadata of a capture file with numbers and the layer list decoded."""
    if not raw or raw.get("format") != FORMAT:
        raise CaptureError(f"{path} is not an attncompose capture file (no {FORMAT!r} metadata)")
    try:
        metadata = {
            **raw,
            "layers": json.loads(raw["layers"]),
            **{key: int(raw[key]) for key in _INT_FIELDS},
        }
    except (KeyError, ValueError) as error:
        raise CaptureError(f"{path} has incomplete metadata: {error}") from error
    layers = metadata["layers"]
    if not isinstance(layers, list) or not all(type(i) is int for i in layers):
        raise CaptureError(
            f"{path}: metadata 'layers' must be a list of layer numbers, got {raw['layers']!r}"
        )
    return metadata


def load_capture(path: str | Path) -> tuple[dict[int, QKVTensors], dict[str, Any]]:
    """Read a capture file: ({layer: (q [1, Hq, L, D], k [1, Hkv, L, D], v)}, metadata).

    Tensors that attention cannot take, or that disagree with each other or with the
    metadata's length, are a CaptureError naming the file and the tensor."""
    path = Path(path)
    if not path.is_file():
        raise CaptureError(f"capture file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = _parse_metadata(path, handle.metadata())
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CaptureError(f"{path} is not a readable safetensors file: {error}") from error
    missing = [
        f"layer.{i}.{n}"
        for i in metadata["layers"]
        for n in "qkv"
        if f"layer.{i}.{n}" not in tensors
    ]
    if missing:
        raise CaptureError(f"{path} lacks tensors {', '.join(missing[:6])}")
    qkv = {i: tuple(tensors[f"layer.{i}.{n}"] for n in "qkv") for i in metadata["layers"]}
    for i, triple in qkv.items():
        _check_layer(path, i, triple, metadata["length"])
    return qkv, metadata


def _check_layer(path: Path, layer: int, qkv: QKVTensors, length: int) -> None:
    """Raise a CaptureError unless one layer's q, k, v are what attention takes: each 4-D
    [batch, heads, length, head_dim] of a supported float dtype, with ``length`` positions
    (the metadata's), no empty dimension, one batch size, q and k one head_dim, k and v the
    same heads, and query heads a multiple of key/value heads (grouped-query attention)."""
    named = {f"layer.{layer}.{n}": t for n, t in zip("qkv", qkv, strict=True)}
    for name, t in named.items():
        where = f"{path}: {name} {tuple(t.shape)}"
        if t.dim() != 4:
            raise CaptureError(f"{where} is {t.dim()}-D, not [batch, heads, length, head_dim]")
        if t.dtype not in SUPPORTED_DTYPES:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
            raise CaptureError(
                f"{where} has dtype {str(t.dtype).removeprefix('torch.')}, not one of {allowed}"
            )
        if t.shape[2] != length:
            raise CaptureError(
                f"{where} holds {t.shape[2]} positions, but the metadata states length {length}"
            )
        if 0 in t.shape:
            raise CaptureError(f"{where} is empty")
    q, k, v = qkv
    shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in named.items())
    where = f"{path}: layer {layer}:"
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise CaptureError(f"{where} q, k and v differ in batch: {shapes}")
    if q.shape[3] != k.shape[3]:
        raise CaptureError(f"{where} q and k differ in head_dim: {shapes}")
    if k.shape[1] != v.shape[1]:
        raise CaptureError(f"{where} k and v differ in heads: {shapes}")
    if q.shape[1] % k.shape[1]:
        raise CaptureError(
            f"{where} query heads ({q.shape[1]}) are not a multiple of key/value heads "
            f"({k.shape[1]}): {shapes}"
        )


def select_kv_heads(qkv: dict[int, QKVTensors], kv_heads: list[int]) -> dict[int, QKVTensors]:
    """Keep the given key/value heads and their groups of query heads (GQA order)."""
    out = {}
    for layer, (q, k, v) in qkv.items():
        group = q.shape[1] // k.shape[1]
        bad = [h for h in kv_heads if not 0 <= h < k.shape[1]]
        if bad:
            raise CaptureError(f"no key/value heads {bad}: the model has {k.shape[1]}")
        q_heads = [h * group + i for h in kv_heads for i in range(group)]
        out[layer] = (q[:, q_heads], k[:, kv_heads], v[:, kv_heads])
    return out
