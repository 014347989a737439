"""The project's one timing helper: CUDA events/do_bench on GPU, warm-up + median on CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attncompose.runtime.naming import device_name


@dataclass(frozen=True)
class Timing:
    """Latency of a callable: median and all repeats, in milliseconds."""

    median_ms: float
    samples_ms: tuple[float, ...]

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)


def measure(
    fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 1, repeats: int = 5
) -> Timing:
    """Time ``fn()``: on CUDA with ``triton.testing.do_bench`` (CUDA events), on CPU with
    ``warmup`` untimed calls then the median of ``repeats`` wall-clock timings."""
    device = torch.device(device)
    if device.type == "cuda":
        return _measure_cuda(fn, warmup, repeats)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(samples), tuple(samples))


def measure_rounds(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    warmup: int = 1,
    repeats: int = 5,
) -> dict[str, Timing]:
    """Time several callables in interleaved rounds (each round calls every one once), so
    that slow drifts of a shared machine hit all of them alike; ``samples_ms[i]`` of each
    Timing comes from round i, so per-round ratios can be taken. CUDA: :func:`measure`."""
    if torch.device(device).type == "cuda":
        return {name: measure(fn, device, warmup, repeats) for name, fn in fns.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: Timing(statistics.median(s), tuple(s)) for name, s in samples.items()}


def median_ratio(num: Timing, den: Timing) -> float:
    """Median over rounds of num/den (timings from one :func:`measure_rounds` call)."""
    return statistics.median(a / b for a, b in zip(num.samples_ms, den.samples_ms, strict=True))


def _measure_cuda(fn: Callable[[], object], warmup: int, repeats: int) -> Timing:
    fn()  # compile and autotune first: do_bench sizes its loops on its first calls' time
    torch.cuda.synchronize()
    try:
        from triton.testing import do_bench

        samples = do_bench(fn, warmup=max(25, warmup), rep=max(100, repeats), return_mode="all")
        return Timing(statistics.median(samples), tuple(float(s) for s in samples))
    except ImportError:
        pass
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return Timing(statistics.median(samples), tuple(samples))


LAUNCH_EVENTS = (
    "cudaLaunchKernel",
    "cuLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",  # a CUDA graph replay: one launch
)
TOP_KERNELS = 8  # kernels a profile names, by device time


def profile_call(fn: Callable[[], object], device: torch.device | str) -> dict | None:
    """Where one ``fn()`` call spends the GPU (``torch.profiler``; None off CUDA):
    ``launches`` (CUDA runtime and driver launch calls, Triton's through the driver, a graph
    replay as one), ``gpu_ms`` (the device time of its kernels: against the call's wall
    time, how far it is bound by the host) and ``top_kernels`` ([name, ms, calls] of the
    kernels with the most device time)."""
    if torch.device(device).type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    found = {"launches": sum(e.count for e in events if e.key in LAUNCH_EVENTS)}
    try:  # the profiler's event fields vary across torch versions: a miss costs the breakdown
        found |= kernel_times(events, torch.autograd.DeviceType.CUDA, _device_us)
    except (AttributeError, TypeError) as err:
        found["profile_note"] = f"no kernel breakdown: {err}"
    return found


def kernel_times(events, device_type, self_us) -> dict:
    """``gpu_ms`` and ``top_kernels`` of :func:`profile_call` from averaged profiler events:
    those on ``device_type``, timed by ``self_us(event)`` (microseconds)."""
    kernels = sorted((e for e in events if e.device_type == device_type), key=self_us)[::-1]
    return {
        "gpu_ms": sum(self_us(e) for e in kernels) / 1e3,
        "top_kernels": [
            [e.key[:80], round(self_us(e) / 1e3, 4), e.count] for e in kernels[:TOP_KERNELS]
        ],
    }


def _device_us(event) -> float:
    """Self device time of a profiler event, microseconds (torch >= 2.4 names it so)."""
    return getattr(event, "self_device_time_total", None) or getattr(
        event, "self_cuda_time_total", 0
    )


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak GPU memory one ``fn()`` call allocates beyond what was held before (MiB). None off
    CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def run_info(device: torch.device | str | None = None) -> dict[str, str]:
    """Where a measurement was taken: device (``device``, by default CUDA where present),
    library versions, git commit, date (UTC), and how busy the machine was as it began
    (``load_1min``: the 1-minute load average, against ``cpus``; timings on a shared machine
    vary with it). The commit is the HEAD of the checkout holding
    this package, else ``$ATTNCOMPOSE_COMMIT`` (a copy of the tree without .git), else
    "unknown"."""
    import datetime
    import os
    import platform
    import subprocess
    from pathlib import Path

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("ATTNCOMPOSE_COMMIT", "unknown")
    return {
        "device": device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
        "cpus": str(os.cpu_count()),
        "load_1min": f"{os.getloadavg()[0]:.2f}",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(path, record: dict, device: torch.device | str | None = None) -> dict:
    """Write a benchmark's ``record`` to ``path`` as JSON, with where it ran (:func:`run_info`
    of ``device``) merged in; returns what was written."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = {**record, **run_info(device)}
    path.write_text(json.dumps(written, indent=2) + "\n")
    return written
