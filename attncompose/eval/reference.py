"""Exact attention: the one oracle every error is measured against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

HEAD_CHUNK = 4  # query heads per call of the float32 form (bounds its memory)


def exact_attention(
    q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float | None = None
) -> Tensor:
    """Exact attention with PyTorch's SDPA, in the inputs' dtype: q [B, Hq, Lq, D], k/v
    [B, Hkv, Lk, D] (GQA expanded), causal bottom-right aligned -> [B, Hq, Lq, Dv]."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    lq, lk = q.shape[2], k.shape[2]
    if is_causal and lq != lk:
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)


def exact_attention_float32(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> Tensor:
    """:func:`exact_attention` in float32, a few query heads at a time with linear-memory
    SDPA kernels: the reference for long bfloat16/float16 inputs (benchmarks)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    group = q.shape[1] // k.shape[1]
    kernels = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(kernels), torch.no_grad():
        for h0 in range(0, q.shape[1], HEAD_CHUNK):
            heads = torch.arange(h0, min(h0 + HEAD_CHUNK, q.shape[1]), device=q.device)
            kv = heads // group  # the key/value head of each query head (GQA)
            out[:, heads] = exact_attention(
                q[:, heads].float(), k[:, kv].float(), v[:, kv].float(), is_causal
            )
    return out
