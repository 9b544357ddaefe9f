"""The documentation is self-contained: every file it links or cites exists in the repository.

Backticked names of other files (`results.json`, `key.json`) are what commands write, so only
Markdown links and cited documents (`*.md`) must resolve, and in code the `docs/*.md` it cites.
"""
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
WRITTEN = {"tally.md"}  # Markdown that commands write (`sr3d study tally`), cited as output
PYTHON = [*sorted((REPO / "sr3d").rglob("*.py")), *sorted(REPO.glob("*.py")), *sorted((REPO / "benchmarks").glob("*.py"))]


def _missing(path: pathlib.Path, references) -> list[str]:
    return [r for r in references
            if not r.startswith(("http://", "https://", "mailto:")) and r not in WRITTEN
            and not (path.parent / r).exists() and not (REPO / r).exists()]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_cited_documents_exist(path):
    text = path.read_text(encoding="utf-8")
    references = re.findall(r"\]\(([^)#\s]+)", text) + re.findall(r"`([\w./-]+\.md)`", text)
    assert _missing(path, references) == []


def test_code_cites_only_documents_in_the_repository():
    cited = {(p.relative_to(REPO), r) for p in PYTHON
             for r in re.findall(r"(?<![\w/.])(docs/[\w/-]+\.md)\b", p.read_text(encoding="utf-8"))}
    assert sorted(c for c in cited if _missing(REPO / c[0], [c[1]])) == []
