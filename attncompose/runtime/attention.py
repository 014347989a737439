"""The SDPA-compatible attention module that ``compile`` returns."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attncompose.primitives.base import Problem, Workspace
from attncompose.runtime.checks import check_inputs, check_sdpa_options
from attncompose.runtime.compiler import Pipeline
from attncompose.runtime.graphs import GraphCache
from attncompose.spec.recipe import load_recipe


class Attention(nn.Module):
    """Approximate attention with the calling convention of ``scaled_dot_product_attention``.

    ``attn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
    enable_gqa=False, return_lse=False)``, SDPA's signature, with q [B, Hq, Lq, D],
    k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] (Hq a multiple of Hkv: grouped-query attention
    whatever ``enable_gqa`` says; causal masks are aligned bottom-right, so Lq < Lk is
    decoding). A ``scale`` of 0 or below runs with its sign folded into the queries (-q at
    scale s > 0 for -s, zero queries for 0): fused kernels that mask and take row maxima
    before they scale (PyTorch's CPU flash kernel) gave NaN rows for it. ``attn_mask`` must
    be None and ``dropout_p`` 0 (an approximation takes no arbitrary mask: the Hugging Face
    integration runs such calls exactly). Returns
    o [B, Hq, Lq, Dv] in q's dtype, and with ``return_lse`` also lse [B, Hq, Lq] (float32,
    natural log). Forward only: where gradients are wanted the output carries a backward
    that raises, rather than silently detaching the inputs. Computation runs in float32:
    inputs are cast, except where the Triton kernels run (``backend="triton"``, or ``"auto"``
    on CUDA), which read float16/bfloat16 as they are and accumulate in float32.
    ``fuse=False`` evaluates every step on its own instead of fusing step patterns
    (:mod:`attncompose.primitives.fusion`): same result, slower; for checking a fusion.
    ``reuse_buffers`` keeps the kernels' intermediate buffers (gathers, copies, masks) from
    call to call (a :class:`~attncompose.primitives.base.Workspace`): no fresh memory per
    call, at the price of holding it between calls; a module so configured must not be
    called from two threads at once. ``check_finite=False`` skips the NaN/Inf check of the
    inputs (a host synchronisation). ``cuda_graphs=True`` captures one CUDA graph per call
    shape on CUDA and replays it (:mod:`attncompose.runtime.graphs`; off by default until
    measured to win): for calls whose shapes repeat; a decode loop whose key length grows
    every step would capture at every step. ``release_memory()`` drops the buffers and
    graphs a module holds between calls.
    """

    def __init__(
        self,
        recipe,
        backend: str = "torch",
        check_finite: bool = True,
        fuse: bool = True,
        reuse_buffers: bool = True,
        cuda_graphs: bool = False,
    ):
        super().__init__()
        self.recipe = recipe
        self.pipeline = Pipeline(recipe, backend=backend, fuse=fuse)
        self.check_finite = check_finite
        self.workspace = Workspace() if reuse_buffers else None
        self.graphs = GraphCache(self.workspace) if cuda_graphs else None

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        *,
        scale: float | None = None,
        enable_gqa: bool = False,
        return_lse: bool = False,
    ):
        check_sdpa_options(attn_mask, dropout_p, scale)
        check_inputs(q, k, v, is_causal, self.check_finite)
        run = lambda q, k, v: self._run(q, k, v, is_causal, scale, self.workspace)
        if self.graphs is not None and q.device.type == "cuda":
            key = (q.shape, k.shape, v.shape, q.dtype, q.device, bool(is_causal), scale)
            graphed = lambda q, k, v, workspace: self._run(q, k, v, is_causal, scale, workspace)
            run = lambda q, k, v: self.graphs(graphed, key, q, k, v)
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            out, lse = _ForwardOnly.apply(lambda: run(q, k, v), q, k, v)
        else:
            out, lse = run(q, k, v)
        return (out, lse) if return_lse else out

    def _run(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        is_causal: bool,
        scale: float | None,
        workspace: Workspace | None,
    ):
        b, hq, lq, d = q.shape
        group = hq // k.shape[1]
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        if scale <= 0:  # the fused kernels mask (-inf) and take row maxima before scaling
            q, scale = (-q if scale < 0 else torch.zeros_like(q)), (-scale or 1.0)
        native = self.pipeline.backend == "triton" or (
            self.pipeline.backend in ("auto", "flex") and q.device.type == "cuda"
        )
        dtype = q.dtype if native else torch.float32
        # detached: the steps run forward only (FlexAttention refuses inputs that want grads)
        rows = lambda x: _rows(x.detach(), dtype, strided=native)
        problem = Problem(
            q=rows(q),
            k=rows(k),  # one row per key/value head: the steps read them grouped or expand
            v=rows(v),
            scale=scale,
            causal=bool(is_causal),
            heads=hq,
            kv_group=group,
            q_offset=k.shape[2] - lq,  # bottom-right: the last query sits at the last key
            workspace=workspace,
        )
        with torch.no_grad():
            result = self.pipeline(problem)
        return result.out.view(b, hq, lq, -1).to(q.dtype), result.lse.view(b, hq, lq)

    def release_memory(self) -> None:
        """Drop what the module holds between calls: its reused buffers (a workspace shared
        with other modules is emptied for all) and its captured CUDA graphs; later calls
        make them again."""
        if self.workspace is not None:
            self.workspace.clear()
        if self.graphs is not None:
            self.graphs.graphs.clear()

    def extra_repr(self) -> str:
        return f"recipe={self.recipe.name!r}, backend={self.pipeline.backend!r}"


class _ForwardOnly(torch.autograd.Function):
    """Links the output to q, k, v so that a backward pass fails with a clear message."""

    @staticmethod
    def forward(ctx, run, q, k, v):
        out, lse = run()
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        raise RuntimeError(
            "attncompose attention has no backward pass (it is for inference): run the model "
            "under torch.no_grad() or torch.inference_mode(), or use exact SDPA for training"
        )


def _rows(x: Tensor, dtype: torch.dtype, strided: bool) -> Tensor:
    """[B, H, L, D] -> [B*H, L, D] of ``dtype``, contiguous; with ``strided`` (the Triton
    and FlexAttention kernels read rows at any stride) a view where the layout allows one
    (e.g. one batch element of Hugging Face's [B, L, H, D] transposed: no copy of q, k, v
    per call). The torch path copies: its chunked plans would copy strided rows anyway."""
    rows = x.reshape(-1, x.shape[2], x.shape[3]).to(dtype)
    return rows if strided and rows.stride(-1) == 1 else rows.contiguous()


def compile(
    recipe,
    backend: str = "auto",
    check_finite: bool = True,
    fuse: bool = True,
    reuse_buffers: bool = True,
    cuda_graphs: bool = False,
) -> Attention:
    """Compile a recipe (name, path, mapping or Recipe) into an :class:`Attention` module
    (the options: see :class:`Attention`)."""
    return Attention(
        load_recipe(recipe),
        backend=backend,
        check_finite=check_finite,
        fuse=fuse,
        reuse_buffers=reuse_buffers,
        cuda_graphs=cuda_graphs,
    )
