"""Capture post-RoPE Q, K, V per layer of a Llama-family transformers model, to safetensors.

A recording attention function is registered through transformers' ``AttentionInterface``:
it receives exactly the q, k, v the attention would (after RoPE, before GQA expansion),
stores them, then runs SDPA. The file format is in :mod:`attncompose.models.capture_file`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from attncompose.integrations.hf import (
    LayerSelection,
    attention_implementation,
    register_function,
    select_layers,
)
from attncompose.models.capture_file import QKVTensors
from attncompose.models.evaluate import perplexity_from_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def capture_qkv(
    model: PreTrainedModel, input_ids: torch.Tensor, layers: LayerSelection = "all"
) -> dict[int, QKVTensors]:
    """Run ``model`` on input_ids [1, L]: {layer: (q [1, Hq, L, D], k, v [1, Hkv, L, D])}."""
    return capture_qkv_and_perplexity(model, input_ids, layers)[0]


@torch.inference_mode()
def capture_qkv_and_perplexity(
    model: PreTrainedModel, input_ids: torch.Tensor, layers: LayerSelection = "all"
) -> tuple[dict[int, QKVTensors], float]:
    """:func:`capture_qkv`, and the exact perplexity of the same forward pass."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"capture takes one sequence, got a batch of {input_ids.shape[0]}")
    chosen = select_layers(layers, model.config.num_hidden_layers)
    records: dict[int, QKVTensors] = {}

    def record(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if module.layer_idx in chosen:
            records[module.layer_idx] = (
                query.contiguous().clone(),
                key.contiguous().clone(),
                value.contiguous().clone(),
            )
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    with attention_implementation(model, register_function("attncompose-capture", record)):
        logits = model(input_ids.to(model.device), use_cache=False).logits
    return records, perplexity_from_logits(logits, input_ids)
