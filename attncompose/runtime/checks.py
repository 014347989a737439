"""Input validation of the attention call: every bad input is a clear error naming what."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch
from torch import Tensor

from attncompose.errors import AttentionInputError

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_sdpa_options(attn_mask: object, dropout_p: float, scale: object = None) -> None:
    """SDPA arguments an approximation cannot honour (an explicit mask, dropout), and a
    ``scale`` that is no finite real number (a NaN scale gave finite nonsense or NaN
    outputs); NumPy's scalars are numbers, a tensor is not (reading it waits for its device)."""
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale)
    ):
        hint = " (a tensor: pass float(scale))" if isinstance(scale, Tensor) else ""
        raise AttentionInputError(f"scale must be None or a finite number, got {scale!r}{hint}")
    if attn_mask is not None:
        raise AttentionInputError(
            "attn_mask is not supported: approximate attention takes no arbitrary mask; pass "
            "is_causal=True for a (bottom-right) causal mask, or run exact SDPA for this call"
        )
    if dropout_p:
        raise AttentionInputError(f"dropout_p must be 0 (inference only), got {dropout_p}")


def check_inputs(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, check_finite: bool) -> None:
    """Shapes [B,Hq,Lq,D], [B,Hkv,Lk,D], [B,Hkv,Lk,Dv]; same dtype/device; Hq % Hkv == 0;
    ``is_causal`` a bool, as SDPA wants it (a string such as 'false' read as true)."""
    if not isinstance(is_causal, (bool, np.bool_)):
        shown = (
            f"a tensor of shape {tuple(is_causal.shape)}"
            if isinstance(is_causal, Tensor)
            else f"{is_causal!r:.60}"
        )
        raise AttentionInputError(f"is_causal must be True or False, got {shown}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise AttentionInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:  # a sparse one died in a reshape
            raise AttentionInputError(f"{name} must be a dense tensor, got layout {t.layout}")
        if t.dim() != 4:
            raise AttentionInputError(
                f"{name} must be 4-D [batch, heads, length, head_dim], got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise AttentionInputError(
                f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionInputError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(
            f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}"
        )
    if q.device.type == "meta":
        raise AttentionInputError(
            "q, k, v are meta tensors (shapes without values); attention needs their values"
        )
    (b, hq, lq, d), (bk, hkv, lk, dk) = q.shape, k.shape
    if bk != b or v.shape[0] != b:
        raise AttentionInputError(f"batch sizes differ: q {b}, k {bk}, v {v.shape[0]}")
    if b == 0:
        raise AttentionInputError(f"empty batch: q has shape {tuple(q.shape)}")
    if hq == 0:
        raise AttentionInputError(f"no query heads: q has shape {tuple(q.shape)}")
    if dk != d:
        raise AttentionInputError(f"head_dim of q ({d}) and k ({dk}) differ")
    for name, t in (("q", q), ("v", v)):
        if t.shape[3] == 0:
            raise AttentionInputError(f"head_dim is 0: {name} has shape {tuple(t.shape)}")
    if v.shape[1] != hkv or v.shape[2] != lk:
        raise AttentionInputError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on heads and length"
        )
    if hkv == 0 or hq % hkv:
        raise AttentionInputError(
            f"query heads ({hq}) must be a multiple of key/value heads "
            f"({hkv}) for grouped-query attention"
        )
    if lk == 0 or lq == 0:
        raise AttentionInputError(f"empty sequence: Lq={lq}, Lk={lk}")
    if is_causal and lq > lk:
        raise AttentionInputError(
            f"causal attention needs Lq <= Lk (bottom-right aligned), got Lq={lq}, Lk={lk}"
        )
    if check_finite:
        bad = non_finite(q, k, v)
        if bad is not None:
            raise AttentionInputError(f"{bad} contains NaN or Inf values")


def non_finite(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """The first of q, k, v that holds a NaN or an Inf, or None.

    A float32 sum is finite only if every element is (a NaN or an Inf makes every partial
    sum after it non-finite): one read-only pass per tensor, then ONE read back to the
    host, tested there (the call's only device synchronisation, in five launches: three
    sums, a stack, a copy). A sum also overflows where finite elements add up past 3e38;
    only then the tensor's min and max decide (finite iff every element is). A sum takes
    about a quarter less time than ``aminmax`` over keys and values out of cache on a CPU
    (2.4x faster where they sit in cache), and a decode step checks every cached key."""
    tensors = {"q": q, "k": k, "v": v}
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors.values()]).tolist()
    for (name, t), total in zip(tensors.items(), sums, strict=True):
        if not math.isfinite(total) and not all(map(math.isfinite, torch.aminmax(t))):
            return name
    return None
