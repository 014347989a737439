"""Real models for capturing attention and measuring perplexity (needs ``transformers``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attncompose.models.smollm2 import ModelNotAvailableError, gguf_path, load_smollm2

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["ModelNotAvailableError", "gguf_path", "load_model", "load_smollm2"]

_LOADERS = {"smollm2": load_smollm2}


def load_model(
    name: str, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a known model by name ("smollm2"); returns (model, tokenizer), cached per process."""
    if name not in _LOADERS:
        raise ModelNotAvailableError(
            f"unknown model {name!r}; known: {', '.join(sorted(_LOADERS))}"
        )
    return _LOADERS[name](dtype)
