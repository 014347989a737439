"""Error and latency of an attention callable against exact attention on Q/K/V data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from attncompose.data import load_qkv
from attncompose.metrics import relative_error
from attncompose.timing import measure


@dataclass(frozen=True)
class Comparison:
    """One data item: relative error against exact, and both latencies (ms)."""

    name: str
    error: float
    latency_ms: float
    exact_ms: float


def exact_sdpa(q, k, v, is_causal: bool, scale: float | None = None):
    """Exact attention with PyTorch's SDPA (GQA expanded, causal bottom-right aligned)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    lq, lk = q.shape[2], k.shape[2]
    if is_causal and lq != lk:
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)


def compare_to_exact(
    attn, data: Path | None, seq_len: int, causal: bool, repeats: int = 3, device: str = "cpu"
) -> list[Comparison]:
    """Run ``attn`` and exact SDPA on each item of the data at ``seq_len``."""
    rows = []
    for item in load_qkv(data, seq_len):
        x = item.to(device)
        with torch.no_grad():
            exact = exact_sdpa(x.q, x.k, x.v, causal)
            out = attn(x.q, x.k, x.v, is_causal=causal)
            t_exact = measure(
                lambda x=x: exact_sdpa(x.q, x.k, x.v, causal), device, repeats=repeats
            )
            t_attn = measure(
                lambda x=x: attn(x.q, x.k, x.v, is_causal=causal), device, repeats=repeats
            )
        rows.append(
            Comparison(item.name, relative_error(out, exact), t_attn.median_ms, t_exact.median_ms)
        )
    return rows


def exact_products(q, k, is_causal: bool) -> int:
    """Query-key products of exact attention: B*Hq*Lq*Lk, or the visible pairs if causal."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    if not is_causal:
        return b * hq * lq * lk
    offset = lk - lq  # bottom-right: query i sees keys 0..i+offset
    return b * hq * (lq * (offset + 1) + lq * (lq - 1) // 2)


def run_counted(attn, q, k, v, is_causal: bool):
    """(output, frac): run ``attn`` counting the query-key products its torch kernels compute,
    frac being their share of exact attention's products."""
    from attncompose.primitives.base import count_products

    with torch.no_grad(), count_products() as computed:
        out = attn(q, k, v, is_causal=is_causal)
    return out, computed[0] / exact_products(q, k, is_causal)


def products_fraction(attn, q, k, v, is_causal: bool) -> float:
    """ "frac": products the recipe computes (torch kernels) / products of exact attention."""
    return run_counted(attn, q, k, v, is_causal)[1]
