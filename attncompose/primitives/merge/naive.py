"""Reference merge: combine partial results over disjoint key sets by log-sum-exp."""

from __future__ import annotations

import torch
from torch import Tensor

from attncompose.primitives.base import Partial, Problem


def merge(problem: Problem, parts: list[Partial], into: Partial | None = None) -> Partial:
    """The ``merge`` kernel op's reference: :func:`merge_partials` (``problem``: what the
    kernel choice looks at), or the parts merged into ``into`` (in its dtype): ``parts[0]``
    itself folds the others in place (:func:`merge_into`), another target takes a copy of
    the first part first. Partials are out [N, L, Dv], lse [N, L], or [N, M, L, Dv], [N, M, L]."""
    if into is None:
        return merge_partials(parts)
    if into is not parts[0]:
        into.out.copy_(parts[0].out)
        into.lse.copy_(parts[0].lse)
    for part in parts[1:]:
        merge_into(into, part)
    return into


def merge_partials(parts: list[Partial]) -> Partial:
    """o = sum_i e^{l_i} o_i / sum_i e^{l_i}, l = log sum_i e^{l_i}; rows all -inf stay empty.
    A new Partial (float32 where the first part's output is in a half dtype): the parts are
    folded into a copy of the first by :func:`merge_into`."""
    first = parts[0]
    wide = first.out.dtype in (torch.float32, torch.float64)
    out = first.out.clone() if wide else first.out.float()
    result = Partial(out, first.lse.clone())
    for part in parts[1:]:
        merge_into(result, part)
    return result


def merge_into(target: Partial, part: Partial) -> None:
    """Merge ``part`` into ``target`` in place (``target``'s tensors may be views of larger
    buffers): lse = log(e^{l_t} + e^{l_p}), out = the two outputs weighted by e^{l - lse}.
    Outputs may be float32 or a half dtype (Triton kernels write their inputs' dtype); the
    weighting is computed in float32."""
    lse = torch.logaddexp(target.lse, part.lse)  # -inf where both are
    base = lse.nan_to_num(neginf=0.0)
    keep = torch.exp(target.lse - base).unsqueeze(-1)
    add = torch.exp(part.lse - base).unsqueeze(-1)
    if target.out.dtype in (torch.float32, torch.float64):
        target.out.mul_(keep).addcmul_(part.out.to(target.out.dtype), add)
    else:
        target.out.copy_(target.out.float() * keep + part.out.float() * add)
    target.lse.copy_(lse)


def merge_rows_into(
    problem: Problem, target: Partial, part: Partial, rows: Tensor, sources: Tensor | None = None
) -> None:
    """Merge row j of ``part`` into row ``rows[j]`` of ``target``, in place, by lse; several
    rows of ``part`` may land on one row of ``target``. A fixed number of kernels however many
    land on a row (target: out [N, L, Dv], lse [N, L]; part: out [N, M, Dv], lse [N, M];
    ``rows`` [M] int64; ``sources``, the same map inverted, is for the Triton kernel).
    Weights and sums in float32, the output written in its dtype. The ``merge_rows`` kernel
    op's reference (``problem``: what the kernel choice looks at)."""
    n = target.lse.shape[0]
    top = target.lse.clone().scatter_reduce_(1, rows.expand(n, -1), part.lse, "amax")
    base = top.nan_to_num(neginf=0.0)  # rows that attend nothing stay -inf
    keep = torch.exp(target.lse - base)
    add = torch.exp(part.lse - base.index_select(1, rows))
    total = keep.index_add(1, rows, add)  # sum of e^{l - base} over a row's parts
    wide = target.out.dtype in (torch.float32, torch.float64)
    out = target.out.mul_(keep.unsqueeze(-1)) if wide else target.out.float() * keep[..., None]
    out.index_add_(1, rows, part.out.to(out.dtype) * add.unsqueeze(-1))
    out.div_(total.masked_fill(total == 0, 1.0).unsqueeze(-1))
    if not wide:
        target.out.copy_(out)
    target.lse.copy_(base.add_(torch.log(total)))
