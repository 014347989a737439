"""Product counting: exact attention's query-key products, and frac, the share of them a
recipe computes (its torch kernels count theirs in ``primitives.base.count_products``)."""

from __future__ import annotations

import torch
from torch import Tensor

from attncompose.primitives.base import count_products


def exact_products(q: Tensor, k: Tensor, is_causal: bool) -> int:
    """Query-key products of exact attention: B*Hq*Lq*Lk, or the visible pairs if causal."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    if not is_causal:
        return b * hq * lq * lk
    offset = lk - lq  # bottom-right: query i sees keys 0..i+offset
    return b * hq * (lq * (offset + 1) + lq * (lq - 1) // 2)


def run_counted(attn, q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> tuple[Tensor, float]:
    """(output, frac): run ``attn`` counting the query-key products its torch kernels compute,
    frac being their share of exact attention's products."""
    with torch.no_grad(), count_products() as computed:
        out = attn(q, k, v, is_causal=is_causal)
    return out, computed[0] / exact_products(q, k, is_causal)


def products_fraction(attn, q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> float:
    """ "frac": products the recipe computes (torch kernels) / products of exact attention."""
    return run_counted(attn, q, k, v, is_causal)[1]
