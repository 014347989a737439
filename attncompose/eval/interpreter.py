"""Watching one call run under ``TRITON_INTERPRET=1`` as a GPU would run it.

On a CPU the Triton kernels run in the interpreter, which itself calls aten ops: a
:class:`CallWatch` sees each aten op the call makes outside a Triton launch
(:meth:`CallWatch.op`) and each launch with its arguments (:meth:`CallWatch.launch`), never
the interpreter's own ops. ``benchmarks/launch_count.py`` counts with it what a GPU would
launch; the tests check with it that a call never waits for the device and reads only memory
a CUDA graph would own. Set ``TRITON_INTERPRET=1`` before triton is first imported.
"""

from __future__ import annotations

from typing import Any

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

    def launch(self, args: tuple, kwargs: dict) -> None:
        """A Triton launch of the call, before it runs (its tensors are its arguments)."""

    def __enter__(self):
        grid = interpreter.GridExecutor
        self._call = call = grid.__call__

        def launch(executor, *args, **kwargs):
            self.launch(args, kwargs)
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
