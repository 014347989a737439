"""The search space, read from the recipe: each tunable knob's declared range or choices.

Nothing here names a knob: every ``'step.knob'`` that the recipe declares tunable becomes one
Optuna distribution, and knobs named ``seed`` are the recipe's sources of randomness.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from attncompose.spec.knobs import FloatChoices, FloatRange, IntChoices, IntRange, StrChoices
from attncompose.tuner.errors import TunerError

SEED_KNOB = "seed"


def search_space(recipe) -> dict[str, BaseDistribution]:
    """'step.knob' -> Optuna distribution for every tunable knob of ``recipe``."""
    space = {
        name: to_distribution(decl)
        for name, decl in recipe.tunables().items()
        if not is_seed(name)  # seeds are averaged over, never tuned
    }
    if not space:
        raise TunerError(
            f"recipe {recipe.name!r} declares no tunable knob: give a knob a range "
            "({default, low, high}) or choices ({default, choices}) to tune it"
        )
    return space


def to_distribution(decl: Any) -> BaseDistribution:
    """A tunable declaration (a range, or choices of numbers or names) as a distribution."""
    if isinstance(decl, IntRange):
        return IntDistribution(decl.low, decl.high, log=decl.log, step=decl.step)
    if isinstance(decl, FloatRange):
        return FloatDistribution(decl.low, decl.high, log=decl.log)
    if isinstance(decl, (IntChoices, FloatChoices, StrChoices)):
        return CategoricalDistribution(tuple(dict.fromkeys(decl.choices)))
    raise TypeError(f"not a tunable declaration: {decl!r}")


def defaults(recipe) -> dict[str, Any]:
    """'step.knob' -> the declared default of every tunable knob (the untuned recipe)."""
    return {name: decl.default for name, decl in recipe.tunables().items() if not is_seed(name)}


def is_seed(name: str) -> bool:
    """Whether 'step.knob' names a seed knob."""
    return name.rpartition(".")[2] == SEED_KNOB


def suggest(trial: optuna.Trial, space: dict[str, BaseDistribution]) -> dict[str, Any]:
    """Sample one value per knob of ``space`` through the trial's public suggest API."""
    values = {}
    for name, dist in space.items():
        if isinstance(dist, IntDistribution):
            values[name] = trial.suggest_int(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        elif isinstance(dist, FloatDistribution):
            values[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
        else:
            values[name] = trial.suggest_categorical(name, dist.choices)
    return values


def seed_knobs(recipe) -> dict[str, int]:
    """'step.seed' -> current value, for every knob named ``seed`` (the recipe's randomness)."""
    return {name: int(value) for name, value in recipe.knob_values().items() if is_seed(name)}


def seed_variants(recipe, n_seeds: int) -> list[dict[str, int]]:
    """``n_seeds`` settings of the seed knobs (offsets 0..n-1); one empty one if none is random."""
    seeds = seed_knobs(recipe)
    if not seeds:
        return [{}]
    return [{name: base + i for name, base in seeds.items()} for i in range(n_seeds)]
