"""Bad input to the attention call is a clear error naming what is wrong."""

from __future__ import annotations

import pytest
import torch

import attncompose as ac
from attncompose import AttentionInputError


@pytest.fixture(scope="module")
def attn():
    return ac.compile("hyperattention")


def _qkv(**kw):
    shape = dict(b=1, hq=4, hkv=2, lq=8, lk=8, d=16) | kw
    q = torch.randn(shape["b"], shape["hq"], shape["lq"], shape["d"])
    k = torch.randn(shape["b"], shape["hkv"], shape["lk"], shape["d"])
    return q, k, k.clone()


def test_heads_not_a_multiple(attn):
    q, k, v = _qkv(hq=5, hkv=2)
    with pytest.raises(AttentionInputError, match=r"query heads \(5\) must be a multiple"):
        attn(q, k, v)


def test_wrong_rank(attn):
    q, k, v = _qkv()
    with pytest.raises(AttentionInputError, match=r"q must be 4-D .* got shape \(4, 8, 16\)"):
        attn(q[0], k, v)


def test_head_dim_mismatch(attn):
    q, k, v = _qkv()
    with pytest.raises(AttentionInputError, match=r"head_dim of q \(8\) and k \(16\) differ"):
        attn(q[..., :8], k, v)


def test_kv_length_mismatch(attn):
    q, k, v = _qkv()
    with pytest.raises(AttentionInputError, match="must agree on heads and length"):
        attn(q, k, v[:, :, :5])


def test_batch_mismatch(attn):
    q, k, v = _qkv()
    with pytest.raises(AttentionInputError, match="batch sizes differ"):
        attn(q.expand(2, -1, -1, -1), k, v)


def test_mixed_dtypes(attn):
    q, k, v = _qkv()
    with pytest.raises(AttentionInputError, match="dtypes differ"):
        attn(q.half(), k, v)


def test_unsupported_dtype(attn):
    q, k, v = _qkv()
    with pytest.raises(AttentionInputError, match=r"q has dtype torch\.float64"):
        attn(q.double(), k.double(), v.double())


def test_mixed_devices(attn):
    q, k, v = _qkv()
    with pytest.raises(AttentionInputError, match="different devices: cpu, meta"):
        attn(q, k.to("meta"), v)


def test_causal_with_more_queries_than_keys(attn):
    q, k, v = _qkv(lq=9, lk=8)
    with pytest.raises(AttentionInputError, match="causal attention needs Lq <= Lk"):
        attn(q, k, v, is_causal=True)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(attn, name, bad):
    q, k, v = _qkv()
    {"q": q, "k": k, "v": v}[name][0, 0, 3, 1] = bad
    with pytest.raises(AttentionInputError, match=f"{name} contains NaN or Inf"):
        attn(q, k, v)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ac.compile("exact", backend="cuda")


def test_explicit_mask_and_dropout_are_refused_not_ignored(attn):
    q, k, v = _qkv()
    with pytest.raises(AttentionInputError, match="attn_mask is not supported"):
        attn(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(AttentionInputError, match=r"dropout_p must be 0 .* got 0\.1"):
        attn(q, k, v, dropout_p=0.1)


def test_sdpa_positional_signature():
    """A drop-in for F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal,
    *, scale, enable_gqa): the exact recipe gives SDPA's result called the same way."""
    q, k, v = _qkv(hq=4, hkv=2, lq=8, lk=8)  # Lq = Lk: SDPA aligns causal masks top-left
    args, kwargs = (None, 0.0, True), {"scale": 0.3, "enable_gqa": True}
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, *args, **kwargs)
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
