"""CPU fast path of the block kernel: each tile chunk through PyTorch's fused flash kernel.

Same contract and the same pair mask as the reference (:mod:`.naive`); the mask (with the
key bias, if any) becomes the additive mask of
``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the lse, so scores,
softmax and the value product never leave the fused kernel. Rows whose pairs are all masked
come back with lse 0 from that kernel and are set to (0, -inf).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncompose.primitives.base import Coverage, Partial, Problem, Tiles, Workspace
from attncompose.primitives.block.naive import any_key, run_tiles
from attncompose.primitives.block.one_query import one_query_attention
from attncompose.primitives.block.plan_torch import run_plan
from attncompose.primitives.plan import BlockPlan


def fused_op():
    """PyTorch's CPU flash-attention op with lse, or None if this build lacks it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def block_attention(
    problem: Problem, tiles: Tiles, own: Coverage | None = None, exclude: tuple[Coverage, ...] = ()
) -> Partial:
    """Same result as the reference block kernel, computed by the fused CPU kernel."""
    return run_tiles(problem, tiles, own, exclude, _fused_chunk)


def _fused_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    bias: Tensor | None,
    scale: float,
    scratch: Workspace | None = None,
) -> tuple[Tensor, Tensor]:
    # tiles play the role of heads: q [N, T, bq, D], k/v [N, T, nk, D]; the additive mask
    # [N or 1, T, bq or 1, nk] is broadcast over rows and the tile's queries by stride
    add = None
    if mask is not None:
        scalar = lambda x: torch.full((), x, dtype=q.dtype, device=q.device)
        keep = scalar(0.0) if bias is None else bias.unsqueeze(-2)
        shape = torch.broadcast_shapes(mask.shape, keep.shape)
        into = None if scratch is None else scratch.take("add_mask", shape, q.dtype, q.device)
        add = torch.where(mask, keep, scalar(float("-inf")), out=into)
        add = add.expand(*q.shape[:-1], k.shape[-2])
    out, lse = fused_op()(q, k, v, 0.0, False, attn_mask=add, scale=scale)[:2]
    if mask is not None:
        empty = ~any_key(mask)  # [N or 1, T, bq or 1]
        if bool(empty.any()):  # the kernel's own outputs: filled in place
            empty = empty.expand(lse.shape)
            lse.masked_fill_(empty, float("-inf"))
            out.masked_fill_(empty.unsqueeze(-1), 0.0)
    return out, lse


def plan_attention(problem: Problem, plan: BlockPlan) -> Partial:
    """Same result as the reference plan walk, each group computed by the fused CPU kernel:
    full blocks without a mask, partial blocks with the plan's pair rule."""
    return run_plan(problem, plan, _fused_chunk)


def one_query(problem: Problem, select: list[Coverage], exclude: list[Coverage]) -> Partial:
    """A decode step's kept keys (:mod:`.one_query`) through the fused CPU kernel."""
    return one_query_attention(problem, select, exclude, _fused_chunk)
