"""A tuning job: every requested length and recipe, one study each; per length the best
across recipes (:mod:`.choice`) goes into the tuned file."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.distributions import CategoricalDistribution

from attncompose.errors import AttncomposeError
from attncompose.runtime.attention import compile as compile_recipe
from attncompose.runtime.compiler import BACKENDS
from attncompose.runtime.files import can_write_beside, folder_lock
from attncompose.runtime.tuned import (
    BACKEND_KNOB,
    COSTS,
    TunedEntry,
    TunedFile,
    device_name,
    read_tuned,
    write_tuned,
)
from attncompose.spec.recipe import RecipeBase, load_recipe
from attncompose.tuner.choice import RecipeRun, Rules, make_entry
from attncompose.tuner.errors import TunerError
from attncompose.tuner.objective import (
    Calibration,
    Evaluator,
    Objective,
    build_calibration,
    time_decode,
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
from attncompose.version import __version__


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
    backends: tuple[str, ...] = ()  # two or more: the implementation is a tunable choice
    device: str | None = None
    storage: str | None = None
    study: str | None = None
    out: Path = Path("tuned.yaml")

    def check(self) -> None:
        """Raise :class:`TunerError` for settings that cannot work."""
        if not 0 < self.target_err < math.inf:
            raise TunerError(f"--target-err must be a positive number, got {self.target_err}")
        if self.timeout_s is not None and not 0 < self.timeout_s < math.inf:
            raise TunerError(
                f"--timeout must be a positive number of seconds, got {self.timeout_s}"
            )
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise TunerError(f"--seq-lens must be positive lengths, got {list(self.seq_lens)}")
        if self.trials < 1 or self.n_seeds < 1 or self.repeats < 1:
            raise TunerError("--trials, seeds and repeats must be at least 1")
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise TunerError(f"--latency-budget-ms must be positive, got {self.latency_budget_ms}")
        if self.cost not in COSTS:
            raise TunerError(f"--cost must be one of {', '.join(COSTS)}, got {self.cost!r}")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise TunerError(
                f"--backends: unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}"
            )
        if self.study is not None and self.storage is None:
            raise TunerError("--study names a study in a shared --storage; give --storage too")
        if not self.out.parent.is_dir():
            raise TunerError(f"--out {self.out}: folder {self.out.parent} does not exist")
        if (err := can_write_beside(self.out)) is not None:  # found before the trials
            raise TunerError(f"--out {self.out}: cannot write in {self.out.parent}: {err}")

    def check_backends(self, device: str) -> None:
        """Refuse, before any trial, a ``--backends`` implementation that cannot run on
        ``device`` (a trial failed with a traceback first): each runs a tiny exact call."""
        for backend in self.backends:
            q = torch.zeros(1, 1, 16, 16, device=device)
            try:
                compile_recipe("exact", backend=backend, check_finite=False)(q, q, q)
            except AttncomposeError as err:
                raise TunerError(f"--backends {backend}: {err}") from None


class Reporter:
    """Hooks a tuning job calls as it goes; this base says nothing (library use)."""

    def start_length(
        self, seq_len: int, trials: int, calibration: Calibration, recipe: str = ""
    ) -> None:
        """A recipe's study of a length begins (its calibration loaded, exact attention timed)."""

    def trial_done(
        self, seq_len: int, study: optuna.Study, target_err: float, recipe: str = ""
    ) -> None:
        """A trial of this recipe and length finished (in this worker)."""

    def end_length(self, seq_len: int, entry: TunedEntry) -> None:
        """A length is done (every recipe) and its entry written."""


@dataclass
class TuneResult:
    """The tuned file written, every recipe's finished trials per length (for plots and
    summaries), and exact attention's latency per length."""

    tuned: TunedFile
    device: str
    trials: dict[str, dict[int, list[optuna.trial.FrozenTrial]]] = field(default_factory=dict)
    exact_ms: dict[int, float] = field(default_factory=dict)

    @property
    def recipes(self) -> list[str]:
        """The recipes of this run, in the order given."""
        return list(self.trials)


def tune(recipes, config: TuneConfig, reporter: Reporter | None = None) -> TuneResult:
    """Tune one recipe or several (names, paths or Recipes) per length, choosing per length
    the best across recipes; writes ``config.out`` after each length."""
    config.check()
    reporter = reporter or Reporter()
    loaded = load_recipes(recipes)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config.check_backends(device)
    dname = device_name(device)
    tuned = _start_file(config.out, loaded, config.causal)  # read again at every write
    storage = open_storage(config.storage or default_storage_url(config.out))
    result = TuneResult(tuned, dname, trials={recipe.name: {} for recipe, _ in loaded})
    for n in config.seq_lens:
        calib = build_calibration(config.data, n, config.causal, device, config.backend)
        runs = []
        for recipe, _ in loaded:
            reporter.start_length(n, config.trials, calib, recipe.name)
            name = study_name(_study_base(recipe, config), dname, n)
            run = _run_study(recipe, config, calib, storage, name, reporter)
            result.trials[recipe.name][n] = run.trials
            runs.append(run)
        # timed again after the trials: the first timing of a process can carry warm-up costs
        again = time_exact(calib.items, calib.causal, calib.device, config.backend)
        exact_ms = min(calib.exact_latency_ms, again)
        rules = Rules(config.target_err, config.latency_budget_ms, config.cost)
        entry = make_entry(runs, exact_ms, rules, _data_text(config, calib), versions())
        entry = _with_decode(entry, {r.name: r for r, _ in loaded}, config, calib)
        with folder_lock(config.out):  # other workers' lengths, written meanwhile, stay
            current = _start_file(config.out, loaded, config.causal)
            result.tuned = current.with_entry(dname, n, entry)
            write_tuned(config.out, result.tuned)
        result.exact_ms[n] = exact_ms
        reporter.end_length(n, entry)
    return result


def _with_decode(
    entry: TunedEntry, recipes: dict[str, RecipeBase], config: TuneConfig, calib: Calibration
) -> TunedEntry:
    """The entry with a decode step of its choice timed beside exact attention's (causal
    tunings that chose an approximation): :class:`~attncompose.runtime.tuned.TunedAttention`
    runs decode steps exactly where the choice's is no faster."""
    if entry.is_exact or not config.causal:
        return entry
    recipe = recipes[entry.recipe].with_knobs(entry.knobs)
    backend = entry.backend or config.backend
    attn = compile_recipe(recipe, backend=backend)
    ms, exact_ms = time_decode(attn, calib.items, calib.device, backend)
    return entry.model_copy(update={"decode_latency_ms": ms, "exact_decode_latency_ms": exact_ms})


def load_recipes(recipes) -> list[tuple[RecipeBase, str | None]]:
    """(recipe, how it was named) for one recipe or a list; names must differ, and each
    recipe must have something to tune."""
    if isinstance(recipes, (str, Path, dict)) or hasattr(recipes, "steps"):
        recipes = [recipes]
    loaded = []
    for given in recipes:
        source = None if isinstance(given, dict) or hasattr(given, "steps") else str(given)
        recipe = load_recipe(given)
        search_space(recipe)  # fail early on a recipe with nothing to tune
        loaded.append((recipe, source))
    if not loaded:
        raise TunerError("give at least one recipe to tune")
    names = [recipe.name for recipe, _ in loaded]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise TunerError(
            f"two recipes are named {twice[0]!r}: a tuned file tells recipes apart by name"
        )
    return loaded


def _run_study(
    recipe, config: TuneConfig, calib: Calibration, storage, name: str, reporter: Reporter
) -> RecipeRun:
    """Run (or resume, or join) the study of one recipe and length."""
    evaluator = Evaluator(
        recipe,
        calib,
        config.target_err,
        config.backend,
        config.n_seeds,
        config.repeats,
        cost=config.cost,
    )
    space, start = search_space(recipe), defaults(recipe)
    if len(config.backends) > 1:  # the implementation as a tunable choice
        space[BACKEND_KNOB] = CategoricalDistribution(config.backends)
        start[BACKEND_KNOB] = config.backends[0]
    objective = Objective(evaluator, space=space)
    study = open_study(storage, name, _sampler(config, 0), _meta(recipe, config, calib))
    study.sampler = _sampler(config, len(study.trials))
    if not study.trials:
        study.enqueue_trial(start, skip_if_exists=True)
    n = calib.seq_len
    run_trials(
        study,
        objective,
        config.trials,
        config.timeout_s,
        lambda s: reporter.trial_done(n, s, config.target_err, recipe.name),
    )
    seeds = len(seed_variants(recipe, config.n_seeds))
    return RecipeRun(
        recipe.name,
        finished_trials(study),
        seeds,
        frac_of=evaluator.frac_of,
        time_of=evaluator.latency_of,
    )


def _start_file(out: Path, recipes: list[tuple[RecipeBase, str | None]], causal: bool) -> TunedFile:
    """The tuned file to add entries to: the existing one if it holds these recipes (the
    same set, unchanged) and this masking mode."""
    fresh = TunedFile(
        causal=causal,
        recipes={r.name: r.model_dump(mode="json", exclude_none=True) for r, _ in recipes},
        sources={r.name: source for r, source in recipes if source is not None},
    )
    if not out.exists():
        return fresh
    old = read_tuned(out)
    changed = [n for n in fresh.recipes if n in old.recipes and old.recipes[n] != fresh.recipes[n]]
    if changed:
        raise TunerError(
            f"--out {out} holds a tuning of recipe {changed[0]!r} as it was before it changed; "
            "choose another --out or remove the file"
        )
    if old.recipes != fresh.recipes:
        held = ", ".join(old.recipes)
        raise TunerError(
            f"--out {out} holds a tuning of another recipe set ({held}); tune the same recipes "
            "to add to it, or choose another --out or remove the file"
        )
    if old.causal != causal:
        raise TunerError(
            f"--out {out} holds a {'causal' if old.causal else 'non-causal'} tuning; choose "
            "another --out or remove the file"
        )
    return old


def _study_base(recipe, config: TuneConfig) -> str:
    """The name the studies of one recipe start with: ``--study`` and the recipe's name, or a
    digest of what the run is for (rerunning the same command resumes)."""
    if config.study is not None:
        return f"{config.study}:{recipe.name}"
    return _default_study(recipe, config)


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
                *config.backends,
            ]
        ).encode()
    ).hexdigest()
    return f"{recipe.name}-{digest[:10]}"


def _data_text(config: TuneConfig, calib: Calibration) -> str:
    """The calibration data, as tuned files and studies name it."""
    origin = calib.items[0].name.split(":")[0]
    return f"{config.data or 'built-in'} ({origin}, {len(calib.items)} items)"


def _meta(recipe, config: TuneConfig, calib: Calibration) -> dict:
    """What a study is for; workers joining it must agree (a study started before the data's
    digest was recorded is joined on the rest)."""
    return {
        "recipe_sha256": hashlib.sha256(recipe.dump_yaml().encode()).hexdigest(),
        "target_err": config.target_err,
        "causal": config.causal,
        "data": _data_text(config, calib),
        "data_sha256": calib.values_sha256,
        "seeds": config.n_seeds,
        "backend": config.backend,
        "backends": ",".join(config.backends),
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


def versions() -> dict[str, str]:
    """Versions of the libraries a measurement depends on."""
    found = {
        "attncompose": __version__,
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
