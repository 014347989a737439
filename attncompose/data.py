"""The project's one data loader: Q/K/V for running, tuning and benchmarking.

``load_qkv`` reads a capture file (``attncompose capture``: post-RoPE Q, K, V per layer of a
real model) or, without a file, the built-in capture shipped with the package; where no
capture is available or the length asked exceeds it, it falls back to the synthetic
generator (structured: a sink token, local clusters), and says which it used.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

BUILTIN_CAPTURE = "smollm2-pydoc.safetensors"


class DataError(ValueError):
    """Calibration data that cannot be used, naming the file and the problem."""


@dataclass(frozen=True)
class QKV:
    """One attention input: q [1, Hq, L, D], k/v [1, Hkv, L, D] (float32), and its origin."""

    name: str
    q: Tensor
    k: Tensor
    v: Tensor

    @property
    def seq_len(self) -> int:
        return self.q.shape[2]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> QKV:
        return QKV(self.name, *(t.to(device=device, dtype=dtype) for t in (self.q, self.k, self.v)))


def builtin_capture_path() -> Path | None:
    """Path of the capture shipped with the package, or None if it is not there."""
    path = Path(str(resources.files("attncompose") / "data" / BUILTIN_CAPTURE))
    return path if path.exists() else None


def load_qkv(
    path: str | Path | None,
    seq_len: int,
    *,
    layers: list[int] | None = None,
    synthetic_heads: int = 4,
    head_dim: int = 64,
    seed: int = 0,
) -> list[QKV]:
    """Q/K/V of length ``seq_len`` from a capture file, the built-in capture, or synthetic.

    From a capture, each selected layer gives one item (first ``seq_len`` positions).
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    source = Path(path) if path is not None else builtin_capture_path()
    if source is not None:
        items = _from_capture(source, seq_len, layers, explicit=path is not None)
        if items:
            return items
    return [synthetic_qkv(seq_len, heads=synthetic_heads, head_dim=head_dim, seed=seed)]


def _from_capture(path: Path, seq_len: int, layers: list[int] | None, explicit: bool) -> list[QKV]:
    from attncompose.models.capture_file import CaptureError, load_capture

    try:
        captured, meta = load_capture(path)
    except CaptureError as err:
        raise DataError(str(err)) from None
    length = int(meta["length"])
    if seq_len > length:
        if explicit:
            raise DataError(f"{path}: holds {length} positions, fewer than the {seq_len} asked")
        return []
    chosen = sorted(captured) if layers is None else layers
    missing = [i for i in chosen if i not in captured]
    if missing:
        raise DataError(f"{path}: no layers {missing} (has {sorted(captured)})")
    out = []
    for i in chosen:
        q, k, v = (t[:, :, :seq_len].float() for t in captured[i])
        out.append(QKV(f"{path.name}:layer{i}", q, k, v))
    return out


def synthetic_qkv(seq_len: int, heads: int = 4, head_dim: int = 64, seed: int = 0) -> QKV:
    """Structured random attention inputs [1, heads, seq_len, head_dim].

    Positions run in segments that share a topic vector (queries align with the keys of their
    topic, so attention concentrates on a few regions), and token 0 is a sink that every query
    leans towards, as in real language models. Random, but not uniform attention.
    """
    g = torch.Generator().manual_seed(seed)
    d = head_dim
    n_topics = 16
    topics = torch.randn(heads, n_topics, d, generator=g)
    seg = torch.randint(32, 256, (seq_len // 32 + 2,), generator=g)
    topic_of = torch.repeat_interleave(torch.randint(0, n_topics, seg.shape, generator=g), seg)
    topic_of = topic_of[:seq_len]
    base = topics[:, topic_of]  # [H, L, D]
    k = base + 0.8 * torch.randn(heads, seq_len, d, generator=g)
    q = base + 0.8 * torch.randn(heads, seq_len, d, generator=g)
    sink = torch.randn(heads, 1, d, generator=g)
    sink = sink / sink.norm(dim=-1, keepdim=True) * 2.0 * d**0.5
    k[:, :1] = sink
    q = q + 0.5 * sink
    v = torch.randn(heads, seq_len, d, generator=g)
    return QKV("synthetic", q[None] * 0.65, k[None] * 0.65, v[None])
