"""A block plan lowered to PyTorch's FlexAttention (``torch.nn.attention.flex_attention``).

The plan's lists become a ``BlockMask`` (``from_kv_blocks``: its full blocks as
FlexAttention's full blocks, skipped by ``mask_mod``; its partial blocks as the ones where
``mask_mod`` runs), its pair rule the ``mask_mod`` (in range, causal on absolute positions,
any own coverage, no excluded one: the exact pair semantics, so FlexAttention's eager path,
which ignores the block lists, agrees too), and a per-key log-weight the ``score_mod``. Rows
are FlexAttention's heads (B = 1, H = N; a plan shared by every row broadcasts).

Compilation: on CUDA, ``torch.compile(flex_attention, dynamic=True)`` once per process, with
every value that varies between calls (offsets, lengths, tables) passed as tensors, so a new
length reuses the compiled kernel instead of recompiling; should the recompile limit still
be hit, dynamo is told to raise (``fail_on_recompile_limit_hit``) rather than silently run
the unfused eager implementation (seen on an H200: 74-264 ms instead of 1-3 ms), and the
error says so. Elsewhere (CPU) FlexAttention runs eagerly: correct, for checking, not fast.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from attncompose.errors import AttncomposeError
from attncompose.primitives.base import Partial, Predicate, Problem
from attncompose.primitives.plan import FULL, PARTIAL, BlockPlan

COMPILE_BACKEND = "inductor"  # tests may use "eager" to check the compile policy quickly


class FlexFallbackError(AttncomposeError, RuntimeError):
    """FlexAttention would have left its compiled path (recompile limit): never silently."""


def available() -> bool:
    """Whether this torch has FlexAttention."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled(backend: str) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True, backend=backend)


def _flex(device: torch.device) -> Callable:
    """FlexAttention as it should run on ``device``: compiled on CUDA (or when tests ask for
    a compile backend on CPU), eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type == "cuda" or COMPILE_BACKEND != "inductor":
        return _compiled(COMPILE_BACKEND)
    return flex_attention


def block_mask(problem: Problem, plan: BlockPlan):
    """The plan as a FlexAttention ``BlockMask`` over B = 1, H = rows (cached with a plan
    shared by every row)."""
    make = lambda: _block_mask(problem, plan)
    if plan.row_invariant:
        return plan.memo(("flex-mask", problem.q.shape[0], problem.q.device), make)
    return make()


def _block_mask(problem: Problem, plan: BlockPlan):
    from torch.nn.attention.flex_attention import BlockMask

    g = plan.grid
    lists = plan.kernel_lists()
    extra = {}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        extra["compute_q_blocks"] = False  # forward only: no transposed lists needed
    return BlockMask.from_kv_blocks(
        lists.part_num[None],
        lists.part_idx[None],
        lists.full_num[None],
        lists.full_idx[None],
        BLOCK_SIZE=(g.block_q, g.block_k),
        mask_mod=mask_mod(problem, plan),
        seq_lengths=(g.lq, g.lk),
        **extra,
    )


def mask_mod(problem: Problem, plan: BlockPlan) -> Callable:
    """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)``: the pairs the plan takes, exactly
    (a full block's pairs, a partial block's by the rule), so that it agrees with the block
    lists wherever FlexAttention evaluates it; every number that differs between calls is a
    tensor (no recompilation per length)."""
    dev = problem.q.device
    g = plan.grid
    delta = problem.q_offset - problem.k_offset
    # causal as a number, not a branch: causal and non-causal calls share one compiled graph
    bounds = torch.tensor(
        [problem.lq, problem.lk, delta, int(plan.causal), g.block_q, g.block_k], device=dev
    )
    states = plan.state  # [R, nQB, nKB]: which blocks take part at all
    shared = states.shape[0] == 1
    own = [_pair_fn(p) for cov in plan.own for p in cov.predicates(problem)]
    excluded = [_pair_fn(p) for cov in plan.exclude for p in cov.predicates(problem)]

    def rule(b, h, q_idx, kv_idx):
        inside = (q_idx < bounds[0]) & (kv_idx < bounds[1])
        state = states[0 if shared else h, q_idx // bounds[4], kv_idx // bounds[5]]
        keep = (state == PARTIAL) & ((kv_idx <= q_idx + bounds[2]) | (bounds[3] == 0))
        if own:
            hit = own[0](h, q_idx, kv_idx)
            for fn in own[1:]:
                hit = hit | fn(h, q_idx, kv_idx)
            keep = keep & hit
        for fn in excluded:
            keep = keep & ~fn(h, q_idx, kv_idx)
        return inside & ((state == FULL) | keep)  # full blocks: every pair, no rule

    return rule


def _pair_fn(pred: Predicate) -> Callable:
    """``covered(h, q_idx, kv_idx)`` of one kernel-form predicate (bucket, table or band);
    ids and tables of one row serve every row."""
    q_ids, k_ids = pred.q_ids.long(), pred.k_ids.long()
    row = (lambda h: 0) if q_ids.shape[0] == 1 else (lambda h: h)
    if pred.table is not None:
        table = pred.table
        at = (lambda h: 0) if table.shape[0] == 1 else (lambda h: h)
        return lambda h, qi, kj: table[at(h), q_ids[row(h), qi], k_ids[row(h), kj]]
    gap = lambda h, qi, kj: q_ids[row(h), qi] - k_ids[row(h), kj]
    if pred.band is not None:
        band = torch.tensor(pred.band, device=q_ids.device)
        return lambda h, qi, kj: (gap(h, qi, kj) >= 0) & (gap(h, qi, kj) < band)
    return lambda h, qi, kj: gap(h, qi, kj) == 0


def _score_mod(bias: Tensor) -> Callable:
    """Scores + per-key natural-log weights (``bias`` [R, Lk], R = 1 shared)."""
    shared = bias.shape[0] == 1
    return lambda score, b, h, q_idx, kv_idx: score + bias[0 if shared else h, kv_idx]


def plan_attention(problem: Problem, plan: BlockPlan) -> Partial:
    """(out [N, Lq, Dv] in the inputs' dtype, lse [N, Lq] float32) over the plan's pairs by
    FlexAttention; rows that select no key get out 0 and lse -inf."""
    from torch.nn.attention import flex_attention as flex_module

    plan = plan.natural_rows()
    q, k, v = (x.unsqueeze(0) for x in (problem.q, problem.k, problem.v))  # [1, N, L, D]
    kwargs = {"block_mask": block_mask(problem, plan), "scale": problem.scale}
    if problem.kv_group > 1:  # query head h reads key/value head h // kv_group
        kwargs["enable_gqa"] = True
    if plan.key_bias is not None:
        kwargs["score_mod"] = _score_mod(plan.key_bias.float())
    if hasattr(flex_module, "AuxRequest"):
        kwargs["return_aux"] = flex_module.AuxRequest(lse=True)
    else:  # older torch
        kwargs["return_lse"] = True
    fn = _flex(problem.q.device)
    with _no_silent_fallback():
        out, aux = fn(q, k, v, **kwargs)
    lse = aux if isinstance(aux, Tensor) else aux.lse
    return Partial(out[0], lse[0].float())


class _no_silent_fallback:
    """Within the block, hitting dynamo's recompile limit raises (it would otherwise run
    FlexAttention's unfused eager path without a word)."""

    def __enter__(self):
        import torch._dynamo

        config = torch._dynamo.config
        self._patch = (
            config.patch(fail_on_recompile_limit_hit=True)
            if hasattr(config, "fail_on_recompile_limit_hit")
            else None
        )
        if self._patch is not None:
            self._patch.__enter__()
        return self

    def __exit__(self, kind, err, tb):
        if self._patch is not None:
            self._patch.__exit__(kind, err, tb)
        if err is not None and "recompile" in str(err).lower() and "limit" in str(err).lower():
            raise FlexFallbackError(
                "FlexAttention hit dynamo's recompile limit and would fall back to its slow "
                f"eager path ({str(err).splitlines()[0]}); raise "
                "torch._dynamo.config.recompile_limit or use the Triton block-sparse kernel"
            ) from err
        return False
