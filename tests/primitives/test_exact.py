"""``exact``: the Triton flash kernel against the reference, its launch helpers, and
the one-step recipe against exact attention."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from contract import ReducesToExact, watch_expansions
from on_device import (
    DEVICE,
    IDS,
    SHAPES,
    assert_same,
    nan_partial,
    padded_views,
    triton_module,
    with_descriptor_loads,
)
from on_device import make_problem as device_problem
from oracle import make_problem as cpu_problem
from oracle import masked_attention

import attncompose as ac
from attncompose.primitives import dispatch
from attncompose.primitives.exact import fast as exact_fast
from attncompose.primitives.exact import kernels as exact_kernels
from attncompose.primitives.exact import naive as exact_naive
from attncompose.primitives.exact.kernels import SdpaCuda, SdpaWithLse

exact_triton = triton_module("exact.triton")  # None where Triton cannot run


class TestExactRecipe(ReducesToExact):
    steps = {"out": {"op": "exact"}}


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("lq", "lk"), SHAPES, ids=IDS)
def test_exact_matches_reference(lq, lk, causal):
    problem = device_problem(2, lq, lk, 16, causal=causal)
    assert_same(exact_triton.exact_attention(problem), exact_naive.exact_attention(problem))


@pytest.mark.triton
@pytest.mark.parametrize("delta", [-20, 5, 40], ids=["rows-see-nothing", "shifted", "all"])
def test_exact_arbitrary_offsets(delta):
    problem = replace(device_problem(2, 33, 17, 16, causal=True), q_offset=delta)
    assert_same(exact_triton.exact_attention(problem), exact_naive.exact_attention(problem))


@pytest.mark.triton
@pytest.mark.parametrize(
    ("lq", "lk", "delta"), [(150, 150, 0), (150, 200, 50), (90, 200, -30), (200, 130, 7)]
)
def test_exact_key_blocks_every_query_sees_run_unmasked(lq, lk, delta):
    """Several query and key blocks, causal at offsets: the blocks of keys every query of a
    block sees run without a mask, the diagonal and the last partial block with it."""
    problem = replace(device_problem(2, lq, lk, 16, causal=True, seed=lq), q_offset=delta)
    assert_same(exact_triton.exact_attention(problem), exact_naive.exact_attention(problem))
    plain = replace(problem, causal=False)
    assert_same(exact_triton.exact_attention(plain), exact_naive.exact_attention(plain))


def _within_leaves(problem, leaf):
    """Bool [N, L, L]: the pairs of the same leaf of ``leaf`` rows (causally visible)."""
    i = torch.arange(problem.lq, device=problem.q.device)
    mask = (i[:, None] // leaf == i[None, :] // leaf) & problem.visible(i[:, None], i[None, :])
    return mask.expand(problem.q.shape[0], -1, -1)


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("leaf", [16, 32, 24, 8], ids=["16", "32", "24-straddled", "8-many"])
def test_exact_leaves_attend_within_their_own(leaf, causal, monkeypatch):
    """The causal splitter's diagonal leaves in one call: each query over the keys of its own
    leaf only, equal to dense attention under a block-diagonal mask. Read where they lie:
    on NaN-padded strided views (nothing past the storage's rows leaks), through tensor
    descriptors too, at an offset; leaves of 24 rows, which tiles of 16 or 32 queries
    straddle, and of 8 (several in a tile), masked per query."""
    problem = replace(device_problem(2, 96, 96, 16, causal=causal, seed=leaf), q_offset=7)
    problem = replace(problem, k_offset=7)
    want = masked_attention(problem, _within_leaves(problem, leaf))
    assert_same(exact_naive.exact_attention(problem, leaf=leaf), want)
    views = padded_views(problem)
    assert_same(exact_triton.exact_attention(views, leaf=leaf), want)
    got, used = with_descriptor_loads(
        lambda: exact_triton.exact_attention(views, leaf=leaf), exact_triton._exact_tuned,
        monkeypatch,
    )  # fmt: skip
    assert_same(got, want)
    assert used and all(used), used


@pytest.mark.triton
@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's launches are inspected")
def test_exact_kernel_masks_leaves_only_where_the_queries_span_several():
    """The per-query leaf mask is compiled into calls over several leaves only: a plain call
    and a call of one leaf run the kernel variant without it (its registers, see
    benchmarks/results/compile_gpu.json)."""
    from attncompose.eval.interpreter import CallWatch

    class Leaves(CallWatch):
        def __init__(self):
            super().__init__()
            self.seen = []

        def launch(self, kernel, args, kwargs):
            self.seen.append(kwargs["LEAVES"])

    problem = device_problem(1, 64, 64, 16, causal=True)
    watch = Leaves()
    with watch:
        for leaf in (None, 64, 32, 16):
            exact_triton.exact_attention(problem, leaf=leaf)
    assert watch.seen == [False, False, True, True]


@pytest.mark.parametrize(
    ("lq", "lk", "causal", "calls"),
    [(1, 300, True, 1), (1, 300, False, 1), (7, 300, True, 2), (300, 300, True, 1)],
    ids=["decode", "one-query-noncausal", "decode7", "square"],
)  # fmt: skip
def test_fused_exact_calls_the_kernel_once_where_every_query_sees_every_key(
    lq, lk, causal, calls, monkeypatch
):
    """A decode step's one query sees every key: one non-causal fused call (before, a
    visible prefix and a one-key causal square, merged). Several queries after their keys
    still split in two; the result is the dense oracle's either way."""
    seen = []
    fused = exact_fast._fused
    monkeypatch.setattr(
        exact_fast, "_fused", lambda problem, causal: seen.append(causal) or fused(problem, causal)
    )
    problem = cpu_problem(3, lq, lk, 16, causal=causal, seed=lq)
    got = exact_fast.fused_exact_attention(problem)
    assert len(seen) == calls
    want = exact_naive.exact_attention(problem)
    assert torch.allclose(got.out, want.out, atol=1e-5)
    assert torch.allclose(got.lse, want.lse, atol=1e-5)


@pytest.mark.parametrize(
    ("hkv", "lq", "causal", "queries"),
    [
        (4, 1, True, [(4, 1, 3)]),
        (4, 5, False, [(4, 1, 15)]),
        (4, 5, True, [(4, 1, 15), (4, 3, 5)]),
        (1, 1, True, [(1, 3, 1)]),
    ],
    ids=["decode", "noncausal", "causal", "one-kv-row"],
)  # fmt: skip
def test_a_groups_heads_stack_as_rows_where_no_causal_mask_tells_them_apart(
    make_qkv, reference, hkv, lq, causal, queries, monkeypatch
):
    """A decode step, a non-causal call or the keys every query of a causal call sees: the
    query heads of a group are the rows of one head of the fused CPU kernel ([B*Hkv, 1,
    G*Lq] queries), so the keys are read once per key/value head (as heads against a
    broadcast key row, PyTorch's kernel read them once per query head: 1.6x the time of a
    decode step at 16k-32k keys). The causal square after them keeps them as heads ([B*Hkv,
    G, Lq]: its mask is per row), and so does a call that stacked would leave a thread idle
    (one key/value row on 2 threads). Results to float rounding of the dense oracle's."""
    calls = []
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def watch(q, k, *args, **kwargs):
        calls.append((tuple(q.shape[:3]), k.shape[1]))
        return op(q, k, *args, **kwargs)

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", watch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # as on CI, whatever runs this
    q, k, v = make_qkv(b=1, hq=3 * hkv, hkv=hkv, lq=lq, lk=40, d=16)
    out = ac.compile("exact", backend="torch")(q, k, v, is_causal=causal)
    assert calls == [(shape, shape[1]) for shape in queries]  # keys: a head per query head
    assert ac.relative_error(out, reference(q, k, v, is_causal=causal)[0]) < 1e-6


def test_exact_leaves_need_a_square_of_whole_leaves():
    square = cpu_problem(1, 64, 64, 16, causal=True)
    for problem, leaf in (
        (cpu_problem(1, 32, 64, 16, causal=True), 16),  # not square
        (square, 24),  # 64 rows are no whole number of leaves of 24
        (replace(square, q_offset=3), 16),  # the queries after the keys
    ):
        with pytest.raises(ValueError, match=r"leaves of \d+ rows need a square problem"):
            exact_naive.exact_attention(problem, leaf=leaf)


@pytest.mark.triton
def test_exact_nan_poisoned_buffers_and_inputs_equal_clean_run():
    problem = device_problem(2, 33, 33, 16, causal=True)
    clean = exact_triton.exact_attention(problem)
    poisoned = exact_triton.exact_attention(padded_views(problem), out=nan_partial(problem))
    assert torch.equal(poisoned.out, clean.out) and torch.equal(poisoned.lse, clean.lse)


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_exact_fp16_within_twice_torch_fp16_error(causal):
    problem = device_problem(2, 64, 64, 16, causal=causal)
    truth = exact_naive.exact_attention(problem).out
    half = replace(problem, q=problem.q.half(), k=problem.k.half(), v=problem.v.half())
    torch_err = (exact_naive.exact_attention(half).out.float() - truth).abs().max()
    kernel_err = (exact_triton.exact_attention(half).out - truth).abs().max()
    assert kernel_err <= 2 * torch_err + 1e-5


def test_fused_cuda_kernels_say_what_they_decline():
    """PyTorch's fused CUDA kernels take half-precision problems on CUDA only, and leaves
    only where stacking them is a view: leaves of strided rows go to the Triton kernel (it
    reads them where they lie), CPU tensors to the torch path."""
    problem = cpu_problem(2, 64, 64, 16, causal=True)
    reasons = SdpaCuda.not_supported_reasons(problem, leaf=16)
    assert "device cpu is not CUDA" in reasons
    assert "dtype torch.float32 is not float16/bfloat16" in reasons
    shifted = "causal, not bottom-right aligned (its causal part would be a rectangle)"
    assert shifted not in reasons  # squares and bottom-right aligned rectangles are taken
    assert shifted not in SdpaCuda.not_supported_reasons(cpu_problem(2, 30, 90, 16, causal=True))
    assert shifted in SdpaCuda.not_supported_reasons(replace(problem, q_offset=5))
    strided = "leaves of strided rows (the Triton kernel reads them where they lie)"
    assert strided not in reasons
    assert strided in SdpaCuda.not_supported_reasons(padded_views(problem), leaf=16)
    assert strided not in SdpaCuda.not_supported_reasons(padded_views(problem))
    assert dispatch.choose("exact", "auto", problem) is SdpaWithLse
    assert dispatch.explain("exact", "auto", problem)[0].startswith(
        "sdpa:cudnn-else-flash: device cpu is not CUDA"
    )
    if exact_triton is not None:  # Triton runs here
        triton_only = dispatch.choose("exact", "triton", replace(problem, q=problem.q.half()))
        assert triton_only.backend == "triton"  # an explicit backend is never overridden


def _fake_fused_cuda_ops(monkeypatch, kernel):
    """cuDNN's and flash's ATen ops faked by exact math in the shapes they return (lse
    [B, H, Lq, 1] and [B, H, Lq]), the CUDA path taking ``kernel``: its glue runs on CPU."""

    def attention(q, k, v, causal, scale):
        s = q.float() @ k.float().transpose(-1, -2) * scale  # [1, N, Lq, Lk]
        if causal:  # top-left, as PyTorch's fused kernels align it
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return (s.softmax(-1) @ v.float()).to(q.dtype), s.logsumexp(-1)

    def cudnn(q, k, v, bias, with_lse, dropout, causal, debug, scale):
        assert bias is None and with_lse and dropout == 0 and not debug
        out, lse = attention(q, k, v, causal, scale)
        return out, lse[..., None], None, None, q.shape[2], k.shape[2], None, None, None

    def flash(q, k, v, dropout, causal, debug, scale):
        assert dropout == 0 and not debug
        out, lse = attention(q, k, v, causal, scale)
        return out, lse, None, None, q.shape[2], k.shape[2], None, None, None

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", cudnn)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention", flash)
    monkeypatch.setattr(exact_fast, "_cuda_kernel", lambda *tensors: kernel)
    monkeypatch.setattr(exact_fast, "_fused", exact_fast._fused_cuda)


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize(
    ("lq", "lk", "causal", "leaf"),
    [(64, 64, True, None), (30, 90, True, None), (40, 70, False, None), (1, 33, True, None),
     (64, 64, True, 16)],
    ids=["square", "queries-after-keys", "rectangle", "decode", "leaves"],
)  # fmt: skip
def test_fused_cuda_path_splits_offsets_and_reads_each_kernels_lse(
    lq, lk, causal, leaf, kernel, monkeypatch
):
    """The CUDA path's glue, checked where no GPU is: a causal problem whose queries sit
    after its keys split into a visible prefix and a top-left causal rest, merged by lse;
    leaves stacked as rows; each kernel's lse layout read as [N, Lq]. The kernels' own
    numbers are checked on CUDA (test_fused_cuda_exact_within_twice_torch_half_error)."""
    _fake_fused_cuda_ops(monkeypatch, kernel)
    problem = _half(cpu_problem(3, lq, lk, 16, causal=causal, seed=lq), torch.bfloat16)
    got = exact_fast.fused_exact_attention(problem, leaf=leaf)
    want = exact_naive.exact_attention(problem, leaf=leaf)
    assert got.out.shape == want.out.shape and got.lse.shape == want.lse.shape
    assert ac.relative_error(got.out.float(), want.out) < 1e-2  # bf16 rounding of out
    assert torch.allclose(got.lse, want.lse, atol=1e-5)


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize(
    ("lq", "lk", "causal", "calls"),
    [(1, 33, True, [(2, 3)]), (40, 70, False, [(2, 120)]), (30, 90, True, [(2, 90), (6, 30)]),
     (64, 64, True, [(6, 64)])],
    ids=["decode", "rectangle", "queries-after-keys", "square"],
)  # fmt: skip
def test_fused_cuda_path_stacks_grouped_heads_where_no_causal_mask_applies(
    lq, lk, causal, calls, kernel, monkeypatch
):
    """Grouped keys on the CUDA path: a non-causal call (a decode step, a visible prefix)
    takes a group's 3 query heads as the rows of its key row, with no copy of the keys per
    query head (before: every call copied them, the keys of a decode step 3 times); a
    causal square still gets them expanded. ``calls``: (heads, query rows) of each kernel
    call. Results as the keys repeated per head."""
    _fake_fused_cuda_ops(monkeypatch, kernel)
    expanded = watch_expansions(monkeypatch)
    shapes = []
    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    watch = lambda run: lambda q, *a, **kw: shapes.append(tuple(q.shape[1:3])) or run(q, *a, **kw)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", watch(cudnn))
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention", watch(flash))
    flat = _half(cpu_problem(6, lq, lk, 16, causal=causal, seed=lq), torch.bfloat16)
    problem = replace(flat, k=flat.k[::3].clone(), v=flat.v[::3].clone(), kv_group=3)
    got = SdpaCuda.load()(problem.for_reader(SdpaCuda))  # as dispatch.call hands it over
    assert shapes == calls
    assert len(expanded) == sum(heads == 6 for heads, _ in calls)  # causal squares only
    want = exact_naive.exact_attention(problem.expanded())
    assert ac.relative_error(got.out.float(), want.out) < 1e-2  # bf16 rounding of out
    assert torch.allclose(got.lse, want.lse, atol=1e-5)


def _assert_within_twice(got, baseline, truth):
    """out and lse of ``got`` at most twice as far from ``truth`` (fp32) as ``baseline``
    (PyTorch's computation in the same half precision) is."""
    assert got.out.shape == truth.out.shape and got.lse.shape == truth.lse.shape
    for field in ("out", "lse"):
        err = lambda x, f=field: (getattr(x, f).float() - getattr(truth, f)).abs().max()
        assert err(got) <= 2 * err(baseline) + 1e-4, field


def _half(problem, dtype):
    return replace(problem, q=problem.q.to(dtype), k=problem.k.to(dtype), v=problem.v.to(dtype))


@pytest.mark.triton
@pytest.mark.skipif(DEVICE.type != "cuda", reason="PyTorch's fused CUDA kernels need CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    ("lq", "lk", "causal", "d"),
    [(256, 256, True, 64), (100, 300, True, 128), (200, 130, False, 64), (1, 257, True, 128)],
    ids=["square", "queries-after-keys", "rectangle", "decode"],
)
def test_fused_cuda_exact_within_twice_torch_half_error(lq, lk, causal, d, dtype):
    """On CUDA, exact attention of a whole half-precision problem runs in PyTorch's fused
    kernels (cuDNN, else FlashAttention-2): out and lse (natural log, as the merges expect)
    at most twice as far from the fp32 truth as PyTorch's own half-precision computation,
    on contiguous rows and on strided views."""
    problem = device_problem(2, lq, lk, d, causal=causal, seed=lq)
    truth = exact_naive.exact_attention(problem)
    half = _half(problem, dtype)
    assert dispatch.choose("exact", "auto", half) is SdpaCuda
    baseline = exact_naive.exact_attention(half)
    for inputs in (half, padded_views(half)):
        got = dispatch.call("exact", "auto", inputs)
        _assert_within_twice(got, baseline, truth)


@pytest.mark.triton
@pytest.mark.skipif(DEVICE.type != "cuda", reason="PyTorch's fused CUDA kernels need CUDA")
@pytest.mark.parametrize(
    ("lq", "lk", "causal"),
    [(1, 257, True), (100, 300, True), (200, 130, False)],
    ids=["decode", "queries-after-keys", "rectangle"],
)  # fmt: skip
def test_fused_cuda_grouped_heads_within_twice_torch_half_error(lq, lk, causal):
    """Grouped keys on CUDA (3 query heads a key/value head): the non-causal calls take a
    group's heads as the rows of its key row, the causal square gets the keys expanded;
    out and lse at most twice as far from the fp32 truth as PyTorch's own bf16 computation."""
    flat = device_problem(6, lq, lk, 128, causal=causal, seed=lq)
    problem = replace(flat, k=flat.k[::3].contiguous(), v=flat.v[::3].contiguous(), kv_group=3)
    truth = exact_naive.exact_attention(problem.expanded())
    half = _half(problem, torch.bfloat16)
    assert dispatch.choose("exact", "auto", half) is SdpaCuda
    baseline = exact_naive.exact_attention(half.expanded())
    _assert_within_twice(dispatch.call("exact", "auto", half), baseline, truth)


@pytest.mark.triton
@pytest.mark.skipif(DEVICE.type != "cuda", reason="PyTorch's fused CUDA kernels need CUDA")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_fused_cuda_leaves_within_twice_torch_half_error(causal):
    """The causal splitter's diagonal leaves on CUDA: stacked as rows (a view) into
    PyTorch's fused kernels; on strided rows, the Triton kernel in place. Either way each
    query attends within its own leaf, as near the fp32 truth as PyTorch's bf16."""
    problem = replace(device_problem(2, 256, 256, 64, causal=causal, seed=5), q_offset=3)
    problem = replace(problem, k_offset=3)
    truth = masked_attention(problem, _within_leaves(problem, 64))
    half = _half(problem, torch.bfloat16)
    baseline = exact_naive.exact_attention(half, leaf=64)
    for inputs, runs in ((half, SdpaCuda), (padded_views(half), exact_kernels.TritonFlash)):
        assert dispatch.choose("exact", "auto", inputs, leaf=64) is runs
        got = dispatch.call("exact", "auto", inputs, leaf=64)
        _assert_within_twice(got, baseline, truth)


@pytest.mark.triton
def test_autotune_prunes_tile_sizes_to_the_buckets():
    configs = exact_triton._exact_tuned.configs
    kept = exact_triton.prune_configs(configs, {"ROWS_B": 16, "KEYS_B": 64})
    assert kept and all(c.kwargs["BQ"] <= 16 and c.kwargs["BK"] <= 64 for c in kept)
    assert len(kept) < len(configs)
    everything = {"ROWS_B": 1 << 17, "KEYS_B": 1 << 17}
    assert len(exact_triton.prune_configs(configs, everything)) == len(configs)
    assert exact_triton.bucket(1) == 16 and exact_triton.bucket(4097) == 8192


@pytest.mark.triton
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_descriptor_loads_equal_pointer_loads(causal, monkeypatch):
    """Rows read through tensor descriptors (TMA bulk copies on Hopper; ATTNCOMPOSE_TMA=on
    makes the interpreter run them too) give what pointer loads give, on NaN-padded views at
    odd lengths (zeros past each end, never the storage's NaN): bit for bit under the
    interpreter (same tiles), the reference's result on a GPU."""
    problem = padded_views(device_problem(2, 33, 45, 16, causal=causal))
    pointers = exact_triton.exact_attention(problem)
    run = lambda: exact_triton.exact_attention(problem)
    got, used = with_descriptor_loads(run, exact_triton._exact_tuned, monkeypatch)
    assert used and all(used), used
    assert_same(got, exact_naive.exact_attention(problem))
    if dispatch.interpreting():
        assert torch.equal(got.out, pointers.out) and torch.equal(got.lse, pointers.lse)


@pytest.mark.triton
def test_descriptors_only_where_tma_can_read_the_rows(monkeypatch):
    """TMA reads rows that are contiguous, start and stride on 16 bytes and span 16+ bytes;
    anything else, a GPU without TMA or ``ATTNCOMPOSE_TMA=off`` reads through pointers; an
    unknown setting is an error that names it."""
    t = exact_triton
    x = torch.randn(2, 34, 16)
    flat = torch.randn(2 * 33 * 16 + 1)
    monkeypatch.delenv("ATTNCOMPOSE_TMA", raising=False)
    monkeypatch.setattr(dispatch, "interpreting", lambda: True)
    assert t.descriptors(x, x[:, 1:]) == t.EITHER  # a view one row (64 bytes) in
    unfit = {
        "starts off 16 bytes": flat[1:].view(2, 33, 16),
        "strided columns": torch.randn(2, 33, 32)[..., ::2],
        "rows 68 bytes apart": torch.randn(2, 33, 17)[..., :16],
        "rows of 8 bytes": torch.randn(2, 33, 2),
    }
    for why, y in unfit.items():
        assert t.descriptors(x, y) == t.NO_TMA, why
    monkeypatch.setenv("ATTNCOMPOSE_TMA", "on")
    assert t.descriptors(x) == t.TMA_ONLY
    monkeypatch.setenv("ATTNCOMPOSE_TMA", "off")
    assert t.descriptors(x) == t.NO_TMA
    monkeypatch.setenv("ATTNCOMPOSE_TMA", "yes")
    with pytest.raises(ValueError, match=r"ATTNCOMPOSE_TMA='yes'.*auto, on, off"):
        t.descriptors(x)
    monkeypatch.setenv("ATTNCOMPOSE_TMA", "on")
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    assert t.descriptors(x) == t.NO_TMA  # CPU tensors, compiled: no TMA


@pytest.mark.triton
def test_autotuner_times_descriptor_loads_where_allowed():
    """Hopper-sized tiles come twice (pointer and descriptor loads); ``TMA_OK`` decides which
    the autotuner may time, and the tile pruning still holds."""
    t = exact_triton
    configs = t._exact_tuned.configs
    tma = [c for c in configs if c.kwargs["TMA"]]
    twins = {(c.kwargs["BQ"], c.kwargs["BK"], c.num_warps, c.num_stages) for c in tma}
    assert twins == {c for c in t.ATTENTION_CONFIGS if t.tma_tiles(c[0], c[1], c[3])}
    prune = t._exact_tuned.early_config_prune
    big = {"ROWS_B": 1 << 17, "KEYS_B": 1 << 17}
    assert prune(configs, {**big, "TMA_OK": t.EITHER}) == configs
    assert prune(configs, {**big, "TMA_OK": t.TMA_ONLY}) == tma
    assert not any(c.kwargs["TMA"] for c in prune(configs, {**big, "TMA_OK": t.NO_TMA}))
    small = prune(configs, {"ROWS_B": 16, "KEYS_B": 16, "TMA_OK": t.TMA_ONLY})
    assert small and all(not c.kwargs["TMA"] and c.kwargs["BQ"] == 16 for c in small)


@pytest.mark.triton
def test_fp32_dots_follow_torchs_tf32_setting():
    """float32 inputs: full-precision dots unless PyTorch allows TF32 matmuls (Triton's own
    default would be TF32, ~1e-3 relative error, on every GPU run)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert exact_triton.dot_precision(torch.float32) == "ieee"
        assert exact_triton.dot_precision(torch.bfloat16) == "ieee"
        matmul.allow_tf32 = True
        assert exact_triton.dot_precision(torch.float32) == "tf32"
        assert exact_triton.dot_precision(torch.float16) == "ieee"
    finally:
        matmul.allow_tf32 = before
