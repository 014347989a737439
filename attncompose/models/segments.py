"""Calibration segments of a text and their captured Q/K/V, cached on disk.

A text of T tokens gives consecutive segments of ``seq_len`` tokens (offsets 0, n, 2n, ...).
Each segment's capture (post-RoPE Q, K, V of every layer and head, float16, with the exact
perplexity of the same forward pass) is stored once in a cache folder, keyed by model, text
hash, length and offset, and reused by every later run (a capture of SmolLM2 at 4096 tokens
is 236 MB and one forward pass).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from attncompose.models.capture import capture_qkv_and_perplexity
from attncompose.models.capture_file import CaptureError, QKVTensors, load_capture, save_capture
from attncompose.models.card import ModelInputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CACHE_DTYPE = torch.float16


@dataclass(frozen=True)
class Segment:
    """``seq_len`` tokens of a text from ``offset``: ids [1, seq_len]."""

    role: str
    offset: int
    ids: torch.Tensor


@dataclass(frozen=True)
class SegmentCapture:
    """A segment, its Q/K/V per layer (float16, CPU) and its exact perplexity."""

    segment: Segment
    qkv: dict[int, QKVTensors]
    exact_ppl: float


def default_cache_dir() -> Path:
    """``$ATTNCOMPOSE_CACHE``, else ``$XDG_CACHE_HOME/attncompose``, else ~/.cache/attncompose."""
    if "ATTNCOMPOSE_CACHE" in os.environ:
        return Path(os.environ["ATTNCOMPOSE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "attncompose"


def split_segments(ids: torch.Tensor, seq_len: int, roles: list[str]) -> list[Segment]:
    """One segment per role, consecutive from the start of ``ids`` [1, T]."""
    need = seq_len * len(roles)
    if ids.shape[1] < need:
        raise ModelInputError(
            f"the text has {ids.shape[1]} tokens; {len(roles)} segment(s) of {seq_len} need "
            f"{need}: use fewer segments, a shorter length or a longer text"
        )
    return [
        Segment(role, i * seq_len, ids[:, i * seq_len : (i + 1) * seq_len])
        for i, role in enumerate(roles)
    ]


def capture_segment(
    model: PreTrainedModel, model_name: str, text_sha256: str, segment: Segment, cache_dir: Path
) -> SegmentCapture:
    """The segment's capture from the cache, or captured now (all layers) and cached."""
    n = segment.ids.shape[1]
    path = cache_dir / f"{model_name}-{text_sha256[:16]}-n{n}-at{segment.offset}.safetensors"
    cached = _read_cached(path, model_name, text_sha256, n, segment.offset)
    if cached is not None:
        return SegmentCapture(segment, *cached)
    qkv, ppl = capture_qkv_and_perplexity(model, segment.ids)
    qkv = {i: tuple(t.to(CACHE_DTYPE).cpu() for t in triple) for i, triple in qkv.items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    save_capture(
        tmp,
        qkv,
        model=model_name,
        text_sha256=text_sha256,
        extra={"offset": str(segment.offset), "perplexity": repr(ppl)},
    )
    os.replace(tmp, path)  # a killed run leaves no half-written cache entry
    return SegmentCapture(segment, qkv, ppl)


def _read_cached(
    path: Path, model_name: str, text_sha256: str, n: int, offset: int
) -> tuple[dict[int, QKVTensors], float] | None:
    """(qkv, exact perplexity) of a cache entry that matches, else None."""
    if not path.is_file():
        return None
    try:
        qkv, meta = load_capture(path)
    except CaptureError:
        return None
    same = (meta["model"], meta["text_sha256"], meta["length"], meta.get("offset")) == (
        model_name,
        text_sha256,
        n,
        str(offset),
    )
    if not same or "perplexity" not in meta:
        return None
    return qkv, float(meta["perplexity"])
