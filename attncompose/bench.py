"""Speed of a recipe (or tuned file) against the exact SDPA backends available on the device.

``attncompose bench RECIPE_OR_TUNED --seq-lens 4096,8192 [--causal] [--backend auto]`` times
one forward of the compiled attention and of ``scaled_dot_product_attention`` under each SDPA
backend that runs on the device (flash, cuDNN, memory-efficient on CUDA; flash and math on
CPU), with :func:`attncompose.timing.measure`, and reports its relative error against exact
float32 attention. ``benchmarks/bench_gpu.py`` reuses these functions for its grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import click
import torch
import torch.nn.functional as F
from torch import Tensor

from attncompose.commands import backend_option, device_option, parse_lengths
from attncompose.commands import user_errors as _user_errors
from attncompose.loading import load_attention
from attncompose.metrics import relative_error
from attncompose.timing import measure
from attncompose.tuned import TunedAttention

HEAD_CHUNK = 4  # heads per exact float32 reference call (bounds its memory)


@dataclass(frozen=True)
class BenchRow:
    """One (implementation, length) timing; ``error`` is None for exact baselines."""

    name: str
    seq_len: int
    causal: bool
    median_ms: float | None
    error: float | None = None
    note: str | None = None


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


def exact_reference(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """Exact attention in float32, a few heads at a time (linear-memory SDPA kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    group = q.shape[1] // k.shape[1]
    kernels = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(kernels), torch.no_grad():
        for h0 in range(0, q.shape[1], HEAD_CHUNK):
            heads = torch.arange(h0, min(h0 + HEAD_CHUNK, q.shape[1]), device=q.device)
            kv = heads // group  # the key/value head of each query head (GQA)
            out[:, heads] = F.scaled_dot_product_attention(
                q[:, heads].float(), k[:, kv].float(), v[:, kv].float(), is_causal=causal
            )
    return out


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
    n, device = q.shape[2], q.device
    with torch.no_grad():
        out = attn(q, k, v, is_causal=causal)
    error = relative_error(out.float(), exact_reference(q, k, v, causal))
    del out
    t = measure(lambda: attn(q, k, v, is_causal=causal), device)
    rows = [BenchRow(name, n, causal, t.median_ms, error)]
    for label, backend in sdpa_backends(device).items():
        try:
            ms = measure(sdpa_call(q, k, v, causal, backend), device).median_ms
            rows.append(BenchRow(f"sdpa-{label}", n, causal, ms))
        except RuntimeError as err:  # backend not built or not for this dtype/shape
            note = str(err).strip().splitlines()[0][:200]
            rows.append(BenchRow(f"sdpa-{label}", n, causal, None, note=note))
    return rows


@click.command("bench")
@click.argument("recipe_or_tuned")
@click.option("--seq-lens", default="4096,8192", show_default=True, callback=parse_lengths)
@click.option("--causal/--no-causal", default=False, show_default=True)
@backend_option
@click.option("--heads", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--head-dim", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--dtype",
    default="bfloat16",
    show_default=True,
    type=click.Choice(["bfloat16", "float16", "float32"]),
)
@device_option("Default: cuda if available, else cpu.")
@_user_errors
def bench(
    recipe_or_tuned: str,
    seq_lens: list[int],
    causal: bool,
    backend: str,
    heads: int,
    head_dim: int,
    dtype: str,
    device: str | None,
) -> None:
    """Latency of RECIPE_OR_TUNED vs exact SDPA backends, and its relative error."""
    from rich.console import Console
    from rich.table import Table

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    attn = load_attention(recipe_or_tuned, backend)
    name = attn.recipe.name + (" (tuned)" if isinstance(attn, TunedAttention) else "")
    table = Table(title=f"{name} on {dev}, B=1 H={heads} d={head_dim} {dtype}, causal={causal}")
    for col in ("seq_len", "implementation", "median ms", "rel. error", "note"):
        table.add_column(col)
    for n in seq_lens:
        q, k, v = random_qkv(1, heads, n, head_dim, getattr(torch, dtype), dev)
        for row in bench_length(attn, q, k, v, causal, name):
            table.add_row(
                str(n),
                row.name,
                "-" if row.median_ms is None else f"{row.median_ms:.2f}",
                "" if row.error is None else f"{row.error:.4f}",
                row.note or "",
            )
    Console().print(table)


__all__ = ["BenchRow", "bench", "bench_length", "exact_reference", "sdpa_backends"]
