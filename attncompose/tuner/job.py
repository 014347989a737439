"""A tuning job: every requested length, one study each, results merged into the tuned file."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch

from attncompose.spec.recipe import load_recipe
from attncompose.tuned import Candidate, TunedEntry, TunedFile, device_name, read_tuned, write_tuned
from attncompose.tuner.errors import TunerError
from attncompose.tuner.objective import (
    Calibration,
    Evaluator,
    Objective,
    best_feasible,
    build_calibration,
    time_exact,
)
from attncompose.tuner.space import defaults, search_space, seed_variants
from attncompose.tuner.study import (
    default_storage_url,
    finished_trials,
    open_storage,
    open_study,
    run_trials,
    study_name,
)

COSTS = ("latency", "products")


@dataclass(frozen=True)
class TuneConfig:
    """What to tune for and how long; ``timeout_s`` applies to each length."""

    target_err: float
    seq_lens: tuple[int, ...] = (4096,)
    causal: bool = True
    data: Path | None = None
    trials: int = 40
    timeout_s: float | None = None
    seed: int = 0
    n_seeds: int = 3
    repeats: int = 3
    latency_budget_ms: float | None = None
    cost: str = "latency"  # what to minimise: "latency" (measured) or "products" (frac)
    backend: str = "auto"
    device: str | None = None
    storage: str | None = None
    study: str | None = None
    out: Path = Path("tuned.yaml")

    def check(self) -> None:
        """Raise :class:`TunerError` for settings that cannot work."""
        if not self.target_err > 0:
            raise TunerError(f"--target-err must be positive, got {self.target_err}")
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise TunerError(f"--seq-lens must be positive lengths, got {list(self.seq_lens)}")
        if self.trials < 1 or self.n_seeds < 1 or self.repeats < 1:
            raise TunerError("--trials, seeds and repeats must be at least 1")
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise TunerError(f"--latency-budget-ms must be positive, got {self.latency_budget_ms}")
        if self.cost not in COSTS:
            raise TunerError(f"--cost must be one of {', '.join(COSTS)}, got {self.cost!r}")
        if self.study is not None and self.storage is None:
            raise TunerError("--study names a study in a shared --storage; give --storage too")
        if not self.out.parent.is_dir():
            raise TunerError(f"--out {self.out}: folder {self.out.parent} does not exist")


class Reporter:
    """Hooks a tuning job calls as it goes; this base says nothing (library use)."""

    def start_length(self, seq_len: int, trials: int, calibration: Calibration) -> None:
        """A length begins: its calibration is loaded and exact attention timed."""

    def trial_done(self, seq_len: int, study: optuna.Study, target_err: float) -> None:
        """A trial of this length finished (in this worker)."""

    def end_length(self, seq_len: int, entry: TunedEntry) -> None:
        """A length is done and its entry written."""


@dataclass
class TuneResult:
    """The tuned file written, and every length's finished trials (for plots and summaries)."""

    tuned: TunedFile
    device: str
    trials: dict[int, list[optuna.trial.FrozenTrial]] = field(default_factory=dict)
    exact_ms: dict[int, float] = field(default_factory=dict)


def tune(recipe, config: TuneConfig, reporter: Reporter | None = None) -> TuneResult:
    """Tune ``recipe`` (name, path or Recipe) per length; writes ``config.out`` after each."""
    config.check()
    reporter = reporter or Reporter()
    source = None if hasattr(recipe, "steps") else str(recipe)
    recipe = load_recipe(recipe)
    search_space(recipe)  # fail early on a recipe with nothing to tune
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dname = device_name(device)
    tuned = _start_file(config.out, recipe, config.causal, source)
    storage = open_storage(config.storage or default_storage_url(config.out))
    base = config.study or _default_study(recipe, config)
    result = TuneResult(tuned, dname)
    for n in config.seq_lens:
        calib = build_calibration(config.data, n, config.causal, device, config.backend)
        reporter.start_length(n, config.trials, calib)
        study, entry = _tune_length(
            recipe, config, calib, storage, study_name(base, dname, n), reporter
        )
        result.tuned = result.tuned.with_entry(dname, n, entry)
        write_tuned(config.out, result.tuned)
        result.trials[n] = finished_trials(study)
        result.exact_ms[n] = entry.exact_latency_ms
        reporter.end_length(n, entry)
    return result


def _tune_length(
    recipe, config: TuneConfig, calib: Calibration, storage, name: str, reporter: Reporter
) -> tuple[optuna.Study, TunedEntry]:
    """Run (or resume, or join) the study of one length and make its entry."""
    evaluator = Evaluator(
        recipe,
        calib,
        config.target_err,
        config.backend,
        config.n_seeds,
        config.repeats,
        cost=config.cost,
    )
    objective = Objective(evaluator, space=search_space(recipe))
    meta = _meta(recipe, config, calib)
    study = open_study(storage, name, _sampler(config, 0), meta)
    study.sampler = _sampler(config, len(study.trials))
    if not study.trials:
        study.enqueue_trial(defaults(recipe), skip_if_exists=True)
    n = calib.seq_len
    run_trials(
        study,
        objective,
        config.trials,
        config.timeout_s,
        lambda s: reporter.trial_done(n, s, config.target_err),
    )
    seeds = len(seed_variants(recipe, config.n_seeds))
    # timed again after the trials: the first timing of a process can carry warm-up costs
    again = time_exact(calib.items, calib.causal, calib.device, config.backend)
    calib = dataclasses.replace(calib, exact_latency_ms=min(calib.exact_latency_ms, again))
    entry = make_entry(
        finished_trials(study), calib, config, seeds, meta["data"], frac_of=evaluator.frac_of
    )
    return study, entry


def _start_file(out: Path, recipe, causal: bool, source: str | None) -> TunedFile:
    """The tuned file to add entries to: the existing one if it holds this recipe and mode."""
    fresh = TunedFile(
        causal=causal, recipe=recipe.model_dump(mode="json", exclude_none=True), source=source
    )
    if not out.exists():
        return fresh
    old = read_tuned(out)
    if old.recipe != fresh.recipe or old.causal != causal:
        raise TunerError(
            f"--out {out} holds a tuning of another recipe or masking mode; "
            "choose another --out or remove the file"
        )
    return old


def _default_study(recipe, config: TuneConfig) -> str:
    digest = hashlib.sha256(
        json.dumps(
            [
                recipe.dump_yaml(),
                config.target_err,
                config.causal,
                str(config.data),
                config.n_seeds,
                config.backend,
                config.cost,
            ]
        ).encode()
    ).hexdigest()
    return f"{recipe.name}-{digest[:10]}"


def _meta(recipe, config: TuneConfig, calib: Calibration) -> dict:
    """What a study is for; workers joining it must agree."""
    origin = calib.items[0].name.split(":")[0]
    data = f"{config.data or 'built-in'} ({origin}, {len(calib.items)} items)"
    return {
        "recipe_sha256": hashlib.sha256(recipe.dump_yaml().encode()).hexdigest(),
        "target_err": config.target_err,
        "causal": config.causal,
        "data": data,
        "seeds": config.n_seeds,
        "backend": config.backend,
        "cost": config.cost,
    }


def _sampler(config: TuneConfig, done: int) -> optuna.samplers.TPESampler:
    """TPE (it reads each trial's error constraint), seeded by ``--seed`` and the number of
    trials already in the study (a resumed run draws new points), plus the process id when
    the storage is shared (workers draw different points)."""
    salt = os.getpid() if config.storage else 0
    return optuna.samplers.TPESampler(
        seed=hash((config.seed, done, salt)) % 2**31,
        n_startup_trials=min(10, max(2, config.trials // 4)),
    )


def make_entry(
    trials: list[optuna.trial.FrozenTrial],
    calib: Calibration,
    config: TuneConfig,
    seeds: int,
    data: str,
    frac_of: Callable[[dict], float] | None = None,
) -> TunedEntry:
    """The (device, length) entry: the fastest feasible knobs, or exact attention and why.

    ``frac_of(knobs)`` counts the products of the chosen knobs when the trials did not (cost
    "latency"): knobs that compute every product exact attention computes (e.g. a splitter
    whose ``min_seq_len`` covers the length) are never chosen over exact attention, whatever
    timing noise says.
    """
    best = best_feasible(trials, config.target_err)
    candidate = (
        None
        if best is None
        else Candidate(
            knobs=best.params,
            error_mean=best.user_attrs["error_mean"],
            error_max=best.user_attrs["error_max"],
            latency_ms=best.user_attrs["latency_ms"],
            frac=best.user_attrs.get("frac"),
        )
    )
    if candidate is not None and candidate.frac is None and frac_of is not None:
        candidate = candidate.model_copy(update={"frac": frac_of(best.params)})
    fallback = _fallback(candidate, calib.exact_latency_ms, config)
    if fallback is None:
        chosen = candidate.model_dump()
    else:
        exact = calib.exact_latency_ms
        chosen = {
            "knobs": None,
            "error_mean": 0.0,
            "error_max": 0.0,
            "latency_ms": exact,
            "frac": 1.0,
        }
    return TunedEntry(
        **chosen,
        fallback=fallback,
        exact_latency_ms=calib.exact_latency_ms,
        best=candidate,
        trials=len(trials),
        target_err=config.target_err,
        latency_budget_ms=config.latency_budget_ms,
        cost=config.cost,
        seeds=seeds,
        data=data,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=versions(),
    )


def _fallback(best: Candidate | None, exact_ms: float, config: TuneConfig) -> str | None:
    """Why exact attention is used instead of ``best`` (None: use ``best``)."""
    budget = config.latency_budget_ms
    if best is None:
        return f"no trial met the error target {config.target_err:g}"
    if budget is not None and best.latency_ms > budget:
        return f"best feasible latency {best.latency_ms:.3g} ms exceeds the budget {budget:g} ms"
    if best.frac is not None and best.frac >= 1.0:
        return f"computes as many products as exact attention (frac {best.frac:.3g})"
    if config.cost == "products":
        return None
    if best.latency_ms >= exact_ms:
        return f"exact attention is faster ({exact_ms:.3g} ms vs {best.latency_ms:.3g} ms)"
    return None


def versions() -> dict[str, str]:
    """Versions of the libraries a measurement depends on."""
    import attncompose

    found = {
        "attncompose": attncompose.__version__,
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.version.cuda:
        found["cuda"] = torch.version.cuda
    return found
