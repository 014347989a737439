"""The README and docs point at files the repository has, and their result tables are the
ones `benchmarks/readme_tables.py` renders from `benchmarks/results/` (nobody types them)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RECIPES = sorted((ROOT / "attncompose" / "recipes").glob("*.yaml"))
FILE_MENTION = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.(?:md|png|json|py|yaml))\b")


@pytest.mark.parametrize("doc", DOCS + RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_files_named_in_docs_exist(doc):
    """Links and bare mentions of repository files (e.g. FINDINGS.md) resolve, from the
    repository root, the package or the document's folder."""
    text = doc.read_text()
    named = set(re.findall(r"\]\(([^)#\s]+)\)", text)) | set(FILE_MENTION.findall(text))
    local = {n for n in named if "://" not in n and ("/" in n or n.endswith(".md"))}
    roots = (ROOT, ROOT / "attncompose", doc.parent)
    missing = sorted(n for n in local if not any((root / n).exists() for root in roots))
    assert not missing, f"{doc.name} names files the repository lacks: {missing}"


def check_tables(results: Path) -> subprocess.CompletedProcess:
    script = ROOT / "benchmarks" / "readme_tables.py"
    command = [sys.executable, str(script), "--check", "--results", str(results)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_readme_tables_are_the_results_files(tmp_path):
    """Every table between results markers is what benchmarks/readme_tables.py renders from
    benchmarks/results/; a changed results file makes the README stale."""
    done = check_tables(ROOT / "benchmarks" / "results")
    assert done.returncode == 0, done.stderr
    assert "results parts up to date" in done.stdout
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    bench = json.loads((results / "bench_cpu.json").read_text())
    bench["rows"][0]["sdpa_samples_ms"] = [2 * s for s in bench["rows"][0]["sdpa_samples_ms"]]
    (results / "bench_cpu.json").write_text(json.dumps(bench))
    stale = check_tables(results)
    assert stale.returncode == 1 and "bench_cpu" in stale.stderr


def test_readme_first_command_is_the_main_job():
    """README opens with the main job (several recipes, HyperAttention among them, compared
    against exact attention, with a plot) and the test command that .ci/run runs."""
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    tune = next(part.split() for part in blocks[0].split("&&") if " tune " in part)
    recipes = [w for w in tune[2:] if not w.startswith("-")][:3]
    assert len(recipes) >= 2 and any(r.startswith("hyperattention") for r in recipes)
    assert "--plot" in tune and "--target-err" in tune
    assert blocks[1] in (ROOT / ".ci" / "run").read_text()


def test_gpu_table_renders_a_bench_gpu_results_file(tmp_path):
    """Once a GPU run's bench_gpu_<device>.json is in benchmarks/results, README's GPU table
    shows its causal d=128 speedups per recipe and implementation (until then it says how
    to make one)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from readme_tables import bench_gpu

    assert "gpu_session.sh" in bench_gpu(tmp_path)
    row = dict(causal=True, head_dim=128, q_len=32768, seq_len=32768, frac=0.05)
    rows = [
        {**row, "impl": "cudnn", "recipe": None, "median_ms": 14.8},
        {**row, "impl": "attncompose", "recipe": "streaming", "median_ms": 1.5,
         "speedup_vs_best_exact": 9.87, "efficiency": 0.49},
        {**row, "impl": "flex", "recipe": "streaming", "median_ms": 1.9,
         "speedup_vs_best_exact": 7.79, "efficiency": 0.39},
    ]  # fmt: skip
    run = dict(device="NVIDIA H200", torch="2.11", triton="3.6", heads=32, commit="abc1234567")
    path = tmp_path / "bench_gpu_NVIDIA_H200.json"
    path.write_text(json.dumps({**run, "date": "2026-12-01T00:00:00", "rows": rows}))
    table = bench_gpu(tmp_path)
    assert "| `streaming` | attncompose |  | 9.87x (0.49) |  |" in table
    assert "| `streaming` | flex |  | 7.79x (0.39) |  |" in table
    assert "NVIDIA H200" in table and "abc1234" in table
