"""Block plans to test: problems, the selections and exclusions of a block step, small
recipes that run as block plans (shared by the plan algebra's tests and the block op's)."""

from __future__ import annotations

from oracle import make_problem

import attncompose as ac
from attncompose.primitives.plan import BlockPlan, plan_block_size
from attncompose.primitives.power import Power
from attncompose.primitives.power.schema import PowerStep
from attncompose.primitives.sink import SinkCoverage
from attncompose.primitives.topk import Topk
from attncompose.primitives.topk.schema import TopkStep
from attncompose.primitives.window import WindowCoverage

# problems: (rows, Lq, Lk, causal); causal ones bottom-right aligned
PROBLEMS = {
    "T63": (2, 63, 63, False),
    "T130-causal": (2, 130, 130, True),
    "decode10x300": (2, 10, 300, True),
    "decode1x129": (2, 1, 129, True),
    "rect200x77": (2, 200, 77, False),
}


def problem_named(name: str):
    """The problem of ``PROBLEMS[name]`` (seeded by the name)."""
    n, lq, lk, causal = PROBLEMS[name]
    return make_problem(n, lq, lk, causal=causal, seed=len(name))


def _topk(problem, **knobs):
    return Topk(TopkStep(**knobs))(problem)


# selections and exclusions of one block step: (select, exclude, block size)
CASES = {
    "sink": lambda p: ([SinkCoverage(5)], [], 32),
    "window": lambda p: ([WindowCoverage(37)], [], 16),
    "sink+window": lambda p: ([SinkCoverage(4), WindowCoverage(20)], [], 16),
    "topk": lambda p: ([_topk(p, block_size=16, k=3)], [], 16),
    "topp+sink+window": lambda p: (
        [SinkCoverage(3), WindowCoverage(17), _topk(p, block_size=32, p=0.8, max_k=4)],
        [],
        16,
    ),
    "power+sink": lambda p: (
        [Power(PowerStep(block_size=32, max_distance=4))(p), SinkCoverage(3)],
        [],
        32,
    ),
    "topk-minus-window": lambda p: ([_topk(p, block_size=16, k=4)], [WindowCoverage(9)], 16),
    "window-minus-sink": lambda p: ([WindowCoverage(50)], [SinkCoverage(7)], 64),
    "odd-table-7": lambda p: ([_topk(p, block_size=7, k=2)], [SinkCoverage(2)], 128),
}


def plan_of(case: str, problem):
    """The plan a block step would build: its block size, unless tables ask for theirs."""
    select, exclude, size = CASES[case](problem)
    size = plan_block_size(problem, [*select, *exclude], size)
    return BlockPlan.build(problem, select, exclude, size, size), select, exclude


def small_recipe(name: str):
    """A built-in block-plan recipe ("streaming", "block-topk", "topp", "power") sized for
    tests of a few hundred tokens."""
    knobs = {"streaming": {"local.width": 40}, "power": {"pattern.block_size": 32}}
    knobs |= {r: {"local.width": 24, "heavy.block_size": 16} for r in ("block-topk", "topp")}
    return ac.load_recipe(name).with_knobs(knobs[name])
