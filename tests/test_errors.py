"""The attention call as SDPA's stand-in (bad inputs to it: tests/test_bad_inputs.py)."""

from __future__ import annotations

import pytest
import torch
from on_device import needs_flex

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


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("triton", marks=pytest.mark.triton),
        pytest.param("flex", marks=needs_flex),
    ],
)
def test_inputs_that_want_gradients_run_forward_on_every_backend(backend):
    """q, k, v that require grad (a model's activations) reached the kernels attached:
    FlexAttention on the CPU refused them with a raw NotImplementedError ('does not support
    backward on CPU'), under torch.no_grad() and inference_mode too."""
    recipe = ac.load_recipe("streaming").with_knobs(
        {"local.width": 24, "sinks.count": 1, "out.block_size": 16}
    )
    attn = ac.compile(recipe, backend=backend)
    q, k, v = _qkv(lq=64, lk=64)
    want = attn(q, k, v, is_causal=True)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.equal(attn(q, k, v, is_causal=True).detach(), want), mode.__name__
