"""Tuning a whole model: a recipe and knobs per layer (or per key/value head group).

The job, given a causal LM and the token ids of a calibration text:

1. **Segments.** Consecutive ``seq_len``-token parts of the text, with roles: ``fit`` (the
   trials measure error and cost there), ``check`` (a choice must also hold there) and
   ``test`` (measured, never used to choose). Each is captured once (every layer and head;
   :mod:`attncompose.models.segments` caches it on disk) with its exact perplexity.
2. **Studies.** First, per recipe, one *model-wide* two-objective study (mean error over the
   units, mean cost): each of its trials runs one knob setting on every unit (a layer, or with
   ``per_head`` a key/value head with its query heads) and records each unit's error and cost.
   Then per unit and recipe one two-objective study (error, cost) of the single-length tuner's
   measurements (:mod:`attncompose.tuner.front`) that holds the model-wide trials as finished
   trials of its own (its sampler starts from them) and adds ``trials`` of its own. Every layer
   thus chooses among the knob settings the model-wide search found good, plus its own
   refinements: a few trials per layer alone rarely find a recipe's good corner (issue 14,
   topp's high coverage with many blocks). All studies are resumable and shared by workers
   through one storage. A fresh unit study first tries the recipe's defaults and a few points
   of the previous unit's front.
3. **Choice.** Points are exact attention and the trials that compute fewer products than
   it (knobs of frac 1 run it by another road, as in the single-length tuner).
   ``target_err``: each unit takes its cheapest point within the target on the fit
   segment whose error on the check segment is within it too. ``ppl_budget``: each layer's
   sensitivity (growth of log perplexity with it alone approximated, on the fit segment, and
   the standard error of that growth over blocks of tokens) is measured where the allocation
   needs it; the allocation (:mod:`attncompose.tuner.allocate`)
   is then checked by real forward passes on the fit and check segments and tightened until
   both stay within the budget.
4. **Record.** Every choice's error on each segment, each segment's perplexity and frac in a
   forward pass with the choices, timings: the model-level tuned file
   (:mod:`attncompose.runtime.model_tuned`), written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch
from optuna.trial import TrialState

from attncompose.eval.data import QKVItem
from attncompose.eval.metrics import relative_error
from attncompose.eval.products import run_counted
from attncompose.eval.reference import exact_attention
from attncompose.eval.timing import measure
from attncompose.models.evaluate import perplexity_and_frac
from attncompose.models.replay import LayerReplay
from attncompose.models.segments import capture_segment, default_cache_dir, split_segments
from attncompose.runtime.attention import compile as compile_recipe
from attncompose.runtime.files import can_write_beside, folder_lock
from attncompose.runtime.model_tuned import (
    ROLES,
    Choice,
    LayerTuning,
    LengthTuning,
    ModelShape,
    ModelTunedFile,
    ModelTuning,
    ModelTuningError,
    Segment,
    read_model_tuned,
    write_model_tuned,
)
from attncompose.runtime.naming import device_name
from attncompose.spec.recipe import load_recipe
from attncompose.tuner.allocate import (
    Combo,
    Curve,
    allocate,
    cheapest_within,
    layer_front,
    measure_next,
    reference_combo,
)
from attncompose.tuner.choice import frac_one_reason
from attncompose.tuner.errors import TunerError
from attncompose.tuner.front import (
    DIRECTIONS,
    SHARED_TRIAL,
    FrontObjective,
    Point,
    SharedObjective,
    pareto,
    trial_points,
)
from attncompose.tuner.job import COSTS, versions
from attncompose.tuner.objective import Calibration, Evaluator, time_decode, time_exact
from attncompose.tuner.space import defaults, search_space, seed_knobs
from attncompose.tuner.study import (
    default_storage_url,
    finished_trials,
    open_storage,
    open_study,
    run_trials,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from attncompose.models.segments import SegmentCapture

TRANSFER = 4  # points of the previous unit's front a fresh study starts from
GOOD_ENOUGH = 0.85  # a verified allocation using this share of the budget is kept
SENSITIVITY_ERROR = 0.1  # a layer's sensitivity is first measured at about this error
REFINE_ROUNDS = 4  # rounds of sensitivity measurements where the allocation goes far from them
NUDGE = 1.25  # step of the predicted budget when an allocation repeats one measured already
MAX_NUDGES = 24  # 1.25**24 ~ 200x: beyond, no other allocation is in reach


@dataclass(frozen=True)
class ModelTuneConfig:
    """What to tune a model for: one length, recipes, an error target or a perplexity budget."""

    seq_len: int
    recipes: tuple[str, ...]
    target_err: float | None = None
    ppl_budget: float | None = None
    per_head: bool = False
    trials: int = 6
    shared_trials: int = 16
    cost: str = "latency"
    segments: int = 3
    seed: int = 0
    n_seeds: int = 3
    backend: str = "auto"
    device: str | None = None
    storage: str | None = None
    study: str | None = None
    cache: Path | None = None
    out: Path = Path("model.tuned.yaml")
    max_rounds: int = 6
    sensitivity_error: float = SENSITIVITY_ERROR

    def check(self) -> None:
        """Raise :class:`TunerError` for settings that cannot work (one line each)."""
        if (self.target_err is None) == (self.ppl_budget is None):
            raise TunerError("give one of --target-err or --ppl-budget")
        if self.target_err is not None and not 0 < self.target_err < math.inf:
            raise TunerError(f"--target-err must be positive, got {self.target_err}")
        if self.ppl_budget is not None and not 0 < self.ppl_budget < math.inf:
            raise TunerError(
                f"--ppl-budget is a relative growth (0.02 = +2%) and must be positive, "
                f"got {self.ppl_budget}"
            )
        if self.seq_len < 2:
            raise TunerError(f"--seq-len must be at least 2, got {self.seq_len}")
        if not self.recipes:
            raise TunerError("--recipes names no recipe")
        if self.trials < 0 or self.shared_trials < 0:
            raise TunerError("--trials and --shared-trials cannot be negative")
        if self.trials + self.shared_trials < 1:
            raise TunerError("--trials and --shared-trials are both 0: nothing would be tried")
        if self.n_seeds < 1 or self.max_rounds < 1:
            raise TunerError("seeds and rounds must be at least 1")
        if not 1 <= self.segments <= len(ROLES):
            raise TunerError(f"--segments must be 1 to {len(ROLES)}, got {self.segments}")
        if self.cost not in COSTS:
            raise TunerError(f"--cost must be one of {', '.join(COSTS)}, got {self.cost!r}")
        if self.study is not None and self.storage is None:
            raise TunerError("--study names a study in a shared --storage; give --storage too")
        if not self.out.parent.is_dir():
            raise TunerError(f"--out {self.out}: folder {self.out.parent} does not exist")
        if (err := can_write_beside(self.out)) is not None:  # found before the trials
            raise TunerError(f"--out {self.out}: cannot write in {self.out.parent}: {err}")

    @property
    def roles(self) -> list[str]:
        return list(ROLES[: self.segments])


@dataclass(frozen=True)
class Unit:
    """What one choice serves: a layer's key/value heads (each with its query heads)."""

    layer: int
    kv_heads: tuple[int, ...]

    def label(self, all_heads: bool) -> str:
        return (
            f"L{self.layer}" if all_heads else f"L{self.layer}h{'-'.join(map(str, self.kv_heads))}"
        )


@dataclass(frozen=True)
class TextInfo:
    """The calibration text: how it is named, its hash, its token ids [1, T]."""

    name: str
    sha256: str
    ids: torch.Tensor


class ModelReporter:
    """Hooks the job calls as it goes; this base says nothing (library use)."""

    def phase(self, text: str) -> None:
        """A step of the job begins (capture, sensitivities, a verification round...)."""

    def start_units(self, labels: list[str], trials: int) -> None:
        """The studies begin: one row per unit, ``trials`` per recipe."""

    def trial_done(self, label: str, recipe: str, done: int, best: str) -> None:
        """A trial of ``recipe`` on unit ``label`` finished (``done`` for that recipe)."""

    def shared_trial_done(self, recipe: str, done: int, total: int, front: list[Point]) -> None:
        """A model-wide trial of ``recipe`` finished (``done`` of ``total``); ``front``: the
        Pareto front of its trials so far (mean error and cost over the units)."""

    def unit_done(self, label: str, front: list[Point]) -> None:
        """A unit's studies are done; ``front`` is its Pareto front over every recipe."""


@dataclass
class ModelTuneResult:
    """The file written, the length's entry, and per unit its points and its choice."""

    tuned: ModelTunedFile
    seq_len: int
    points: dict[Unit, list[Point]] = field(default_factory=dict)
    chosen: dict[Unit, Point] = field(default_factory=dict)

    @property
    def entry(self) -> LengthTuning:
        return self.tuned.lengths[self.seq_len]


def tune_model(
    model: PreTrainedModel,
    model_name: str,
    text: TextInfo,
    config: ModelTuneConfig,
    reporter: ModelReporter | None = None,
) -> ModelTuneResult:
    """Tune every layer of ``model`` at ``config.seq_len``; writes ``config.out``."""
    return ModelTuneJob(model, model_name, text, config, reporter or ModelReporter()).run()


class UnitData:
    """A unit's Q/K/V on each segment (float32, tuning device) and exact outputs, on demand."""

    def __init__(self, job: ModelTuneJob, unit: Unit):
        self.job = job
        self.unit = unit
        self._items: dict[str, list[QKVItem]] = {}
        self._exact: dict[str, list[torch.Tensor]] = {}
        self._exact_ms: float | None = None
        self._calibration: Calibration | None = None

    def items(self, role: str) -> list[QKVItem]:
        if role not in self._items:
            capture = self.job.captures[role]
            q, k, v = capture.qkv[self.unit.layer]
            group = q.shape[1] // k.shape[1]
            kv = list(self.unit.kv_heads)
            qh = [h * group + i for h in kv for i in range(group)]
            name = f"{self.job.model_name}:{role}@{capture.segment.offset}:layer{self.unit.layer}"
            item = QKVItem(name, q[:, qh], k[:, kv], v[:, kv]).to(self.job.device, torch.float32)
            self._items[role] = [item]
        return self._items[role]

    def exact(self, role: str) -> list[torch.Tensor]:
        if role not in self._exact:
            items = self.items(role)
            held: list[list[torch.Tensor]] = []
            with torch.no_grad():
                timing = measure(
                    lambda: held.append([exact_attention(x.q, x.k, x.v, True) for x in items]),
                    self.job.device,
                    warmup=int(role == "fit"),  # the fit segment's call times exact attention
                    repeats=1,
                )
            self._exact[role] = held[-1]
            if role == "fit":
                self._exact_ms = timing.median_ms / len(items)
        return self._exact[role]

    def frac(self, point: Point) -> float:
        """The point's frac on the fit segment (measured by the trials with cost products)."""
        if point.is_exact:
            return 1.0
        if not math.isnan(point.frac):
            return point.frac
        attn = self.job.tuning_module(point)
        fracs = [run_counted(attn, x.q, x.k, x.v, True)[1] for x in self.items("fit")]
        return sum(fracs) / len(fracs)

    def exact_sq(self, role: str) -> float:
        """Squared norm of the exact output (the unit's weight in its layer's error)."""
        return sum(float(o.double().square().sum()) for o in self.exact(role))

    def calibration(self) -> Calibration:
        """The fit segment as the tuner's calibration (exact attention timed once)."""
        if self._calibration is None:
            exact = self.exact("fit")
            items = self.items("fit")
            if self.job.config.cost == "latency":
                self._exact_ms = time_exact(items, True, self.job.device, self.job.config.backend)
            self._calibration = Calibration(items, exact, True, self.job.device, self._exact_ms)
        return self._calibration

    def error(self, point: Point, role: str) -> float:
        """The point's relative error on a segment (as it runs: the recipe's own seeds)."""
        if point.is_exact:
            return 0.0
        if role == "fit":
            return point.error
        attn = self.job.tuning_module(point)
        with torch.no_grad():
            outs = [attn(x.q, x.k, x.v, is_causal=True) for x in self.items(role)]
        errors = [relative_error(o, e) for o, e in zip(outs, self.exact(role), strict=True)]
        return sum(errors) / len(errors)


class ModelTuneJob:
    """One tune-model run (see the module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        model_name: str,
        text: TextInfo,
        config: ModelTuneConfig,
        reporter: ModelReporter,
    ):
        config.check()
        self.model = model
        self.model_name = model_name
        self.text = text
        self.config = config
        self.reporter = reporter
        self.recipes = load_recipes(config.recipes)
        self.shape = ModelShape.of(model.config, model_name)
        self.device = torch.device(
            config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.base_file = _start_file(config.out, self.shape)
        self.captures: dict[str, SegmentCapture] = {}
        self.units = self._units()
        self._errors: dict[tuple, float] = {}
        self._exact_sq: dict[tuple[Unit, str], float] = {}
        self._data: dict[Unit, UnitData] = {}
        self.seconds: dict[str, float] = {}
        self.notes: list[str] = []

    # -- setup -------------------------------------------------------------------------------

    def _units(self) -> list[Unit]:
        heads = range(self.shape.num_kv_heads)
        groups = [(h,) for h in heads] if self.config.per_head else [tuple(heads)]
        return [Unit(i, g) for i in range(self.shape.num_layers) for g in groups]

    def label(self, unit: Unit) -> str:
        return unit.label(not self.config.per_head)

    def data(self, unit: Unit) -> UnitData:
        """The unit's Q/K/V and exact outputs per segment (kept for the run)."""
        if unit not in self._data:
            self._data[unit] = UnitData(self, unit)
        return self._data[unit]

    def _capture(self) -> None:
        cache = self.config.cache or default_cache_dir()
        segments = split_segments(self.text.ids, self.config.seq_len, self.config.roles)
        for seg in segments:
            self.reporter.phase(f"Q/K/V of the {seg.role} segment (tokens from {seg.offset})")
            self.captures[seg.role] = capture_segment(
                self.model, self.model_name, self.text.sha256, seg, cache
            )

    # -- studies -----------------------------------------------------------------------------

    def _base_name(self) -> str:
        if self.config.study:
            return self.config.study
        fit = self.captures["fit"].segment.offset
        key = [self.model_name, self.text.sha256, fit, self.config.cost, self.config.backend]
        digest = hashlib.sha256(json.dumps([*key, self.config.n_seeds]).encode()).hexdigest()
        return f"{self.model_name}-{digest[:10]}"

    def _study_name(self, base: str, scope: str, recipe_name: str | None = None) -> str:
        """``base:device:nN:scope``, then ``:recipe-digest`` for a recipe's study. Scopes: a
        unit (``L3:h0-1-2``), the model-wide studies (``all-layers``, ``all-heads``) and
        ``sensitivity`` (its attributes keep the measured sensitivities; no trials)."""
        name = f"{base}:{device_name(self.device)}:n{self.config.seq_len}:{scope}"
        if recipe_name is None:
            return name
        digest = hashlib.sha256(self.recipes[recipe_name].dump_yaml().encode()).hexdigest()
        return f"{name}:{recipe_name}-{digest[:8]}"

    def _unit_scope(self, unit: Unit) -> str:
        return f"L{unit.layer}:h{'-'.join(map(str, unit.kv_heads))}"

    def _meta(self, recipe_name: str | None) -> dict[str, Any]:
        fit = self.captures["fit"].segment.offset
        recipe = "" if recipe_name is None else self.recipes[recipe_name].dump_yaml()
        return {
            "recipe_sha256": hashlib.sha256(recipe.encode()).hexdigest(),
            "data": f"{self.model_name} on text {self.text.sha256[:16]} from token {fit}",
            "seq_len": self.config.seq_len,
            "seeds": self.config.n_seeds,
            "backend": self.config.backend,
            "cost": self.config.cost,
        }

    def _sampler(self, done: int, trials: int = 0) -> optuna.samplers.TPESampler:
        """TPE (multivariate: a recipe's knobs act together) seeded per study state."""
        salt = os.getpid() if self.config.storage else 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=hash((self.config.seed, done, salt)) % 2**31,
                n_startup_trials=min(10, max(2, trials // 3)),
                multivariate=True,
            )

    def _evaluator(self, name: str, calib: Calibration) -> Evaluator:
        return Evaluator(
            self.recipes[name],
            calib,
            math.inf,  # no target: every point may be on the front
            self.config.backend,
            self.config.n_seeds,
            repeats=0 if self.config.cost == "products" else 3,
            cost=self.config.cost,
        )

    def _shared_studies(self, storage, base: str) -> dict[str, optuna.Study]:
        """Per recipe the model-wide study: each trial one knob setting on every unit."""
        studies = {}
        if not self.config.shared_trials:
            return studies
        calibs = [self.data(u).calibration() for u in self.units]
        scope = "all-heads" if self.config.per_head else "all-layers"
        for name, recipe in self.recipes.items():
            study_name = self._study_name(base, scope, name)
            meta = {**self._meta(name), "units": [self.label(u) for u in self.units]}
            sampler = self._shared_sampler(recipe, 0)
            study = open_study(storage, study_name, sampler, meta, DIRECTIONS)
            study.sampler = self._shared_sampler(recipe, len(study.trials))
            if not study.trials:
                study.enqueue_trial(defaults(recipe), skip_if_exists=True)
            objective = SharedObjective(
                [self._evaluator(name, c) for c in calibs], search_space(recipe)
            )

            def on_trial(s: optuna.Study, name: str = name) -> None:
                done = finished_trials(s)
                front = pareto(trial_points(name, done))
                self.reporter.shared_trial_done(name, len(done), self.config.shared_trials, front)

            on_trial(study)
            run_trials(study, objective, self.config.shared_trials, None, on_trial)
            studies[name] = study
        return studies

    def _shared_sampler(self, recipe, done: int) -> optuna.samplers.BaseSampler:
        """Gaussian-process Bayesian optimisation (expected hypervolume improvement) for the
        model-wide studies: each trial runs every layer, so few trials must find the front
        (TPE's 16 trials mostly sampled around it, missing e.g. topp's high-coverage corner)."""
        salt = os.getpid() if self.config.storage else 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(
                seed=hash((self.config.seed, done, salt, "shared")) % 2**31,
                n_startup_trials=min(8, max(2, self.config.shared_trials // 3)),
                deterministic_objective=not seed_knobs(recipe),
            )

    def _tune_units(
        self, storage, base: str, shared: dict[str, optuna.Study]
    ) -> dict[Unit, list[Point]]:
        per_recipe = self.config.shared_trials * bool(shared) + self.config.trials
        self.reporter.start_units([self.label(u) for u in self.units], per_recipe)
        exact: dict[Unit, Point] = {}
        studies: dict[Unit, dict[str, optuna.Study]] = {}
        previous: list[Point] = []
        for index, unit in enumerate(self.units):
            calib = self.data(unit).calibration()
            exact[unit] = self._exact_point(calib)
            studies[unit] = {
                name: self._run_study(
                    storage, base, (index, unit), name, calib, previous, shared.get(name)
                )
                for name in self.recipes
            }
            previous = self._points(exact[unit], studies[unit])
            self.reporter.unit_done(self.label(unit), pareto(previous))
        # read again at the end: other workers may have finished trials since
        points = {unit: self._points(exact[unit], studies[unit]) for unit in self.units}
        self._note_frac_one(points, studies)
        return points

    def _note_frac_one(
        self, points: dict[Unit, list[Point]], studies: dict[Unit, dict[str, optuna.Study]]
    ) -> None:
        """Say which units run exact attention because each of their trials computed every
        product (frac 1; exact attention is all their front holds), as tune says it."""
        units = [
            u
            for u in self.units
            if len(points[u]) == 1 and any(finished_trials(s) for s in studies[u].values())
        ]
        if units:
            goal = "the target" if self.config.target_err is not None else "the perplexity budget"
            self.notes.append(f"{self._run_exact(units)}: {frac_one_reason(goal)}")

    def _run_exact(self, units: list[Unit]) -> str:
        """The words for ``units`` running exact attention: every layer, or which."""
        if len(units) == len(self.units):
            return "every layer runs exact attention"
        return f"{', '.join(self.label(u) for u in units)} run exact attention"

    def _points(self, exact: Point, studies: dict[str, optuna.Study]) -> list[Point]:
        found = [exact]
        for name, study in studies.items():
            found += trial_points(name, finished_trials(study))
        return found

    def _exact_point(self, calib: Calibration) -> Point:
        ms = calib.exact_latency_ms
        cost = 1.0 if self.config.cost == "products" else ms
        return Point(None, None, error=0.0, cost=cost, frac=1.0, latency_ms=ms)

    def _run_study(
        self,
        storage,
        base: str,
        indexed: tuple[int, Unit],
        name: str,
        calib: Calibration,
        previous: list[Point],
        shared: optuna.Study | None,
    ) -> optuna.Study:
        index, unit = indexed
        recipe = self.recipes[name]
        study_name = self._study_name(base, self._unit_scope(unit), name)
        study = open_study(storage, study_name, self._sampler(0), self._meta(name), DIRECTIONS)
        held = 0 if shared is None else _add_shared(study, shared, index)
        study.sampler = self._sampler(len(study.trials), self.config.trials)
        own = [t for t in study.trials if SHARED_TRIAL not in t.user_attrs]
        if not own and self.config.trials:
            # at most half the budget: two workers seeding a fresh study at once still leave
            # no enqueued trial unrun
            design = [defaults(recipe), *_transfer([p for p in previous if p.recipe == name])]
            for knobs in design[: max(1, self.config.trials // 2)]:
                study.enqueue_trial(knobs, skip_if_exists=True)
        label = self.label(unit)

        def on_trial(s: optuna.Study) -> None:
            done = finished_trials(s)
            front = pareto(trial_points(name, done))
            best = f"{len(front)} on the front" if front else ""
            self.reporter.trial_done(label, name, len(done), best)

        on_trial(study)
        run_trials(
            study,
            FrontObjective(self._evaluator(name, calib), search_space(recipe)),
            held + self.config.trials,
            None,
            on_trial,
        )
        return study

    # -- the runtime of choices ----------------------------------------------------------------

    def tuning_module(self, point: Point) -> torch.nn.Module:
        """The compiled attention of a point. Not kept: each module keeps its workspace
        (buffers as large as a call's intermediates), and a run measures hundreds of points;
        what is measured with it is kept instead (:meth:`unit_error`)."""
        recipe = "exact" if point.is_exact else self.recipes[point.recipe].with_knobs(point.knobs)
        return compile_recipe(recipe, backend=self.config.backend)

    def unit_error(self, data: UnitData, point: Point, role: str) -> float:
        """``data.error`` cached per (unit, point, role)."""
        key = (data.unit, point.recipe, _knob_key(point.knobs), role)
        if key not in self._errors:
            self._errors[key] = data.error(point, role)
        return self._errors[key]

    def provisional(self, chosen: dict[Unit, Point]) -> ModelTuning:
        """A :class:`ModelTuning` of some choices (others exact), to run forward passes with."""
        entry = self._entry(chosen, {}, {}, {}, provisional=True)
        tuned = self.base_file.with_length(self.config.seq_len, entry, self._recipe_dumps())
        return ModelTuning(tuned, backend=self.config.backend, source=str(self.config.out))

    def _recipe_dumps(self) -> dict[str, dict]:
        return {n: r.model_dump(mode="json", exclude_none=True) for n, r in self.recipes.items()}

    # -- choosing ------------------------------------------------------------------------------

    def _choose_target(self, points: dict[Unit, list[Point]]) -> dict[Unit, Point]:
        target = self.config.target_err
        chosen = {}
        self.reporter.phase("choosing per unit: cheapest within the target on fit and check")
        for unit, found in points.items():
            data = self.data(unit)
            check = None
            if "check" in self.captures:
                check = lambda p, data=data: self.unit_error(data, p, "check")
            chosen[unit] = cheapest_within(pareto(found), target, check)
        # exact for want of a point within the target (a front of exact attention alone is
        # _note_frac_one's): said, with the least error reached, as tune says it of a recipe
        missed = [u for u, p in chosen.items() if p.is_exact and len(points[u]) > 1]
        if missed:
            least = min(p.error for u in missed for p in points[u] if not p.is_exact)
            where = "fit and check segments" if "check" in self.captures else "fit segment"
            self.notes.append(
                f"{self._run_exact(missed)}: no trial met the error target {target:g} on the "
                f"{where} (least error {least:.3g} on the fit segment)"
            )
        return chosen

    def _layer_fronts(self, points: dict[Unit, list[Point]]) -> dict[int, list[Combo]]:
        fronts = {}
        for layer in range(self.shape.num_layers):
            units = [u for u in self.units if u.layer == layer]
            weights = self._weights(units, "fit")
            fronts[layer] = layer_front([pareto(points[u]) for u in units], weights)
        return fronts

    def _combo_choices(self, layer: int, combo: Combo) -> dict[Unit, Point]:
        units = [u for u in self.units if u.layer == layer]
        return dict(zip(units, combo.points, strict=True))

    def _choose_budget(
        self, points: dict[Unit, list[Point]], store: optuna.Study
    ) -> tuple[dict[Unit, Point], dict[int, Curve], dict[str, tuple[float, float]]]:
        """Allocate by measured sensitivity, verify with forward passes, tighten until it holds.

        Returns the choices, the sensitivity curves and the verified (ppl, frac) per role."""
        budget = math.log1p(self.config.ppl_budget)
        fronts = self._layer_fronts(points)
        with self._phase("sensitivity"):
            curves = self._sensitivities(fronts, budget, store)
        with self._phase("verify"):
            chosen, forwards = self._verify(fronts, curves, budget)
        return chosen, curves, forwards

    def _sensitivities(
        self, fronts: dict[int, list[Combo]], budget: float, store: optuna.Study
    ) -> dict[int, Curve]:
        """Each layer's curve: first measured near ``sensitivity_error``, then again wherever
        the allocation to ``budget`` takes a layer far from what was measured on it
        (:meth:`Curve.far`, :func:`measure_next`). Measurements are kept in ``store`` (a
        rerun, with any budget, reuses them)."""
        fit = self.captures["fit"]
        replay = None
        curves = {layer: Curve() for layer in fronts}

        def measure_layer(layer: int, combo: Combo) -> None:
            nonlocal replay
            if combo.error <= 0:
                return
            key = _sensitivity_key(layer, combo)
            growth = store.user_attrs.get(key)  # one storage read
            if growth is None:
                if replay is None:
                    replay = LayerReplay(self.model, fit.segment.ids)
                attn = self.provisional(self._combo_choices(layer, combo)).layer(layer)
                growth = dataclasses.asdict(replay.growth(layer, attn))
                store.set_user_attr(key, growth)
            curves[layer].add(combo.error, growth["mean"], growth["se"])

        for layer, front in fronts.items():
            self.reporter.phase(f"sensitivity of layer {layer} ({layer + 1}/{len(fronts)})")
            measure_layer(layer, reference_combo(front, self.config.sensitivity_error))
        for _ in range(REFINE_ROUNDS):
            # a layer the allocation takes far from what was measured on it is measured there
            # (far below it, or past the curve's reach: else it could never be chosen there),
            # stepping out at most to the reach (a round per step)
            alloc = allocate(fronts, curves, budget, bounded=False)
            far = {
                layer: measure_next(fronts[layer], curves[layer], c)
                for layer, c in alloc.items()
                if curves[layer].far(c.error)
            }
            if not far:
                break
            for layer, combo in far.items():
                self.reporter.phase(f"sensitivity of layer {layer} at error {combo.error:.3g}")
                measure_layer(layer, combo)
        return curves

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Record the wall and CPU seconds (all threads) of a phase of the run."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[f"{name}_s"] = time.perf_counter() - wall
            self.seconds[f"{name}_cpu_s"] = time.process_time() - cpu

    def _verify(
        self, fronts: dict[int, list[Combo]], curves: dict[int, Curve], budget: float
    ) -> tuple[dict[Unit, Point], dict[str, tuple[float, float]]]:
        """Forward passes on the fit and check segments; the predicted budget is scaled until
        the measured growth is within ``budget`` on both (exact attention always is). Keeps the
        cheapest allocation that held."""
        roles = [r for r in ("fit", "check") if r in self.captures]
        exact = Point(None, None, error=0.0, cost=0.0, frac=1.0, latency_ms=0.0)
        best = (
            dict.fromkeys(self.units, exact),
            {r: (self.captures[r].exact_ppl, 1.0) for r in roles},
        )
        best_cost = math.inf
        lo = hi = None  # predicted budgets that held / did not
        predicted = budget
        seen: list[tuple[dict[int, Combo], float]] = []  # allocations measured, their growth
        for round_ in range(self.config.max_rounds):
            alloc = allocate(fronts, curves, predicted)
            nudges = 0
            while (growth := next((g for a, g in seen if a == alloc), None)) is not None:
                nudges += 1
                if nudges > MAX_NUDGES:  # every allocation within reach is measured
                    predicted = None
                    break
                # measured already: move the predicted budget past it (the allocation is
                # discrete, so a small step can give the same one again)
                if growth <= budget:
                    lo = predicted if lo is None else max(lo, predicted)
                else:
                    hi = predicted if hi is None else min(hi, predicted)
                predicted = _next_budget(lo, hi, predicted)
                if predicted is None:
                    break
                alloc = allocate(fronts, curves, predicted)
            if predicted is None:
                break
            chosen = {u: p for i, c in alloc.items() for u, p in self._combo_choices(i, c).items()}
            measured = self._forwards(chosen, roles)
            growth = max(
                math.log(ppl / self.captures[r].exact_ppl) for r, (ppl, _) in measured.items()
            )
            seen.append((alloc, growth))
            self.reporter.phase(
                f"round {round_ + 1}: perplexity {math.expm1(growth):+.2%} "
                f"(budget {self.config.ppl_budget:+.2%}) at frac {measured['fit'][1]:.3f}, "
                f"predicted {math.expm1(predicted):+.2%}"
            )
            if growth <= budget:
                cost = sum(c.cost for c in alloc.values())
                if cost < best_cost:
                    best, best_cost = (chosen, measured), cost
                if growth >= GOOD_ENOUGH * budget:
                    break
                lo = predicted
            else:
                hi = predicted
            if lo is not None and hi is not None:
                predicted = math.sqrt(lo * hi)
            else:  # scale by how far off the measurement was (at most 4x per round)
                predicted *= min(4.0, max(0.25, 0.95 * budget / max(growth, 1e-9)))
        if best_cost == math.inf:
            self.notes.append(
                f"no allocation met the perplexity budget in {len(seen)} rounds; "
                "every layer runs exact attention"
            )
        return best

    def _forwards(
        self, chosen: dict[Unit, Point], roles: list[str]
    ) -> dict[str, tuple[float, float]]:
        """(perplexity, frac) of a forward pass with ``chosen`` on each segment of ``roles``."""
        tuning = self.provisional(chosen)
        out = {}
        for role in roles:
            self.reporter.phase(f"forward pass on the {role} segment")
            out[role] = perplexity_and_frac(self.model, self.captures[role].segment.ids, tuning)
        return out

    # -- the file ------------------------------------------------------------------------------

    def _entry(
        self,
        chosen: dict[Unit, Point],
        errors: dict[tuple[Unit, str], float],
        forwards: dict[str, tuple[float, float]],
        curves: dict[int, Curve],
        provisional: bool = False,
        decode: dict[Unit, tuple[float, float]] | None = None,
    ) -> LengthTuning:
        roles = list(self.captures)
        layers = {}
        decode = decode or {}
        for layer in range(self.shape.num_layers):
            units = [u for u in self.units if u.layer == layer]
            choices = [self._choice(u, chosen.get(u), errors, roles, decode.get(u)) for u in units]
            layers[layer] = LayerTuning(
                choices=choices,
                errors=self._layer_errors(units, errors, roles) if errors else {},
                frac=sum(c.frac for c in choices) / len(choices),
                sensitivity=[list(p) for p in curves[layer].measured] if layer in curves else None,
            )
        segments = [
            Segment(
                role=role,
                offset=cap.segment.offset,
                exact_ppl=cap.exact_ppl,
                ppl=forwards.get(role, (None, None))[0],
                frac=forwards.get(role, (None, None))[1],
            )
            for role, cap in self.captures.items()
        ]
        error_mean = {}
        if errors:
            for role in roles:
                error_mean[role] = sum(lt.errors[role] for lt in layers.values()) / len(layers)
        return LengthTuning(
            device=device_name(self.device),
            cost=self.config.cost,
            per_head=self.config.per_head,
            target_err=self.config.target_err,
            ppl_budget=self.config.ppl_budget,
            recipes_tried=list(self.recipes),
            trials=self.config.trials,
            shared_trials=self.config.shared_trials,
            text=self.text.name,
            text_sha256=self.text.sha256,
            segments=segments,
            layers=layers,
            error_mean=error_mean,
            frac=sum(lt.frac for lt in layers.values()) / len(layers),
            notes=[] if provisional else list(self.notes),
            seconds={} if provisional else dict(self.seconds),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            versions=versions(),
        )

    def _choice(
        self,
        unit: Unit,
        point: Point | None,
        errors: dict[tuple[Unit, str], float],
        roles: list[str],
        decode: tuple[float, float] | None = None,
    ) -> Choice:
        if point is None or point.is_exact:
            return Choice(
                kv_heads=list(unit.kv_heads),
                errors={r: 0.0 for r in roles} if errors else {},
                frac=1.0,
                latency_ms=point.latency_ms if point is not None and point.latency_ms else None,
            )
        return Choice(
            kv_heads=list(unit.kv_heads),
            recipe=point.recipe,
            knobs=point.knobs,
            errors={r: errors[(unit, r)] for r in roles} if errors else {},
            frac=point.frac,
            latency_ms=point.latency_ms,
            decode_latency_ms=None if decode is None else decode[0],
            exact_decode_latency_ms=None if decode is None else decode[1],
            trial=point.trial,
        )

    def _weights(self, units: list[Unit], role: str) -> list[float]:
        """Each unit's share of its layer's exact output squared norm on a segment (cached)."""
        if len(units) == 1:
            return [1.0]
        for u in units:
            if (u, role) not in self._exact_sq:
                self._exact_sq[(u, role)] = self.data(u).exact_sq(role)
        total = sum(self._exact_sq[(u, role)] for u in units)
        return [self._exact_sq[(u, role)] / total for u in units]

    def _layer_errors(
        self, units: list[Unit], errors: dict[tuple[Unit, str], float], roles: list[str]
    ) -> dict[str, float]:
        """Each segment's error over the layer's heads: sqrt(sum of w_g e_g^2)."""
        out = {}
        for role in roles:
            weights = self._weights(units, role)
            out[role] = math.sqrt(
                sum(w * errors[(u, role)] ** 2 for w, u in zip(weights, units, strict=True))
            )
        return out

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> ModelTuneResult:
        with self._phase("total"):
            if self.device.type != "cpu":
                self.model.to(self.device)
            with self._phase("capture"):
                self._capture()
            storage = open_storage(self.config.storage or default_storage_url(self.config.out))
            base = self._base_name()
            with self._phase("shared"):
                shared = self._shared_studies(storage, base)
            with self._phase("studies"):
                points = self._tune_units(storage, base, shared)
            curves: dict[int, Curve] = {}
            if self.config.target_err is not None:
                with self._phase("choose"):
                    chosen = self._choose_target(points)
                forwards: dict[str, tuple[float, float]] = {}
            else:
                name = self._study_name(base, "sensitivity")
                store = open_study(storage, name, self._sampler(0), self._meta(None))
                chosen, curves, forwards = self._choose_budget(points, store)
            with self._phase("final"):
                errors = self._final_errors(chosen)
                missing = [r for r in self.captures if r not in forwards]
                forwards.update(self._forwards(chosen, missing))
                decode = self._decode_times(chosen)
        self._note_target(chosen, errors)
        entry = self._entry(chosen, errors, forwards, curves, decode=decode)
        out, used = self.config.out, self._used_recipes(chosen)
        with folder_lock(out):  # read again: lengths other workers wrote meanwhile stay
            current = _start_file(out, self.shape)
            old = current.lengths.get(self.config.seq_len)
            if old is not None:  # one entry a length: say which one this replaces
                self.reporter.phase(
                    f"{out}: replacing the entry of n={self.config.seq_len} ({_goal(old)}) by "
                    f"this tuning's ({_goal(entry)}); its trials stay in the storage"
                )
            tuned = current.with_length(self.config.seq_len, entry, used)
            write_model_tuned(out, tuned)
        return ModelTuneResult(tuned, self.config.seq_len, points, chosen)

    def _final_errors(self, chosen: dict[Unit, Point]) -> dict[tuple[Unit, str], float]:
        """Each choice's error on every segment (and its frac where the trials did not count
        it, cost latency: ``chosen`` is updated)."""
        self.reporter.phase("measuring the choices on every segment")
        errors = {}
        for unit, point in list(chosen.items()):
            data = self.data(unit)
            chosen[unit] = dataclasses.replace(point, frac=data.frac(point))
            for role in self.captures:
                errors[(unit, role)] = self.unit_error(data, point, role)
        return errors

    def _decode_times(self, chosen: dict[Unit, Point]) -> dict[Unit, tuple[float, float]]:
        """(ms, exact attention's ms) of one decode step of each approximate choice on its
        unit's heads (the fit segment's last query after its keys): a layer's decode steps
        run exact attention where its choice's is no faster."""
        self.reporter.phase("timing a decode step of each choice")
        backend = self.config.backend
        return {
            unit: time_decode(
                self.tuning_module(point), self.data(unit).items("fit"), self.device, backend
            )
            for unit, point in chosen.items()
            if not point.is_exact
        }

    def _note_target(self, chosen: dict[Unit, Point], errors: dict) -> None:
        target = self.config.target_err
        if target is None or "test" not in self.captures:
            return
        layers = self.shape.num_layers
        mean = (
            sum(
                self._layer_errors([u for u in self.units if u.layer == i], errors, ["test"])[
                    "test"
                ]
                for i in range(layers)
            )
            / layers
        )
        if mean > target:
            self.notes.append(
                f"mean per-layer error on the test segment {mean:.4g} exceeds the target {target:g}"
            )

    def _used_recipes(self, chosen: dict[Unit, Point]) -> dict[str, dict]:
        used = {p.recipe for p in chosen.values() if not p.is_exact}
        return {n: d for n, d in self._recipe_dumps().items() if n in used}


def _add_shared(study: optuna.Study, shared: optuna.Study, index: int) -> int:
    """Copy into a unit's study, as finished trials of its own, the model-wide trials it does
    not hold yet (unit ``index``'s error and cost in each); how many copies it holds now."""
    held = {
        t.user_attrs[SHARED_TRIAL]
        for t in study.get_trials(deepcopy=False)
        if SHARED_TRIAL in t.user_attrs
    }
    new = []
    for t in shared.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number in held or "unit_errors" not in t.user_attrs:
            continue
        attrs = t.user_attrs
        new.append(
            optuna.trial.create_trial(
                params=t.params,
                distributions=t.distributions,
                values=[attrs["unit_errors"][index], attrs["unit_costs"][index]],
                user_attrs={
                    "error_mean": attrs["unit_errors"][index],
                    "frac": attrs["unit_fracs"][index],
                    "latency_ms": attrs["unit_latency_ms"][index],
                    SHARED_TRIAL: t.number,
                },
            )
        )
    study.add_trials(new)
    # counted again: two workers copying at once each add the copies (harmless: the same
    # values twice); the larger count then keeps their own trials at the number asked
    return sum(SHARED_TRIAL in t.user_attrs for t in study.get_trials(deepcopy=False))


def _next_budget(lo: float | None, hi: float | None, predicted: float) -> float | None:
    """A predicted budget between those that held (``lo``) and failed (``hi``), a step of
    :data:`NUDGE` beyond the only bound known, or None once the bounds meet."""
    if lo is not None and hi is not None:
        return math.sqrt(lo * hi) if hi > 1.01 * lo else None
    return predicted * NUDGE if hi is None else predicted / NUDGE


def _sensitivity_key(layer: int, combo: Combo) -> str:
    """Names a layer's choice (every unit's recipe and knobs) among stored sensitivities."""
    choice = [[p.recipe, sorted((p.knobs or {}).items())] for p in combo.points]
    digest = hashlib.sha256(json.dumps(choice).encode()).hexdigest()[:24]
    return f"sensitivity:L{layer}:{digest}"


def _knob_key(knobs: dict | None) -> tuple | None:
    return None if knobs is None else tuple(sorted(knobs.items()))


def _transfer(points: list[Point]) -> list[dict[str, Any]]:
    """Up to :data:`TRANSFER` knob settings spread along a previous unit's front."""
    front = pareto(points)
    if len(front) <= TRANSFER:
        return [p.knobs for p in front]
    step = (len(front) - 1) / (TRANSFER - 1)
    return [front[round(i * step)].knobs for i in range(TRANSFER)]


def load_recipes(names: tuple[str, ...]) -> dict[str, Any]:
    """Recipes by their own names; each must have tunable knobs and a distinct name."""
    recipes = {}
    for spec in names:
        recipe = load_recipe(spec)
        search_space(recipe)
        if recipe.name in recipes:
            raise TunerError(f"--recipes names two recipes called {recipe.name!r}")
        recipes[recipe.name] = recipe
    return recipes


def check_out_file(out: Path, card: Any) -> None:
    """Refuse at once, from the model's card, an --out file tuned for a model with other layer
    or key/value head counts (the full shape is checked once the model is loaded)."""
    if not out.exists():
        return
    try:
        old = read_model_tuned(out)
    except ModelTuningError as err:
        raise TunerError(f"--out {out}: {err.reason}; choose another --out") from None
    if (old.model.num_layers, old.model.num_kv_heads) != (card.layers, card.kv_heads):
        raise TunerError(
            f"--out {out} holds a tuning of {old.model.name} ({old.model.describe()}), not of "
            f"{card.name} ({card.layers} layers, {card.kv_heads} key-value heads); choose "
            "another --out"
        )


def _goal(entry) -> str:
    """What a length's entry was tuned for, in the options' words."""
    if entry.target_err is not None:
        return f"--target-err {entry.target_err:g}"
    return f"--ppl-budget {entry.ppl_budget:g}" if entry.ppl_budget is not None else "no goal"


def _start_file(out: Path, shape: ModelShape) -> ModelTunedFile:
    """The file to add a length to: the existing one if it is for this model, else a new one."""
    fresh = ModelTunedFile(model=shape)
    if not out.exists():
        return fresh
    try:
        old = read_model_tuned(out)
    except ModelTuningError as err:
        raise TunerError(f"--out {out}: {err.reason}; choose another --out") from None
    if old.model != shape:
        raise TunerError(
            f"--out {out} holds a tuning of {old.model.name} ({old.model.describe()}), not of "
            f"{shape.name} ({shape.describe()}); choose another --out"
        )
    return old


__all__ = [
    "ModelReporter",
    "ModelTuneConfig",
    "ModelTuneJob",
    "ModelTuneResult",
    "TextInfo",
    "Unit",
    "load_recipes",
    "tune_model",
]
