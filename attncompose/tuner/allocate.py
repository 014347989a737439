"""Choosing per layer from the Pareto fronts: to an error target, or to a perplexity budget.

Pure functions over measured points (no model, no torch): the job
(:mod:`attncompose.tuner.model_job`) measures, these decide.

- **Error target**: each unit takes its cheapest point whose error is within the target (on
  the fit segment and, lazily checked, on the check segment).
- **Perplexity budget**: a layer's choice is one point per unit (one unit per layer, or one per
  key/value head group); its error over all heads is ``sqrt(sum_g w_g e_g^2)`` (``w_g`` the
  group's share of the exact output's squared norm) and its cost the mean of the units' costs.
  Each layer has a measured **sensitivity curve**: the growth of log perplexity with that
  layer alone approximated (mean plus :data:`CONFIDENCE` standard errors), measured at a few
  errors, linear between them, rising as
  ``error ** POWER`` from zero to the first, extrapolated at the last slope up to
  :data:`EXTRAPOLATE` times the largest error measured (never beyond: no layer is pushed
  where nothing was measured). The job measures again where an allocation takes a layer far
  from its measurements (:meth:`Curve.far`), stepping out at most to the curve's reach
  (:func:`measure_next`). For a multiplier ``lam``,
  every layer takes the point minimising ``cost + lam * predicted growth``; ``lam`` is bisected
  so that the predicted total stays within a budget (the sum over layers: growths measured
  one layer at a time are taken as additive, which the job checks with a real forward pass).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from attncompose.tuner.front import Point

EXTRAPOLATE = 2.0  # a curve predicts up to this many times its largest measured error
# below its first measurement a curve rises as error ** POWER (convex, not linear): SmolLM2's
# growths measured at two errors rise as error^0.2-6.6, median 1.5 (13 layers, 536eeec), and
# error^0.1-6.5, median 1.6 (18 pairs of growing means in the sensitivity entries of
# benchmarks/results/tuned/smollm2-n8192-ppl-budget0.01.model-tuned.yaml)
POWER = 1.5
# a measured growth counts as its mean plus this many standard errors: single-layer growths
# measured on one text are noisy (SmolLM2, 8192 tokens: standard errors 0.0001-0.0015, as large as
# the growths), and the allocation, taking the layers that measured cheapest, took those whose
# noise was lucky: bare means gave fit +0.2%, check +0.9%, held-out test +1.3% at 8192 tokens;
# with one standard error +0.2%, +0.9%, +0.8% (README, issue 14's notes)
CONFIDENCE = 1.0
FAR = 1.5  # a prediction this many times beyond (or below) the measurements is far from them
BISECT_STEPS = 60


def cheapest_within(
    front: Sequence[Point], target: float, check: Callable[[Point], float] | None = None
) -> Point:
    """The cheapest point with error <= ``target`` whose ``check(point)`` error (another
    segment) is within it too; exact attention (error 0) when none is. ``front`` must hold the
    exact point."""
    for p in sorted(front, key=lambda p: p.cost):
        if p.error <= target and (p.is_exact or check is None or check(p) <= target):
            return p
    return next(p for p in front if p.is_exact)


@dataclass(frozen=True)
class Combo:
    """A layer's choice: one point per unit, with the layer's error and cost."""

    points: tuple[Point, ...]
    error: float
    cost: float


def layer_front(fronts: Sequence[Sequence[Point]], weights: Sequence[float]) -> list[Combo]:
    """The Pareto front of a layer's combinations of its units' points (one unit: its front).

    ``weights``: each unit's share of the layer's exact output squared norm (sum 1)."""
    combos = []
    for choice in itertools.product(*fronts):
        error = math.sqrt(sum(w * p.error**2 for w, p in zip(weights, choice, strict=True)))
        cost = sum(p.cost for p in choice) / len(choice)
        combos.append(Combo(tuple(choice), error, cost))
    combos.sort(key=lambda c: (c.cost, c.error))
    front: list[Combo] = []
    for c in combos:
        if not front or c.error < front[-1].error:
            front.append(c)
    return front


@dataclass
class Curve:
    """Measured growth of log perplexity against a layer's error: points (error, growth)."""

    points: list[tuple[float, float]] = field(default_factory=list)
    measured: list[tuple[float, float, float]] = field(default_factory=list)  # error, mean, se

    def add(self, error: float, growth: float, se: float = 0.0) -> None:
        """Add a measurement: mean growth and its standard error, which count together as
        ``max(growth, 0) + CONFIDENCE * se`` (a negative mean is noise around none: what
        another text shows may still grow by its standard error)."""
        self.measured = sorted({*self.measured, (error, growth, se)})
        self.points = sorted({*self.points, (error, max(growth, 0.0) + CONFIDENCE * se)})

    def far(self, error: float) -> bool:
        """Whether a prediction at ``error`` (> 0) lies far from the measurements: past
        :data:`FAR` times the largest error measured, or below the smallest by that factor
        where that one grew (below a measurement that did not grow, nothing can)."""
        if error <= 0:
            return False
        if not self.points:
            return True
        (low, growth), high = self.points[0], self.points[-1][0]
        return error > FAR * high or (growth > 0 and error < low / FAR)

    @property
    def reach(self) -> float:
        """The largest error it predicts for (``EXTRAPOLATE`` x the largest measured)."""
        return EXTRAPOLATE * max((e for e, _ in self.points), default=0.0)

    def predict(self, error: float, bounded: bool = True) -> float:
        """Growth at ``error``: ``error ** POWER`` up to the first measurement, then piecewise
        linear through the measurements, made non-decreasing; inf beyond :attr:`reach` if
        ``bounded`` (else extrapolated: where to measure next)."""
        if error <= 0:
            return 0.0
        if error > self.reach and (bounded or not self.points):
            return math.inf
        xs, ys = [0.0], [0.0]
        for e, g in self.points:
            if e > xs[-1]:
                xs.append(e)
                ys.append(max(g, ys[-1]))
        i = bisect.bisect_left(xs, error)
        if i == 1:  # below the first measurement: convex, through zero
            return ys[1] * (error / xs[1]) ** POWER
        if i < len(xs):
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (error - x0) / (x1 - x0)
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + slope * (error - xs[-1])


def allocate(
    fronts: dict[int, list[Combo]],
    curves: dict[int, Curve],
    budget: float,
    bounded: bool = True,
) -> dict[int, Combo]:
    """Per layer the combo of least total cost whose predicted growths sum to <= ``budget``.

    Lagrangian: for multiplier ``lam`` each layer minimises cost + lam * growth; the least
    ``lam`` meeting the budget is found by bisection (costs are comparable across layers:
    each layer's cost is a share of its exact cost, or milliseconds). ``bounded=False``
    extrapolates the curves past their reach: the allocation that says where to measure."""

    def predict(layer: int, error: float) -> float:
        return curves[layer].predict(error, bounded)

    def pick(lam: float) -> dict[int, Combo]:
        return {
            layer: min(front, key=lambda c: c.cost + lam * predict(layer, c.error))
            for layer, front in fronts.items()
        }

    def total(choice: dict[int, Combo]) -> float:
        return sum(predict(layer, c.error) for layer, c in choice.items())

    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget and hi < 1e12:
        hi *= 4
    if total(pick(lo)) <= budget:
        return pick(lo)
    for _ in range(BISECT_STEPS):
        mid = (lo + hi) / 2
        if total(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)


def measure_next(front: Sequence[Combo], curve: Curve, combo: Combo) -> Combo:
    """Where to measure a layer the unbounded allocation takes to ``combo``, far from its
    curve: ``combo`` itself if the curve reaches it, else the combo of ``front`` beyond the
    measurements (far from them) that is farthest within the curve's :attr:`Curve.reach`, or
    the nearest one if none is within it.

    A curve that did not grow at its largest error extrapolates flat, so the allocation takes
    such a layer to its cheapest point (error 1: no attention); measured there, the layer
    grows a lot, and the line from its small error to error 1 over-predicts everything in
    between (curves are convex). Stepping out at most to the reach measures where it is used.
    """
    if not curve.points or combo.error <= curve.reach:
        return combo
    high = curve.points[-1][0]
    beyond = [c for c in front if c.error > high and curve.far(c.error)]
    within = [c for c in beyond if c.error <= curve.reach]
    if within:
        return max(within, key=lambda c: c.error)
    return min(beyond, key=lambda c: c.error, default=combo)


def reference_combo(front: Sequence[Combo], error: float) -> Combo:
    """The combo to first measure a layer's sensitivity at: the cheapest with error <= ``error``
    that is not exact attention, else the least erroneous non-exact one."""
    inexact = [c for c in front if c.error > 0]
    if not inexact:
        return front[0]
    within = [c for c in inexact if c.error <= error]
    return min(within, key=lambda c: c.cost) if within else min(inexact, key=lambda c: c.error)
