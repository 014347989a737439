"""The choice for one (device, length): each recipe's cheapest useful point, the winner
across recipes, or exact attention and why.

A recipe's *best* is its cheapest trial (least latency, or least frac for the cost
"products") that meets the error target, fits the latency budget, and computes fewer
products than exact attention: knobs that compute every product (frac 1, e.g. a splitter
whose ``min_seq_len`` covers the length) run exact attention by another road, and only
timing noise could make them look faster. A recipe loses to exact attention when it has no
best, or (cost "latency") when its best is not faster than exact attention; the winner is
the cheapest best of the rest. Under the cost "products" a winner may be slower than exact
attention on the tuning device: the entry says so.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass

from optuna.trial import FrozenTrial

from attncompose.runtime.naming import format_ms
from attncompose.runtime.tuned import Candidate, LossKind, RecipeOutcome, TunedEntry, split_backend
from attncompose.tuner.objective import SLOW_FACTOR, below_exact, is_feasible


@dataclass(frozen=True)
class Rules:
    """What a choice is held to: target error, latency budget, and the cost minimised."""

    target_err: float
    latency_budget_ms: float | None = None
    cost: str = "latency"


@dataclass(frozen=True)
class RecipeRun:
    """One recipe's finished trials at one length; ``seeds``: seed settings averaged over.

    ``frac_of(knobs)`` counts the products of knobs whose trials did not (cost "latency");
    ``time_of(knobs)`` times the best point again, beside exact attention's second timing,
    where it could win (within ``SLOW_FACTOR`` of exact attention's time)."""

    name: str
    trials: list[FrozenTrial]
    seeds: int = 1
    frac_of: Callable[[dict], float] | None = None
    time_of: Callable[[dict], float] | None = None


def outcome(run: RecipeRun, exact_ms: float, rules: Rules) -> RecipeOutcome:
    """``run``'s best point, least error, and why it cannot beat exact attention (or None).

    The least error is that of trials computing fewer products than exact attention (knobs
    of frac 1 reach error 0 and say nothing about the approximation)."""
    fracs = _Fracs(run.frac_of)
    by_error = sorted(
        (t for t in run.trials if "error_mean" in t.user_attrs),
        key=lambda t: t.user_attrs["error_mean"],
    )
    least = next((t.user_attrs["error_mean"] for t in by_error if fracs.below_exact(t)), None)
    common = dict(least_error=least, trials=len(run.trials), seeds=run.seeds)
    feasible = [t for t in run.trials if is_feasible(t, rules.target_err)]
    budget = rules.latency_budget_ms
    fitting = [t for t in feasible if budget is None or t.user_attrs["latency_ms"] <= budget]
    cheapest = sorted(fitting, key=lambda t: t.value)
    useful = next((t for t in cheapest if fracs.below_exact(t)), None)  # counts lazily
    if useful is None:
        kind, why = _why_none(feasible, fitting, least, rules)
        if not run.trials:  # e.g. a --timeout shorter than one trial
            why = "no trial finished (a --timeout shorter than one trial?)"
        return RecipeOutcome(lost=why, lost_as=kind, **common)
    best = _candidate(useful, fracs.of(useful))
    if run.time_of is not None and best.latency_ms <= SLOW_FACTOR * exact_ms:  # could win
        best = best.model_copy(update={"latency_ms": run.time_of(best.params)})
    if rules.cost == "latency" and best.latency_ms >= exact_ms:
        times = f"{format_ms(exact_ms)} ms vs {format_ms(best.latency_ms)} ms"
        why = f"exact attention is faster ({times})"
        return RecipeOutcome(best=best, lost=why, lost_as="exact faster", **common)
    return RecipeOutcome(best=best, **common)


def _why_none(
    feasible: list[FrozenTrial], fitting: list[FrozenTrial], least: float | None, rules: Rules
) -> tuple[LossKind, str]:
    """Why a recipe has no best point: (kind, words)."""
    if not feasible:
        reached = "" if least is None else f" (least error {least:.3g})"
        return "target", f"no trial met the error target {rules.target_err:g}{reached}"
    if not fitting:
        fastest = min(t.user_attrs["latency_ms"] for t in feasible)
        return "budget", (
            f"the best feasible latency {format_ms(fastest)} ms exceeds the budget "
            f"{rules.latency_budget_ms:g} ms"
        )
    return "frac 1", frac_one_reason()


def frac_one_reason(goal: str = "the target") -> str:
    """Why exact attention where only knobs of frac 1 met ``goal``: they compute every product,
    exact attention by another road (tune says it of a recipe, tune-model of layers)."""
    return f"only knobs that compute as many products as exact attention (frac 1) met {goal}"


class _Fracs:
    """Frac of trials: recorded (cost "products"), else counted once per knob setting."""

    def __init__(self, frac_of: Callable[[dict], float] | None):
        self.frac_of = frac_of
        self.counted: dict[tuple, float] = {}

    def of(self, trial: FrozenTrial) -> float | None:
        if "frac" in trial.user_attrs:
            return trial.user_attrs["frac"]
        if self.frac_of is None:
            return None
        key = tuple(sorted(trial.params.items()))
        if key not in self.counted:
            self.counted[key] = self.frac_of(trial.params)
        return self.counted[key]

    def below_exact(self, trial: FrozenTrial) -> bool:
        """Whether the trial computes fewer products than exact attention (unknown: yes)."""
        return below_exact(self.of(trial))


def _candidate(trial: FrozenTrial, frac: float | None) -> Candidate:
    attrs = trial.user_attrs
    knobs, backend = split_backend(trial.params)
    return Candidate(
        knobs=knobs,
        backend=backend,
        error_mean=attrs["error_mean"],
        error_max=attrs["error_max"],
        latency_ms=attrs["latency_ms"],
        frac=frac,
    )


def _frac_text(frac: float | None) -> str:
    return "unknown" if frac is None else f"{frac:.3g}"


def cost_of(candidate: Candidate, cost: str) -> float:
    """What the tuner minimises, for one candidate."""
    if cost == "products":
        return math.inf if candidate.frac is None else candidate.frac
    return candidate.latency_ms


def choose(
    runs: list[RecipeRun], exact_ms: float, rules: Rules
) -> tuple[str | None, dict[str, RecipeOutcome], str | None]:
    """(winning recipe or None for exact attention, every recipe's outcome, why exact)."""
    outcomes = {run.name: outcome(run, exact_ms, rules) for run in runs}
    open_ = {name: o for name, o in outcomes.items() if o.lost is None}
    if not open_:
        if len(outcomes) == 1:
            return None, outcomes, next(iter(outcomes.values())).lost
        reasons = "; ".join(f"{name}: {o.lost}" for name, o in outcomes.items())
        return None, outcomes, f"no recipe beats exact attention ({reasons})"
    winner = min(open_, key=lambda name: cost_of(open_[name].best, rules.cost))
    won = open_[winner].best
    for name, o in open_.items():
        if name != winner:
            why = _beaten(winner, won, o.best, rules)
            outcomes[name] = o.model_copy(update={"lost": why, "lost_as": "beaten"})
    return winner, outcomes, None


def _beaten(winner: str, won: Candidate, lost: Candidate, rules: Rules) -> str:
    if rules.cost == "products":
        return (
            f"{winner} computes fewer products "
            f"(frac {_frac_text(won.frac)} vs {_frac_text(lost.frac)})"
        )
    return f"{winner} is faster ({format_ms(won.latency_ms)} ms vs {format_ms(lost.latency_ms)} ms)"


def make_entry(
    runs: list[RecipeRun],
    exact_ms: float,
    rules: Rules,
    data: str,
    versions: dict[str, str],
) -> TunedEntry:
    """The (device, length) entry: the winning recipe's best point, or exact attention and why."""
    winner, outcomes, fallback = choose(runs, exact_ms, rules)
    if winner is None:
        chosen = dict(error_mean=0.0, error_max=0.0, latency_ms=exact_ms, frac=1.0)
        seeds = max(run.seeds for run in runs)
        note = None
    else:
        best = outcomes[winner].best
        chosen = best.model_dump()
        seeds = outcomes[winner].seeds
        note = _slower_note(best, exact_ms)
    return TunedEntry(
        recipe=winner,
        **chosen,
        fallback=fallback,
        note=note,
        exact_latency_ms=exact_ms,
        recipes=outcomes,
        trials=sum(len(run.trials) for run in runs),
        target_err=rules.target_err,
        latency_budget_ms=rules.latency_budget_ms,
        cost=rules.cost,
        seeds=seeds,
        data=data,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=versions,
    )


def _slower_note(best: Candidate, exact_ms: float) -> str | None:
    """Said of a choice (cost "products") that measured slower than exact attention."""
    if best.latency_ms <= exact_ms:
        return None
    return (
        f"slower than exact attention where tuned ({format_ms(best.latency_ms)} ms vs "
        f"{format_ms(exact_ms)} ms, {exact_ms / best.latency_ms:.2f}x): chosen for the least "
        f"products (frac {_frac_text(best.frac)}); --latency-budget-ms bounds the latency"
    )
