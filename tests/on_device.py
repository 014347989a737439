"""What kernel tests share: Triton kernels against their PyTorch references, interpreted on
CPU or compiled on a GPU.

Under ``TRITON_INTERPRET=1`` (the default, set by conftest.py) the kernels run in Triton's
CPU interpreter on CPU tensors; with ``TRITON_INTERPRET=0`` on a CUDA machine they compile
and every kernel test runs on CUDA tensors (``DEVICE``). Tests of Triton kernels are marked
``triton`` (``pytest -m triton tests`` runs them all) and skip where Triton cannot run.
Kernel modules import triton, so test files reach them through :func:`triton_module`.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton (any kernel module) imports

import importlib
from dataclasses import replace
from types import ModuleType

import pytest
import torch
from oracle import make_problem as cpu_problem

from attncompose.primitives.base import Partial
from attncompose.primitives.block.plan_flex import available as flex_available
from attncompose.primitives.lsh import Lsh
from attncompose.primitives.lsh.schema import LshStep

# compiled kernels on CUDA tensors when not interpreting, else the interpreter on CPU tensors
DEVICE = torch.device("cuda" if os.environ["TRITON_INTERPRET"] == "0" else "cpu")

# tests of the FlexAttention implementation skip on a torch without it (before 2.5)
needs_flex = pytest.mark.skipif(
    not flex_available(), reason="this torch has no torch.nn.attention.flex_attention (2.5+)"
)


def triton_unusable() -> str | None:
    """Why Triton kernels cannot run in this test session (None: they can)."""
    from attncompose.primitives.dispatch import triton_missing

    missing = triton_missing()
    if missing is not None:
        return missing
    import triton.runtime.interpreter

    if not torch.cuda.is_available() and not isinstance(
        triton.language.zeros, triton.runtime.interpreter.InterpretedFunction
    ):  # triton.language was imported (e.g. by transformers) before TRITON_INTERPRET=1
        return (
            "triton was imported before TRITON_INTERPRET=1: set it in conftest.py or the "
            "environment"
        )
    return None


def triton_module(name: str) -> ModuleType | None:
    """``attncompose.primitives.<name>`` (e.g. ``"exact.triton"``), or None where Triton
    cannot run (the tests that use it are marked ``triton`` and skipped there)."""
    if triton_unusable() is not None:
        return None
    return importlib.import_module(f"attncompose.primitives.{name}")


def make_problem(*args, **kwargs):
    """The oracle's problem on DEVICE."""
    p = cpu_problem(*args, **kwargs)
    return replace(p, q=p.q.to(DEVICE), k=p.k.to(DEVICE), v=p.v.to(DEVICE))


SHAPES = [(17, 17), (33, 33), (64, 64), (17, 64)]  # (Lq, Lk); Lq < Lk is decode
IDS = ["T17", "T33", "T64", "decode17x64"]


def assert_same(got: Partial, want: Partial, tol: float = 1e-5) -> None:
    assert not got.out.isnan().any() and not got.lse.isnan().any()
    assert torch.equal(got.lse.isinf(), want.lse.isinf())
    finite = want.lse.isfinite()
    assert torch.allclose(got.lse[finite], want.lse[finite].float(), atol=tol)
    assert torch.allclose(got.out, want.out.float(), atol=tol)


def nan_partial(problem) -> Partial:
    n, lq = problem.q.shape[:2]
    nan = lambda *shape: torch.full(shape, float("nan"), device=problem.q.device)
    return Partial(nan(n, lq, problem.v.shape[-1]), nan(n, lq))


def padded_views(problem):
    """The problem on strided views into NaN storage: reading out of range poisons results."""

    def pad(x):
        n, length, d = x.shape
        store = torch.full((n + 1, length + 3, 2 * d), float("nan"), dtype=x.dtype, device=x.device)
        store[1:, 1 : length + 1, :d] = x
        return store[1:, 1 : length + 1, :d]

    return replace(problem, q=pad(problem.q), k=pad(problem.k), v=pad(problem.v))


def lsh_coverage(problem, block):
    sel = Lsh(LshStep(op="lsh", num_projections=3, seed=1))(problem)
    return sel.bind(block)


def with_descriptor_loads(run, tuned, monkeypatch) -> tuple:
    """(``run()`` with ``ATTNCOMPOSE_TMA=on``, whether each kernel variant it launched read
    its rows through tensor descriptors): under the interpreter by the ``TMA`` constexpr of
    each launch, on a GPU by the configs ``tuned``, the kernel's autotuner, chose."""
    monkeypatch.setenv("ATTNCOMPOSE_TMA", "on")
    if os.environ["TRITON_INTERPRET"] == "1":
        from attncompose.eval.aot import LaunchRecorder

        with LaunchRecorder() as recorder:
            result = run()
        return result, [v["constexprs"].get("TMA") for v in recorder.variants]
    tuned.cache.clear()
    result = run()
    return result, [config.kwargs.get("TMA") for config in tuned.cache.values()]
