"""Hugging Face integration: an exact stand-in callable must reproduce SDPA on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import exact_attention, tiny_llama  # noqa: E402

from attncompose.integrations.hf import attention_implementation, register, select_layers  # noqa: E402


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
