"""Reference sortLSH: random-projection sign codes ordered by their reflected-Gray rank.

The rank of a code c in the reflected Gray sequence is the inverse Gray map
``c ^ (c >> 1) ^ (c >> 2) ^ ...``; consecutive ranks name codes that differ in one bit, so
sorting by rank puts neighbouring buckets one bit apart (the paper's code used the forward
map, where that holds for ~76% of neighbours at r=7).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from attncompose.primitives.base import group_views, static_arange


@functools.lru_cache(maxsize=64)
def projections(
    heads: int, dim: int, bits: int, seed: int, device: str = "cpu", rows: int | None = None
) -> Tensor:
    """Gaussian directions [heads, dim, bits] (float32, drawn on the CPU), one set per head;
    with ``rows`` (a multiple of ``heads``) repeated to [rows, dim, bits], one set per row of
    a [B*H, ...] problem. Kept per ``device`` and shape (no draw, host-to-device copy or
    repeat per call). Do not modify."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(heads, dim, bits, generator=g)
    return dirs.repeat(rows // heads, 1, 1).to(device) if rows else dirs.to(device)


def hash_codes(x: Tensor, directions: Tensor) -> Tensor:
    """r-bit sign codes [N, L] (int64) of x [N / G, L, D] under directions [N, D, r]: row n
    hashes row n // G of x (G = N / x's rows; grouped keys are hashed where they are, for
    each query head of their group, as the keys repeated per head would be)."""
    n, length = directions.shape[0], x.shape[1]
    group = n // x.shape[0]
    xt = x.to(directions.dtype).transpose(-1, -2)
    code = torch.zeros(n, length, dtype=torch.long, device=x.device)
    for dirs, into in zip(group_views(directions, group), group_views(code, group), strict=True):
        # [N / G, r, L]: one long GEMM row per bit (which orientation runs faster depends on
        # the CPU: x @ directions measured 2x slower on one, 3-7x faster on another at r=7;
        # these bits are the reference's), then the bits are packed one at a time
        proj = torch.matmul(dirs.transpose(-1, -2), xt)
        for bit in range(proj.shape[1]):
            into.bitwise_or_((proj[:, bit] > 0).long() << bit)
    return code


def gray_rank(code: Tensor, bits: int = 63) -> Tensor:
    """Rank of each ``bits``-bit code in the reflected Gray sequence (inverse Gray map)."""
    rank = code.clone()
    shift = 1
    while shift < bits:
        rank ^= rank >> shift
        shift <<= 1
    return rank


def gray_code(rank: Tensor) -> Tensor:
    """The forward Gray map: the code at a given rank (``rank ^ (rank >> 1)``)."""
    return rank ^ (rank >> 1)


def sort_positions(
    xs: Sequence[Tensor],
    directions: Tensor,
    part: Tensor | None = None,
    rows: Sequence[Tensor] | None = None,
    keep: int | None = None,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """For each x [N, L, D] of ``xs`` (queries and keys; grouped keys [N / G, L, D], row n
    hashed from row n // G, see :func:`hash_codes`): (order [N, L]: indices sorted by Gray
    rank, position [N, L]: each index's sorted slot, key [N, L]: the sorted Gray ranks,
    with the part above them, see :func:`within_parts`; in the ranks' dtype, int32 from the
    Triton kernel, where no part is above them). ``part`` [L] (a packed problem's part of
    each position): sorted within each part, the parts in their order. ``rows`` (one [L] per
    input, :class:`~attncompose.primitives.base.RowMaps`): input i is ``xs[i][:, rows[i]]``.
    ``keep``: only the first ``keep`` sorted slots of each input are wanted
    (:func:`sorted_order`). Inputs of one shape are sorted as one batch
    (:func:`sort_together`)."""
    if rows is not None:  # the reference reads them gathered
        xs = [x.index_select(1, r) for x, r in zip(xs, rows, strict=True)]
    bits = directions.shape[-1]
    ranks = lambda group: torch.cat([gray_rank(hash_codes(x, directions), bits) for x in group])
    return sort_together(xs, ranks, part, keep=keep)


def sort_together(
    xs: Sequence[Any],
    ranks_of: Callable[[list[Any]], Tensor],
    part: Tensor | None,
    shape_of: Callable[[Any], tuple[int, ...]] = lambda x: tuple(x.shape[1:]),
    keep: int | None = None,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`sorted_order` of each of ``xs``; inputs of one shape (``shape_of``: [L, D],
    the rows aside: grouped keys have fewer) in ONE sort of their ranks stacked as rows
    (``ranks_of(group)`` [len(group) * N, L], N rows each), each row sorted alone as it
    would be by itself (``keep``: see :func:`sorted_order`)."""
    together = all(shape_of(x) == shape_of(xs[0]) for x in xs)
    out = []
    for group in [list(xs)] if together else [[x] for x in xs]:
        ranks = ranks_of(group)
        order, position, key = sorted_order(ranks, part, keep)
        n = ranks.shape[0] // len(group)
        out += [(order[i * n : (i + 1) * n], position[i * n : (i + 1) * n],
                 key[i * n : (i + 1) * n]) for i in range(len(group))]  # fmt: skip
    return out


def within_parts(rank: Tensor, part: Tensor | None) -> Tensor:
    """Sort keys that order by ``part`` [L] first, then by ``rank`` [N, L] (< 2**31)."""
    return rank if part is None else rank.long() | (part << 32)


def sorted_order(
    rank: Tensor, part: Tensor | None = None, keep: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(order, position, sorted key) of a stable sort of ``rank`` [N, L] (within each
    ``part``: the key is :func:`within_parts`). ``keep`` (no part): only the first ``keep``
    sorted slots are wanted: order and key [N, keep], the ``keep`` smallest of rank * L +
    index (unique, so in the stable sort's order) by a top-k instead of a sort; the position
    of every index past them is ``keep``."""
    length = rank.shape[1]
    if keep is None or part is not None or keep >= length:
        key, order = torch.sort(within_parts(rank, part), dim=-1, stable=True)
        position = torch.empty_like(order)
    else:
        ties = static_arange(length, rank.device)  # equal ranks keep their index order
        _, order = torch.topk(rank.long() * length + ties, keep, largest=False, sorted=True)
        key = rank.gather(1, order)
        position = torch.full(rank.shape, keep, dtype=order.dtype, device=rank.device)
    position.scatter_(1, order, static_arange(order.shape[1], order.device).expand_as(order))
    return order, position, key


def mips_augment(q: Tensor, k: Tensor, part: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The MIPS-to-angular reduction: q -> [q/|q|, 0], k -> [k/M, sqrt(1 - |k|^2/M^2)].

    With M the largest key norm (per row; per part of a packed row, ``part`` [L]), every
    augmented key has norm 1 and the angle between an augmented query and key orders keys
    by q.k, which sign-LSH tracks.
    """
    q, k = q.float(), k.float()
    qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    norms = k.norm(dim=-1, keepdim=True)
    if part is None:
        m = norms.amax(dim=1, keepdim=True)
    else:  # the largest norm of each part, read back at each of its keys
        ids = part.expand(k.shape[0], -1)
        top = norms.new_zeros(k.shape[:2])  # room for every part (fewer than keys)
        m = top.scatter_reduce_(1, ids, norms.squeeze(-1), "amax").gather(1, ids)[..., None]
    m = m.clamp_min(1e-12)
    kn = k / m
    extra = (1 - (norms / m) ** 2).clamp_min(0).sqrt()
    return torch.cat([qn, torch.zeros_like(qn[..., :1])], -1), torch.cat([kn, extra], -1)
