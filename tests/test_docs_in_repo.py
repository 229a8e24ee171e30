"""Docstrings and comments point only at files in the repository (docs/design.md and the other docs/ pages)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A design document that is not in the repository, or a path out of it (data directories are passed as arguments).
OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared/(?!data)")
CITED = re.compile(r"docs/[\w./-]+\.md")


def _sources():
    for top in ("pica_kernels", "tests", "examples", "benchmarks", "docs"):
        for path in (ROOT / top).rglob("*"):
            if path.suffix in (".py", ".md") and path.resolve() != Path(__file__).resolve():
                yield path


def test_no_reference_points_outside_the_repo():
    found = [f"{p.relative_to(ROOT)}:{i}" for p in _sources()
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not found, f"references to documents outside the repository: {found}"


def test_cited_docs_exist():
    cited = {m for p in (ROOT / "pica_kernels").rglob("*.py") for m in CITED.findall(p.read_text())}
    assert cited, "the package cites its docs"
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, f"docstrings cite missing docs: {missing}"
