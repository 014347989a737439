"""``attncompose bench RECIPE_OR_TUNED --seq-lens 4096,8192 [--causal] [--backend auto]``:
times one forward of the compiled attention and of ``scaled_dot_product_attention`` under each
SDPA backend on the device, and its relative error (the work is in :mod:`attncompose.eval.bench`).

Each row is shown as soon as it is measured.
"""

from __future__ import annotations

import click
import torch

from attncompose.cli.options import backend_option, causal_option, device_option, parse_lengths
from attncompose.cli.options import user_errors as _user_errors
from attncompose.eval.bench import BenchRow, default_shape, iter_bench_length, random_qkv
from attncompose.runtime.loading import attention_name, is_model_tuned_file, load_attention
from attncompose.spec.errors import RecipeError

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
    if is_model_tuned_file(recipe_or_tuned):  # one choice per layer: no one attention to time
        raise RecipeError(
            "this is a model-level tuned file (a choice per layer), which bench does not take: "
            "give it to `attncompose eval`, or load it with attncompose.load(PATH) (a "
            "ModelTuning: .layer(i) is layer i's attention)",
            source=recipe_or_tuned,
        )
    attn = load_attention(recipe_or_tuned, backend)
    name = attention_name(attn)
    console = Console()
    console.print(f"{name} on {dev}, B=1 H={heads} d={head_dim} {dtype}, causal={causal}")
    console.print(COLUMNS.format("seq_len", "implementation", "median ms", "rel. error", "note"))
    for n in seq_lens:
        q, k, v = random_qkv(1, heads, n, head_dim, getattr(torch, dtype), dev)
        for row in iter_bench_length(attn, q, k, v, causal, name):
            show_row(console, row)
