"""Shared helpers for the model tests: a tiny random Llama and an exact stand-in attention."""

from __future__ import annotations

import torch
import transformers

from attncompose.eval import reference

# a tiny streaming recipe (2 sinks + a window of 8 or 16) for model-level tuning tests
STREAM = {
    "name": "s",
    "steps": {
        "sinks": {"op": "sink", "count": 2},
        "local": {"op": "window", "width": {"default": 8, "choices": [8, 16]}},
        "out": {"op": "block", "select": ["sinks", "local"], "block_size": 16},
    },
}


def tiny_llama(num_layers: int = 2, max_positions: int = 256) -> transformers.LlamaForCausalLM:
    """A randomly initialised Llama (GQA: 4 query / 2 key-value heads, head dim 16)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).eval()


def exact_attention(q, k, v, is_causal=True, scale=None):
    """Stand-in for a compiled recipe: exact SDPA, GQA, bottom-right causal alignment."""
    return reference.exact_attention(q, k, v, is_causal, scale)
