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
