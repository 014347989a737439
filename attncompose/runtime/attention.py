"""The SDPA-compatible attention module that ``compile`` returns."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attncompose.primitives.base import Problem
from attncompose.runtime.checks import check_inputs
from attncompose.runtime.compiler import Pipeline


class Attention(nn.Module):
    """Approximate attention with the calling convention of ``scaled_dot_product_attention``.

    ``attn(q, k, v, is_causal=False, scale=None, return_lse=False)`` with q [B, Hq, Lq, D],
    k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] (Hq a multiple of Hkv; causal masks are aligned
    bottom-right, so Lq < Lk is decoding). Returns o [B, Hq, Lq, Dv] in q's dtype, and with
    ``return_lse`` also lse [B, Hq, Lq] (float32, natural log). Computation runs in float32:
    inputs are cast, except where the Triton kernels run (``backend="triton"``, or ``"auto"``
    on CUDA), which read float16/bfloat16 as they are and accumulate in float32.
    ``fuse=False`` evaluates every step on its own instead of fusing step patterns
    (:mod:`attncompose.runtime.fusion`): same result, slower; for checking a fusion.
    """

    def __init__(
        self, recipe, backend: str = "torch", check_finite: bool = True, fuse: bool = True
    ):
        super().__init__()
        self.recipe = recipe
        self.pipeline = Pipeline(recipe, backend=backend, fuse=fuse)
        self.check_finite = check_finite

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        is_causal: bool = False,
        scale: float | None = None,
        return_lse: bool = False,
    ):
        check_inputs(q, k, v, is_causal, self.check_finite)
        b, hq, lq, d = q.shape
        group = hq // k.shape[1]
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        native = self.pipeline.backend == "triton" or (
            self.pipeline.backend == "auto" and q.device.type == "cuda"
        )
        dtype = q.dtype if native else torch.float32
        problem = Problem(
            q=_rows(q, dtype),
            k=_rows(_expand_heads(k, group), dtype),
            v=_rows(_expand_heads(v, group), dtype),
            scale=scale,
            causal=bool(is_causal),
            heads=hq,
            kv_group=group,
            q_offset=k.shape[2] - lq,  # bottom-right: the last query sits at the last key
        )
        with torch.no_grad():
            result = self.pipeline(problem)
        out = result.out.view(b, hq, lq, -1).to(q.dtype)
        if return_lse:
            return out, result.lse.view(b, hq, lq)
        return out

    def extra_repr(self) -> str:
        return f"recipe={self.recipe.name!r}, backend={self.pipeline.backend!r}"


def _expand_heads(x: Tensor, group: int) -> Tensor:
    """[B, Hkv, L, D] -> [B, Hkv*group, L, D], each key/value head repeated for its group."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, H, L, D] -> contiguous [B*H, L, D] of ``dtype``."""
    return x.reshape(-1, x.shape[2], x.shape[3]).to(dtype).contiguous()


def compile(
    recipe, backend: str = "auto", check_finite: bool = True, fuse: bool = True
) -> Attention:
    """Compile a recipe (name, path, mapping or Recipe) into an :class:`Attention` module."""
    from attncompose.spec.recipe import load_recipe

    return Attention(load_recipe(recipe), backend=backend, check_finite=check_finite, fuse=fuse)
