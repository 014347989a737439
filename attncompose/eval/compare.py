"""Error and latency of an attention callable against exact attention on Q/K/V data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from attncompose.eval.data import load_qkv
from attncompose.eval.metrics import relative_error
from attncompose.eval.reference import exact_attention
from attncompose.eval.timing import measure


@dataclass(frozen=True)
class Comparison:
    """One data item: relative error against exact, and both latencies (ms)."""

    name: str
    error: float
    latency_ms: float
    exact_ms: float


def compare_to_exact(
    attn, data: Path | None, seq_len: int, causal: bool, repeats: int = 3, device: str = "cpu"
) -> list[Comparison]:
    """Run ``attn`` and exact SDPA on each item of the data at ``seq_len``."""
    rows = []
    for item in load_qkv(data, seq_len):
        x = item.to(device)
        with torch.no_grad():
            exact = exact_attention(x.q, x.k, x.v, causal)
            out = attn(x.q, x.k, x.v, is_causal=causal)
            t_exact = measure(
                lambda x=x: exact_attention(x.q, x.k, x.v, causal), device, repeats=repeats
            )
            t_attn = measure(
                lambda x=x: attn(x.q, x.k, x.v, is_causal=causal), device, repeats=repeats
            )
        rows.append(
            Comparison(item.name, relative_error(out, exact), t_attn.median_ms, t_exact.median_ms)
        )
    return rows
