"""``power``: PowerAttention's static table, its tiles shared by every row, and a recipe
whose knobs make it exact."""

from __future__ import annotations

import pytest
from contract import ReducesToExact, assert_partial_equal
from oracle import dense_mask, make_problem, masked_attention

from attncompose.primitives.window import WindowCoverage


def test_power_pattern_picks_power_of_two_distances():
    from attncompose.primitives.power import power_table

    p = make_problem(1, 80, 80, causal=True)
    rows = power_table(p, 8, max_distance=1 << 20)[0]
    assert rows[9].nonzero().flatten().tolist() == [1, 5, 7, 8, 9]  # distances 8, 4, 2, 1, 0
    assert power_table(p, 8, max_distance=0).sum() == 0


@pytest.mark.parametrize("causal", [False, True])
def test_static_table_tiles_share_one_mask_across_rows(block_attention, causal):
    """A static block table (power) is the same for every head: its tiles stay expanded along
    rows, so the kernel builds one pair mask for all of them; same pairs as the dense mask."""
    from attncompose.primitives.coverages import BlockTable
    from attncompose.primitives.power import power_table

    p = make_problem(3, 90, 90, causal=causal, seed=6)
    cov = BlockTable(power_table(p, 8, max_distance=32), 8)
    tiles = cov.tiles(p)
    assert cov.row_invariant and tiles.k_idx.stride(0) == 0
    window = WindowCoverage(5).bind(16)
    got = block_attention(p, tiles, own=cov, exclude=(window,))
    assert_partial_equal(got, masked_attention(p, dense_mask(p, cov, exclude=(window,))))


class TestPowerWithSamplingEverything(ReducesToExact):
    steps = {
        "pattern": {"op": "power", "block_size": 8},
        "near": {"op": "block", "select": ["pattern"], "block_size": 16},
        "rest": {"op": "uniform_sample", "exclude": ["near"], "sample_size": 4096},
        "out": {"op": "merge", "inputs": ["near", "rest"]},
    }
