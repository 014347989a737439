"""The project's one error metric."""

from __future__ import annotations

import torch
from torch import Tensor


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
