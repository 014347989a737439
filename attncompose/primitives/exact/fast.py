"""Fast exact attention with lse through PyTorch's fused SDPA kernels (falls back to naive):
the fused CPU flash kernel on CPU; on CUDA, cuDNN's fused attention where PyTorch says it can
run the rows, else FlashAttention-2's (half precision; :func:`cuda_fused_reasons`).

PyTorch's fused kernels align ``is_causal`` top-left, so a causal problem whose queries sit
``delta`` positions after its keys is split into a fully visible key prefix (non-causal) and
a top-left causal remainder, merged by lse (:func:`fused_pieces`); a decode step's one query
sees every key: one non-causal call.

Grouped keys and values (:attr:`Problem.kv_group`) are read where they are on the CPU: the
query heads of a group as the heads of one batch element, its key/value row broadcast to
them (a stride-0 view, no copy), or, where no causal mask tells the heads' rows apart (a
decode step, a visible prefix), their queries stacked as the rows of one head
(:func:`~attncompose.primitives.base.stack_heads`: the keys read once) where that leaves
every thread work (:func:`~attncompose.primitives.base.stacking_fills_threads`). The CUDA
kernels get a non-causal call's heads stacked so too, a causal one's keys expanded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncompose.primitives.base import (
    Partial,
    Problem,
    add_products,
    counting_products,
    stack_heads,
    stacking_fills_threads,
    unstack_heads,
)
from attncompose.primitives.exact.naive import exact_attention, on_leaves
from attncompose.primitives.merge.naive import merge_partials

HALF = (torch.float16, torch.bfloat16)


def fused_exact_attention(problem: Problem, leaf: int | None = None) -> Partial:
    """Same contract as :func:`exact_attention`, through fused kernels where they apply."""
    if leaf is not None:
        return on_leaves(fused_exact_attention, problem, leaf)
    if counting_products():
        visible = problem.visible_keys(torch.arange(problem.lq, device=problem.q.device))
        add_products(problem.q.shape[0] * visible.sum())
    pieces = fused_pieces(problem)
    if pieces is None:
        return exact_attention(problem)  # some rows see no key: rare, keep it simple
    parts = [_fused(_piece(problem, keys, causal), causal) for keys, causal in pieces]
    return parts[0] if len(parts) == 1 else merge_partials(parts)


def _piece(problem: Problem, keys: slice, causal: bool) -> Problem:
    """The problem of one of :func:`fused_pieces`' calls: its queries on the keys ``keys``."""
    return problem if keys == slice(None) else problem.sub(slice(None), keys, causal)


def fused_pieces(problem: Problem) -> list[tuple[slice, bool]] | None:
    """The fused calls an exact problem makes, (key range, top-left causal) each, merged by
    lse: all keys (non-causal, a causal square, or a decode step's one query, which sees
    every key), else a causal problem's fully visible key prefix and its causal square
    after it; None where some query sees no key (the reference runs it)."""
    if not problem.causal:
        return [(slice(None), False)]
    delta = problem.q_offset - problem.k_offset
    if delta < 0 or delta > problem.lk:
        return None
    if delta == 0:
        return [(slice(None), True)]
    if problem.lq == 1 and delta == problem.lk - 1:
        return [(slice(None), False)]
    if delta == problem.lk:
        return [(slice(0, delta), False)]
    return [(slice(0, delta), False), (slice(delta, None), True)]


def cuda_fused_reasons(problem: Problem, leaf: int | None = None) -> list[str]:
    """Why PyTorch's fused CUDA kernels (cuDNN, FlashAttention-2) cannot run ``problem``
    (empty: they can). Leaves they take where stacking them as rows is a view; strided rows
    (one batch element in Hugging Face's layout) would be copied, where the Triton kernel
    reads them in place."""
    q, k, v = problem.q, problem.k, problem.v
    reasons = []
    if q.device.type != "cuda":
        reasons.append(f"device {q.device} is not CUDA")
    read = (q, k, v) if problem.kv_group == 1 else (q,)  # grouped ones: expanded, contiguous
    if leaf is not None and any(x.stride(0) != x.shape[1] * x.stride(1) for x in read):
        reasons.append("leaves of strided rows (the Triton kernel reads them where they lie)")
    if q.dtype not in HALF:
        reasons.append(f"dtype {q.dtype} is not float16/bfloat16")
    if q.shape[-1] != v.shape[-1]:
        reasons.append(f"value head dim {v.shape[-1]} is not the head dim {q.shape[-1]}")
    if 0 in (problem.lq, problem.lk):
        reasons.append(f"{problem.lq} queries x {problem.lk} keys")
    if problem.causal and problem.q_offset + problem.lq != problem.k_offset + problem.lk:
        reasons.append("causal, not bottom-right aligned (its causal part would be a rectangle)")
    pieces = fused_pieces(problem)
    if pieces is None:
        reasons.append("some query sees no key (the reference runs it)")
    if not reasons:  # the calls fused_exact_attention makes (on the rows _cuda_rows gives)
        parts = [(_piece(problem, keys, causal), causal) for keys, causal in pieces]
        if any(
            _cuda_kernel(*_cuda_rows(part, causal)[:3], causal) is None for part, causal in parts
        ):
            reasons.append(
                "PyTorch's cuDNN and flash kernels both decline it "
                "(torch.backends.cuda.can_use_cudnn_attention / can_use_flash_attention)"
            )
    return reasons


def _cuda_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str | None:
    """Which fused CUDA kernel takes these rows as [1, N, L, D]: ``"cudnn"`` (the fastest
    dense attention measured on an H200, ../shared/GPU.md), else ``"flash"``, else None."""
    params = torch.backends.cuda.SDPAParams(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, 0.0, causal, False
    )
    if torch.backends.cuda.can_use_cudnn_attention(params):
        return "cudnn"
    if torch.backends.cuda.can_use_flash_attention(params):
        return "flash"
    return None


def _cuda_rows(problem: Problem, causal: bool) -> tuple[Tensor, Tensor, Tensor, int]:
    """q, k, v as PyTorch's fused CUDA kernels take ``problem``'s rows, and how many query
    heads each row of q stacks: a non-causal call stacks a group's query heads as the rows
    of its key row (:func:`~attncompose.primitives.base.stack_heads`: the keys not copied;
    FlashAttention-2 packs a grouped decode step so itself), a causal one gets the keys
    expanded per query head (a copy: its mask is per row)."""
    group = problem.kv_group
    if group > 1 and not causal:
        return stack_heads(problem.q, group), problem.k, problem.v, group
    problem = problem.expanded()
    return problem.q, problem.k, problem.v, 1


def _fused_cuda(problem: Problem, causal: bool) -> Partial:
    """Causal squares and any non-causal problem (causal rectangles, whose diagonal the
    kernels may anchor either way, run the reference)."""
    q, k, v, stacked = _cuda_rows(problem, causal)
    square = problem.lq == problem.lk
    kernel = _cuda_kernel(q, k, v, causal) if q.dtype in HALF and (square or not causal) else None
    if kernel is None:
        return exact_attention(problem.expanded())
    q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # [1, N, L, D]
    if kernel == "cudnn":  # lse [1, N, Lq, 1]
        run = torch.ops.aten._scaled_dot_product_cudnn_attention
        out, lse = run(q, k, v, None, True, 0.0, causal, False, scale=problem.scale)[:2]
    else:  # lse [1, N, Lq]
        run = torch.ops.aten._scaled_dot_product_flash_attention
        out, lse = run(q, k, v, 0.0, causal, False, scale=problem.scale)[:2]
    return Partial(*unstack_heads(out[0], lse.reshape(q.shape[1], q.shape[2]), stacked))


def _fused(problem: Problem, causal: bool) -> Partial:
    if problem.q.device.type == "cuda":
        return _fused_cuda(problem, causal)
    q, k, v = problem.q.float(), problem.k.float(), problem.v.float()
    if q.device.type != "cpu" or q.shape[-1] != v.shape[-1]:
        return exact_attention(problem)
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return exact_attention(problem)
    group = problem.kv_group  # a group's query heads share its key row
    stack = not causal and group > 1 and stacking_fills_threads(k.shape[0], group * q.shape[1])
    if not stack:  # [N/G, G, L, D]: the heads of one batch element, the key row broadcast
        q = q.view(-1, group, *q.shape[1:])
        k, v = (x.unsqueeze(1).expand(-1, group, -1, -1) for x in (k, v))
        out, lse = op(q, k, v, 0.0, causal, scale=problem.scale)[:2]
        return Partial(out.flatten(0, 1), lse.flatten(0, 1))
    # non-causal (a decode step, a visible prefix): the heads' queries as rows of one head,
    # where that leaves each thread a part
    q, k, v = stack_heads(q, group).unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    out, lse = op(q, k, v, 0.0, False, scale=problem.scale)[:2]  # [N/G, 1, G*Lq, ...]
    return Partial(*unstack_heads(out[:, 0], lse[:, 0], group))
