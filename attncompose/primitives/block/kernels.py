"""Implementations of the block step's kernel ops, per backend in preference order.

``plan``: a :class:`~attncompose.primitives.plan.BlockPlan` in one pass (block-sparse
attention). ``block``: a tile pass (the tile kernel, for selections without a block form and
for the sampler), or exact tiles laid out contiguously and run as a block-diagonal plan.
"""

from __future__ import annotations

from typing import Any

from attncompose.primitives.base import Problem, UnionCoverage
from attncompose.primitives.block import contiguous, fused, naive, plan_flex, plan_torch
from attncompose.primitives.dispatch import Kernel, TritonKernel
from attncompose.primitives.plan import BlockPlan


def plan_block_reasons(plan: BlockPlan | None) -> list[str]:
    """Why a compiled kernel cannot walk ``plan``: its blocks must be powers of two >= 16."""
    if plan is None:
        return []
    return [
        f"plan {name} block {size} is not a power of two >= 16"
        for name, size in (("query", plan.grid.block_q), ("key", plan.grid.block_k))
        if size < 16 or size & (size - 1)
    ]


def plan_rule_reasons(plan: BlockPlan | None) -> list[str]:
    """Why a kernel that tests the plan's pair rule as kernel data cannot: a coverage of the
    plan without a kernel form (:meth:`~attncompose.primitives.base.Coverage.predicates`)."""
    if plan is None:
        return []
    return [
        f"coverage {type(cov).__name__} has no kernel form (predicates)"
        for cov in (*plan.own, *plan.exclude)
        if not cov.has_kernel_form
    ]


class FlexKernel(Kernel):
    """A FlexAttention implementation: this torch must have it, and equal head dims."""

    @classmethod
    def not_supported_reasons(
        cls, problem: Problem, plan: BlockPlan | None = None, **inputs: Any
    ) -> list[str]:
        reasons = []
        if not plan_flex.available():
            reasons.append("this torch has no torch.nn.attention.flex_attention")
        if problem.q.shape[-1] != problem.v.shape[-1]:
            reasons.append("query and value head dims differ")
        if problem.q.device.type == "cuda":
            reasons += plan_block_reasons(plan)
        return reasons + plan_rule_reasons(plan)


class FusedCpuKernel(Kernel):
    """A path through PyTorch's fused CPU flash kernel (:mod:`.fused`)."""

    @classmethod
    def not_supported_reasons(cls, problem: Problem, **inputs: Any) -> list[str]:
        reasons = []
        if problem.q.device.type != "cpu":
            reasons.append(f"device {problem.q.device} is not the CPU")
        if fused.fused_op() is None:
            reasons.append("this torch has no aten._scaled_dot_product_flash_attention_for_cpu")
        if problem.q.shape[-1] != problem.v.shape[-1]:
            reasons.append("query and value head dims differ")
        return reasons


# -- plan: a block plan in one pass ------------------------------------------------------


class TritonBlockSparse(TritonKernel):
    """One launch walking the plan: full blocks unmasked, partial ones by the pair rule."""

    op = "plan"
    name = "triton:block-sparse"
    lazy = "plan_triton.plan_attention"
    row_maps = True  # walks BlockPlan.query_rows and key_rows (tiles in permuted order)
    reads_rows = True  # and reads a problem's row maps
    reads_groups = True  # row n reads key/value row n // kv_group

    @classmethod
    def not_supported_reasons(
        cls, problem: Problem, plan: BlockPlan | None = None, **inputs: Any
    ) -> list[str]:
        reasons = super().not_supported_reasons(problem)
        return reasons + plan_block_reasons(plan) + plan_rule_reasons(plan)


class FlexBlockSparse(FlexKernel):
    """The plan as a FlexAttention BlockMask, its pair rule the mask_mod."""

    op = "plan"
    name = "flex:block-sparse"
    function = staticmethod(plan_flex.plan_attention)
    reads_groups = True  # FlexAttention's enable_gqa: query head h reads head h // kv_group


class FusedCpuBlockSparse(FusedCpuKernel):
    """The plan's groups through the fused CPU kernel."""

    op = "plan"
    name = "torch:block-sparse-cpu"
    function = staticmethod(fused.plan_attention)
    one_query = staticmethod(fused.one_query)  # a decode step's kept keys, no plan
    reads_groups = True  # a query row reads key row n // kv_group


class TorchBlockSparse(Kernel):
    """The reference walk of the plan."""

    op = "plan"
    name = "torch:block-sparse"
    function = staticmethod(plan_torch.plan_attention)
    one_query = staticmethod(plan_torch.one_query)  # a decode step's kept keys, no plan
    reads_groups = True  # a query row reads key row n // kv_group


# -- block: a tile pass ------------------------------------------------------------------


class ContiguousTiles:
    """Exact tiles laid out contiguous and run as a block-diagonal plan (:mod:`.contiguous`),
    beside another backend's reasons."""

    reads_rows = True  # the plan kernel reads them, else the tile pass gathers them
    reads_groups = True  # likewise: key/value row n // kv_group for query row n

    @classmethod
    def not_supported_reasons(
        cls, problem: Problem, tiles=None, own=None, exclude=(), **inputs: Any
    ) -> list[str]:
        reasons = super().not_supported_reasons(problem)
        if own is not None and not tiles.exact:
            reasons.append("tiles are not exact: their selection would be tested pair by pair")
        if exclude:
            reasons.append("exclusions are tested pair by pair")
        if problem.causal:  # the block-diagonal plan has no pair rule (a splitter's body is
            reasons.append("a causal problem: the causal mask is tested pair by pair")  # not)
        bq = tiles.q_idx.shape[-1]
        if bq < 16 or bq & (bq - 1):
            reasons.append(f"tiles of {bq} queries: not a power of two >= 16")
        if tiles.k_idx.shape[-1] == 0:
            reasons.append("tiles without keys")
        return reasons


class TritonContiguousTiles(ContiguousTiles, TritonKernel):
    """Exact tiles copied contiguous, then one launch of the Triton plan kernel."""

    op = "block"
    name = "triton:contiguous-tiles"
    function = staticmethod(contiguous.triton_block_attention)


class TritonTileAttention(TritonKernel):
    """The index-gathered tile kernel: pair rules of any coverage with a kernel form."""

    op = "block"
    name = "triton:tile-attention"
    lazy = "triton.block_attention"
    reads_groups = True  # row n reads key/value row n // kv_group

    @classmethod
    def not_supported_reasons(
        cls, problem: Problem, tiles=None, own=None, exclude=(), **inputs: Any
    ) -> list[str]:
        reasons = super().not_supported_reasons(problem)
        if isinstance(own, UnionCoverage):
            reasons.append("a union coverage cannot be a tile kernel's own selection")
        for cov in (own, *exclude):
            if cov is not None and not cov.has_kernel_form:
                reasons.append(f"coverage {type(cov).__name__} has no kernel form (predicates)")
        return reasons


class FlexContiguousTiles(ContiguousTiles, FlexKernel):
    """Exact tiles copied contiguous, then one FlexAttention call."""

    op = "block"
    name = "flex:contiguous-tiles"
    function = staticmethod(contiguous.flex_block_attention)


class FusedCpuTiles(FusedCpuKernel):
    """Tile chunks through the fused CPU kernel, the pair mask as its additive mask."""

    op = "block"
    name = "torch:block-fused-cpu"
    function = staticmethod(fused.block_attention)
    reads_groups = True  # a query row reads key row n // kv_group


class TorchTiles(Kernel):
    """The reference tile kernel."""

    op = "block"
    name = "torch:block"
    function = staticmethod(naive.block_attention)
    reads_groups = True  # a query row reads key row n // kv_group
