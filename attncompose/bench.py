"""Speed of a recipe (or tuned file) against the exact SDPA backends available on the device.

``attncompose bench RECIPE_OR_TUNED --seq-lens 4096,8192 [--causal] [--backend auto]`` times
one forward of the compiled attention and of ``scaled_dot_product_attention`` under each SDPA
backend that runs on the device (flash, cuDNN, memory-efficient on CUDA; flash and math on
CPU), with :func:`attncompose.eval.timing.measure`, and reports its relative error against exact
float32 attention. ``benchmarks/bench_gpu.py`` reuses these functions for its grid.

Sizes not given suit the device (:func:`default_shape`: a GPU's model-sized heads, a CPU's
smaller ones), each row is shown as soon as it is measured, and a dense (math) SDPA backend
whose score matrix would not fit in memory is skipped with a note.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import click
import torch
import torch.nn.functional as F
from torch import Tensor

from attncompose.commands import backend_option, causal_option, device_option, parse_lengths
from attncompose.commands import user_errors as _user_errors
from attncompose.eval.metrics import relative_error
from attncompose.eval.reference import exact_attention_float32
from attncompose.eval.timing import measure
from attncompose.loading import attention_name, load_attention

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


COLUMNS = "{:>8}  {:<24} {:>10} {:>10}  {}"


def show_row(console, row: BenchRow) -> None:
    """One measured row, printed at once (long runs show progress row by row)."""
    console.print(
        COLUMNS.format(
            row.seq_len,
            row.name,
            "-" if row.median_ms is None else f"{row.median_ms:.2f}",
            "" if row.error is None else f"{row.error:.4f}",
            row.note or "",
        ),
        highlight=False,
        soft_wrap=True,
    )


@click.command("bench")
@click.argument("recipe_or_tuned")
@click.option(
    "--seq-lens",
    default=None,
    callback=lambda ctx, param, value: None if value is None else parse_lengths(ctx, param, value),
    help="[default: 4096,8192 on CUDA, 1024,4096 on CPU]",
)
@causal_option
@backend_option
@click.option("--heads", type=click.IntRange(min=1), help="[default: 32 on CUDA, 4 on CPU]")
@click.option("--head-dim", type=click.IntRange(min=1), help="[default: 128 on CUDA, 64 on CPU]")
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    help="[default: bfloat16 on CUDA, float32 on CPU]",
)
@device_option("Default: cuda if available, else cpu.")
@_user_errors
def bench(
    recipe_or_tuned: str,
    seq_lens: tuple[int, ...] | None,
    causal: bool,
    backend: str,
    heads: int | None,
    head_dim: int | None,
    dtype: str | None,
    device: str | None,
) -> None:
    """Latency of RECIPE_OR_TUNED vs exact SDPA backends, and its relative error."""
    from rich.console import Console

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = default_shape(dev)
    seq_lens = seq_lens or shape.seq_lens
    heads, head_dim, dtype = heads or shape.heads, head_dim or shape.head_dim, dtype or shape.dtype
    attn = load_attention(recipe_or_tuned, backend)
    name = attention_name(attn)
    console = Console()
    console.print(f"{name} on {dev}, B=1 H={heads} d={head_dim} {dtype}, causal={causal}")
    console.print(COLUMNS.format("seq_len", "implementation", "median ms", "rel. error", "note"))
    for n in seq_lens:
        q, k, v = random_qkv(1, heads, n, head_dim, getattr(torch, dtype), dev)
        for row in iter_bench_length(attn, q, k, v, causal, name):
            show_row(console, row)


__all__ = [
    "BenchRow",
    "BenchShape",
    "bench",
    "bench_length",
    "default_shape",
    "iter_bench_length",
    "sdpa_backends",
]
