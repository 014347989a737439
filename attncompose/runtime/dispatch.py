"""Which implementation runs a kernel-level op, xformers-style.

Each op has implementations in preference order (Triton first, then FlexAttention where an
op has one, PyTorch last); each answers ``not_supported_reasons(problem, **inputs)``.
``backend="torch"`` takes the first PyTorch one without reasons (its reference, last, has
none); ``"triton"`` / ``"flex"`` take that implementation or raise one error listing every
reason (ops without a FlexAttention form run as under ``"auto"``); ``"auto"`` takes, for
CUDA tensors, the first Triton or FlexAttention implementation with no reason against, else
PyTorch (per call: ``show`` can only say what CUDA inputs would get; :func:`explain` says
why each one was passed over). Kernel modules are imported only when an implementation is
first called, so ``import attncompose`` never loads kernels.

Ops: ``exact`` (attention with lse), ``plan`` (a block plan in one pass: block-sparse
attention), ``block`` (tile kernel for selections without a block form, also the
sampler's), ``lsh_sort`` (hash, Gray rank, sort), ``topk_scores`` (block means and their
scores).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attncompose.primitives.base import Problem
from attncompose.runtime.checks import AttentionInputError

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendNotSupportedError(AttentionInputError):
    """The requested backend cannot run this problem; the message lists every reason."""


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_reasons(problem: Problem) -> list[str]:
    """Why Triton kernels cannot run ``problem`` (empty when they can)."""
    reasons = []
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed")
    device = problem.q.device
    if device.type != "cuda" and not interpreting():
        reasons.append(f"device {device} is not CUDA (set TRITON_INTERPRET=1 to interpret)")
    if problem.q.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {problem.q.dtype} is not float32/float16/bfloat16")
    if problem.q.dtype == torch.bfloat16 and device.type != "cuda":
        reasons.append("the Triton interpreter computes bfloat16 wrongly")
    for name, d in (("head dim", problem.q.shape[-1]), ("value head dim", problem.v.shape[-1])):
        if d < 16 or d > 256 or d & (d - 1):
            reasons.append(f"{name} {d} is not a power of two in [16, 256]")
    return reasons


def _block_reasons(problem: Problem, tiles=None, own=None, exclude=()) -> list[str]:
    from attncompose.primitives.base import UnionCoverage

    reasons = triton_reasons(problem)
    if isinstance(own, UnionCoverage):
        reasons.append("a union coverage cannot be a tile kernel's own selection")
    for cov in (own, *exclude):
        if cov is not None and not cov.has_kernel_form:
            reasons.append(f"coverage {type(cov).__name__} has no kernel form (predicates)")
    return reasons


@dataclass(frozen=True)
class Implementation:
    """One implementation of an op: ``name`` (shown by ``show``), where its function lives."""

    name: str
    module: str
    function: str
    reasons: Callable[..., list[str]] = lambda problem, **inputs: []

    @property
    def backend(self) -> str:
        return self.name.split(":", 1)[0]

    def not_supported_reasons(self, problem: Problem, **inputs: Any) -> list[str]:
        return self.reasons(problem, **inputs)

    def load(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), self.function)


def _triton_basic(problem: Problem, **inputs: Any) -> list[str]:
    return triton_reasons(problem)


def _plan_reasons(problem: Problem, **inputs: Any) -> list[str]:
    from attncompose.primitives.block.plan_triton import not_supported_reasons

    return triton_reasons(problem) + not_supported_reasons(problem, **inputs)


def _contiguous_reasons(backend: str) -> Callable[..., list[str]]:
    """Reasons against running a tile pass as a contiguous block plan on ``backend``."""

    def reasons(problem: Problem, tiles=None, **inputs: Any) -> list[str]:
        from attncompose.primitives.block.contiguous import not_supported_reasons

        first = triton_reasons(problem) if backend == "triton" else _flex_reasons(problem)
        return first + not_supported_reasons(problem, tiles, **inputs)

    return reasons


def _flex_reasons(problem: Problem, **inputs: Any) -> list[str]:
    from attncompose.primitives.block.plan_flex import not_supported_reasons

    return not_supported_reasons(problem, **inputs)


def _fused_reasons(problem: Problem, **inputs: Any) -> list[str]:
    from attncompose.primitives.block.fused import not_supported_reasons

    return not_supported_reasons(problem, **inputs)


_P = "attncompose.primitives"
OPS: dict[str, list[Implementation]] = {
    "exact": [
        Implementation(
            "triton:flash-fwd-lse", f"{_P}.exact.triton", "exact_attention", _triton_basic
        ),
        Implementation("torch:sdpa-with-lse", f"{_P}.exact.fast", "fused_exact_attention"),
    ],
    "block": [
        Implementation(
            "triton:contiguous-tiles",
            f"{_P}.block.contiguous",
            "triton_block_attention",
            _contiguous_reasons("triton"),
        ),
        Implementation(
            "triton:tile-attention", f"{_P}.block.triton", "block_attention", _block_reasons
        ),
        Implementation(
            "flex:contiguous-tiles",
            f"{_P}.block.contiguous",
            "flex_block_attention",
            _contiguous_reasons("flex"),
        ),
        Implementation(
            "torch:block-fused-cpu", f"{_P}.block.fused", "block_attention", _fused_reasons
        ),
        Implementation("torch:block", f"{_P}.block.naive", "block_attention"),
    ],
    "plan": [
        Implementation(
            "triton:block-sparse", f"{_P}.block.plan_triton", "plan_attention", _plan_reasons
        ),
        Implementation(
            "flex:block-sparse", f"{_P}.block.plan_flex", "plan_attention", _flex_reasons
        ),
        Implementation(
            "torch:block-sparse-cpu", f"{_P}.block.fused", "plan_attention", _fused_reasons
        ),
        Implementation("torch:block-sparse", f"{_P}.block.plan_torch", "plan_attention"),
    ],
    "topk_scores": [
        Implementation(
            "triton:block-mean-scores", f"{_P}.topk.triton", "block_scores", _triton_basic
        ),
        Implementation("torch:block-mean-scores", f"{_P}.topk.naive", "block_scores"),
    ],
    "lsh_sort": [
        Implementation(
            "triton:lsh-gray-rank+torch.sort", f"{_P}.lsh.triton", "sort_positions", _triton_basic
        ),
        Implementation("torch:lsh-gray-rank+torch.sort", f"{_P}.lsh.naive", "sort_positions"),
    ],
}


def _by_backend(op: str, backend: str, problem: Problem | None = None, **inputs: Any):
    """The first implementation of ``backend`` with no reason against ``problem`` (the last
    of each backend, its reference, has none)."""
    impls = [impl for impl in OPS[op] if impl.backend == backend]
    if problem is None:
        return impls[0]
    return next(
        i for i in impls if i is impls[-1] or not i.not_supported_reasons(problem, **inputs)
    )


def choose(op: str, backend: str, problem: Problem, **inputs: Any) -> Implementation:
    """The implementation of ``op`` that ``backend`` runs on ``problem`` (see module doc)."""
    if backend == "torch":
        return _by_backend(op, "torch", problem, **inputs)
    if backend in ("triton", "flex"):
        impls = [impl for impl in OPS[op] if impl.backend == backend]
        if not impls:  # no such form of this op: as auto would run it
            return choose(op, "auto", problem, **inputs)
        reasons = {impl.name: impl.not_supported_reasons(problem, **inputs) for impl in impls}
        for impl in impls:
            if not reasons[impl.name]:
                return impl
        raise BackendNotSupportedError(
            f"backend {backend!r} cannot run {op!r}: "
            + "; ".join(f"{r} ({name})" if len(impls) > 1 else r
                        for name, rs in reasons.items() for r in rs)
        )  # fmt: skip
    if problem.q.device.type == "cuda":
        for impl in OPS[op]:
            if impl.backend != "torch" and not impl.not_supported_reasons(problem, **inputs):
                return impl
    return _by_backend(op, "torch", problem, **inputs)


def explain(op: str, backend: str, problem: Problem, **inputs: Any) -> list[str]:
    """Why ``backend`` runs what it runs: one line per implementation of ``op``, in
    preference order, naming the chosen one and the reasons against the others."""
    chosen = choose(op, backend, problem, **inputs)
    lines = []
    for impl in OPS[op]:
        if impl is chosen:
            lines.append(f"{impl.name}: chosen")
            break
        reasons = impl.not_supported_reasons(problem, **inputs)
        if backend not in ("auto", impl.backend):
            reasons = [f"backend {backend!r} asked"]
        elif not reasons and problem.q.device.type != "cuda":
            reasons = [f"device {problem.q.device} (auto takes kernels for CUDA tensors)"]
        lines.append(f"{impl.name}: " + "; ".join(reasons))
    return lines


def call(op: str, backend: str, problem: Problem, *args: Any, **inputs: Any) -> Any:
    """Run ``op`` on ``problem`` with the implementation ``backend`` chooses."""
    return choose(op, backend, problem, **inputs).load()(problem, *args, **inputs)


def describe(op: str, backend: str) -> str:
    """What ``backend`` runs for ``op`` on this machine, as ``attncompose show`` prints it
    (``auto``: Triton and FlexAttention where CUDA and triton are present, else PyTorch). A
    backend with several implementations is named in preference order, ``a else b``: which
    one runs is chosen per call (e.g. the fused CPU kernels take CPU tensors only)."""
    if backend == "auto":
        cuda = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
        names = [impl.name for impl in OPS[op] if (impl.backend != "torch") == cuda]
        return " else ".join(names)
    names = [impl.name for impl in OPS[op] if impl.backend == backend]
    return " else ".join(names) if names else describe(op, "auto")
