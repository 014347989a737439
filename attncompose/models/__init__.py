"""Real models for capturing attention and measuring perplexity (needs ``transformers``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attncompose.models.card import ModelCard, ModelInputError
from attncompose.models.smollm2 import SMOLLM2, ModelNotAvailableError, gguf_path, load_smollm2

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ModelCard",
    "ModelInputError",
    "ModelNotAvailableError",
    "gguf_path",
    "load_model",
    "load_smollm2",
    "model_card",
]

_LOADERS = {"smollm2": (SMOLLM2, load_smollm2)}


def model_card(name: str) -> ModelCard:
    """What the model ``name`` takes (layers, heads, positions), without loading it."""
    if name not in _LOADERS:
        raise ModelNotAvailableError(
            f"unknown model {name!r}; known: {', '.join(sorted(_LOADERS))}"
        )
    return _LOADERS[name][0]


def load_model(
    name: str, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a known model by name ("smollm2"); returns (model, tokenizer), cached per process."""
    model_card(name)
    return _LOADERS[name][1](dtype)
