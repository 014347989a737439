"""``sink``: recipes whose sinks (and other parts switched off) make them exact."""

from __future__ import annotations

from contract import ReducesToExact


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
