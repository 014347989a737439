from __future__ import annotations

import pytest

from attncompose.primitives.block.fused import block_attention as fused_block_attention
from attncompose.primitives.block.naive import block_attention as naive_block_attention

BLOCK_KERNELS = {"naive": naive_block_attention, "fused-cpu": fused_block_attention}


@pytest.fixture(params=sorted(BLOCK_KERNELS))
def block_attention(request):
    """Every torch implementation of the block kernel must match the dense specification."""
    return BLOCK_KERNELS[request.param]
