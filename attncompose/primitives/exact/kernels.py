"""Implementations of the ``exact`` kernel op: attention with lse."""

from __future__ import annotations

from attncompose.primitives.dispatch import Kernel, TritonKernel
from attncompose.primitives.exact.fast import fused_exact_attention


class TritonFlash(TritonKernel):
    """Flash-attention forward with lse, causal on absolute positions (``triton.py``)."""

    op = "exact"
    name = "triton:flash-fwd-lse"
    lazy = "triton.exact_attention"


class SdpaWithLse(Kernel):
    """PyTorch's fused CPU flash kernel with lse where it applies, else the reference."""

    op = "exact"
    name = "torch:sdpa-with-lse"
    function = staticmethod(fused_exact_attention)
