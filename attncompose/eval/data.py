"""The project's one data loader: Q/K/V for running, tuning and benchmarking.

``load_qkv`` reads a capture file (``attncompose capture``: post-RoPE Q, K, V per layer of a
real model) or, without a file, the built-in capture shipped with the package (4096 tokens).
The synthetic generator (structured: a sink token, local clusters) runs only when asked for
by name (``--data synthetic``): knobs tuned on random tensors say little about real
attention, so a length beyond the built-in capture is refused, saying how to capture one.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from attncompose.errors import AttncomposeError

BUILTIN_CAPTURE = "smollm2-pydoc.safetensors"
SYNTHETIC = "synthetic"  # the data name that asks for the synthetic generator
SYNTHETIC_NOTE = "data: synthetic, structured random tensors (not real attention)"


class DataError(AttncomposeError, ValueError):
    """Calibration data that cannot be used, naming the file and the problem."""


@dataclass(frozen=True)
class QKVItem:
    """One attention input: q [1, Hq, L, D], k/v [1, Hkv, L, D] (float32), and its origin."""

    name: str
    q: Tensor
    k: Tensor
    v: Tensor

    @property
    def seq_len(self) -> int:
        return self.q.shape[2]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> QKVItem:
        return QKVItem(
            self.name, *(t.to(device=device, dtype=dtype) for t in (self.q, self.k, self.v))
        )


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
) -> list[QKVItem]:
    """Q/K/V of length ``seq_len`` from a capture file, the built-in capture (``path``
    None), or the synthetic generator (``path`` "synthetic").

    From a capture, each selected layer gives one item (first ``seq_len`` positions).
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    if path is not None and str(path) == SYNTHETIC:
        return [synthetic_qkv(seq_len, heads=synthetic_heads, head_dim=head_dim, seed=seed)]
    source = Path(path) if path is not None else builtin_capture_path()
    if source is None:
        raise DataError(f"the built-in capture is missing from this install; {_how(seq_len)}")
    return _from_capture(source, seq_len, layers, builtin=path is None)


def _how(seq_len: int) -> str:
    """How to get data of ``seq_len`` tokens."""
    from attncompose.models.smollm2 import SMOLLM2

    synthetic = f"or --data {SYNTHETIC} for structured random tensors (not real attention)"
    if seq_len > SMOLLM2.positions:
        return (
            f"SmolLM2 reaches {SMOLLM2.positions} tokens: pass --data with a capture of a "
            f"longer-context model, {synthetic}"
        )
    return (
        f"capture real attention with `attncompose capture --seq-len {seq_len} --layers "
        f"2,11,20,29 --out qkv.safetensors` and pass --data qkv.safetensors, {synthetic}"
    )


def _from_capture(
    path: Path, seq_len: int, layers: list[int] | None, builtin: bool
) -> list[QKVItem]:
    from attncompose.models.capture_file import CaptureError, load_capture
    from attncompose.runtime.checks import non_finite

    try:
        captured, meta = load_capture(path)
    except CaptureError as err:
        raise DataError(str(err)) from None
    length = int(meta["length"])
    if seq_len > length:
        if builtin:
            raise DataError(
                f"the built-in capture holds {length} tokens, fewer than the {seq_len} asked: "
                + _how(seq_len)
            )
        raise DataError(f"{path}: holds {length} positions, fewer than the {seq_len} asked")
    chosen = sorted(captured) if layers is None else layers
    missing = [i for i in chosen if i not in captured]
    if missing:
        raise DataError(f"{path}: no layers {missing} (has {sorted(captured)})")
    out = []
    for i in chosen:
        q, k, v = (t[:, :, :seq_len].float() for t in captured[i])
        bad = non_finite(q, k, v)  # the attention call's own check, naming file and layer
        if bad is not None:
            raise DataError(f"{path}: layer.{i}.{bad} contains NaN or Inf values")
        out.append(QKVItem(f"{path.name}:layer{i}", q, k, v))
    return out


def synthetic_qkv(seq_len: int, heads: int = 4, head_dim: int = 64, seed: int = 0) -> QKVItem:
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
    return QKVItem("synthetic", q[None] * 0.65, k[None] * 0.65, v[None])
