"""Perplexity with one layer's attention replaced, re-running only that layer and those above.

One exact forward pass records what each decoder layer receives (hidden states and the
keyword arguments the model passes: position embeddings, mask, ...). Replacing layer i's
attention changes nothing below it, so the perplexity with it replaced runs layers i..L-1, the
final norm and the output head from layer i's recorded input: about half a forward pass on
average instead of a whole one. Measuring each layer's sensitivity (how much perplexity grows
when that layer alone is approximated) costs L such passes.

Needs the Llama-family layout of transformers models (``model.model.layers``,
``model.model.norm``, the output embeddings); :func:`supports_replay` says whether a model has
it, and callers fall back to whole forward passes where it does not.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from attncompose.integrations.hf import AttentionFn, attention_implementation, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CHUNK_TOKENS = 1024  # output-head rows at once: 1024 x 49152 logits is 200 MB in fp32


def supports_replay(model: PreTrainedModel) -> bool:
    """Whether ``model`` has the layout :class:`LayerReplay` re-runs."""
    base = getattr(model, "model", None)
    return (
        isinstance(getattr(base, "layers", None), torch.nn.ModuleList)
        and isinstance(getattr(base, "norm", None), torch.nn.Module)
        and model.get_output_embeddings() is not None
    )


class LayerReplay:
    """Exact perplexity of ``input_ids`` [1, L], and the perplexity with one layer replaced.

    Holds every layer's input (L x [1, L, hidden] floats: 283 MB for SmolLM2 at 4096 tokens).
    """

    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor):
        if not supports_replay(model):
            raise TypeError(f"{type(model).__name__} lacks the layout LayerReplay re-runs")
        self.model = model
        self.input_ids = input_ids.to(model.device)
        self.inputs: list[tuple[tuple, dict[str, Any]]] = []
        self.exact_ppl = self._record()

    @torch.inference_mode()
    def _record(self) -> float:
        layers = self.model.model.layers

        def keep(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self.inputs.append((args, kwargs))

        handles = [layer.register_forward_pre_hook(keep, with_kwargs=True) for layer in layers]
        try:
            with attention_implementation(self.model, "sdpa"):
                hidden = self.model.model(self.input_ids, use_cache=False).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()
        return self._perplexity(hidden)

    @torch.inference_mode()
    def perplexity(self, layer: int, attn: AttentionFn) -> float:
        """Perplexity with ``attn`` as layer ``layer``'s attention, every other layer exact."""
        name = register("attncompose-replay", attn, [layer])
        args, kwargs = self.inputs[layer]
        hidden = args[0]
        with attention_implementation(self.model, name):
            for i, block in enumerate(self.model.model.layers[layer:], start=layer):
                args, kwargs = self.inputs[i]
                out = block(hidden, *args[1:], **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
        return self._perplexity(self.model.model.norm(hidden))

    def _perplexity(self, hidden: torch.Tensor) -> float:
        """exp(mean next-token loss) from final hidden states [1, L, hidden], in chunks."""
        head = self.model.get_output_embeddings()
        targets = self.input_ids[0, 1:]
        total = 0.0
        for start in range(0, targets.shape[0], CHUNK_TOKENS):
            logits = head(hidden[0, start : start + CHUNK_TOKENS][: targets.shape[0] - start])
            chunk = targets[start : start + logits.shape[0]]
            total += float(F.cross_entropy(logits.float(), chunk, reduction="sum"))
        return math.exp(total / targets.shape[0])
