"""The objective of one sequence length: measured latency, subject to error <= target.

Error is ``relative_error`` against exact attention on the calibration data, for several
settings of the recipe's seed knobs (mean and max recorded); the exact outputs are computed
once per length and reused by every trial. Latency is measured with :func:`measure`: the
first call of a trial is its warm-up, and counts the products it computes (frac); the
following calls (one per further seed, topped up to ``repeats`` for feasible trials) are
the samples whose median is the latency. Under the cost "latency" a feasible trial whose
first call took over ``SLOW_FACTOR`` times exact attention's time is not topped up (it
cannot win; the tuner times each recipe's best point again at the end).

A trial is pruned when it cannot be feasible any more (the errors seen so far already push
the mean over the target, whatever the remaining seeds give), or when its first call is far
slower than the best feasible latency found so far.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import Tensor

from attncompose.eval.data import QKVItem, load_qkv
from attncompose.eval.metrics import relative_error
from attncompose.eval.products import exact_products
from attncompose.eval.reference import exact_attention
from attncompose.eval.timing import measure, measure_rounds
from attncompose.primitives.base import count_products
from attncompose.runtime.attention import compile as compile_recipe
from attncompose.runtime.tuned import split_backend
from attncompose.tuner.space import seed_variants, suggest

SLOW_FACTOR = 2.0  # a first call this many times slower than the best feasible (or, for its
# timing, than exact attention) is hopeless
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CONSTRAINT = "error"  # error_mean - target_err; <= 0 is feasible


@dataclass(frozen=True)
class Calibration:
    """Q/K/V items of one length on the tuning device, their exact outputs and exact latency."""

    items: list[QKVItem]
    exact: list[Tensor]
    causal: bool
    device: torch.device
    exact_latency_ms: float

    @property
    def seq_len(self) -> int:
        return self.items[0].seq_len

    @cached_property
    def values_sha256(self) -> str:
        """A digest of the items' values, made once (every recipe's study of this length
        records it): a study measured on other data (a capture written over the same path)
        is not resumed as if it were this one."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(item.name.encode())
            for x in (item.q, item.k, item.v):
                digest.update(str((x.dtype, tuple(x.shape))).encode())
                digest.update(x.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def build_calibration(
    data: Path | None, seq_len: int, causal: bool, device: str, backend: str
) -> Calibration:
    """Load the data, cache exact outputs, and time the exact fallback in this process."""
    dev = torch.device(device)
    items = [item.to(dev) for item in load_qkv(data, seq_len)]
    with torch.no_grad():
        exact = [exact_attention(x.q, x.k, x.v, causal) for x in items]
    return Calibration(items, exact, causal, dev, time_exact(items, causal, dev, backend))


def time_exact(
    items: list[QKVItem], causal: bool, device: torch.device, backend: str, repeats: int = 5
) -> float:
    """Latency (ms per item) of exact attention, the fallback of a tuned recipe."""
    fallback = compile_recipe("exact", backend=backend)
    timing = measure(lambda: _run(fallback, items, causal), device, warmup=2, repeats=repeats)
    return timing.median_ms / len(items)


DECODE_REPEATS = 9  # timed rounds of a decode step (a few ms each: cheap beside the trials)


def time_decode(
    attn: Callable, items: list[QKVItem], device: torch.device, backend: str
) -> tuple[float, float]:
    """(ms of one decode step of ``attn``, ms of exact attention's) per item: each item's
    last query after all its keys (what a generation step asks of a layer at that length),
    timed in interleaved rounds. The tuner measures it beside the prefill: a choice that
    wins at prefill may lose at decode, where exact attention reads each key once."""
    exact = compile_recipe("exact", backend=backend)
    steps = [(x.q[:, :, -1:], x.k, x.v) for x in items]

    def run(module: Callable) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                for q, k, v in steps:
                    module(q, k, v, is_causal=True)

        return call

    timed = measure_rounds(
        {"recipe": run(attn), "exact": run(exact)}, device, warmup=2, repeats=DECODE_REPEATS
    )
    return timed["recipe"].median_ms / len(items), timed["exact"].median_ms / len(items)


def _run(attn: Callable, items: list[QKVItem], causal: bool) -> list[Tensor]:
    with torch.no_grad():
        return [attn(x.q, x.k, x.v, is_causal=causal) for x in items]


@dataclass
class Evaluation:
    """What one trial measured: errors per seed and item, latency samples per call (ms)."""

    errors: list[list[float]] = field(default_factory=list)
    first_ms: float = math.nan
    samples_ms: list[float] = field(default_factory=list)
    frac: float | None = None  # share of exact attention's products (counted in the first call)
    pruned: str | None = None
    timing: str | None = None  # why the latency was not refined, if it was not

    @property
    def error_mean(self) -> float:
        return statistics.fmean(statistics.fmean(e) for e in self.errors)

    @property
    def error_max(self) -> float:
        return max(max(e) for e in self.errors)

    @property
    def latency_ms(self) -> float:
        return statistics.median(self.samples_ms) if self.samples_ms else self.first_ms

    def attrs(self) -> dict[str, Any]:
        """The trial's user attributes."""
        attrs = {
            "error_mean": self.error_mean,
            "error_max": self.error_max,
            "errors": [statistics.fmean(e) for e in self.errors],
            "latency_ms": self.latency_ms,
            "seeds": len(self.errors),
        }
        if self.frac is not None:
            attrs["frac"] = self.frac
        if self.pruned:
            attrs["pruned"] = self.pruned
        if self.timing:
            attrs["timing"] = self.timing
        return attrs


class Evaluator:
    """Error and latency of recipe knob settings on one :class:`Calibration`."""

    def __init__(
        self,
        recipe,
        calibration: Calibration,
        target_err: float,
        backend: str = "auto",
        n_seeds: int = 3,
        repeats: int = 3,
        cost: str = "latency",
    ):
        self.recipe = recipe
        self.calibration = calibration
        self.target_err = target_err
        self.backend = backend
        self.n_seeds = n_seeds
        self.repeats = repeats
        self.cost = cost

    def compiled(self, knobs: dict[str, Any], seeds: dict[str, int] | None = None):
        """The recipe with ``knobs`` (and ``seeds``) compiled, on the backend the knobs name
        (``tune --backends``: the implementation is a tunable choice) or the run's."""
        knobs, backend = split_backend(knobs)
        return compile_recipe(
            self.recipe.with_knobs({**knobs, **(seeds or {})}), backend or self.backend
        )

    def evaluate(self, knobs: dict[str, Any], best_ms: float | None = None) -> Evaluation:
        """Run the recipe with ``knobs`` for each seed setting, pruning when hopeless."""
        variants = seed_variants(self.recipe.with_knobs(split_backend(knobs)[0]), self.n_seeds)
        ev = Evaluation()
        attn = None
        for i, seeds in enumerate(variants):
            attn = self.compiled(knobs, seeds)
            if i == 0:  # the warm-up call: it also counts the products
                with count_products() as computed:
                    outs, ev.first_ms = self._timed(attn)
                ev.frac = computed[0] / self._exact_products
            else:
                outs, ms = self._timed(attn)
                ev.samples_ms.append(ms)
            ev.errors.append(
                [relative_error(o, e) for o, e in zip(outs, self.calibration.exact, strict=True)]
            )
            ev.pruned = self._hopeless(ev, len(variants), best_ms)
            if ev.pruned:
                return ev
        if ev.error_mean > self.target_err or len(ev.samples_ms) >= self.repeats:
            return ev
        exact_ms = self.calibration.exact_latency_ms
        if self.cost == "latency" and ev.first_ms > SLOW_FACTOR * exact_ms:
            ev.timing = f"not refined: first call over {SLOW_FACTOR:g}x exact attention's time"
            return ev
        ev.samples_ms.extend(self._samples(attn, self.repeats - len(ev.samples_ms)))
        return ev

    def _hopeless(self, ev: Evaluation, n_variants: int, best_ms: float | None) -> str | None:
        done = len(ev.errors)
        if done == n_variants:
            return None
        if sum(statistics.fmean(e) for e in ev.errors) > self.target_err * n_variants:
            return "error: the mean over seeds must exceed the target"
        if done == 1 and best_ms is not None and ev.first_ms > SLOW_FACTOR * best_ms:
            return f"latency: first call over {SLOW_FACTOR:g}x the best feasible"
        return None

    def _timed(self, attn) -> tuple[list[Tensor], float]:
        """Outputs of one call per item and its latency per item (ms)."""
        held: list[list[Tensor]] = []
        items, causal = self.calibration.items, self.calibration.causal
        fn = lambda: held.append(_run(attn, items, causal))
        timing = measure(fn, self.calibration.device, warmup=0, repeats=1)
        return held[-1], timing.median_ms / len(items)

    def latency_of(self, knobs: dict) -> float:
        """Latency (ms per item) of the recipe with ``knobs``: one warm-up call, then the
        median of ``repeats`` timed calls."""
        attn = self.compiled(knobs)
        items, causal = self.calibration.items, self.calibration.causal
        fn = lambda: _run(attn, items, causal)
        timing = measure(fn, self.calibration.device, warmup=1, repeats=self.repeats)
        return timing.median_ms / len(items)

    def frac_of(self, knobs: dict) -> float:
        """Share of exact attention's products the recipe with ``knobs`` computes."""
        return self._frac(self.compiled(knobs))

    def _frac(self, attn) -> float:
        """Share of exact attention's query-key products ``attn`` computes on the items."""
        with count_products() as computed:
            _run(attn, self.calibration.items, self.calibration.causal)
        return computed[0] / self._exact_products

    @property
    def _exact_products(self) -> int:
        items, causal = self.calibration.items, self.calibration.causal
        return sum(exact_products(x.q, x.k, causal) for x in items)

    def _samples(self, attn, repeats: int) -> list[float]:
        items, causal = self.calibration.items, self.calibration.causal
        timing = measure(
            lambda: _run(attn, items, causal), self.calibration.device, warmup=0, repeats=repeats
        )
        return [s / len(items) for s in timing.samples_ms]


class Objective:
    """Optuna objective of one length: returns latency (ms), or frac for the cost "products";
    the error is a user attribute and the constraint ``error`` (error_mean - target, feasible
    when <= 0).

    A trial whose knobs repeat a finished trial reuses its measurements instead of running.
    """

    def __init__(self, evaluator: Evaluator, space: dict):
        self.evaluator = evaluator
        self.space = space

    def __call__(self, trial: optuna.Trial) -> float:
        knobs = suggest(trial, self.space)
        finished = trial.study.get_trials(deepcopy=False, states=FINISHED)
        same = next((t for t in finished if t.params == knobs), None)
        if same is not None:
            return _replay(trial, same)
        by_latency = self.evaluator.cost == "latency"
        best_ms = best_feasible_ms(finished, self.target_err) if by_latency else None
        ev = self.evaluator.evaluate(knobs, best_ms=best_ms)
        for step in range(len(ev.errors)):
            trial.report(statistics.fmean(statistics.fmean(e) for e in ev.errors[: step + 1]), step)
        for key, value in ev.attrs().items():
            trial.set_user_attr(key, value)
        trial.set_constraint(CONSTRAINT, ev.error_mean - self.target_err)
        if ev.pruned:
            raise optuna.TrialPruned(ev.pruned)
        return ev.latency_ms if by_latency else ev.frac

    @property
    def target_err(self) -> float:
        return self.evaluator.target_err


def _replay(trial: optuna.Trial, same: FrozenTrial) -> float:
    for key, value in same.user_attrs.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("same_as", same.number)
    for key, value in same.constraints.items():
        trial.set_constraint(key, value)
    if same.state == TrialState.PRUNED:
        raise optuna.TrialPruned(same.user_attrs.get("pruned", "same knobs as a pruned trial"))
    return float(same.value)


def is_feasible(trial: FrozenTrial, target_err: float) -> bool:
    """A completed trial whose mean error meets the target."""
    return (
        trial.state == TrialState.COMPLETE
        and trial.user_attrs.get("error_mean", math.inf) <= target_err
    )


def below_exact(frac: float | None) -> bool:
    """Whether knobs of this frac compute fewer products than exact attention (unknown: yes).
    Knobs of frac 1 (a window or splitter covering the length) run exact attention by another
    road: their error is 0 and only timing noise could make them look cheaper, so neither
    tuner chooses them."""
    return frac is None or math.isnan(frac) or frac < 1.0


def best_feasible(trials: list[FrozenTrial], target_err: float) -> FrozenTrial | None:
    """The completed trial of least latency among those meeting the target, or None."""
    feasible = [t for t in trials if is_feasible(t, target_err)]
    return min(feasible, key=lambda t: t.value) if feasible else None


def best_feasible_ms(trials: list[FrozenTrial], target_err: float) -> float | None:
    """Latency of :func:`best_feasible`, or None."""
    best = best_feasible(trials, target_err)
    return None if best is None else float(best.value)
