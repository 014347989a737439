"""``sink``: recipes whose sinks (and other parts switched off) make them exact."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from contract import ReducesToExact
from oracle import make_problem

from attncompose.primitives.base import Tiles, UnionCoverage
from attncompose.primitives.block import without_keys
from attncompose.primitives.sink import SinkCoverage
from attncompose.primitives.window import WindowCoverage


class TestSinksCoverEverything(ReducesToExact):
    steps = {
        "sinks": {"op": "sink", "count": 4096},
        "local": {"op": "window", "width": 8},
        "out": {"op": "block", "select": ["sinks", "local"], "block_size": 16},
    }


class TestZeroSwitchesPartsOff(ReducesToExact):
    steps = {
        "sinks": {"op": "sink", "count": 0},
        "local": {"op": "window", "width": 0},
        "heavy": {"op": "topk", "block_size": 8, "k": 0},
        "near": {"op": "block", "select": ["sinks", "local", "heavy"], "block_size": 16},
        "rest": {"op": "uniform_sample", "exclude": ["near"], "sample_size": 4096},
        "out": {"op": "merge", "inputs": ["near", "rest"]},
    }


@pytest.mark.parametrize("k_offset", [0, 5])
def test_excluding_sinks_is_a_lookup_of_minus_inf_on_their_keys(k_offset):
    """A key-only coverage's exclusion bias reads -inf exactly where it covers a key (for
    any query), 0 elsewhere and at padding (-1); ``without_keys`` adds it to the tiles' own
    bias; a coverage that depends on the query has none."""
    problem = replace(make_problem(2, 40, 50, 8, causal=False), k_offset=k_offset)
    sinks = SinkCoverage(6).bind(16)
    both = UnionCoverage([sinks, SinkCoverage(2).bind(16)])
    kj = torch.randint(-1, problem.lk, (2, 3, 7))
    kj[0, 0, 0] = -1
    anyq = torch.zeros(2, 3, 1, 1, dtype=torch.long)
    for coverage in (sinks, both):
        covered = coverage.covers(problem, anyq, kj.unsqueeze(-2)).squeeze(-2) & (kj >= 0)
        expected = torch.where(covered, float("-inf"), 0.0)
        assert torch.equal(coverage.key_exclusion(problem)[kj], expected)
    own = torch.randn(2, 3, 7)
    tiles = Tiles(torch.zeros(2, 3, 4, dtype=torch.long), kj, key_bias=own)
    got = without_keys(problem, tiles, [sinks]).key_bias
    assert torch.equal(got, own + sinks.key_exclusion(problem)[kj])
    assert without_keys(problem, tiles, []) is tiles
    with pytest.raises(TypeError, match="per query"):
        WindowCoverage(4).bind(16).key_exclusion(problem)
