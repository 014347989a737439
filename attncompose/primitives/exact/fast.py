"""Fast exact attention with lse through PyTorch's fused SDPA kernels (falls back to naive).

PyTorch's fused kernels align ``is_causal`` top-left, so a causal problem whose queries sit
``delta`` positions after its keys is split into a fully visible key prefix (non-causal) and
a top-left causal remainder, merged by lse.
"""

from __future__ import annotations

import torch

from attncompose.primitives.base import Partial, Problem, add_products, counting_products
from attncompose.primitives.exact.naive import exact_attention, on_leaves
from attncompose.primitives.merge.naive import merge_partials


def fused_exact_attention(problem: Problem, leaf: int | None = None) -> Partial:
    """Same contract as :func:`exact_attention`, through fused kernels where they apply."""
    if leaf is not None:
        return on_leaves(fused_exact_attention, problem, leaf)
    if counting_products():
        visible = problem.visible_keys(torch.arange(problem.lq, device=problem.q.device))
        add_products(problem.q.shape[0] * visible.sum())
    if not problem.causal:
        return _fused(problem, causal=False)
    delta = problem.q_offset - problem.k_offset
    if delta < 0 or delta > problem.lk:
        return exact_attention(problem)  # some rows see no key: rare, keep it simple
    if delta == 0:
        return _fused(problem, causal=True)
    prefix = _fused(problem.sub(slice(None), slice(0, delta), causal=False), causal=False)
    if delta == problem.lk:
        return prefix
    rest = _fused(problem.sub(slice(None), slice(delta, None), causal=True), causal=True)
    return merge_partials([prefix, rest])


def _fused(problem: Problem, causal: bool) -> Partial:
    q, k, v = problem.q.float(), problem.k.float(), problem.v.float()
    if q.device.type != "cpu" or q.shape[-1] != v.shape[-1]:
        return exact_attention(problem)
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return exact_attention(problem)
    out, lse = op(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, causal, scale=problem.scale)[
        :2
    ]
    return Partial(out[0], lse[0])
