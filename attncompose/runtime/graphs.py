"""CUDA graphs for an attention module: one capture per (shapes, dtype, device, mode, scale),
replayed on later calls of the same key.

A recipe's call launches many small kernels (hashing, sorting, gathers, the attention
kernel, merges of the causal splitter); replaying a captured graph replaces their launch
and host overhead by one replay. Inputs are copied into the graph's static buffers and the
outputs cloned out, so a caller never sees a buffer the next replay overwrites. A key whose
capture fails (an operation that cannot be captured, e.g. a host synchronisation) runs
eagerly from then on, and says so once.

A replay reads and writes the memory the capture saw, so a graph owns everything it uses:
its own :class:`~attncompose.primitives.base.Workspace` (the module's, grown by another
shape, would free buffers the graph writes) and whatever the process caches handed out
during the capture (:func:`~attncompose.primitives.base.pinning`: a static plan or hash
directions a cache later drops must stay where the graph reads them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attncompose.primitives.base import Workspace, pinning

Run = Callable[[Tensor, Tensor, Tensor, Workspace | None], tuple[Tensor, Tensor]]
WARMUP = 2  # eager calls on a side stream before a capture (as torch.cuda.graphs advises)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, Tensor, Tensor]
    outputs: tuple[Tensor, Tensor]
    owned: tuple[Workspace, list[Any]]  # kept alive as long as the graph (module doc)


class GraphCache:
    """Captured graphs of one attention module, by call key."""

    def __init__(self, workspace: Workspace | None = None) -> None:
        self.graphs: dict[tuple, _Captured | None] = {}  # None: capture failed, run eagerly
        self.workspace = workspace  # the module's, for the calls that run eagerly

    def __call__(self, run: Run, key: tuple, q, k, v) -> tuple[Tensor, Tensor]:
        """``run(q, k, v, workspace)`` replayed from the graph of ``key`` (captured first)."""
        if key not in self.graphs:
            self.graphs[key] = self._capture(run, key, q, k, v)
        captured = self.graphs[key]
        if captured is None:
            return run(q, k, v, self.workspace)
        for static, x in zip(captured.inputs, (q, k, v), strict=True):
            static.copy_(x)
        captured.graph.replay()
        return tuple(t.clone() for t in captured.outputs)

    @staticmethod
    def _capture(run: Run, key, q, k, v) -> _Captured | None:
        inputs = tuple(x.clone() for x in (q, k, v))
        workspace = Workspace()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP):  # compiles, autotunes and fills caches outside
                    run(*inputs, workspace)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with pinning() as pins, torch.cuda.graph(graph):
                outputs = run(*inputs, workspace)
        except RuntimeError as err:
            torch.cuda.synchronize()
            warnings.warn(
                f"CUDA graph capture failed for {key}; this call shape runs eagerly "
                f"({str(err).strip().splitlines()[0]})",
                stacklevel=4,
            )
            return None
        return _Captured(graph, inputs, outputs, (workspace, pins))
