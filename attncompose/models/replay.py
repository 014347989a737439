"""Perplexity with one layer's attention replaced, re-running only that layer and those above.

One exact forward pass records what each decoder layer receives (hidden states and the
keyword arguments the model passes: position embeddings, mask, ...). Replacing layer i's
attention changes nothing below it, so the perplexity with it replaced runs layers i..L-1, the
final norm and the output head from layer i's recorded input: about half a forward pass on
average instead of a whole one. Measuring each layer's sensitivity (how much perplexity grows
when that layer alone is approximated) costs L such passes.

Needs the Llama-family layout of transformers models (``model.model.layers``,
``model.model.norm``, the output embeddings); :func:`supports_replay` says whether a model has
it. Where it does not, :class:`LayerReplay` runs whole forward passes instead (same results).

What it measures is a :class:`~attncompose.models.evaluate.Growth`: the mean change of the
per-token loss, and its standard error over blocks of tokens (one text's measurement is noisy:
on SmolLM2 at 8192 tokens the standard error of a layer's growth is 0.0001-0.0015, as large as
the growths a perplexity budget of 1% shares among 30 layers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from attncompose.integrations.hf import AttentionFn, attention_implementation, register
from attncompose.models.evaluate import Growth, loss_growth, losses, token_losses

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
    """Exact per-token losses of ``input_ids`` [1, L], and their growth with one layer replaced.

    Holds every layer's input (L x [1, L, hidden] floats: 283 MB for SmolLM2 at 4096 tokens).
    """

    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor):
        self.model = model
        self.input_ids = input_ids.to(model.device)
        self.partial = supports_replay(model)
        self.inputs: list[tuple[tuple, dict[str, Any]]] = []
        self.exact_losses = self._record() if self.partial else losses(model, self.input_ids)

    @property
    def exact_ppl(self) -> float:
        return float(self.exact_losses.double().mean().exp())

    @torch.inference_mode()
    def _record(self) -> torch.Tensor:
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
        return self._losses(hidden)

    @torch.inference_mode()
    def losses(self, layer: int, attn: AttentionFn) -> torch.Tensor:
        """Per-token losses with ``attn`` as layer ``layer``'s attention, every other exact."""
        if not self.partial:
            return losses(self.model, self.input_ids, attn, [layer])
        name = register("attncompose-replay", attn, [layer])
        hidden = self.inputs[layer][0][0]
        with attention_implementation(self.model, name):
            for i, block in enumerate(self.model.model.layers[layer:], start=layer):
                args, kwargs = self.inputs[i]
                out = block(hidden, *args[1:], **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
        return self._losses(self.model.model.norm(hidden))

    def growth(self, layer: int, attn: AttentionFn) -> Growth:
        """Growth of log perplexity with ``attn`` as layer ``layer``'s attention alone."""
        return loss_growth(self.losses(layer, attn), self.exact_losses)

    def perplexity(self, layer: int, attn: AttentionFn) -> float:
        """Perplexity with ``attn`` as layer ``layer``'s attention, every other layer exact."""
        return float(self.losses(layer, attn).double().mean().exp())

    def _losses(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token losses from the final (normed) hidden states [1, L, hidden], in chunks."""
        head = self.model.get_output_embeddings()
        targets = self.input_ids[0, 1:]
        out = []
        for start in range(0, targets.shape[0], CHUNK_TOKENS):
            logits = head(hidden[0, start : start + CHUNK_TOKENS][: targets.shape[0] - start])
            out.append(token_losses(logits, targets[start : start + logits.shape[0]]))
        return torch.cat(out)
