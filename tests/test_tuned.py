"""Tuned files: round trip, per-length dispatch and its stated policy, clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml

import attncompose as ac
from attncompose.tuned import TunedAttention, TunedEntry, TunedFile, load, read_tuned, write_tuned

KNOBS = {"diag.block_size": 16, "residual.sample_size": 8, "out.min_seq_len": 32}


def entry(knobs: dict | None = KNOBS) -> TunedEntry:
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
    return TunedEntry(knobs=knobs, error_mean=0.05, error_max=0.08, latency_ms=1.0, **common)


@pytest.fixture
def tuned_path(tmp_path):
    recipe = ac.load_recipe("hyperattention").model_dump(mode="json", exclude_none=True)
    tuned = TunedFile(causal=True, recipe=recipe, table={"cpu": {128: entry(), 512: entry(None)}})
    path = tmp_path / "tuned.yaml"
    write_tuned(path, tuned)
    return path


def test_round_trip(tuned_path):
    tuned = read_tuned(tuned_path)
    assert tuned.table["cpu"][128].knobs == KNOBS
    assert tuned.table["cpu"][512].is_exact
    write_tuned(tuned_path, tuned)
    assert read_tuned(tuned_path) == tuned


def test_dispatch_by_length_with_the_stated_policy(tuned_path, make_qkv):
    attn = load(tuned_path, backend="torch")
    recipe = ac.load_recipe("hyperattention")
    q, k, v = make_qkv(b=1, hq=4, hkv=2, lq=128, d=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tuned length says nothing
        out = attn(q, k, v, is_causal=True)
    expected = ac.compile(recipe.with_knobs(KNOBS), backend="torch")(q, k, v, is_causal=True)
    assert torch.equal(out, expected)
    with pytest.warns(UserWarning, match="length 100 not tuned; using the entry of 128"):
        attn(q[:, :, :100], k[:, :, :100], v[:, :, :100], is_causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        attn(q[:, :, :100], k[:, :, :100], v[:, :, :100], is_causal=True)
    assert attn.choose("cpu", 300, True)[0] is None  # the 512 entry is exact attention
    knobs, note = attn.choose("cpu", 600, True)
    assert knobs is None and "above every tuned length" in note
    knobs, note = attn.choose("cpu", 128, False)
    assert knobs is None and "causal attention only" in note


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
    knobs, note = attn.choose("cpu", 128, True)
    assert knobs == KNOBS and "not tuned on cpu; using the entries of NVIDIA H100" in note


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
            lambda d: d["recipe"]["steps"]["diag"].update(block_size=0),
            "recipe.steps.diag.block_size",
        ),
        (lambda d: d.update(format="other/9"), "format"),
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
    ],
)
def test_unreadable_tuned_file(tmp_path, text, message):
    path = tmp_path / "tuned.yaml"
    path.write_text(text)
    with pytest.raises(ac.RecipeError, match=message):
        load(path)
    with pytest.raises(ac.RecipeError, match="file not found"):
        load(tmp_path / "missing.yaml")
