"""Reference merge: combine partial results over disjoint key sets by log-sum-exp."""

from __future__ import annotations

import torch

from attncompose.primitives.base import Partial


def merge_partials(parts: list[Partial]) -> Partial:
    """o = sum_i e^{l_i} o_i / sum_i e^{l_i}, l = log sum_i e^{l_i}; rows all -inf stay empty."""
    lses = torch.stack([p.lse for p in parts])  # [P, N, L]
    lse = torch.logsumexp(lses, dim=0)  # [N, L]
    w = torch.exp(lses - lse.nan_to_num(neginf=0.0).unsqueeze(0))  # [P, N, L], 0 where -inf
    out = parts[0].out * w[0].unsqueeze(-1)
    for i, p in enumerate(parts[1:], 1):
        out.addcmul_(p.out, w[i].unsqueeze(-1))
    return Partial(out, lse)


def merge_into(target: Partial, part: Partial) -> None:
    """Merge ``part`` into ``target`` in place: the same result as ``merge_partials([target,
    part])``, written into ``target``'s tensors (which may be views of larger buffers)."""
    lse = torch.logaddexp(target.lse, part.lse)  # -inf where both are
    base = lse.nan_to_num(neginf=0.0)
    target.out.mul_(torch.exp(target.lse - base).unsqueeze(-1))
    target.out.addcmul_(part.out, torch.exp(part.lse - base).unsqueeze(-1))
    target.lse.copy_(lse)
