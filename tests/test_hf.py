"""Hugging Face integration: an exact stand-in callable must reproduce SDPA on a tiny Llama;
what it cannot honour (soft-capping, sinks, layers a model lacks) is refused, never dropped."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import exact_attention, tiny_llama  # noqa: E402

from attncompose.errors import AttentionInputError, AttncomposeError  # noqa: E402
from attncompose.integrations.hf import (  # noqa: E402
    attention_function,
    attention_implementation,
    register,
    select_layers,
)
from attncompose.models.card import ModelInputError  # noqa: E402


class CallLog:
    """Exact attention that records the layer-independent (Lq, Lk) of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, q, k, v, is_causal=True, scale=None):
        self.calls.append((q.shape[2], k.shape[2]))
        return exact_attention(q, k, v, is_causal=is_causal, scale=scale)


@pytest.fixture(scope="module")
def model() -> transformers.LlamaForCausalLM:
    return tiny_llama()


def ids(batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def test_round_trip_matches_sdpa(model):
    x = ids()
    expected = model(x).logits
    log = CallLog()
    with attention_implementation(model, register("ac-test-exact", log)):
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert log.calls == [(24, 24), (24, 24)]
    assert model.config._attn_implementation == "sdpa"


@torch.inference_mode()
def test_left_padded_batch_matches_sdpa(model):
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :7] = 0
    x[0, :7] = 0
    expected = model(x, attention_mask=mask).logits
    log = CallLog()
    with attention_implementation(model, register("ac-test-padded", log)):
        got = model(x, attention_mask=mask).logits
    torch.testing.assert_close(got[:, 7:], expected[:, 7:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
    assert log.calls == []


@torch.inference_mode()
def test_generate_with_cache_matches_sdpa(model):
    x = ids(batch=1, length=10)
    kwargs = {
        "max_new_tokens": 6,
        "min_new_tokens": 6,
        "do_sample": False,
        "use_cache": True,
        "pad_token_id": 0,
    }
    expected = model.generate(x, **kwargs)
    log = CallLog()
    with attention_implementation(model, register("ac-test-generate", log)):
        got = model.generate(x, **kwargs)
    assert torch.equal(got, expected)
    decode_steps = [(q, k) for q, k in log.calls if q == 1]
    assert [k for _, k in decode_steps] == [11, 11, 12, 12, 13, 13, 14, 14, 15, 15]


@torch.inference_mode()
def test_layer_selection_routes_only_chosen_layers():
    model = tiny_llama(num_layers=4)
    seen: list[int] = []

    def spy(q, k, v, is_causal=True, scale=None):
        seen.append(len(seen))
        return exact_attention(q, k, v, is_causal=is_causal, scale=scale)

    for layers, count in [("all", 4), (1, 1), (-3, 3), ([0, 2], 2), (0, 0)]:
        seen.clear()
        with attention_implementation(model, register("ac-test-layers", spy, layers=layers)):
            model(ids(batch=1, length=8))
        assert len(seen) == count, layers


def test_select_layers():
    assert select_layers("all", 3) == {0, 1, 2}
    assert select_layers(2, 5) == {0, 1}
    assert select_layers(-2, 5) == {3, 4}
    assert select_layers([4, 0], 5) == {0, 4}
    for bad in (6, -6, [5], [-1], "first", True):
        with pytest.raises(ValueError):
            select_layers(bad, 5)


def test_register_refuses_builtin_names():
    with pytest.raises(ValueError, match="sdpa"):
        register("sdpa", exact_attention)
    with pytest.raises(ValueError, match="layers"):
        register("ac-test-bad", exact_attention, layers="some")


@torch.inference_mode()
def test_chunked_prefill_on_cache_uses_bottom_right_causal(model):
    x = ids(batch=1, length=15)

    def run() -> torch.Tensor:
        cache = transformers.DynamicCache(config=model.config)
        model(x[:, :10], past_key_values=cache, use_cache=True)
        return model(x[:, 10:], past_key_values=cache, use_cache=True).logits

    expected = run()
    log = CallLog()
    with attention_implementation(model, register("ac-test-chunked", log)):
        got = run()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert log.calls == [(10, 10), (10, 10), (5, 15), (5, 15)]


@torch.inference_mode()
def test_core_exact_recipe_round_trip(model):
    """The compiled ``exact`` recipe, registered in transformers, reproduces SDPA's logits."""
    import attncompose as ac

    attn = ac.compile(ac.load_recipe("exact"), backend="torch")
    x = ids()
    expected = model(x).logits
    with attention_implementation(model, register("ac-test-core-exact", attn)):
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def qkv(length: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q [1, 4, L, 16] and k, v [1, 2, L, 16], the tiny Llama's attention shapes."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, length, 16, generator=g)
    return q, torch.randn(1, 2, length, 16, generator=g), torch.randn(1, 2, length, 16, generator=g)


@pytest.mark.parametrize("key", ["softcap", "s_aux", "sinks", "indices", "block_indices"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padded"])
def test_unhonoured_kwargs_are_refused(model, key, padded):
    """Neither the recipe nor exact SDPA applies them: refused by name, on either path."""
    q, k, v = qkv()
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    mask[..., 0] = not padded
    value = 1.0 if key == "softcap" else torch.zeros(4)
    log = CallLog()
    forward = attention_function(log)
    with pytest.raises(AttentionInputError, match=key):
        forward(model.model.layers[0].self_attn, q, k, v, mask, **{key: value})
    assert log.calls == []


@torch.inference_mode()
def test_result_neutral_kwargs_reach_the_recipe(model):
    q, k, v = qkv()
    log = CallLog()
    neutral = {"softcap": None, "s_aux": None, "sliding_window": None, "output_attentions": False}
    attention_function(log)(model.model.layers[0].self_attn, q, k, v, None, **neutral)
    assert log.calls == [(6, 6)]


@torch.inference_mode()
def test_position_bias_runs_exact_sdpa(model):
    """T5's relative position bias is an additive mask: exact SDPA adds it, as transformers'."""
    q, k, v = qkv()
    bias = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    module = model.model.layers[0].self_attn
    log = CallLog()
    got, _ = attention_function(log)(module, q, k, v, None, position_bias=bias)
    expected, _ = transformers.integrations.sdpa_attention.sdpa_attention_forward(
        module, q, k, v, None, position_bias=bias
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert log.calls == []


def tiny_gemma2(softcap: float | None) -> transformers.Gemma2ForCausalLM:
    """A randomly initialised Gemma 2 whose attention soft-caps its logits at ``softcap``."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attn_logit_softcapping=softcap,
        final_logit_softcapping=None,
        query_pre_attn_scalar=16,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return transformers.Gemma2ForCausalLM(config).eval()


@torch.inference_mode()
def test_gemma2_softcap_is_refused_not_dropped():
    """Gemma 2 soft-caps its attention logits: a recipe cannot, so the call is refused;
    without soft-capping the same model matches eager."""
    x = ids(batch=1, length=8)
    model = tiny_gemma2(softcap=1.0)
    name = register("ac-test-softcap", CallLog())
    with attention_implementation(model, name), pytest.raises(AttentionInputError, match="softcap"):
        model(x)
    model = tiny_gemma2(softcap=None)
    expected = model(x).logits
    log = CallLog()
    with attention_implementation(model, register("ac-test-softcap", log)):
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert log.calls == [(8, 8), (8, 8)]


@torch.inference_mode()
def test_sliding_window_is_in_the_mask():
    """A window shorter than the keys makes a mask (exact SDPA); a decode step on the window's
    cache goes to the recipe with the window's keys."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        attn_implementation="sdpa",
    )
    model = transformers.MistralForCausalLM(config).eval()
    x = ids(batch=1, length=12)
    kwargs = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    expected = model(x).logits, model.generate(x[:, :3], **kwargs)
    log = CallLog()
    with attention_implementation(model, register("ac-test-window", log)):
        got = model(x).logits, model.generate(x[:, :3], **kwargs)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], expected[1])
    assert log.calls == [(3, 3), (3, 3), (1, 4), (1, 4), (1, 4), (1, 4)]


def test_register_refuses_a_recipe_name():
    with pytest.raises(AttncomposeError, match=r"not str 'streaming'.*ac\.compile\('streaming'\)"):
        register("ac-test-name", "streaming")


@torch.inference_mode()
def test_layers_are_checked(model):
    """Their form at register, their range at the first call, naming the model's count."""
    for bad in ([-1], [0.5], "some", True, None):
        with pytest.raises(ModelInputError, match="layers must be"):
            register("ac-test-bad-layers", exact_attention, layers=bad)
    name = register("ac-test-bad-layers", CallLog(), [0, 99])
    outside = r"layers=\[0, 99\] .* 2 layers.*\[99\]"
    with attention_implementation(model, name), pytest.raises(ModelInputError, match=outside):
        model(ids(batch=1, length=4))
