"""Which implementation runs a kernel-level op, xformers-style.

A kernel-level op (``exact``: attention with lse, optionally within consecutive leaves;
``plan``: a block plan in one pass; ``block``: the tile kernel for selections without a
block form, also the sampler's; ``lsh_sort``: hash, Gray rank, sort; ``topk_scores``:
block means and their scores; ``merge``: partials over disjoint keys merged by lse;
``merge_rows``: a packed result merged into its rows, the causal splitter's) has
implementations, each a :class:`Kernel` class that an op folder declares in its
``kernels.py`` (xformers' ``FwOp`` style): its ``name`` (shown by ``attncompose show``),
``not_supported_reasons(problem, **inputs)`` and the function it runs. The primitive that
owns them lists them (``Primitive.kernels``) and registering it adds them here
(:func:`add`).

Policy: implementations are kept in preference order: PyTorch's fused CUDA kernels first
where an op has one (``sdpa``: half-precision exact attention, where cuDNN is faster than
any kernel here), then Triton, then FlexAttention, PyTorch last
(:data:`PREFERENCE`; within a backend, the op folder's order). ``backend="torch"`` takes the
first PyTorch one without reasons (its reference, last, has none); ``"triton"`` / ``"flex"``
take that implementation or raise one error listing every reason (ops without such a form
run as under ``"auto"``); ``"auto"`` takes, for CUDA tensors, the first fused, Triton or
FlexAttention implementation with no reason against, else PyTorch (per call: ``show`` can
only say what CUDA inputs would get; :func:`explain` says why each one was passed over).
Triton kernel modules are imported only when an implementation is first called
(:attr:`Kernel.lazy`), so ``import attncompose`` never loads a kernel and works where triton
is absent.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from attncompose.errors import AttentionInputError
from attncompose.primitives.base import Problem

BACKENDS = ("auto", "torch", "triton", "flex")
PREFERENCE = ("sdpa", "triton", "flex", "torch")  # the order implementations are tried in
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the oldest Triton the kernels are checked with: every variant compiled for sm_90 with 3.4,
# 3.6 (the GPU image's, its interpreter running the suite too) and 3.9
# (benchmarks/compile_gpu.py --triton-path); 3.0's interpreter rejects them
OLDEST_TRITON = (3, 4)


class BackendNotSupportedError(AttentionInputError):
    """The requested backend cannot run this problem; the message lists every reason."""


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_version() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, None if there is none; read from its package
    metadata, so that asking does not import triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        release = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # importable but not installed: a checkout
        import triton

        release = triton.__version__
    major, minor = (int("".join(c for c in x if c.isdigit()) or 0) for x in release.split(".")[:2])
    return major, minor


def triton_missing() -> str | None:
    """Why no Triton that runs the kernels is installed (None: one is)."""
    version = triton_version()
    if version is None:
        return "triton is not installed"
    if version < OLDEST_TRITON:
        return (
            f"triton {version[0]}.{version[1]} is older than "
            f"{OLDEST_TRITON[0]}.{OLDEST_TRITON[1]}, the oldest the kernels are checked with"
        )
    return None


def triton_reasons(problem: Problem) -> list[str]:
    """Why Triton kernels cannot run ``problem`` (empty when they can)."""
    missing = triton_missing()
    reasons = [] if missing is None else [missing]
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


class Kernel:
    """One implementation of a kernel-level op: subclasses set ``op``, ``name``
    (``"<backend>:<what>"``) and the function that runs it, ``function`` or ``lazy``, and say
    what they cannot run (:meth:`not_supported_reasons`)."""

    op: ClassVar[str]
    name: ClassVar[str]
    backend: ClassVar[str]  # the part of ``name`` before the colon
    function: ClassVar[Callable[..., Any]]
    # or "<module>.<function>" of a module in the op folder that imports triton, imported
    # on first use (e.g. "triton.exact_attention")
    lazy: ClassVar[str | None] = None
    # op "plan": walks a plan's query and key rows in permuted order (BlockPlan.query_rows,
    # BlockPlan.key_rows)
    row_maps: ClassVar[bool] = False
    # takes a problem whose queries and keys are rows of its tensors (Problem.rows)
    reads_rows: ClassVar[bool] = False
    # takes grouped keys and values (Problem.kv_group), else given them expanded
    reads_groups: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls):
            cls.backend = cls.name.split(":", 1)[0]

    @classmethod
    def not_supported_reasons(cls, problem: Problem, **inputs: Any) -> list[str]:
        """Why this implementation cannot run ``problem`` with ``inputs`` (empty: it can)."""
        return []

    @classmethod
    def load(cls) -> Callable[..., Any]:
        """The function that runs it: ``(problem, *args, **inputs) -> result``."""
        if cls.lazy is None:
            return cls.function
        module, _, function = cls.lazy.rpartition(".")
        folder = cls.__module__.rpartition(".")[0]
        return getattr(importlib.import_module(f"{folder}.{module}"), function)


class TritonKernel(Kernel):
    """A Triton implementation: it needs triton, CUDA (or the interpreter), a float dtype and
    power-of-two head dims."""

    @classmethod
    def not_supported_reasons(cls, problem: Problem, **inputs: Any) -> list[str]:
        return triton_reasons(problem)


KERNELS: dict[str, list[type[Kernel]]] = {}


def add(kernel: type[Kernel]) -> type[Kernel]:
    """Register an implementation of ``kernel.op``, in preference order (see module doc)."""
    if kernel.backend not in PREFERENCE:
        raise ValueError(f"{kernel.name}: backend {kernel.backend!r} is not one of {PREFERENCE}")
    impls = KERNELS.setdefault(kernel.op, [])
    if kernel not in impls:
        impls.append(kernel)
        impls.sort(key=lambda impl: PREFERENCE.index(impl.backend))  # stable: folder order
    return kernel


def _by_backend(op: str, backend: str, problem: Problem | None = None, **inputs: Any):
    """The first implementation of ``backend`` with no reason against ``problem`` (the last
    of each backend, its reference, has none)."""
    impls = [impl for impl in KERNELS[op] if impl.backend == backend]
    if problem is None:
        return impls[0]
    return next(
        i for i in impls if i is impls[-1] or not i.not_supported_reasons(problem, **inputs)
    )


def choose(op: str, backend: str, problem: Problem, **inputs: Any) -> type[Kernel]:
    """The implementation of ``op`` that ``backend`` runs on ``problem`` (see module doc)."""
    if backend == "torch":
        return _by_backend(op, "torch", problem, **inputs)
    if backend in ("triton", "flex"):
        impls = [impl for impl in KERNELS[op] if impl.backend == backend]
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
        for impl in KERNELS[op]:
            if impl.backend != "torch" and not impl.not_supported_reasons(problem, **inputs):
                return impl
    return _by_backend(op, "torch", problem, **inputs)


def explain(op: str, backend: str, problem: Problem, **inputs: Any) -> list[str]:
    """Why ``backend`` runs what it runs: one line per implementation of ``op``, in
    preference order, naming the chosen one and the reasons against the others."""
    chosen = choose(op, backend, problem, **inputs)
    lines = []
    for impl in KERNELS[op]:
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
    """Run ``op`` on ``problem`` with the implementation ``backend`` chooses (given the
    problem gathered unless it reads row maps, ``Kernel.reads_rows``, and its keys and values
    expanded unless it reads them grouped, ``Kernel.reads_groups``)."""
    impl = choose(op, backend, problem, **inputs)
    return impl.load()(problem.for_reader(impl), *args, **inputs)


def describe(op: str, backend: str) -> str:
    """What ``backend`` runs for ``op`` on this machine, as ``attncompose show`` prints it
    (``auto``: Triton and FlexAttention where CUDA and a Triton the kernels support are
    present, else PyTorch). A backend with several implementations is named in preference
    order, ``a else b``: which one runs is chosen per call (e.g. the fused CPU kernels take
    CPU tensors only)."""
    if backend == "auto":
        cuda = torch.cuda.is_available() and triton_missing() is None
        names = [impl.name for impl in KERNELS[op] if (impl.backend != "torch") == cuda]
        return " else ".join(names)
    names = [impl.name for impl in KERNELS[op] if impl.backend == backend]
    return " else ".join(names) if names else describe(op, "auto")
