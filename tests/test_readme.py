"""The README and docs point at files the repository has, and their result tables are the
ones `benchmarks/readme_tables.py` renders from `benchmarks/results/` (nobody types them)."""

from __future__ import annotations

import re
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
