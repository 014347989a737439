"""The Optuna tuner: per sequence length, the recipe knobs of least latency with error <= target.

The search space is the recipe's own tunable knobs (:mod:`.space`); each length is one study
(:mod:`.study`) whose objective (:mod:`.objective`) measures latency and, over several seeds,
the error against exact attention on calibration data. The result is a tuned recipe file
(:mod:`attncompose.runtime.tuned`). ``attncompose tune`` is :data:`attncompose.cli.tune.tune`.
"""

from __future__ import annotations

from attncompose.tuner.errors import TunerError
from attncompose.tuner.job import Reporter, TuneConfig, TuneResult, tune
from attncompose.tuner.space import search_space, seed_variants

__all__ = [
    "Reporter",
    "TuneConfig",
    "TuneResult",
    "TunerError",
    "search_space",
    "seed_variants",
    "tune",
]
