"""The attention call as SDPA's stand-in (bad inputs to it: tests/test_bad_inputs.py)."""

from __future__ import annotations

import pytest
import torch

import attncompose as ac


@pytest.fixture(scope="module")
def attn():
    return ac.compile("hyperattention")


def _qkv(**kw):
    shape = dict(b=1, hq=4, hkv=2, lq=8, lk=8, d=16) | kw
    q = torch.randn(shape["b"], shape["hq"], shape["lq"], shape["d"])
    k = torch.randn(shape["b"], shape["hkv"], shape["lk"], shape["d"])
    return q, k, k.clone()


def test_sdpa_positional_signature():
    """A drop-in for F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal,
    *, scale, enable_gqa): the exact recipe gives SDPA's result called the same way."""
    q, k, v = _qkv(hq=4, hkv=2, lq=8, lk=8)  # Lq = Lk: SDPA aligns causal masks top-left
    args, kwargs = (None, 0.0, True), {"scale": 0.3, "enable_gqa": True}
    # SDPA's grouped-query result as its enable_gqa (torch 2.5+) gives it: heads repeated
    kv = (x.repeat_interleave(2, dim=1) for x in (k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q, *kv, *args, scale=0.3)
    got = ac.compile("exact")(q, k, v, *args, **kwargs)
    assert ac.relative_error(got, want) < 1e-5


def test_backward_fails_clearly_instead_of_dropping_gradients(attn):
    """With gradients wanted, the output stays attached to q/k/v: a backward pass raises
    rather than training the layers before attention with silently missing gradients."""
    q, k, v = (x.requires_grad_() for x in _qkv())
    out = attn(q, k, v, is_causal=True)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match=r"no backward pass .* torch\.no_grad"):
        out.sum().backward()
    with torch.no_grad():
        assert not attn(q, k, v).requires_grad
    with torch.inference_mode():
        assert torch.equal(attn(q, k, v, is_causal=True), out.detach())
