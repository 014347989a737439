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
