"""The project's one error metric, and the per-layer error built on it."""

from __future__ import annotations

import torch
from torch import Tensor

from attncompose.eval.reference import exact_attention


def relative_error(out: Tensor, reference: Tensor) -> float:
    """||out - reference||_F / ||reference||_F over the whole tensor, computed in float64."""
    if out.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs {tuple(reference.shape)}")
    ref = reference.detach().double()
    diff = out.detach().double() - ref
    denom = torch.linalg.vector_norm(ref)
    if denom == 0:
        raise ValueError("the reference is all zeros: relative error is undefined")
    return float(torch.linalg.vector_norm(diff) / denom)


def layer_errors(
    captured: dict[int, tuple[Tensor, Tensor, Tensor]], attn, causal: bool = True
) -> dict[int, float]:
    """Relative error of ``attn`` vs exact attention per captured layer.

    captured: {layer: (q [1, Hq, L, D], k [1, Hkv, L, D], v [1, Hkv, L, D])}; ``attn`` one
    attention callable, or one per layer (``attn.layer(i)``, as a model-level tuning).
    """
    per_layer = getattr(attn, "layer", None)
    errors = {}
    with torch.no_grad():
        for layer, (q, k, v) in sorted(captured.items()):
            fn = attn if per_layer is None else per_layer(layer)
            exact = exact_attention(q, k, v, causal)
            errors[layer] = relative_error(fn(q, k, v, is_causal=causal), exact)
    return errors
