"""``window`` (and ``sink``, the other band of key positions): the tile kernels on their
tiles and band forms, key ranges read as views, and a recipe whose knobs make it exact."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from contract import ReducesToExact, assert_partial_equal
from on_device import (
    assert_same,
    lsh_coverage,
    triton_module,
)
from on_device import make_problem as device_problem
from oracle import dense_mask, make_problem, masked_attention

from attncompose.primitives.block import naive as block_naive
from attncompose.primitives.sink import SinkCoverage
from attncompose.primitives.window import WindowCoverage

block_triton = triton_module("block.triton")  # None where Triton cannot run


class TestWindowThenSampleEverything(ReducesToExact):
    steps = {
        "sinks": {"op": "sink", "count": 3},
        "local": {"op": "window", "width": 7},
        "near": {"op": "block", "select": ["sinks", "local"], "block_size": 16},
        "rest": {"op": "uniform_sample", "exclude": ["near"], "sample_size": 4096},
        "out": {"op": "merge", "inputs": ["near", "rest"]},
    }


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("lq", "lk"), [(63, 63), (10, 300), (1, 129)])
@pytest.mark.parametrize("width", [0, 1, 5, 40])
def test_window_and_sink_kernels_match_dense_mask(block_attention, causal, lq, lk, width):
    from attncompose.primitives.sink import Sink
    from attncompose.primitives.sink.schema import SinkStep
    from attncompose.primitives.window import Window
    from attncompose.primitives.window.schema import WindowStep

    p = make_problem(2, lq, lk, causal=causal)
    win = Window(WindowStep(width=width))(p).bind(16)
    sink = Sink(SinkStep(count=3))(p).bind(16)
    assert_partial_equal(
        block_attention(p, win.tiles(p), own=win, exclude=(sink,)),
        masked_attention(p, dense_mask(p, win, exclude=(sink,))),
    )
    assert_partial_equal(
        block_attention(p, sink.tiles(p), own=sink, exclude=(win,)),
        masked_attention(p, dense_mask(p, sink, exclude=(win,))),
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("lq", "lk"), [(200, 200), (207, 207), (100, 230)])
def test_key_ranges_read_as_views_equal_gathers(block_attention, causal, lq, lk, monkeypatch):
    """Window and sink tiles are key ranges: in-bounds chunks read K/V through overlapping
    views (edge tiles, with keys outside [0, Lk), are gathered); same result as gathering
    every chunk, and as the dense specification."""
    from attncompose.primitives.block import naive
    from attncompose.primitives.sink import SinkCoverage
    from attncompose.primitives.window import WindowCoverage

    monkeypatch.setattr(naive, "SCORE_BUDGET", 2 * 16 * 40 * 3)  # three tiles a chunk
    views = []
    key_ranges = naive.key_ranges
    monkeypatch.setattr(naive, "key_ranges", lambda *a: views.append(a) or key_ranges(*a))
    p = make_problem(2, lq, lk, causal=causal, seed=3)
    win, sink = WindowCoverage(25).bind(16), SinkCoverage(4).bind(16)
    for own, exclude in ((win, (sink,)), (sink, (win,))):
        tiles = own.tiles(p)
        got = block_attention(p, tiles, own=own, exclude=exclude)
        gathered = block_attention(p, replace(tiles, k_start=None), own=own, exclude=exclude)
        assert torch.allclose(got.out, gathered.out, atol=1e-6)
        assert torch.equal(got.lse.isinf(), gathered.lse.isinf())
        assert_partial_equal(got, masked_attention(p, dense_mask(p, own, exclude=exclude)))
    assert views  # some chunks were read as views


@pytest.mark.triton
@pytest.mark.parametrize(("lq", "lk"), [(33, 33), (17, 64)], ids=["T33", "decode17x64"])
def test_window_and_sink_band_forms_match_reference(lq, lk):
    problem = replace(device_problem(2, lq, lk, 16, causal=True), k_offset=3)
    window, sink = WindowCoverage(5).bind(16), SinkCoverage(6).bind(16)
    tiles = lsh_coverage(problem, 16).tiles(problem)
    for own, exclude in ((window, (sink,)), (sink, (window,)), (None, (window, sink))):
        assert_same(
            block_triton.block_attention(problem, tiles, own=own, exclude=exclude),
            block_naive.block_attention(problem, tiles, own=own, exclude=exclude),
        )
