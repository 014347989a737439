"""The tuner: search space from the recipe, target met, exact fallback, resume, shared studies."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor

import optuna
import pytest
import torch
from click.testing import CliRunner
from on_device import needs_flex
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

import attncompose as ac
from attncompose.cli.tune import tune as tune_command
from attncompose.runtime.tuned import read_tuned
from attncompose.tuner import TuneConfig, TunerError, search_space, seed_variants, tune
from attncompose.tuner.choice import RecipeRun, Rules, make_entry
from attncompose.tuner.objective import Evaluator, build_calibration
from attncompose.tuner.report import LineReporter
from attncompose.tuner.study import interrupts_outside_storage, open_storage, open_study

N = 128
TARGET = 0.65  # some knobs of TINY meet it at N=128 on the built-in data, others do not
TINY = textwrap.dedent(
    """\
    name: tiny-hyper
    steps:
      hash: {op: lsh, num_projections: {default: 3, low: 1, high: 4}}
      diag: {op: block, select: [hash], block_size: {default: 16, choices: [8, 16]}}
      residual: {op: uniform_sample, exclude: [diag], sample_size: {default: 8, choices: [0, 8]}}
      merged: {op: merge, inputs: [diag, residual]}
      out: {op: causal_split, body: merged, min_seq_len: {default: 32, choices: [32, 64]}}
    """
)
TINY_STREAM = textwrap.dedent(
    """\
    name: tiny-stream
    steps:
      sinks: {op: sink, count: {default: 1, choices: [0, 1, 4]}}
      local: {op: window, width: {default: 32, choices: [8, 16, 32, 64]}}
      out: {op: block, select: [sinks, local], block_size: 16}
    """
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def recipe_path(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture
def stream_path(tmp_path):
    path = tmp_path / "tiny-stream.yaml"
    path.write_text(TINY_STREAM)
    return path


def finished(storage_url: str) -> list[optuna.trial.FrozenTrial]:
    """Finished trials of every study in a storage."""
    storage = open_storage(storage_url)
    return [
        t
        for s in optuna.get_all_study_names(storage)
        for t in optuna.load_study(study_name=s, storage=storage).trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]


def cli_args(recipe_path, out, *extra: str) -> list[str]:
    return [
        str(recipe_path),
        "--target-err",
        str(TARGET),
        "--seq-lens",
        str(N),
        "--out",
        str(out),
        "--backend",
        "torch",
        *extra,
    ]


def worker(recipe_path, out, *extra: str) -> subprocess.Popen:
    """``attncompose tune`` in its own process."""
    code = "from attncompose.cli.tune import tune; tune()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *cli_args(recipe_path, out, *extra)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_search_space_and_seeds_come_from_the_recipe(recipe_path):
    recipe = ac.load_recipe(recipe_path)
    space = search_space(recipe)
    assert set(space) == set(recipe.tunables())
    assert space["diag.block_size"].choices == (8, 16)
    assert (space["hash.num_projections"].low, space["hash.num_projections"].high) == (1, 4)
    variants = seed_variants(recipe, 3)
    assert variants == [{"hash.seed": i, "residual.seed": i} for i in range(3)]
    with pytest.raises(TunerError, match="no tunable knob"):
        search_space(ac.load_recipe("exact"))
    assert search_space(ac.load_recipe("topp"))["heavy.score"].choices == ("means", "keys")


def test_tuned_result_meets_the_target_on_its_calibration_data(recipe_path, tmp_path):
    out = tmp_path / "tuned.yaml"
    config = TuneConfig(target_err=TARGET, seq_lens=(N,), trials=6, backend="torch", out=out)
    result = tune(recipe_path, config)
    entry = read_tuned(out).table["cpu"][N]
    assert entry.trials == 6 and entry.seeds == 3 and entry.target_err == TARGET
    best = entry.recipes["tiny-hyper"].best
    assert best is not None and best.error_mean <= TARGET and 0 < best.frac < 1
    assert best.error_max >= best.error_mean
    assert entry.knobs in (None, best.knobs)
    calib = build_calibration(None, N, True, "cpu", "torch")
    again = Evaluator(ac.load_recipe(recipe_path), calib, TARGET, "torch").evaluate(best.knobs)
    assert again.error_mean == pytest.approx(best.error_mean, rel=1e-6)
    trials = result.trials["tiny-hyper"][N]
    assert len(trials) == 6
    assert all(0 < t.user_attrs["frac"] <= 1 for t in trials)  # counted in each first call


def test_cost_products_minimises_frac_not_latency(recipe_path, tmp_path):
    out = tmp_path / "tuned.yaml"
    config = TuneConfig(
        target_err=TARGET, seq_lens=(N,), trials=5, backend="torch", out=out, cost="products"
    )
    result = tune(recipe_path, config)
    entry = read_tuned(out).table["cpu"][N]
    best = entry.recipes["tiny-hyper"].best
    assert entry.cost == "products" and best is not None
    fracs = [
        t.user_attrs["frac"]
        for t in result.trials["tiny-hyper"][N]
        if t.state.name == "COMPLETE" and t.user_attrs["error_mean"] <= TARGET
    ]
    assert best.frac == pytest.approx(min(f for f in fracs if f < 1))
    # cheaper in products than exact: used whatever the latency says, and said if slower
    assert entry.knobs == best.knobs and entry.frac == best.frac
    assert (entry.note is not None) == (best.latency_ms > entry.exact_latency_ms)
    # a decode step of the choice is timed beside exact attention's; decode steps follow it
    assert entry.decode_latency_ms > 0 and entry.exact_decode_latency_ms > 0
    decode = ac.load(out, backend="torch").choose("cpu", N, True, decode=True)
    assert (decode.knobs is None) == entry.decode_slower_than_exact


def test_knobs_that_compute_exact_attention_never_beat_it_by_timing_noise(tmp_path):
    """A splitter whose min_seq_len covers the length computes exact attention: whatever the
    timings say, the entry is exact attention, with the reason."""
    path = tmp_path / "exact-equivalent.yaml"
    path.write_text(
        TINY.replace("default: 32, choices: [32, 64]", "default: 256, choices: [256, 512]")
    )
    out = tmp_path / "tuned.yaml"
    tune(path, TuneConfig(target_err=TARGET, seq_lens=(N,), trials=3, backend="torch", out=out))
    entry = read_tuned(out).table["cpu"][N]
    outcome = entry.recipes["tiny-hyper"]
    assert outcome.best is None and outcome.least_error is None  # no frac-1 point shown
    assert entry.knobs is None and "as many products as exact attention" in entry.fallback
    assert outcome.lost == entry.fallback


def test_impossible_target_falls_back_to_exact_and_says_so(recipe_path, tmp_path):
    out = tmp_path / "tuned.yaml"
    args = cli_args(recipe_path, out, "--trials", "3")
    args[args.index("--target-err") + 1] = "1e-9"
    done = CliRunner().invoke(tune_command, args)
    assert done.exit_code == 0, done.output
    assert "tiny-hyper: no trial met the error target 1e-09" in done.output
    assert "target missed" in done.output
    assert "exact attention" in done.output and "is the choice on cpu" in done.output
    entry = read_tuned(out).table["cpu"][N]
    assert entry.knobs is None and entry.recipes["tiny-hyper"].best is None
    assert entry.error_mean == 0
    assert entry.latency_ms == entry.exact_latency_ms


def test_latency_budget_falls_back_to_exact(recipe_path, tmp_path):
    out = tmp_path / "tuned.yaml"
    done = CliRunner().invoke(
        tune_command, cli_args(recipe_path, out, "--trials", "3", "--latency-budget-ms", "1e-6")
    )
    assert done.exit_code == 0, done.output
    entry = read_tuned(out).table["cpu"][N]
    assert entry.knobs is None
    assert "exceeds the budget" in entry.fallback or "no trial met" in entry.fallback


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_rerun_resumes_and_a_stopped_run_loses_no_finished_trial(recipe_path, tmp_path, sig):
    """Killed or interrupted (Ctrl-C: one line, no traceback, exit 130), a run keeps every
    finished trial, and the same command resumes it."""
    out = tmp_path / "tuned.yaml"
    url = f"sqlite:///{tmp_path / 'tuned.optuna.db'}"  # the default storage beside --out
    proc = worker(recipe_path, out, "--trials", "1000")
    deadline = time.monotonic() + 300  # leaves as soon as 3 trials are done (busy CI: slow)
    before: list = []
    while len(before) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
        before = finished(url) if (tmp_path / "tuned.optuna.db").exists() else []
    os.kill(proc.pid, sig)
    said = proc.communicate(timeout=300)[0]
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Traceback" not in said, said
        assert said.strip().splitlines()[-1].startswith("interrupted: "), said
        assert "of the study it stopped kept, as is every earlier study's" in said
        assert "run the same command again to resume" in said
    before = finished(url)
    assert len(before) >= 3 and not out.exists()
    goal = len(before) + 2
    proc = worker(recipe_path, out, "--trials", str(goal))
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
    after = {t.number: t for t in finished(url)}
    for t in before:
        assert (after[t.number].params, after[t.number].value) == (t.params, t.value)
    assert len(after) == goal
    assert read_tuned(out).table["cpu"][N].trials == goal


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_resumed_run_fails_the_trial_a_killed_run_left_running(stream_path, tmp_path, kind):
    """A run SIGKILLed inside a trial left it RUNNING in the study for good (a journal has no
    heartbeat; SQLite's fails it only 30 s on), and the defaults it was running were never
    tried: the resume fails it, saying why, runs its knobs again and the trials asked."""
    out = tmp_path / "t.yaml"
    storage = (
        f"journal:{tmp_path / 'j.log'}" if kind == "journal" else f"sqlite:///{tmp_path / 'j.db'}"
    )
    args = cli_args(stream_path, out, "--storage", storage, "--study", "s")
    killed = (
        "import os, signal\n"
        "from attncompose.tuner.objective import Evaluator\n"
        "Evaluator.evaluate = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from attncompose.cli.tune import tune\n"
        "tune()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", killed, *args, "--trials", "3"], env=ENV, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout
    done = CliRunner().invoke(tune_command, [*args, "--trials", "2"])
    assert done.exit_code == 0, done.output
    loaded = open_storage(storage)
    (name,) = optuna.get_all_study_names(loaded)
    trials = optuna.load_study(study_name=name, storage=loaded).trials
    assert trials[0].state == TrialState.FAIL
    assert "ended while it ran" in trials[0].system_attrs["attncompose:interrupted"]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    finished_now = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished_now) == 2 and read_tuned(out).table["cpu"][N].trials == 2
    assert finished_now[0].params == trials[0].params  # the defaults, run again


def test_resuming_leaves_the_running_trial_of_a_live_worker(tmp_path):
    """Workers share a study: the trial another worker is running is not stale while that
    worker lives (failing it would crash the worker when it tells its value)."""
    storage = f"journal:{tmp_path / 'j.log'}"
    busy = (
        "import sys, time\n"
        "from attncompose.tuner.study import open_storage, open_study, run_trials\n"
        "import optuna\n"
        "study = open_study(open_storage(sys.argv[1]), 's', optuna.samplers.RandomSampler(), {})\n"
        "run_trials(study, lambda t: time.sleep(t.suggest_float('x', 0, 1) + 600), 1, None)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", busy, storage], env=ENV)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline and proc.poll() is None
            if (tmp_path / "j.log").exists():
                study = optuna.load_study(study_name="s", storage=open_storage(storage))
                if study.trials and "attncompose:worker" in study.trials[0].system_attrs:
                    break
            time.sleep(0.1)
        study = open_study(open_storage(storage), "s", optuna.samplers.RandomSampler(), {})
        assert study.trials[0].state == TrialState.RUNNING
    finally:
        proc.kill()
        proc.wait()
    study = open_study(open_storage(storage), "s", optuna.samplers.RandomSampler(), {})
    assert study.trials[0].state == TrialState.FAIL
    assert study.trials[1].state == TrialState.WAITING  # its knobs, queued again
    assert study.trials[1].system_attrs["fixed_params"] == study.trials[0].params


def test_ctrl_c_inside_storage_code_lands_after_it():
    """Ctrl-C inside SQLAlchemy left an SQLite write lock that nothing released; failing the
    interrupted trial then died with "database is locked" (a traceback, exit 1). The interrupt
    now waits until storage code has returned."""
    storage_code: dict = {"__name__": "sqlalchemy.engine.stand_in"}
    exec(
        "import _thread, time\n"
        "def commit(log):\n"
        "    _thread.interrupt_main()\n"
        "    time.sleep(0.3)\n"
        "    log.append('committed')\n",
        storage_code,
    )
    log: list[str] = []
    with pytest.raises(KeyboardInterrupt), interrupts_outside_storage():
        storage_code["commit"](log)
        log.append("returned")
        time.sleep(5)
        log.append("not interrupted")
    assert log == ["committed", "returned"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_share_one_study(recipe_path, tmp_path, kind):
    storage = (
        f"sqlite:///{tmp_path / 'shared.db'}"
        if kind == "sqlite"
        else (f"journal:{tmp_path / 'shared.log'}")
    )
    run_two_workers(recipe_path, tmp_path, storage, study=f"s-{kind}")


def run_two_workers(recipe_path, tmp_path, storage: str, study: str, budget: int = 6) -> None:
    """Two processes, one study: every trial number once, all finished, at most one extra."""
    extra = ("--trials", str(budget), "--storage", storage, "--study", study)
    procs = [worker(recipe_path, tmp_path / f"out{i}.yaml", *extra) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stdout.read()
    loaded = open_storage(storage)
    names = [s for s in optuna.get_all_study_names(loaded) if s.startswith(f"{study}:")]
    assert len(names) == 1
    trials = optuna.load_study(study_name=names[0], storage=loaded).trials
    assert [t.number for t in trials] == list(range(len(trials)))  # none lost, none twice
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert budget <= len(trials) <= budget + 1  # a worker may start one as the other ends
    for i in range(2):
        assert read_tuned(tmp_path / f"out{i}.yaml").table["cpu"][N].trials >= budget


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_two_workers_never_run_the_same_enqueued_trial(tmp_path, monkeypatch):
    """The race behind 'Cannot tell a COMPLETE trial': Optuna moves an enqueued (WAITING) trial
    to RUNNING by reading its row (SELECT ... FOR UPDATE) and then updating it. SQLite has no
    row locks, so two workers that both read the row before either writes both got the trial,
    ran it, and the second to finish died telling a trial the first had completed. Here the
    two reads are forced to meet (as CPU load makes them do by chance): each worker must get a
    trial of its own."""
    stores = [open_storage(f"sqlite:///{tmp_path / 'shared.db'}") for _ in range(2)]
    studies = [optuna.create_study(study_name="s", storage=s, load_if_exists=True) for s in stores]
    studies[0].enqueue_trial({"x": 1})
    both_read = threading.Barrier(2)
    find = models.TrialModel.find_or_raise_by_id.__func__

    def read_then_wait(cls, trial_id, session, for_update=False):
        row = find(cls, trial_id, session, for_update)
        if for_update:  # where a worker claims a trial: let the other read it too, if it can
            with contextlib.suppress(threading.BrokenBarrierError):
                both_read.wait(timeout=2)
        return row

    monkeypatch.setattr(models.TrialModel, "find_or_raise_by_id", classmethod(read_then_wait))
    with ThreadPoolExecutor(2) as pool:
        numbers = list(pool.map(lambda study: study.ask().number, studies))
    assert sorted(numbers) == [0, 1]


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get("ATTNCOMPOSE_TEST_PG_URL"), reason="no PostgreSQL")
def test_two_workers_share_one_postgres_study(recipe_path, tmp_path):
    url = os.environ["ATTNCOMPOSE_TEST_PG_URL"]
    run_two_workers(recipe_path, tmp_path, url, study=f"pg-{uuid.uuid4().hex[:8]}")


def test_out_file_of_another_recipe_is_refused(recipe_path, tmp_path):
    out = tmp_path / "t.yaml"
    assert (
        CliRunner().invoke(tune_command, cli_args(recipe_path, out, "--trials", "1")).exit_code == 0
    )
    other = tmp_path / "other.yaml"
    other.write_text(TINY.replace("tiny-hyper", "other"))
    done = CliRunner().invoke(tune_command, cli_args(other, out, "--trials", "1"))
    assert done.exit_code == 2
    assert "holds a tuning of another recipe set (tiny-hyper)" in done.output


def test_a_rerun_on_other_data_at_the_same_path_is_refused(stream_path, tmp_path):
    """A capture written over the --data path of a tuning (another text, another model) is
    not resumed as if it were the same data: the study records a digest of the values, and
    the rerun names it (it ran no trial and wrote the old data's entry; found by fuzzing)."""
    from attncompose.models.capture_file import save_capture

    data = tmp_path / "qkv.safetensors"

    def capture(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, h, N, 16, generator=g) for h in (2, 1, 1))
        save_capture(data, {0: (q, k, v)}, model="m", text_sha256="0")

    args = cli_args(stream_path, tmp_path / "t.yaml", "--trials", "1", "--data", str(data))
    capture(0)
    assert CliRunner().invoke(tune_command, args).exit_code == 0
    capture(1)
    done = CliRunner().invoke(tune_command, args)
    assert done.exit_code == 2 and "was started with data_sha256=" in done.output, done.output


def test_workers_writing_one_out_keep_each_others_lengths(stream_path, tmp_path):
    """Two runs sharing an --out (workers per length): each reads the file again under a lock
    before it writes, so a length another worker wrote meanwhile stays (the last writer wrote
    back the copy it read at its start; found by fuzzing). Worker A runs its length while
    worker B is tuning another."""
    out, storage = tmp_path / "t.yaml", f"sqlite:///{tmp_path / 's.db'}"

    def config(n: int) -> TuneConfig:
        return TuneConfig(target_err=TARGET, seq_lens=(n,), trials=1, n_seeds=1, repeats=1,
                          backend="torch", storage=storage, out=out)  # fmt: skip

    class OtherWorkerMeanwhile(LineReporter):
        def start_length(self, *args, **kwargs):
            tune([stream_path], config(N // 2))  # worker A, while B is at its length
            return super().start_length(*args, **kwargs)

    tune([stream_path], config(N), OtherWorkerMeanwhile(io.StringIO()))  # worker B
    assert sorted(read_tuned(out).table["cpu"]) == [N // 2, N]


def test_several_recipes_compete_per_length_and_the_file_names_the_winner(
    recipe_path, stream_path, tmp_path
):
    out = tmp_path / "tuned.yaml"
    args = [str(recipe_path), *cli_args(stream_path, out, "--trials", "4", "--cost", "products")]
    done = CliRunner().invoke(tune_command, args)
    assert done.exit_code == 0, done.output
    entry = read_tuned(out).table["cpu"][N]
    assert list(entry.recipes) == ["tiny-hyper", "tiny-stream"]
    assert entry.trials == 8 and all(o.trials == 4 for o in entry.recipes.values())
    open_ = {n: o for n, o in entry.recipes.items() if o.best is not None and o.best.frac < 1}
    assert open_, "at this target both recipes have knobs that meet it"
    winner = min(open_, key=lambda n: open_[n].best.frac)
    assert entry.recipe == winner and entry.knobs == open_[winner].best.knobs
    assert entry.recipes[winner].lost is None
    assert all(o.lost for n, o in entry.recipes.items() if n != winner)
    for name in ("tiny-hyper", "tiny-stream", "min err", "speedup", "verdict", "chosen"):
        assert name in done.output
    assert "…" not in done.output  # nothing cut at 80 columns
    loser = next(n for n in entry.recipes if n != winner)
    assert f"  {loser}: {entry.recipes[loser].lost}" in done.output  # why, in words
    assert f"n={N}: {winner} (" in done.output  # the conclusion names the choice and knobs
    attn = ac.load(out, backend="torch")
    assert attn.choose("cpu", N, True).recipe == winner


def test_one_file_one_recipe_set(recipe_path, stream_path, tmp_path):
    out = tmp_path / "tuned.yaml"
    two = [str(recipe_path), *cli_args(stream_path, out, "--trials", "1")]
    assert CliRunner().invoke(tune_command, two).exit_code == 0
    done = CliRunner().invoke(tune_command, cli_args(stream_path, out, "--trials", "1"))
    assert done.exit_code == 2 and "another recipe set (tiny-hyper, tiny-stream)" in done.output
    twice = CliRunner().invoke(tune_command, [str(stream_path), *two[1:]])
    assert twice.exit_code == 2 and "two recipes are named 'tiny-stream'" in twice.output


def frozen(value: float, error: float, ms: float, frac: float, **params) -> FrozenTrial:
    """A finished trial as the objective leaves it (value: latency, or frac by products)."""
    return optuna.trial.create_trial(
        params=params,
        distributions={k: optuna.distributions.IntDistribution(0, 99) for k in params},
        value=value,
        user_attrs={"error_mean": error, "error_max": error, "latency_ms": ms, "frac": frac},
    )


def test_products_choice_slower_than_exact_says_so_and_the_budget_bounds_it():
    """--cost products: a choice slower than exact attention is kept and said so (entry note);
    --latency-budget-ms rules out points over it, also when their products are fewer."""
    trials = [
        frozen(0.3, 0.04, ms=30.0, frac=0.3, a=1),  # fewest products, 3x slower than exact
        frozen(0.6, 0.04, ms=8.0, frac=0.6, a=2),  # more products, faster than exact
        frozen(0.1, 0.20, ms=1.0, frac=0.1, a=3),  # misses the target
        frozen(1.0, 0.00, ms=5.0, frac=1.0, a=4),  # computes everything: never a best
    ]
    run = RecipeRun("r", trials)
    data, versions = "built-in", {"torch": "x"}
    entry = make_entry([run], 10.0, Rules(0.05, cost="products"), data, versions)
    assert entry.knobs == {"a": 1} and entry.latency_ms == 30.0
    assert "slower than exact attention where tuned (30 ms vs 10 ms" in entry.note
    assert entry.slower_than_exact and entry.recipes["r"].least_error == 0.04
    bounded = make_entry([run], 10.0, Rules(0.05, 20.0, "products"), data, versions)
    assert bounded.knobs == {"a": 2} and bounded.note is None
    none_fits = make_entry([run], 10.0, Rules(0.05, 2.0, "products"), data, versions)
    assert none_fits.is_exact and "exceeds the budget 2 ms" in none_fits.fallback


def test_latency_choice_across_recipes_says_why_each_lost():
    fast = RecipeRun("fast", [frozen(4.0, 0.03, ms=4.0, frac=0.5, a=1)])
    slow = RecipeRun("slow", [frozen(6.0, 0.01, ms=6.0, frac=0.2, a=1)])
    exact_only = RecipeRun("same", [frozen(1.0, 0.0, ms=1.0, frac=1.0, a=1)])
    missing = RecipeRun("miss", [frozen(2.0, 0.09, ms=2.0, frac=0.1, a=1)])
    runs = [fast, slow, exact_only, missing]
    entry = make_entry(runs, 10.0, Rules(0.05), "built-in", {})
    assert entry.recipe == "fast" and entry.recipes["fast"].lost is None
    assert entry.recipes["slow"].lost == "fast is faster (4 ms vs 6 ms)"
    assert "(frac 1)" in entry.recipes["same"].lost and entry.recipes["same"].best is None
    assert entry.recipes["miss"].lost == "no trial met the error target 0.05 (least error 0.09)"
    slower = make_entry(runs, 3.0, Rules(0.05), "built-in", {})
    assert slower.is_exact and "exact attention is faster (3 ms vs 4 ms)" in slower.fallback


def test_plot_without_matplotlib_fails_before_tuning(recipe_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "t.yaml"
    done = CliRunner().invoke(
        tune_command, cli_args(recipe_path, out, "--plot", str(tmp_path / "p.png"))
    )
    assert done.exit_code == 2 and "--plot needs matplotlib" in done.output
    assert not out.exists() and not (tmp_path / "t.optuna.db").exists()


def test_plot_shows_every_recipe(recipe_path, stream_path, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    args = [str(recipe_path), *cli_args(stream_path, tmp_path / "t.yaml", "--trials", "2")]
    done = CliRunner().invoke(tune_command, [*args, "--plot", str(png)])
    assert done.exit_code == 0, done.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_is_plain_lines_outside_a_terminal(recipe_path, tmp_path):
    """No live bar in a log: a line when a study starts, as trials finish (at most every
    ``every_s``), and the choice."""
    stream = io.StringIO()
    config = TuneConfig(
        target_err=TARGET, seq_lens=(N,), trials=3, backend="torch", out=tmp_path / "t.yaml"
    )
    tune(recipe_path, config, LineReporter(stream, every_s=0))
    lines = stream.getvalue().splitlines()
    assert "tiny-hyper n=128: tuning, 3 trials" in lines[0]
    assert sum("/3 trials" in line for line in lines) == 3
    assert "n=128: chose" in lines[-1]
    assert "\x1b[" not in stream.getvalue()  # no terminal control codes


def test_points_far_slower_than_exact_are_not_timed_further(recipe_path):
    """Under the cost "latency", a trial whose first call takes over SLOW_FACTOR x exact
    attention's time cannot win: its errors are measured, its latency is not refined."""
    import dataclasses

    recipe = ac.load_recipe(recipe_path)
    calib = build_calibration(None, N, True, "cpu", "torch")
    knobs = {"hash.num_projections": 3, "diag.block_size": 16}
    knobs |= {"residual.sample_size": 8, "out.min_seq_len": 32}
    for exact_ms, topped_up in ((1e-9, False), (1e9, True)):
        fake = dataclasses.replace(calib, exact_latency_ms=exact_ms)
        ev = Evaluator(recipe, fake, target_err=10.0, backend="torch", repeats=5).evaluate(knobs)
        assert len(ev.errors) == 3  # every seed measured either way
        assert len(ev.samples_ms) == (5 if topped_up else 2)
        assert ("timing" in ev.attrs()) != topped_up


def test_each_recipes_best_point_is_timed_again_at_the_end_where_it_could_win():
    run = RecipeRun("r", [frozen(4.0, 0.03, ms=4.0, frac=0.5, a=1)], time_of=lambda knobs: 12.0)
    entry = make_entry([run], 10.0, Rules(0.05), "built-in", {})
    assert entry.recipes["r"].best.latency_ms == 12.0
    assert entry.is_exact and "exact attention is faster (10 ms vs 12 ms)" in entry.fallback
    hopeless = make_entry([run], 1.0, Rules(0.05), "built-in", {})  # 4 ms > 2x exact's 1 ms
    assert hopeless.recipes["r"].best.latency_ms == 4.0


@needs_flex
def test_the_implementation_is_a_tunable_choice(stream_path, tmp_path):
    """--backends torch,flex: trials run on either implementation, the file records which
    won beside the knobs, and the loaded attention runs on it."""
    out = tmp_path / "tuned.yaml"
    config = TuneConfig(
        target_err=0.5, seq_lens=(N,), trials=6, backends=("torch", "flex"), out=out,
        cost="products", n_seeds=1,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FlexAttention eager on CPU says it is unfused
        result = tune(stream_path, config)
        tried = {t.params["backend"] for t in result.trials["tiny-stream"][N]}
        entry = read_tuned(out).table["cpu"][N]
        backend = entry.backend
        assert tried == {"torch", "flex"} and backend in tried and "backend" not in entry.knobs
        attn = ac.load(out)
        q, k, v = (torch.randn(1, 2, N, 16) for _ in range(3))
        attn(q, k, v, is_causal=True)
    (module,) = attn._modules_by_key.values()
    assert module.pipeline.backend == backend


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-err", "inf"], "--target-err must be a positive number, got inf"),
        (["--timeout", "nan"], "--timeout must be a positive number of seconds, got nan"),
        (["--plot", "{tmp}/missing/p.png"], "--plot {tmp}/missing/p.png: cannot write in"),
        (["--storage", "journal:{tmp}/cut.log"], "the last record of {tmp}/cut.log is cut short"),
        (["--storage", "journal:{tmp}/bad.log"], "line 2 of {tmp}/bad.log is no journal record"),
    ],
    ids=["target-inf", "timeout-nan", "plot-folder", "journal-cut", "journal-broken"],
)
def test_tune_settings_that_cannot_work_are_one_line_before_any_trial(
    recipe_path, tmp_path, extra, message
):
    """Each was accepted (inf, NaN: ignored), found after the trials (the plot's folder), or
    a raw traceback at every later run (a journal whose last record a killed run cut short:
    Optuna appended after it; found by fuzzing)."""
    record = '{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}'
    (tmp_path / "cut.log").write_text(record + "\n" + record[:20])
    (tmp_path / "bad.log").write_text(record + '\n{"op_cod\n')
    args = [a.format(tmp=tmp_path) for a in extra]
    done = CliRunner().invoke(tune_command, cli_args(recipe_path, tmp_path / "t.yaml", *args))
    assert done.exit_code == 2 and message.format(tmp=tmp_path) in done.output, done.output
    assert "Traceback" not in done.output and not (tmp_path / "t.optuna.db").exists()


def test_a_recipe_name_is_no_path_of_the_default_out(stream_path, tmp_path, monkeypatch):
    """A recipe's name is free text: the default --out takes only its safe characters (the
    name "../escaped" wrote ../escaped.tuned.yaml and its study outside the working folder)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_STREAM.replace("name: tiny-stream", "name: ../escaped"))
    args = cli_args(recipe, "x", "--trials", "1")
    done = CliRunner().invoke(tune_command, args[: args.index("--out")] + args[-2:])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in work.iterdir()) == [
        "escaped.tuned.optuna.db",
        "escaped.tuned.yaml",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("escaped")]


def test_unknown_backends_are_refused(recipe_path, tmp_path):
    done = CliRunner().invoke(
        tune_command, cli_args(recipe_path, tmp_path / "t.yaml", "--backends", "triton,cuda")
    )
    assert done.exit_code == 2 and "unknown backend 'cuda'" in done.output


def test_backends_that_cannot_run_here_and_an_unwritable_out_are_refused_before_trials(
    recipe_path, tmp_path, monkeypatch
):
    """Found before any trial, in one line (a trial failed first, with Optuna's traceback;
    the unwritable --out only at the end, with a raw PermissionError; found by fuzzing)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU without the interpreter
    out = tmp_path / "t.yaml"
    done = CliRunner().invoke(
        tune_command, cli_args(recipe_path, out, "--backends", "torch,triton")
    )
    assert done.exit_code == 2 and "--backends triton: backend 'triton' cannot run" in done.output
    assert "Traceback" not in done.output and not (tmp_path / "t.optuna.db").exists()
    import attncompose.tuner.job as job
    from attncompose.runtime.files import can_write_beside

    (tmp_path / "file").write_text("")  # no file can be made "in" a file (root can in 0555)
    assert can_write_beside(tmp_path / "file" / "t.yaml") is not None
    assert can_write_beside(out) is None
    monkeypatch.setattr(job, "can_write_beside", lambda path: PermissionError("denied"))
    done = CliRunner().invoke(tune_command, cli_args(recipe_path, out, "--trials", "1"))
    assert done.exit_code == 2 and f"--out {out}: cannot write in" in done.output
