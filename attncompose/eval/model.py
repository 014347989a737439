"""A recipe on a real model: perplexity, per-layer error on its own Q/K/V, frac, time share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attncompose.eval.metrics import layer_errors
from attncompose.eval.products import products_fraction


@dataclass(frozen=True)
class ModelReport:
    """Perplexities (exact and recipe), frac over the replaced layers, per-layer (error, frac)."""

    recipe: str
    exact_ppl: float
    ppl: float
    frac: float
    exact_share: float
    share: float
    layers: dict[int, tuple[float, float]]


def evaluate_recipe(
    recipe: str,
    model_name: str,
    text: str | Path | None,
    seq_len: int,
    layers: str | list[int] = "all",
    progress: Callable[[str], None] = lambda stage: None,
) -> ModelReport:
    """Run the model with exact attention and with the recipe on ``layers``; ``progress``
    hears each stage as it begins (each can take minutes on CPU).

    ``recipe`` is a recipe, a tuned recipe, or a model-level tuned file (each layer its own
    choice; a file made for another model is refused before anything runs).
    """
    from attncompose.integrations.hf import LayerwiseAttention, select_layers
    from attncompose.models import load_model, model_card
    from attncompose.models.capture import capture_qkv
    from attncompose.models.evaluate import attention_time_share, perplexity
    from attncompose.models.text import load_text, token_ids
    from attncompose.runtime.loading import attention_name, load_attention
    from attncompose.runtime.model_tuned import ModelTuning

    attn = load_attention(recipe)
    layerwise = isinstance(attn, LayerwiseAttention)
    card = model_card(model_name)
    card.check(seq_len, layers)  # at once: loading the model takes a while
    if isinstance(attn, ModelTuning):
        attn.check_card(card)
    body = load_text(text)
    progress(f"loading {model_name}")
    model, tokenizer = load_model(model_name)
    ids = token_ids(tokenizer, seq_len, body)
    chosen = sorted(select_layers(layers, model.config.num_hidden_layers))
    if layerwise:
        attn.check_model(model.config)
    progress(f"perplexity with exact attention ({seq_len} tokens)")
    exact_ppl = perplexity(model, ids)
    progress(f"perplexity with {attention_name(attn)} on {len(chosen)} layers")
    ppl = perplexity(model, ids, attn, chosen)
    progress("per-layer error and frac on the model's own Q/K/V")
    captured = capture_qkv(model, ids, chosen)
    errors = layer_errors(captured, attn)
    per_layer = {}
    for layer, (q, k, v) in sorted(captured.items()):
        fn = attn.layer(layer) if layerwise else attn
        per_layer[layer] = (errors[layer], products_fraction(fn, q, k, v, True))
    frac = sum(f for _, f in per_layer.values()) / len(per_layer)
    progress("attention's share of the forward time (exact, then the recipe)")
    return ModelReport(
        recipe=attention_name(attn),
        exact_ppl=exact_ppl,
        ppl=ppl,
        frac=frac,
        exact_share=attention_time_share(model, ids)["share"],
        share=attention_time_share(model, ids, attn, chosen)["share"],
        layers=per_layer,
    )
