"""Speed of an attention against the exact SDPA backends available on the device, and its
relative error against exact float32 attention (``attncompose bench``, ``benchmarks/bench_gpu.py``).

Each SDPA backend that runs on the device (flash, cuDNN, memory-efficient on CUDA; flash and
math on CPU) is timed with :func:`attncompose.eval.timing.measure`; a dense (math) backend
whose score matrix would not fit in memory is skipped with a note. Sizes not given suit the
device (:func:`default_shape`: a GPU's model-sized heads, a CPU's smaller ones).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attncompose.errors import AttncomposeError
from attncompose.eval.metrics import relative_error
from attncompose.eval.reference import exact_attention_float32
from attncompose.eval.timing import measure

MEMORY_SHARE = 4  # a dense score matrix may take 1/MEMORY_SHARE of the device's memory


@dataclass(frozen=True)
class BenchRow:
    """One (implementation, length) timing; ``error`` is None for exact baselines."""

    name: str
    seq_len: int
    causal: bool
    median_ms: float | None
    error: float | None = None
    note: str | None = None


@dataclass(frozen=True)
class BenchShape:
    """Input sizes of a benchmark: B=1, ``heads`` heads of ``head_dim``, ``dtype``, lengths."""

    heads: int
    head_dim: int
    dtype: str
    seq_lens: tuple[int, ...]


DEFAULT_SHAPES = {
    "cuda": BenchShape(32, 128, "bfloat16", (4096, 8192)),  # a 7B-class layer
    "cpu": BenchShape(4, 64, "float32", (1024, 4096)),  # seconds on two cores, not minutes
}


def default_shape(device: torch.device) -> BenchShape:
    """The sizes ``bench`` uses on ``device`` where none are given."""
    return DEFAULT_SHAPES["cuda" if device.type == "cuda" else "cpu"]


def memory_budget(device: torch.device) -> int:
    """Bytes a dense score matrix may take on ``device``: a share of its memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // MEMORY_SHARE
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MEMORY_SHARE


def sdpa_backends(device: torch.device) -> dict[str, object]:
    """SDPA backends worth timing on ``device`` (name -> ``SDPBackend``)."""
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        names = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
    else:
        names = ("FLASH_ATTENTION", "MATH")
    return {n.lower(): getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)}


def sdpa_call(q: Tensor, k: Tensor, v: Tensor, causal: bool, backend) -> Callable[[], Tensor]:
    """A no-argument SDPA forward pinned to one backend."""
    from torch.nn.attention import sdpa_kernel

    def call() -> Tensor:
        with sdpa_kernel(backend), torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def random_qkv(
    b: int, h: int, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Standard-normal q, k, v [B, H, n, d]."""
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, device=device).to(dtype) for _ in range(3))
    return q, k, v


def bench_length(
    attn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, causal: bool, name: str
) -> list[BenchRow]:
    """Time ``attn`` and every available SDPA backend on one input; error of ``attn``."""
    return list(iter_bench_length(attn, q, k, v, causal, name))


def iter_bench_length(
    attn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, causal: bool, name: str
) -> Iterator[BenchRow]:
    """:func:`bench_length`'s rows, each as soon as it is measured."""
    _check_timeable(attn)  # now, not at the first row
    return _rows(attn, q, k, v, causal, name)


def _check_timeable(attn: object) -> None:
    """Refuse what bench cannot time: it times one attention callable (an attention per layer,
    a recipe's name and the like were a TypeError from inside)."""
    if callable(attn):
        return
    got = type(attn).__name__
    if callable(getattr(attn, "layer", None)):  # a ModelTuning: a choice per layer
        hint = ": its attention differs per layer; time one layer's (attn.layer(i))"
    elif isinstance(attn, str):
        got, hint = f"str {attn!r:.60}", f"; for a recipe, pass ac.compile({attn!r:.60})"
    else:
        hint = ""
    raise AttncomposeError(
        "bench times an attention callable (ac.compile(recipe), ac.load(a tuned file of "
        f"`attncompose tune`)), not {got}{hint}"
    )


def _rows(
    attn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, causal: bool, name: str
) -> Iterator[BenchRow]:
    n, device = q.shape[2], q.device
    with torch.no_grad():
        out = attn(q, k, v, is_causal=causal)
    error = relative_error(out.float(), exact_attention_float32(q, k, v, causal))
    del out
    t = measure(lambda: attn(q, k, v, is_causal=causal), device)
    yield BenchRow(name, n, causal, t.median_ms, error)
    scores = q.shape[0] * q.shape[1] * n * k.shape[2] * 4  # a float32 score matrix
    for label, backend in sdpa_backends(device).items():
        if label == "math" and scores > memory_budget(device):
            note = f"skipped: its score matrix needs {_size(scores)}"
            yield BenchRow(f"sdpa-{label}", n, causal, None, note=note)
            continue
        try:
            ms = measure(sdpa_call(q, k, v, causal, backend), device).median_ms
            yield BenchRow(f"sdpa-{label}", n, causal, ms)
        except RuntimeError as err:  # backend not built or not for this dtype/shape
            note = str(err).strip().splitlines()[0][:200]
            yield BenchRow(f"sdpa-{label}", n, causal, None, note=note)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


__all__ = [
    "BenchRow",
    "BenchShape",
    "bench_length",
    "default_shape",
    "iter_bench_length",
    "memory_budget",
    "random_qkv",
    "sdpa_backends",
    "sdpa_call",
]
