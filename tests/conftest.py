from __future__ import annotations

import os

# Triton kernels run in its CPU interpreter unless told otherwise (TRITON_INTERPRET=0 on a GPU
# machine). It must be set before anything imports triton, transformers included.
os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def reference_attention(q, k, v, is_causal=False, scale=None):
    """Exact attention in float64 with GQA and a bottom-right causal mask: (out, lse)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    q = q.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if is_causal:
        lq, lk = q.shape[2], k.shape[2]
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


def qkv(b=2, hq=4, hkv=2, lq=63, lk=None, d=16, dtype=torch.float32, seed=0):
    lk = lq if lk is None else lk
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.fixture
def make_qkv():
    return qkv


@pytest.fixture
def reference():
    return reference_attention


def pytest_collection_modifyitems(config, items):
    """Tests marked ``triton`` skip where Triton cannot run (see tests/on_device.py)."""
    from on_device import triton_unusable  # tests/ is on sys.path from here on

    reason = triton_unusable()
    if reason is not None:
        for item in items:
            if "triton" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def packing_on_cpu():
    """The causal splitter packs every level into one body call on CPU tensors too (as on
    CUDA; by default a CPU runs the levels one by one)."""
    from attncompose.primitives import causal_split

    with causal_split.packing_on({"cuda", "cpu"}):
        yield
