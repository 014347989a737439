"""Implementations of the ``exact`` kernel op: attention with lse."""

from __future__ import annotations

from typing import Any

from attncompose.primitives.base import Problem
from attncompose.primitives.dispatch import Kernel, TritonKernel
from attncompose.primitives.exact.fast import cuda_fused_reasons, fused_exact_attention


class SdpaCuda(Kernel):
    """PyTorch's fused CUDA attention with lse (cuDNN, else FlashAttention-2) in half
    precision: dense cuDNN ran ~600 TFLOP/s on an H200 where the Triton kernel ran ~410 on
    the causal splitter's leaves (../shared/GPU.md), so exact attention (the tuned fallback,
    the leaves) should run at the speed of the baseline it is compared to (bench_gpu's exact
    rows and ``--triton-exact`` measure it). Leaves of strided rows go to the Triton kernel,
    which reads them in place."""

    op = "exact"
    name = "sdpa:cudnn-else-flash"
    function = staticmethod(fused_exact_attention)
    reads_groups = True  # a non-causal call stacks a group's heads, a causal one expands (fast.py)

    @classmethod
    def not_supported_reasons(cls, problem: Problem, **inputs: Any) -> list[str]:
        return cuda_fused_reasons(problem, inputs.get("leaf"))


class TritonFlash(TritonKernel):
    """Flash-attention forward with lse, causal on absolute positions (``triton.py``)."""

    op = "exact"
    name = "triton:flash-fwd-lse"
    lazy = "triton.exact_attention"
    reads_groups = True  # row n reads key/value row n // kv_group


class SdpaWithLse(Kernel):
    """PyTorch's fused flash kernels with lse where they apply (CPU; on CUDA as
    :class:`SdpaCuda`), else the reference."""

    op = "exact"
    name = "torch:sdpa-with-lse"
    function = staticmethod(fused_exact_attention)
    reads_groups = True  # on the CPU in place or stacked, else expanded (fast.py)
