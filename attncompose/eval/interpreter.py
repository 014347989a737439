"""Watching one call run under ``TRITON_INTERPRET=1`` as a GPU would run it.

On a CPU the Triton kernels run in the interpreter, which itself calls aten ops: a
:class:`CallWatch` sees each aten op the call makes outside a Triton launch
(:meth:`CallWatch.op`) and each launch with its arguments (:meth:`CallWatch.launch`), never
the interpreter's own ops. :class:`LaunchCounter` counts with it what a GPU would launch
(``benchmarks/launch_count.py``, a test of the launch budget), :class:`DeviceWaits` what
would make the host wait for the device; the tests also check with it that a call reads
only memory a CUDA graph would own. Set
``TRITON_INTERPRET=1`` before triton is first imported.
"""

from __future__ import annotations

from typing import Any

import torch
import triton.runtime.interpreter as interpreter
from torch.utils._python_dispatch import TorchDispatchMode


class CallWatch(TorchDispatchMode):
    """A dispatch mode that also sees the interpreter's Triton launches (see the module doc);
    subclasses override :meth:`op` and :meth:`launch`."""

    def __init__(self) -> None:
        super().__init__()
        self._inside = 0  # > 0 while a launch runs: its tensor ops are the interpreter's

    def op(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """An aten op of the call (views and allocations included), after it ran."""

    def launch(self, kernel: Any, args: tuple, kwargs: dict) -> None:
        """A Triton launch of the call, before it runs (its tensors are its arguments;
        ``kernel``: the interpreter's executor, ``kernel.fn`` the kernel's Python function,
        ``kernel.constexprs`` the names of its constexpr parameters)."""

    def __enter__(self):
        grid = interpreter.GridExecutor
        self._call = call = grid.__call__

        def launch(executor, *args, **kwargs):
            self.launch(executor, args, kwargs)
            self._inside += 1
            try:
                return call(executor, *args, **kwargs)
            finally:
                self._inside -= 1

        grid.__call__ = launch
        return super().__enter__()

    def __exit__(self, *exc):
        interpreter.GridExecutor.__call__ = self._call
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._inside:
            self.op(func, args, kwargs or {}, out)
        return out


class LaunchCounter(CallWatch):
    """Counts what a call would launch on a GPU: each Triton launch (the interpreter's grid
    calls) and each aten op outside one that does work (views and plain allocations launch
    nothing). An estimate of what ``torch.profiler`` counts on CUDA, where a sort or a
    ``cat`` may launch more than one kernel."""

    ALLOCATIONS = ("aten.empty.memory_format", "aten.new_empty.default", "aten.empty_like.default")

    def __init__(self) -> None:
        super().__init__()
        self.aten = 0
        self.triton = 0

    @property
    def launches(self) -> int:
        return self.aten + self.triton

    def op(self, func, args, kwargs, out) -> None:
        if not func.is_view and str(func) not in self.ALLOCATIONS:
            self.aten += 1

    def launch(self, kernel, args, kwargs) -> None:
        self.triton += 1


class DeviceWaits(CallWatch):
    """Records the aten ops, outside Triton launches, that make the host wait for the device
    or that a CUDA graph cannot replay as a call: reading a value to the host (``item``,
    ``bool``, ``int``, ``nonzero``, ...), copying host data into a tensor (``torch.tensor``),
    and, with ``draws``, drawing from a generator (a replay would not redraw as a call
    re-seeds; an eager call draws without waiting)."""

    WAITS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "lift_fresh")

    def __init__(self, draws: bool = True) -> None:
        super().__init__()
        self.draws = draws
        self.seen: list[str] = []

    def op(self, func, args, kwargs, out) -> None:
        name = str(func)
        drawn = self.draws and ("generator" in name or kwargs.get("generator") is not None)
        tensors = [t for t in (*args, out) if isinstance(t, torch.Tensor) and t.dim()]
        crossing = len({t.device.type for t in tensors}) > 1  # between host and device (CUDA)
        if drawn or crossing or any(w in name for w in self.WAITS):
            self.seen.append(name)
