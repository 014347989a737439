"""Reference merge: combine partial results over disjoint key sets by log-sum-exp."""

from __future__ import annotations

import torch

from attncompose.primitives.base import Partial


def merge_partials(parts: list[Partial]) -> Partial:
    """o = sum_i e^{l_i} o_i / sum_i e^{l_i}, l = log sum_i e^{l_i}; rows all -inf stay empty.
    A new Partial: the parts are folded into a copy of the first by :func:`merge_into`."""
    result = Partial(parts[0].out.clone(), parts[0].lse.clone())
    for part in parts[1:]:
        merge_into(result, part)
    return result


def merge_into(target: Partial, part: Partial) -> None:
    """Merge ``part`` into ``target`` in place (``target``'s tensors may be views of larger
    buffers): lse = log(e^{l_t} + e^{l_p}), out = the two outputs weighted by e^{l - lse}."""
    lse = torch.logaddexp(target.lse, part.lse)  # -inf where both are
    base = lse.nan_to_num(neginf=0.0)
    target.out.mul_(torch.exp(target.lse - base).unsqueeze(-1))
    target.out.addcmul_(part.out, torch.exp(part.lse - base).unsqueeze(-1))
    target.lse.copy_(lse)
