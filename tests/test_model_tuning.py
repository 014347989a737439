"""Tuning a whole model (tune-model) and model-level tuned files, on the tiny Llama."""

from __future__ import annotations

import itertools
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from optuna.trial import TrialState

transformers = pytest.importorskip("transformers")

from model_tuning_worker import (  # noqa: E402
    LAYERS,
    SEQ_LEN,
    SHARED,
    config,
    text_ids,
    write_recipes,
)
from tiny_models import STREAM, tiny_llama  # noqa: E402

import attncompose as ac  # noqa: E402
from attncompose.cli import main as cli  # noqa: E402
from attncompose.models import replay as replay_module  # noqa: E402
from attncompose.models.evaluate import perplexity, perplexity_and_frac  # noqa: E402
from attncompose.models.replay import LayerReplay  # noqa: E402
from attncompose.runtime.model_tuned import (  # noqa: E402
    ModelShape,
    ModelTunedFile,
    read_model_tuned,
    write_model_tuned,
)
from attncompose.tuner.allocate import (  # noqa: E402
    CONFIDENCE,
    POWER,
    Curve,
    allocate,
    cheapest_within,
    layer_front,
    measure_next,
)
from attncompose.tuner.choice import frac_one_reason  # noqa: E402
from attncompose.tuner.front import Point, pareto  # noqa: E402
from attncompose.tuner.model_job import (  # noqa: E402
    NUDGE,
    ModelReporter,
    ModelTuneJob,
    _next_budget,
    tune_model,
)
from attncompose.tuner.model_report import summary_table  # noqa: E402
from attncompose.tuner.study import open_storage  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
WORKER = str(Path(__file__).parent / "model_tuning_worker.py")


# -- the job ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama(LAYERS)


def test_target_err_choices_hold_on_fit_and_check(tiny_model, tmp_path):
    write_recipes(tmp_path)
    cfg = config(tmp_path / "t.yaml", tmp_path / "cache", target_err=0.5, segments=3)
    result = tune_model(tiny_model, "tiny", text_ids(), cfg)
    tuned = read_model_tuned(cfg.out)
    assert tuned.model == ModelShape(
        name="tiny", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16
    )
    entry = tuned.lengths[SEQ_LEN]
    assert [s.role for s in entry.segments] == ["fit", "check", "test"]
    assert [s.offset for s in entry.segments] == [0, SEQ_LEN, 2 * SEQ_LEN]
    for layer in entry.layers.values():
        for choice in layer.choices:
            assert choice.errors["fit"] <= 0.5 and choice.errors["check"] <= 0.5
    assert any(c.recipe for lt in entry.layers.values() for c in lt.choices)
    for choice in (c for lt in entry.layers.values() for c in lt.choices):
        # an approximate choice's decode step is timed beside exact attention's
        timed = choice.decode_latency_ms is not None
        assert timed == (not choice.is_exact) == (choice.exact_decode_latency_ms is not None)
    for unit, point in result.chosen.items():  # the cheapest of the front within the target
        cheaper = [p for p in pareto(result.points[unit]) if p.cost < point.cost]
        assert all(p.error > 0.5 or p.trial is not None for p in cheaper)
    for seg in entry.segments:
        assert seg.ppl is not None and 0 < seg.frac < 1
    assert set(entry.error_mean) == {"fit", "check", "test"}


@pytest.mark.parametrize("per_head", [False, True])
def test_every_unit_holds_the_model_wide_trials_measured_on_it(tiny_model, tmp_path, per_head):
    write_recipes(tmp_path)
    cfg = config(tmp_path / "s.yaml", tmp_path / "cache", per_head=per_head, trials=1, segments=1)
    job = ModelTuneJob(tiny_model, "tiny", text_ids(1), cfg, ModelReporter())
    result = job.run()
    storage = open_storage(f"sqlite:///{tmp_path / 's.optuna.db'}")
    names = optuna.get_all_study_names(storage)
    scope = "all-heads" if per_head else "all-layers"
    shared = {n.rsplit(":", 1)[1].rsplit("-", 1)[0]: n for n in names if f":{scope}:" in n}
    assert set(shared) == {"tiny-topk", "tiny-stream"}
    for recipe, name in shared.items():
        wide = optuna.load_study(study_name=name, storage=storage).trials
        assert len(wide) == SHARED
        for index, unit in enumerate(job.units):
            copies = [p for p in result.points[unit] if p.recipe == recipe][: len(wide)]
            assert [p.knobs for p in copies] == [t.params for t in wide]
            for point, t in zip(copies, wide, strict=True):
                ev = job._evaluator(recipe, job.data(unit).calibration()).evaluate(point.knobs)
                assert point.error == pytest.approx(ev.error_mean, rel=1e-6)
                assert point.error == t.user_attrs["unit_errors"][index]
                assert point.cost == point.frac == pytest.approx(ev.frac)
            assert len([p for p in result.points[unit] if p.recipe == recipe]) == SHARED + 1
        means = [statistics.fmean(t.user_attrs["unit_errors"]) for t in wide]
        assert [t.values[0] for t in wide] == pytest.approx(means)


def test_ppl_budget_is_met_on_the_calibration_text_by_the_final_forward(tiny_model, tmp_path):
    write_recipes(tmp_path)
    budget = 0.01
    cfg = config(
        tmp_path / "p.yaml", tmp_path / "cache", target_err=None, ppl_budget=budget, segments=2
    )
    tune_model(tiny_model, "tiny", text_ids(2), cfg)
    entry = read_model_tuned(cfg.out).lengths[SEQ_LEN]
    for seg in entry.segments:
        assert seg.ppl / seg.exact_ppl - 1 <= budget
    assert entry.frac < 1  # some layer is approximated
    assert all(lt.sensitivity for lt in entry.layers.values())
    fit = entry.segment("fit")
    ids = text_ids(2).ids[:, :SEQ_LEN]
    ppl, frac = perplexity_and_frac(tiny_model, ids, ac.load(cfg.out, backend="torch"))
    assert ppl == pytest.approx(fit.ppl, rel=1e-6) and frac == pytest.approx(fit.frac)
    assert perplexity(tiny_model, ids) == pytest.approx(fit.exact_ppl, rel=1e-5)


def test_per_head_choices_cover_every_group(tiny_model, tmp_path):
    write_recipes(tmp_path)
    cfg = config(tmp_path / "h.yaml", tmp_path / "cache", per_head=True, trials=2, segments=1)
    tune_model(tiny_model, "tiny", text_ids(1), cfg)
    entry = read_model_tuned(cfg.out).lengths[SEQ_LEN]
    assert entry.per_head
    for layer in entry.layers.values():
        assert [c.kv_heads for c in layer.choices] == [[0], [1]]


def test_cost_latency_chooses_by_milliseconds_and_records_frac(tiny_model, tmp_path):
    write_recipes(tmp_path)
    cfg = config(tmp_path / "l.yaml", tmp_path / "cache", cost="latency", trials=2, segments=1)
    result = tune_model(tiny_model, "tiny", text_ids(1), cfg)
    entry = read_model_tuned(cfg.out).lengths[SEQ_LEN]
    assert entry.cost == "latency"
    for unit, point in result.chosen.items():
        assert point.cost == point.latency_ms
        front = pareto(result.points[unit])
        best = min((p for p in front if p.error <= 0.5), key=lambda p: p.cost)
        assert (point.recipe, point.knobs) == (best.recipe, best.knobs)
        choice = entry.layers[unit.layer].choices[0]
        assert 0 < choice.frac <= 1 and choice.latency_ms == point.latency_ms


def test_knobs_computing_every_product_are_no_choice(tiny_model, tmp_path, monkeypatch):
    """A window covering the whole length computes every product (frac 1): exact attention by
    another road, error 0, so only timing noise could make it look cheaper than exact
    attention. Here exact attention is made to look slow: the unit still takes exact
    attention, never the window (before: the window, in every layer)."""
    recipe = tmp_path / "wide.yaml"
    recipe.write_text(
        "name: wide\nsteps:\n  local: {op: window, width: {default: 8, choices: [8, 64]}}\n"
        "  out: {op: block, select: [local], block_size: 16}\n"
    )
    slow = lambda self, calib: Point(None, None, error=0.0, cost=1e6, frac=1.0, latency_ms=1e6)
    monkeypatch.setattr(ModelTuneJob, "_exact_point", slow)
    cfg = config(
        tmp_path / "w.yaml",
        tmp_path / "cache",
        recipes=(str(recipe),),
        target_err=1e-4,
        cost="latency",
        shared_trials=2,
        trials=2,
        segments=1,
    )
    result = tune_model(tiny_model, "tiny", text_ids(1), cfg)
    for unit, points in result.points.items():
        assert {p.knobs["local.width"] for p in points if not p.is_exact} == {8}, unit
        assert result.chosen[unit].is_exact, unit


@pytest.mark.parametrize("goal", ["target", "budget"])
def test_a_tuning_where_every_trial_computes_every_product_says_so(tiny_model, tmp_path, goal):
    """At a length every knob setting covers (a window of 64 or more at 64 tokens) each trial
    computes every product (frac 1): every layer runs exact attention, and the file's notes
    said nothing of why (tune says it of a recipe); they say it now, in tune's words."""
    recipe = tmp_path / "wide.yaml"
    recipe.write_text(
        "name: wide\nsteps:\n  local: {op: window, width: {default: 64, choices: [64, 128]}}\n"
        "  out: {op: block, select: [local], block_size: 16}\n"
    )
    goals = {"target": {"target_err": 0.5}, "budget": {"target_err": None, "ppl_budget": 0.01}}
    cfg = config(
        tmp_path / "w.yaml",
        tmp_path / "cache",
        recipes=(str(recipe),),
        shared_trials=2,
        trials=2,
        segments=2,
        **goals[goal],
    )
    result = tune_model(tiny_model, "tiny", text_ids(2), cfg)
    assert all(point.is_exact for point in result.chosen.values())
    notes = read_model_tuned(cfg.out).lengths[SEQ_LEN].notes
    goal = "the target" if goal == "target" else "the perplexity budget"
    assert notes[0] == f"every layer runs exact attention: {frac_one_reason(goal)}", notes
    assert notes[0] in summary_table(result).caption  # what tune-model prints


def test_layers_exact_for_want_of_a_point_within_the_target_say_so(tiny_model, tmp_path):
    """Layers whose trials all missed the target run exact attention; the notes said nothing
    of why (tune says it of a recipe, with the least error reached); they say it now."""
    recipe = tmp_path / "narrow.yaml"
    recipe.write_text(
        "name: narrow\nsteps:\n  local: {op: window, width: {default: 8, choices: [8, 16]}}\n"
        "  out: {op: block, select: [local], block_size: 16}\n"
    )
    cfg = config(
        tmp_path / "w.yaml",
        tmp_path / "cache",
        recipes=(str(recipe),),
        target_err=1e-6,
        shared_trials=1,
        trials=1,
        segments=2,
    )
    result = tune_model(tiny_model, "tiny", text_ids(2), cfg)
    assert all(point.is_exact for point in result.chosen.values())
    least = min(p.error for ps in result.points.values() for p in ps if not p.is_exact)
    notes = read_model_tuned(cfg.out).lengths[SEQ_LEN].notes
    assert notes[0] == (
        "every layer runs exact attention: no trial met the error target 1e-06 on the fit and "
        f"check segments (least error {least:.3g} on the fit segment)"
    ), notes
    assert notes[0] in summary_table(result).caption


def finished_studies(url: str, trials: int) -> dict[str, list[tuple]]:
    """Studies with at least ``trials`` finished trials: name -> (number, params, values)."""
    storage = open_storage(url)
    done = {}
    for name in optuna.get_all_study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        rows = [
            (t.number, t.params, t.values)
            for t in study.trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        ]
        if len(rows) >= trials:
            done[name] = rows
    return done


def worker(
    tmp_path, out: str, storage: str, study: str, trials: int, layers: int = LAYERS
) -> subprocess.Popen:
    args = [out, storage, study, str(trials), str(tmp_path / "cache"), str(layers)]
    return subprocess.Popen(
        [sys.executable, WORKER, *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_resume_after_sigkill_loses_no_finished_layer(tmp_path):
    write_recipes(tmp_path)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    trials, layers = 6, 3  # 6 layer studies: killed after 2, most are left to do
    run = lambda: worker(tmp_path, str(tmp_path / "r.yaml"), url, "resume", trials, layers)
    proc = run()
    deadline = time.monotonic() + 120
    before: dict = {}
    # a layer study is finished with the model-wide trials and its own
    while len(before) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        if (tmp_path / "studies.db").exists():
            before = finished_studies(url, SHARED + trials)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = finished_studies(url, SHARED)  # the model-wide studies and begun layer studies
    done = finished_studies(url, SHARED + trials)  # the finished layer studies
    assert 2 <= len(done) < 2 * layers and not (tmp_path / "r.yaml").exists()
    assert sum(":all-layers:" in name for name in before) == 2  # one per recipe
    proc = run()
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    after = finished_studies(url, SHARED)
    assert len(after) == 2 + 2 * layers  # model-wide per recipe, layers x recipes
    assert len(finished_studies(url, SHARED + trials)) == 2 * layers
    for name, rows in before.items():
        assert after[name][: len(rows)] == rows  # nothing redone, nothing lost
    for name, rows in done.items():
        assert after[name] == rows
    assert set(read_model_tuned(tmp_path / "r.yaml").lengths[SEQ_LEN].layers) == {0, 1, 2}


def run_two_workers(tmp_path, storage: str, study: str, trials: int = 4) -> None:
    """Two processes, one storage: every study once, trial numbers contiguous, no layer's
    budget spent twice (at most one extra trial where both workers were at a study's end)."""
    write_recipes(tmp_path)
    procs = [worker(tmp_path, str(tmp_path / f"w{i}.yaml"), storage, study, trials) for i in (0, 1)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stdout.read()
    loaded = open_storage(storage)
    names = [s for s in optuna.get_all_study_names(loaded) if s.startswith(f"{study}:")]
    assert len(names) == 2 + 2 * LAYERS  # model-wide per recipe, layers x recipes
    for name in names:
        all_trials = optuna.load_study(study_name=name, storage=loaded).trials
        assert [t.number for t in all_trials] == list(range(len(all_trials)))
        assert all(t.state == TrialState.COMPLETE for t in all_trials)
        if ":all-layers:" in name:
            assert SHARED <= len(all_trials) <= SHARED + 1
            continue
        copies = [t.user_attrs.get("shared_trial") for t in all_trials]
        copies = [c for c in copies if c is not None]
        # every model-wide trial is copied (twice where both workers copied at once)
        assert SHARED <= len(set(copies)) <= len(copies) <= 2 * len(set(copies))
        own = len(all_trials) - len(copies)
        assert trials <= own <= trials + 1
    for i in (0, 1):
        assert set(read_model_tuned(tmp_path / f"w{i}.yaml").lengths[SEQ_LEN].layers) == {0, 1}


def test_two_workers_on_one_sqlite_storage_duplicate_no_layer(tmp_path):
    run_two_workers(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}", "two")


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get("ATTNCOMPOSE_TEST_PG_URL"), reason="no PostgreSQL")
def test_two_workers_on_one_postgres_storage_duplicate_no_layer(tmp_path):
    url = os.environ["ATTNCOMPOSE_TEST_PG_URL"]
    run_two_workers(tmp_path, url, f"pg-model-{uuid.uuid4().hex[:8]}")


# -- command line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ppl-budget", "0"], "--ppl-budget is a relative growth"),
        (["--ppl-budget", "-0.02"], "must be positive"),
        (["--target-err", "0.05", "--ppl-budget", "0.02"], "one of --target-err or --ppl-budget"),
        ([], "one of --target-err or --ppl-budget"),
        (["--target-err", "0", "--recipes", "topp"], "--target-err must be positive"),
        (["--target-err", "0.05", "--recipes", "topp,nosuch"], "nosuch"),
        (["--target-err", "0.05", "--recipes", ","], "at least one recipe"),
        (["--target-err", "0.05", "--recipes", "exact"], "no tunable knob"),
        (["--target-err", "0.05", "--study", "s"], "give --storage too"),
        (["--target-err", "0.05", "--trials", "0", "--shared-trials", "0"], "both 0"),
        (["--target-err", "0.05", "--segments", "5"], "--segments"),
        (["--target-err", "0.05", "--text", "no-such-text"], "no such file, nor a built-in"),
        (["--target-err", "0.05", "--seq-len", "9000"], "exceeds the 8192 positions"),
        (["--target-err", "0.05", "--model", "gpt5"], "unknown model 'gpt5'"),
        (["--target-err", "0.05", "--plot", "p.txt"], "--plot p.txt: no figure format .txt"),
    ],
)
def test_bad_arguments_are_one_clear_error(tmp_path, args, message):
    done = CliRunner().invoke(
        cli, ["tune-model", "--seq-len", "64", "--out", str(tmp_path / "o.yaml"), *args]
    )
    assert done.exit_code == 2, done.output
    assert message in done.output
    assert "Traceback" not in done.output


def test_an_out_file_for_another_model_is_refused_before_loading(tmp_path):
    out = tmp_path / "o.yaml"
    write_model_tuned(
        out,
        ModelTunedFile(
            model=ModelShape(name="tiny", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16)
        ),
    )
    done = CliRunner().invoke(
        cli, ["tune-model", "--seq-len", "64", "--target-err", "0.05", "--out", str(out)]
    )
    assert done.exit_code == 2
    assert "holds a tuning of tiny (2 layers" in done.output and "not of smollm2" in done.output


def test_an_out_file_for_another_model_is_refused(tiny_model, tmp_path):
    write_recipes(tmp_path)
    other = ModelShape(name="big", num_layers=30, num_q_heads=9, num_kv_heads=3, head_dim=64)
    out = tmp_path / "o.yaml"
    write_model_tuned(out, ModelTunedFile(model=other))
    from attncompose.tuner.errors import TunerError

    with pytest.raises(TunerError, match="holds a tuning of big"):
        tune_model(tiny_model, "tiny", text_ids(), config(out, tmp_path / "cache"))


# -- pieces -----------------------------------------------------------------------------------


def point(error: float, cost: float, recipe: str | None = "r") -> Point:
    return Point(recipe, {} if recipe else None, error, cost, frac=cost, latency_ms=0.0, trial=0)


def test_pareto_and_cheapest_within():
    exact = point(0.0, 1.0, None)
    pts = [point(0.3, 0.1), point(0.2, 0.3), point(0.25, 0.4), point(0.05, 0.5), exact]
    front = pareto(pts)
    assert [(p.error, p.cost) for p in front] == [(0.3, 0.1), (0.2, 0.3), (0.05, 0.5), (0, 1)]
    assert cheapest_within(front, 0.2).cost == 0.3
    assert cheapest_within(front, 0.2, check=lambda p: 0.5 if p.cost == 0.3 else 0).cost == 0.5
    assert cheapest_within(front, 0.01) is exact


def test_layer_front_combines_head_groups():
    a = [point(0.4, 0.2), point(0.0, 1.0, None)]
    b = [point(0.1, 0.3), point(0.0, 1.0, None)]
    front = layer_front([a, b], [0.5, 0.5])
    assert front[0].cost == pytest.approx(0.25)
    assert front[0].error == pytest.approx(math.sqrt(0.5 * 0.16 + 0.5 * 0.01))
    assert front[-1].error == 0 and front[-1].cost == 1
    assert all(x.cost < y.cost and x.error > y.error for x, y in itertools.pairwise(front))


def test_curve_and_allocation():
    curve = Curve()
    curve.add(0.1, 0.01)
    # below the first measurement the growth is convex (error ** POWER), beyond it linear
    assert curve.predict(0.05) == pytest.approx(0.01 * 0.5**POWER)
    assert curve.predict(0.05) < 0.005 and POWER > 1
    assert curve.predict(0.25) == math.inf
    curve.add(0.2, -0.5)  # a negative growth is none; the curve never decreases
    assert curve.predict(0.2) == pytest.approx(0.01) and curve.reach == pytest.approx(0.4)
    curve.add(0.04, 0.002)
    assert curve.predict(0.07) == pytest.approx(0.006)  # linear between measurements
    # a growth counts with CONFIDENCE standard errors; a negative mean counts as none
    noisy = Curve()
    noisy.add(0.1, 0.002, se=0.001)
    noisy.add(0.2, -0.004, se=0.003)
    assert noisy.points == [(0.1, 0.002 + CONFIDENCE * 0.001), (0.2, CONFIDENCE * 0.003)]
    assert noisy.measured == [(0.1, 0.002, 0.001), (0.2, -0.004, 0.003)] and CONFIDENCE > 0
    front = layer_front([[point(0.2, 0.1), point(0.1, 0.3), point(0.0, 1.0, None)]], [1.0])
    sensitive, robust = Curve([(0.1, 0.02), (0.2, 0.08)]), Curve([(0.1, 0.001), (0.2, 0.002)])
    alloc = allocate({0: front, 1: front}, {0: sensitive, 1: robust}, budget=0.025)
    assert alloc[1].error == 0.2  # the robust layer takes the cheapest point
    assert alloc[0].error == 0.1  # the sensitive one what the rest of the budget allows
    assert allocate({0: front}, {0: Curve()}, 1.0)[0].error == 0  # nothing measured: exact


@torch.inference_mode()
def test_layer_replay_equals_whole_forward_passes(tiny_model, monkeypatch):
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(4))
    replay = LayerReplay(tiny_model, ids)
    assert replay.partial
    assert replay.exact_ppl == pytest.approx(perplexity(tiny_model, ids), rel=1e-5)
    attn = ac.compile(ac.load_recipe(STREAM), backend="torch")
    growths = []
    for layer in range(LAYERS):
        whole = perplexity(tiny_model, ids, attn, [layer])
        assert replay.perplexity(layer, attn) == pytest.approx(whole, rel=1e-5)
        assert whole != pytest.approx(replay.exact_ppl, rel=1e-4)
        growths.append(replay.growth(layer, attn))
        assert growths[-1].mean == pytest.approx(math.log(whole / replay.exact_ppl), abs=1e-5)
        assert growths[-1].se > 0
    # a model without the layout it re-runs: whole forward passes, the same growths
    monkeypatch.setattr(replay_module, "supports_replay", lambda model: False)
    whole_passes = LayerReplay(tiny_model, ids)
    assert not whole_passes.partial and not whole_passes.inputs
    for layer, growth in enumerate(growths):
        again = whole_passes.growth(layer, attn)
        assert again.mean == pytest.approx(growth.mean, abs=1e-5)
        assert again.se == pytest.approx(growth.se, rel=1e-3, abs=1e-6)


def test_perplexity_and_frac_of_exact_attention(tiny_model):
    ids = torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(5))
    ppl, frac = perplexity_and_frac(tiny_model, ids, ac.compile("exact", backend="torch"))
    assert ppl == pytest.approx(perplexity(tiny_model, ids), rel=1e-5) and frac == 1.0


def test_unbounded_allocation_says_where_to_measure_next():
    # measured only at a small error, where it costs nothing: the bounded allocation cannot
    # leave the measured range, the unbounded one goes to the cheap point beyond it
    front = layer_front([[point(0.6, 0.1), point(0.02, 0.9), point(0.0, 1.0, None)]], [1.0])
    flat = Curve([(0.02, 0.0)])
    assert flat.predict(0.6) == math.inf and flat.predict(0.6, bounded=False) == 0.0
    assert allocate({0: front}, {0: flat}, budget=0.01)[0].error == 0.02
    assert allocate({0: front}, {0: flat}, budget=0.01, bounded=False)[0].error == 0.6
    assert Curve().predict(0.1, bounded=False) == math.inf  # nothing measured: nothing known


def test_a_curve_is_far_from_errors_well_beyond_or_below_its_measurements():
    assert Curve().far(0.05) and not Curve().far(0.0)  # nothing measured: far from all
    grew = Curve([(0.05, 0.001), (0.1, 0.004)])
    assert not grew.far(0.04) and not grew.far(0.14)
    assert grew.far(0.16) and grew.far(0.03)  # 1.6x beyond the largest, below the smallest
    flat = Curve([(0.05, 0.0)])  # did not grow at 0.05: nothing below it can
    assert not flat.far(0.001) and flat.far(0.08)


def test_a_far_layer_is_measured_stepping_out_to_its_curves_reach():
    errors = [0.02, 0.05, 0.09, 0.2, 0.5, 1.0]
    front = layer_front([[point(e, 1 - e) for e in errors] + [point(0.0, 1.0, None)]], [1.0])
    at = {round(c.error, 6): c for c in front}
    flat = Curve([(0.05, 0.0)])  # did not grow: the unbounded allocation goes to error 1
    assert allocate({0: front}, {0: flat}, 0.01, bounded=False)[0] == at[1.0]
    assert measure_next(front, flat, at[1.0]) == at[0.09]  # the farthest within reach 0.1
    # none within reach (0.18, 0.3): the nearest far beyond (0.2 is not far from 0.15)
    assert measure_next(front, Curve([(0.09, 0.0)]), at[1.0]) == at[0.2]
    assert measure_next(front, Curve([(0.15, 0.0)]), at[1.0]) == at[0.5]
    assert measure_next(front, Curve([(0.5, 0.0)]), at[1.0]) == at[1.0]  # within reach
    assert measure_next(front, flat, at[0.09]) == at[0.09]


def test_next_budget_moves_past_a_repeated_allocation():
    assert _next_budget(None, 0.02, 0.02) == pytest.approx(0.02 / NUDGE)  # it failed: tighter
    assert _next_budget(0.02, None, 0.02) == pytest.approx(0.02 * NUDGE)  # it held: looser
    assert _next_budget(0.01, 0.04, 0.03) == pytest.approx(0.02)  # between the bounds
    assert _next_budget(0.02, 0.0201, 0.02) is None  # the bounds met


def test_a_rerun_reuses_the_measured_sensitivities(tiny_model, tmp_path, monkeypatch):
    write_recipes(tmp_path)
    cfg = config(tmp_path / "p.yaml", tmp_path / "cache", target_err=None, ppl_budget=0.01)
    tune_model(tiny_model, "tiny", text_ids(), cfg)
    first = read_model_tuned(cfg.out).lengths[SEQ_LEN]
    calls = []
    original = LayerReplay.losses
    monkeypatch.setattr(
        LayerReplay, "losses", lambda self, *a: calls.append(a) or original(self, *a)
    )
    phases = []
    reporter = ModelReporter()
    reporter.phase = phases.append
    tune_model(tiny_model, "tiny", text_ids(), cfg, reporter)
    again = read_model_tuned(cfg.out).lengths[SEQ_LEN]
    assert calls == []  # every sensitivity came from the storage
    # one entry a length: the rerun says it replaces the first run's (found by fuzzing)
    replaced = f"replacing the entry of n={SEQ_LEN} (--ppl-budget 0.01) by this tuning's"
    assert any(replaced in p for p in phases), phases
    assert [lt.sensitivity for lt in again.layers.values()] == [
        lt.sensitivity for lt in first.layers.values()
    ]
    assert all(lt.sensitivity for lt in again.layers.values())
