"""The timing helper: interleaved rounds and per-round ratios (no timing asserts)."""

from __future__ import annotations

import pytest

from attncompose.eval.timing import Timing, measure_rounds, median_ratio


def test_rounds_interleave_the_callables_and_keep_round_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timings = measure_rounds(fns, warmup=1, repeats=4)
    assert calls[:3] == ["a", "b", "c"]  # warm-up, then one call of each per round
    assert calls[3:] == ["a", "b", "c"] * 4
    assert all(len(t.samples_ms) == 4 for t in timings.values())


def test_median_ratio_pairs_samples_by_round():
    num = Timing(0.0, (2.0, 9.0, 4.0))
    den = Timing(0.0, (1.0, 3.0, 4.0))
    assert median_ratio(num, den) == pytest.approx(2.0)  # ratios 2, 3, 1
    with pytest.raises(ValueError):
        median_ratio(num, Timing(0.0, (1.0,)))


def test_kernel_times_name_the_costliest_kernels_of_a_profile():
    """profile_call's breakdown, on a CPU profile (the same event fields as CUDA's): the
    matmul dominates, times in ms, the total at least what the named ones took."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from attncompose.eval.timing import _device_us, kernel_times

    a = torch.randn(512, 512)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        a @ a
        a.add(1.0)
    self_us = lambda e: e.self_cpu_time_total  # the CPU's own field; _device_us on CUDA
    found = kernel_times(prof.key_averages(), torch.autograd.DeviceType.CPU, self_us)
    names = [name for name, _, _ in found["top_kernels"]]
    assert any("mm" in name for name in names[:2])
    assert found["gpu_ms"] >= sum(ms for _, ms, _ in found["top_kernels"]) * 0.99 > 0
    assert _device_us(prof.key_averages()[0]) == 0  # CPU events have no device time
