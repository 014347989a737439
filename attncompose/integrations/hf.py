"""Hugging Face transformers integration: an attention callable as an ``attn_implementation``.

``register(name, attn)`` registers both an attention function (``AttentionInterface``) and a
mask function (``AttentionMaskInterface``, transformers' ``sdpa_mask``). The mask function
matters: for a name missing from the mask interface, transformers builds no mask at all, so a
padding mask would be silently dropped.

Which calls reach ``attn`` (contract: ``o = attn(q, k, v, is_causal=True, scale=None)`` with
q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], returning [B, Hq, Lq, D]):

- selected layers only; the others run exact SDPA;
- no mask (``sdpa_mask`` returns None for an unpadded causal prefill or a decode step), or a
  mask that is exactly bottom-right causal (chunked prefill on a cache);
- any other mask, e.g. left padding in a batch, runs **exact SDPA with that mask**: the
  approximation is not used for padded batches, so their results stay correct;
- dropout > 0 (training) also runs exact SDPA;
- a ``position_bias`` (T5's relative positions, an additive mask) also runs exact SDPA, which
  adds it;
- a sliding window (Mistral, Gemma 2, gpt-oss) is in the mask that ``sdpa_mask`` builds: the mask
  is None only while the window covers every key.

Attention arguments that change the result and that neither ``attn`` nor exact SDPA applies are
refused with an :class:`~attncompose.errors.AttentionInputError` naming them, never dropped:
``softcap`` (Gemma 2's logit soft-capping), ``s_aux`` / ``sinks`` (attention sinks: gpt-oss) and
``indices`` / ``block_indices`` (sparse keys, DeepSeek V3.2, which a model folds into the mask
only for its "eager" and "sdpa" implementations). Run such a model with "eager".

A static cache's prefill (no mask, Lq < Lk, keys past Lq not yet written) crops k/v to the
first Lq positions, as transformers' SDPA path does.

``attn`` may also be per layer (a :class:`LayerwiseAttention`, e.g. the
:class:`~attncompose.runtime.model_tuned.ModelTuning` of a model-level tuned file): each call then
goes to ``attn.layer(module.layer_idx)``, after ``attn.check_model(module.config)`` has
accepted the model's shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from numbers import Integral
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attncompose.errors import AttentionInputError, AttncomposeError
from attncompose.models.card import LayerSelection, ModelInputError, select_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

AttentionFn = Callable[..., torch.Tensor]

_OWN_NAMES: set[str] = set()

# attention kwargs that change the result and that neither a recipe nor exact SDPA applies
_UNHONOURED = {
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "indices": "sparse key indices",
    "block_indices": "sparse key blocks",
}


@runtime_checkable
class LayerwiseAttention(Protocol):
    """An attention that differs per layer: ``layer(i)`` is layer i's attention callable."""

    def layer(self, index: int) -> AttentionFn:
        """The attention callable of layer ``index``."""

    def check_model(self, config: Any) -> None:
        """Raise a clear error if it was not made for a model of this config."""


def for_layer(attn: AttentionFn | LayerwiseAttention, module: torch.nn.Module) -> AttentionFn:
    """The callable serving ``module`` (an attention layer): ``attn`` itself, or its layer's."""
    if isinstance(attn, LayerwiseAttention):
        attn.check_model(module.config)
        return attn.layer(module.layer_idx)
    return attn


def _is_bottom_right_causal(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    """Whether a boolean [B, 1|H, Lq, Lk] mask is plain bottom-right causal (no padding)."""
    if mask.dtype != torch.bool or tuple(mask.shape[-2:]) != (q_len, kv_len):
        return False
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    return bool((mask == causal).all())


def _check_layers(layers: LayerSelection) -> LayerSelection:
    """``layers`` as register takes it, refused at once if no model could take it."""
    if (isinstance(layers, str) and layers == "all") or (
        isinstance(layers, Integral) and not isinstance(layers, bool)
    ):
        return layers
    if isinstance(layers, Iterable) and not isinstance(layers, (str, bytes)):
        chosen = list(layers)
        if all(isinstance(i, Integral) and not isinstance(i, bool) and i >= 0 for i in chosen):
            return [int(i) for i in chosen]
    raise ModelInputError(
        "layers must be 'all', an int k (the first k layers; -k the last k) or a list of layer "
        f"indices >= 0, not {layers!r}"
    )


def _chosen_layers(layers: LayerSelection, config: Any) -> frozenset[int]:
    """The layer indices ``layers`` picks in a model of ``config``; refused if it lacks them."""
    count = config.num_hidden_layers
    try:
        return select_layers(layers, count)
    except ValueError as err:
        raise ModelInputError(
            f"layers={layers!r} does not fit a model of {count} layers: {err}"
        ) from None


def _refuse_unhonoured(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """Raise an :class:`AttentionInputError` for a set kwarg that neither path applies."""
    for key, what in _UNHONOURED.items():
        value = kwargs.get(key)
        if value is None:
            continue
        shown = f"a tensor {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise AttentionInputError(
            f"{type(module).__name__} passes {key}={shown} ({what}), which attncompose's "
            "attention cannot apply (nor exact SDPA); run this model with "
            "attn_implementation='eager'"
        )


def _use_attn(
    module: torch.nn.Module,
    layers: LayerSelection,
    mask: torch.Tensor | None,
    shapes: tuple[int, int],
    exact: bool,
) -> bool:
    """Whether this call may go to the approximate callable (see the module docstring);
    ``exact``: the call has something only exact SDPA applies (dropout, a position bias)."""
    if module.layer_idx not in _chosen_layers(layers, module.config) or exact:
        return False
    return mask is None or _is_bottom_right_causal(mask, *shapes)


def attention_function(
    attn: AttentionFn | LayerwiseAttention, layers: LayerSelection = "all"
) -> Callable[..., tuple[torch.Tensor, None]]:
    """Wrap ``attn`` (one callable, or one per layer) in transformers' attention-function
    signature.

    The returned function takes (module, query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D],
    attention_mask, dropout, scaling, is_causal, ...) and returns (output [B, Lq, Hq, D], None).
    """
    if not (callable(attn) or isinstance(attn, LayerwiseAttention)):
        hint = f"; for a recipe name, pass ac.compile({attn!r})" if isinstance(attn, str) else ""
        raise AttncomposeError(
            "attn must be an attention callable (ac.compile(recipe), ac.load(tuned file)) or a "
            f"per-layer attention, not {type(attn).__name__} {attn!r:.60}{hint}"
        )
    layers = _check_layers(layers)

    def forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        _refuse_unhonoured(module, kwargs)
        q_len, kv_len = query.shape[2], key.shape[2]
        exact = dropout > 0 or kwargs.get("position_bias") is not None
        if not _use_attn(module, layers, attention_mask, (q_len, kv_len), exact):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
            )
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if attention_mask is None and causal and 1 < q_len < kv_len:
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        out = for_layer(attn, module)(query, key, value, is_causal=causal, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return forward


def register(
    name: str, attn: AttentionFn | LayerwiseAttention, layers: LayerSelection = "all"
) -> str:
    """Register ``attn`` on ``layers`` as ``attn_implementation=name``; returns ``name``.

    ``attn`` is one attention callable for every chosen layer, or a per-layer attention such
    as the :class:`~attncompose.runtime.model_tuned.ModelTuning` that ``attncompose.load``
    returns for a model-level tuned file (each layer dispatched by ``module.layer_idx``). A recipe
    name is not an ``attn``: pass ``ac.compile(name)``.

    ``layers``: "all", k >= 0 (the first k layers), -k (the last k) or a list of layer indices
    >= 0. Its form is checked here, its range against the model at the first call (a
    :class:`~attncompose.models.card.ModelInputError` naming the layers and the model's count).

    Use it with ``AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)`` or
    ``model.set_attn_implementation(name)``. Registering the same name again replaces it;
    transformers' own implementations ("sdpa", "eager", ...) cannot be replaced.
    """
    return register_function(name, attention_function(attn, layers))


def register_function(name: str, function: Callable[..., tuple[torch.Tensor, Any]]) -> str:
    """Register a function of transformers' attention signature, with the SDPA mask function."""
    if name == "eager" or (name in AttentionInterface._global_mapping and name not in _OWN_NAMES):
        raise ValueError(
            f"{name!r} is a transformers attention implementation; choose another name"
        )
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)
    _OWN_NAMES.add(name)
    return name


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str) -> Iterator[PreTrainedModel]:
    """Run ``model`` with ``attn_implementation=name`` in the block, then restore the old one."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
