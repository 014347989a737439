"""Pareto fronts of error against cost: what a study of one recipe on one unit of a model finds.

A unit is a layer, or a layer's key/value head group (with its query heads). Its studies (one
per recipe) have two objectives, relative error and cost (frac, or latency in ms), both
minimised: the same trials then serve any error target or perplexity budget, and rerunning
with another target reuses them. The error and cost of a knob setting come from the single
length tuner's :class:`~attncompose.tuner.objective.Evaluator` (mean over seed settings, the
frac or latency of the first call); no trial is pruned, as every point may lie on the front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from attncompose.tuner.objective import FINISHED, Evaluator, below_exact
from attncompose.tuner.space import suggest

DIRECTIONS = ("minimize", "minimize")  # error, cost
SHARED_TRIAL = "shared_trial"  # user attribute: the model-wide trial a unit's trial copies


@dataclass(frozen=True)
class Point:
    """A measured choice for one unit: a recipe's knobs (or exact attention), error, cost."""

    recipe: str | None  # None: exact attention
    knobs: dict[str, Any] | None
    error: float
    cost: float
    frac: float
    latency_ms: float
    trial: int | None = None

    @property
    def is_exact(self) -> bool:
        return self.recipe is None


class _KnobsObjective:
    """Optuna objective returning (error, cost) for the knobs a trial suggests; a trial whose
    knobs repeat a finished trial reuses its measurements instead of running."""

    def __init__(self, space: dict):
        self.space = space

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        knobs = suggest(trial, self.space)
        same = _same_knobs(trial, knobs)
        return same if same is not None else self.measure(trial, knobs)

    def measure(self, trial: optuna.Trial, knobs: dict[str, Any]) -> tuple[float, float]:
        raise NotImplementedError


class FrontObjective(_KnobsObjective):
    """(error_mean, cost) of the knobs on one unit."""

    def __init__(self, evaluator: Evaluator, space: dict):
        super().__init__(space)
        self.evaluator = evaluator

    def measure(self, trial: optuna.Trial, knobs: dict[str, Any]) -> tuple[float, float]:
        ev = self.evaluator.evaluate(knobs)
        for key, value in ev.attrs().items():
            trial.set_user_attr(key, value)
        cost = ev.frac if self.evaluator.cost == "products" else ev.latency_ms
        return ev.error_mean, cost


class SharedObjective(_KnobsObjective):
    """One knob setting run on several units (every layer of a model): the mean error and the
    mean cost over them; each unit's error, cost, frac and latency are user attributes
    (``unit_errors``, ... in the order of ``evaluators``)."""

    def __init__(self, evaluators: list[Evaluator], space: dict):
        super().__init__(space)
        self.evaluators = evaluators

    def measure(self, trial: optuna.Trial, knobs: dict[str, Any]) -> tuple[float, float]:
        units: dict[str, list[float]] = {
            "unit_errors": [],
            "unit_costs": [],
            "unit_fracs": [],
            "unit_latency_ms": [],
        }
        for evaluator in self.evaluators:
            ev = evaluator.evaluate(knobs)
            cost = ev.frac if evaluator.cost == "products" else ev.latency_ms
            values = (ev.error_mean, cost, ev.frac, ev.latency_ms)
            for key, value in zip(units, values, strict=True):
                units[key].append(float(value))
        for key, values in units.items():
            trial.set_user_attr(key, values)
        mean = {key: math.fsum(values) / len(values) for key, values in units.items()}
        trial.set_user_attr("error_mean", mean["unit_errors"])
        trial.set_user_attr("frac", mean["unit_fracs"])
        trial.set_user_attr("latency_ms", mean["unit_latency_ms"])
        return mean["unit_errors"], mean["unit_costs"]


def _same_knobs(trial: optuna.Trial, knobs: dict) -> tuple[float, float] | None:
    """The values of a finished trial with the same knobs (its attributes copied), or None."""
    finished = trial.study.get_trials(deepcopy=False, states=FINISHED)
    same = next((t for t in finished if t.params == knobs), None)
    if same is None:
        return None
    for key, value in same.user_attrs.items():
        if key != SHARED_TRIAL:
            trial.set_user_attr(key, value)
    trial.set_user_attr("same_as", same.number)
    return tuple(same.values)


def trial_points(recipe: str, trials: list[FrozenTrial]) -> list[Point]:
    """The completed trials of a recipe's study as points, less those of frac 1 (they compute
    every product: exact attention by another road, :func:`below_exact`)."""
    points = [
        Point(
            recipe=recipe,
            knobs=dict(t.params),
            error=t.values[0],
            cost=t.values[1],
            frac=t.user_attrs.get("frac", math.nan),
            latency_ms=t.user_attrs["latency_ms"],
            trial=t.number,
        )
        for t in trials
        if t.state == TrialState.COMPLETE and t.values is not None
    ]
    return [p for p in points if below_exact(p.frac)]


def pareto(points: list[Point]) -> list[Point]:
    """The points no other point beats on both error and cost, by increasing cost (so by
    decreasing error). Among equal costs the smaller error wins; exact attention wins ties."""
    ordered = sorted(points, key=lambda p: (p.cost, p.error, not p.is_exact))
    front: list[Point] = []
    for p in ordered:
        if not front or p.error < front[-1].error:
            front.append(p)
    return front
