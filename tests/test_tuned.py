"""Tuned files: round trip, per-length dispatch and its stated policy, clear errors."""

from __future__ import annotations

import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from contract import BAD_QKV

import attncompose as ac
from attncompose.runtime.tuned import (
    TunedAttention,
    TunedEntry,
    TunedFile,
    load,
    read_tuned,
    write_tuned,
)

KNOBS = {"diag.block_size": 16, "residual.sample_size": 8, "out.min_seq_len": 32}
STREAMING = {"sinks.count": 1, "local.width": 128}
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "tuned"


def entry(knobs: dict | None = KNOBS, recipe: str = "hyperattention", **extra) -> TunedEntry:
    common = dict(
        exact_latency_ms=2.0,
        trials=5,
        target_err=0.1,
        seeds=3,
        data="built-in",
        date="2026-01-01",
        versions={"torch": torch.__version__},
    )
    if knobs is None:
        return TunedEntry(
            fallback="no trial met the error target 0.1",
            error_mean=0,
            error_max=0,
            latency_ms=2.0,
            **common,
        )
    values = dict(error_mean=0.05, error_max=0.08, latency_ms=1.0, **common) | extra
    return TunedEntry(recipe=recipe, knobs=knobs, **values)


def recipes(*names: str) -> dict:
    return {n: ac.load_recipe(n).model_dump(mode="json", exclude_none=True) for n in names}


@pytest.fixture
def tuned_path(tmp_path):
    table = {"cpu": {128: entry(), 512: entry(None)}}
    tuned = TunedFile(causal=True, recipes=recipes("hyperattention"), table=table)
    path = tmp_path / "tuned.yaml"
    write_tuned(path, tuned)
    return path


def test_round_trip(tuned_path):
    tuned = read_tuned(tuned_path)
    assert tuned.table["cpu"][128].knobs == KNOBS
    assert tuned.table["cpu"][512].is_exact
    write_tuned(tuned_path, tuned)
    assert read_tuned(tuned_path) == tuned


def test_a_named_knob_round_trips_and_runs(tmp_path, make_qkv):
    """Knobs naming a variant (topk's ``score``) are kept as names, not numbers."""
    knobs = {"heavy.k": 2, "heavy.block_size": 32, "heavy.score": "keys"}
    table = {"cpu": {128: entry(knobs, recipe="block-topk")}}
    path = tmp_path / "tuned.yaml"
    write_tuned(path, TunedFile(causal=True, recipes=recipes("block-topk"), table=table))
    assert read_tuned(path).table["cpu"][128].knobs == knobs
    q, k, v = make_qkv(b=1, hq=2, hkv=2, lq=128, d=16)
    direct = ac.compile(ac.load_recipe("block-topk").with_knobs(knobs), backend="torch")
    assert torch.equal(ac.load(path)(q, k, v, is_causal=True), direct(q, k, v, is_causal=True))


def test_cuda_graphs_reach_the_compiled_entries(tuned_path, make_qkv):
    """``ac.load(tuned, cuda_graphs=True)``: the entry a call selects captures a CUDA graph
    per call shape (on a CPU it runs eagerly: the same result)."""
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=128, d=16)
    graphed = load(tuned_path, backend="torch", cuda_graphs=True)
    want = load(tuned_path, backend="torch")(q, k, v, is_causal=True)
    assert torch.equal(graphed(q, k, v, is_causal=True), want)
    module = graphed.select("cpu", 128, True)
    assert module.graphs is not None and module.workspace.nbytes() > 0
    graphed.release_memory()  # as Attention's: every compiled entry's buffers and graphs
    assert module.workspace.nbytes() == 0
    assert torch.equal(graphed(q, k, v, is_causal=True), want)


def test_dispatch_by_length_with_the_stated_policy(tuned_path, make_qkv):
    attn = load(tuned_path, backend="torch")
    recipe = ac.load_recipe("hyperattention")
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=128, d=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tuned length says nothing
        out = attn(q, k, v, is_causal=True)
    expected = ac.compile(recipe.with_knobs(KNOBS), backend="torch")(q, k, v, is_causal=True)
    assert torch.equal(out, expected)
    with pytest.warns(UserWarning, match="length 100 is not tuned; using the entry of 128"):
        attn(q[:, :, :100], k[:, :, :100], v[:, :, :100], is_causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        attn(q[:, :, :100], k[:, :, :100], v[:, :, :100], is_causal=True)
    assert attn.choose("cpu", 300, True).knobs is None  # the 512 entry is exact attention
    choice = attn.choose("cpu", 600, True)
    assert choice.knobs is None and "above every tuned length" in choice.notes[0][1]
    choice = attn.choose("cpu", 128, False)
    assert choice.knobs is None and "causal attention only" in choice.notes[0][1]


def test_a_decode_loop_hears_each_note_once_at_its_own_line(tuned_path, make_qkv):
    """Lk grows by one per decode step: the untuned lengths below 128 share one note, and the
    lengths above every tuned one another, each pointing at the caller's line."""
    attn = load(tuned_path, backend="torch")
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=1, lk=700, d=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for lk in [*range(100, 128), *range(600, 640)]:
            attn(q, k[:, :, :lk], v[:, :, :lk], is_causal=True)
    assert len(caught) == 2, [str(w.message) for w in caught]
    assert "entry of 128" in str(caught[0].message)
    assert "above every tuned length" in str(caught[1].message)
    assert all(w.filename == __file__ for w in caught), [w.filename for w in caught]


def test_several_recipes_dispatch_to_the_winner_of_each_length(tmp_path, make_qkv):
    table = {"cpu": {128: entry(), 256: entry(STREAMING, recipe="streaming")}}
    tuned = TunedFile(causal=True, recipes=recipes("hyperattention", "streaming"), table=table)
    path = tmp_path / "two.yaml"
    write_tuned(path, tuned)
    attn = load(path, backend="torch")
    assert read_tuned(path) == tuned
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=256, d=16)
    out = attn(q, k, v, is_causal=True)
    streaming = ac.compile(ac.load_recipe("streaming").with_knobs(STREAMING), backend="torch")
    assert torch.equal(out, streaming(q, k, v, is_causal=True))
    assert attn.choose("cpu", 128, True).recipe == "hyperattention"
    assert attn.choose("cpu", 200, True).recipe == "streaming"


def test_an_entry_slower_than_exact_says_so_once(tmp_path, make_qkv):
    slow = entry(STREAMING, recipe="streaming", latency_ms=30.0, frac=0.4, cost="products")
    tuned = TunedFile(causal=True, recipes=recipes("streaming"), table={"cpu": {64: slow}})
    path = tmp_path / "slow.yaml"
    write_tuned(path, tuned)
    attn = load(path, backend="torch")
    q, k, v = make_qkv(b=1, hq=2, hkv=1, lq=64, d=16)
    with pytest.warns(UserWarning, match=r"slower than exact attention \(30 ms vs 2 ms\)"):
        attn(q, k, v, is_causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn(q, k, v, is_causal=True)


@pytest.mark.parametrize(
    ("decode", "fallback", "runs"),
    [
        ({"decode_latency_ms": 9.0, "exact_decode_latency_ms": 3.0}, True, "exact"),
        ({"decode_latency_ms": 3.0, "exact_decode_latency_ms": 3.0}, True, "exact"),
        ({"decode_latency_ms": 9.0, "exact_decode_latency_ms": 3.0}, False, "recipe"),
        ({"decode_latency_ms": 1.0, "exact_decode_latency_ms": 3.0}, True, "recipe"),
        ({}, True, "recipe"),  # a file from before decode steps were timed
    ],
    ids=["slower", "tie", "kept-on-request", "faster", "unmeasured"],
)
def test_decode_steps_run_exact_attention_where_it_measured_faster(
    tmp_path, make_qkv, decode, fallback, runs
):
    """A choice that wins at prefill can lose a decode step (one query after the keys) to
    exact attention, which reads each key once: where the tuner measured that, decode steps
    run exact attention (said once), prefill and chunks keep the choice."""
    table = {"cpu": {128: entry(**decode)}}
    path = tmp_path / "decode.yaml"
    write_tuned(path, TunedFile(causal=True, recipes=recipes("hyperattention"), table=table))
    attn = ac.load(path, backend="torch", decode_fallback=fallback)
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=128, d=16)
    recipe = ac.compile(ac.load_recipe("hyperattention").with_knobs(KNOBS), backend="torch")
    exact = ac.compile("exact", backend="torch")
    want = (exact if runs == "exact" else recipe)(q[:, :, -1:], k, v, is_causal=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert torch.equal(attn(q[:, :, -1:], k, v, is_causal=True), want)
        assert torch.equal(attn(q, k, v, is_causal=True), recipe(q, k, v, is_causal=True))
        chunk = attn(q[:, :, -2:], k, v, is_causal=True)
        assert torch.equal(chunk, recipe(q[:, :, -2:], k, v, is_causal=True))
    said = [str(w.message) for w in caught]
    if runs == "exact":
        assert len(said) == 1 and "decode steps at the entry of 128 run exact attention" in said[0]
        times = f"{decode['decode_latency_ms']:g} ms vs exact attention's 3 ms where tuned"
        assert times in said[0]
    else:
        assert said == []


def test_decode_timings_come_in_pairs(tuned_path):
    data = yaml.safe_load(tuned_path.read_text())
    data["table"]["cpu"][128]["decode_latency_ms"] = 3.0
    tuned_path.write_text(yaml.safe_dump(data))
    with pytest.raises(ac.RecipeError, match="decode_latency_ms with exact_decode_latency_ms"):
        load(tuned_path)


def test_first_format_files_still_load(tmp_path, make_qkv):
    """Files of attncompose-tuned/1 (one recipe, each entry with its best) load as a
    one-recipe file; the project's own results hold such files."""
    old = RESULTS / "topp-t0.05-n8192.tuned.yaml"
    assert "attncompose-tuned/1" in old.read_text()
    tuned = read_tuned(old)
    entry_ = tuned.table["cpu"][8192]
    assert list(tuned.recipes) == ["topp"] and entry_.recipe == "topp"
    assert entry_.recipes["topp"].best is not None
    assert entry_.slower_than_exact  # chosen by products, 8x slower than exact on that CPU
    copy = tmp_path / "old.yaml"
    shutil.copyfile(old, copy)
    attn = load(copy, backend="torch")
    assert attn.choose("cpu", 8192, True).knobs == entry_.knobs
    write_tuned(copy, tuned)  # written back in the current format
    assert "attncompose-tuned/2" in copy.read_text() and read_tuned(copy) == tuned


def test_tuned_files_get_the_permissions_of_any_new_file(tuned_path):
    old = os.umask(0o022)
    try:
        write_tuned(tuned_path, read_tuned(tuned_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(tuned_path.stat().st_mode) == 0o644


def test_exact_fallback_and_lse_match_exact(tuned_path, make_qkv, reference):
    attn = load(tuned_path, backend="torch")
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=20, lk=600, d=16)  # decode, GQA, above 512
    with pytest.warns(UserWarning, match="running exact attention"):
        out, lse = attn(q, k, v, is_causal=True, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, is_causal=True)
    assert ac.relative_error(out, ref_out) < 1e-5
    assert ac.relative_error(lse, ref_lse) < 1e-5


def test_other_device_uses_its_entries_and_says_so(tuned_path):
    tuned = read_tuned(tuned_path)
    moved = tuned.model_copy(update={"table": {"NVIDIA H100 80GB HBM3": tuned.table["cpu"]}})
    attn = TunedAttention(moved, backend="torch")
    choice = attn.choose("cpu", 128, True)
    assert choice.knobs == KNOBS
    assert "not tuned on cpu; using the entries of NVIDIA H100" in choice.notes[0][1]
    # an implementation a --backends tuning chose is its device's: the module's runs here
    # (the GPU's triton refused every call of a CPU; found by fuzzing)
    chose = {n: e.model_copy(update={"backend": "triton"}) for n, e in tuned.table["cpu"].items()}
    on_gpu = TunedAttention(moved.model_copy(update={"table": {"NVIDIA H100": chose}}), "torch")
    assert on_gpu.choose("cpu", 128, True).backend is None
    assert on_gpu.choose("NVIDIA H100", 128, True).backend == "triton"
    q = torch.randn(1, 2, 128, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert on_gpu(q, q, q, is_causal=True).shape == q.shape


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda d: d["table"]["cpu"][128].pop("trials"), "table.cpu.128.trials: field required"),
        (lambda d: d["table"]["cpu"][128].update(error_mean=-1), "table.cpu.128.error_mean"),
        (
            lambda d: d["table"]["cpu"][128]["knobs"].update({"diag.nope": 1}),
            "table.cpu.128.knobs: no knob 'diag.nope'",
        ),
        (lambda d: d["table"]["cpu"][128].update(fallback="why"), "table.cpu.128: Value error"),
        (
            lambda d: d["recipes"]["hyperattention"]["steps"]["diag"].update(block_size=0),
            "recipes.hyperattention.steps.diag.block_size",
        ),
        (lambda d: d["table"]["cpu"][128].update(recipe="ghost"), "table.cpu.128.recipe"),
        # hand edits that loaded (found by fuzzing): every call then failed, or ran as 1
        (lambda d: d["table"]["cpu"][128].update(backend="banana"), "table.cpu.128.backend"),
        (
            lambda d: d["table"]["cpu"][128]["knobs"].update({"diag.block_size": True}),
            "table.cpu.128.knobs[diag.block_size]: expected a number or a name, got True",
        ),
        (lambda d: d["table"]["cpu"][128].update(cost="bogus"), "table.cpu.128.cost"),
        (lambda d: d["table"]["cpu"].update({0: d["table"]["cpu"][128]}), "table.cpu.0: must"),
        (lambda d: d["table"]["cpu"].update({-5: d["table"]["cpu"][128]}), "table.cpu.-5:"),
        (  # a length written true was read as 1
            lambda d: d["table"]["cpu"].update({True: d["table"]["cpu"].pop(128)}),
            "table.cpu.1: expected an integer, got True",
        ),
        (lambda d: d["table"]["cpu"][128].update(seeds=True), "table.cpu.128.seeds: expected"),
        (  # numbers too: a latency written true was read as 1.0 ms
            lambda d: d["table"]["cpu"][128].update(latency_ms=True),
            "table.cpu.128.latency_ms: expected a number, got True",
        ),
        (lambda d: d.update(format="other/9"), "format: unknown tuned-file format 'other/9'"),
        (lambda d: d.update(extra=1), "extra: unknown field"),
    ],
)
def test_corrupt_tuned_file_names_file_and_field(tuned_path, edit, where):
    data = yaml.safe_load(tuned_path.read_text())
    edit(data)
    tuned_path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"tuned\.yaml") as err:
        load(tuned_path)
    assert isinstance(err.value, ac.RecipeError)
    assert where.split(":")[0] in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("table: [1,\n", "YAML syntax error"),
        ("- 1\n", "a tuned file is a mapping"),
        ("name: x\nsteps: {out: {op: exact}}\n", "this is a recipe, not a tuned file"),
        ("table:\n  cpu:\n    64: {}\n    64: {}\n", "table.cpu.64: listed twice"),  # not the last
        # the same length written two ways: read as one, one entry was lost silently
        (
            'table:\n  cpu:\n    64: {}\n    "64": {}\n',
            'table.cpu.64: listed twice, as 64 and "64"',
        ),
        (
            "table:\n  cpu:\n    '64': {}\n    64.0: {}\n",
            "table.cpu.64: listed twice, as '64' and 64.0",
        ),
        (
            '{"table": {"cpu": {"64": {}, "064": {}}}}',
            'table.cpu.64: listed twice, as "64" and "064"',
        ),
        (
            "table:\n  cpu:\n    64: {}\n    0x40: {}\n",
            "table.cpu.64: listed twice, as 64 and 0x40",
        ),
    ],
)
def test_unreadable_tuned_file(tmp_path, text, message):
    path = tmp_path / "tuned.yaml"
    path.write_text(text)
    with pytest.raises(ac.RecipeError, match=message):
        load(path)
    with pytest.raises(ac.RecipeError, match="file not found"):
        load(tmp_path / "missing.yaml")


@BAD_QKV
def test_bad_inputs_are_the_errors_of_compiled_modules(tuned_path, qkv):
    """Checked before the shapes choose an entry (they were an AttributeError, an IndexError)."""
    with pytest.raises(ac.AttentionInputError) as want:
        ac.compile("exact")(*qkv, is_causal=True)
    with pytest.raises(ac.AttentionInputError) as got:
        load(tuned_path, backend="torch")(*qkv, is_causal=True)
    assert str(got.value) == str(want.value)


def test_commands_name_a_tuned_file_by_all_its_recipes(tmp_path):
    from attncompose.runtime.loading import attention_name, load_attention

    tuned = TunedFile(causal=True, recipes=recipes("hyperattention", "streaming"))
    path = tmp_path / "two.yaml"
    write_tuned(path, tuned)
    assert attention_name(load_attention(path)) == "hyperattention+streaming (tuned)"
    assert attention_name(load_attention("streaming")) == "streaming"


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_load_hands_check_finite_to_every_module_it_compiles(
    tmp_path, make_qkv, monkeypatch, check
):
    """``ac.load(path, check_finite=False)``: no NaN/Inf pass (a host synchronisation, and
    at decode a read of every cached key and value), at prefill (the entry) nor at decode
    (exact attention); by default a NaN in the keys is an error naming k, one pass a call."""
    from attncompose.runtime import checks

    passes = []
    non_finite = checks.non_finite
    monkeypatch.setattr(checks, "non_finite", lambda *x: passes.append(1) or non_finite(*x))
    table = {"cpu": {128: entry(decode_latency_ms=9.0, exact_decode_latency_ms=3.0)}}
    path = tmp_path / "tuned.yaml"
    write_tuned(path, TunedFile(causal=True, recipes=recipes("hyperattention"), table=table))
    attn = ac.load(path, backend="torch", check_finite=check)
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=128, d=16)
    k[0, 1, 5, 3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the decode fallback's note
        for call in (q, q[:, :, -1:]):  # prefill (the entry), a decode step (exact attention)
            if check:
                with pytest.raises(ac.AttentionInputError, match="k contains NaN or Inf"):
                    attn(call, k, v, is_causal=True)
            else:
                attn(call, k, v, is_causal=True)
    assert len(passes) == (2 if check else 0)
    # refused before an entry is compiled; else the entry's module and exact attention's,
    # neither making a second pass
    assert len(attn._modules_by_key) == (0 if check else 2)
