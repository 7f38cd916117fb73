"""Every ``docs/method.md §<heading>`` cited in the code and the docs names a heading of docs/method.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/method\.md\s+(§[^`]{0,80})")


def headings() -> list[str]:
    text = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    return [m.group(1).strip() for m in re.finditer(r"^#{2,4}\s+(.+)$", text, re.M)]


def cited_names(text: str) -> list[str]:
    """The text after each ``§``: a heading, then possibly more words (``§A, §B`` gives both).

    Lines are joined first (a citation may wrap in a docstring or a comment); a citation is read over its
    next 80 characters.
    """
    text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)
    out = []
    for match in CITATION.finditer(text):
        out += [part.strip() for part in match.group(1).split("§") if part.strip()]
    return out


def test_every_citation_names_a_heading() -> None:
    known = headings()
    assert {"The two estimators", "The variance law", "Probe estimator", "Token-exact sequences"} <= set(
        known
    )
    files = [
        p
        for folder in ("pipeline", "storage", "tasks", "flows", "tests", "bench")
        for p in (ROOT / folder).rglob("*.py")
    ]
    files += [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
    bad = []
    for path in files:
        if path.name == Path(__file__).name:
            continue
        for name in cited_names(path.read_text(encoding="utf-8")):
            if name.startswith("<heading>"):
                continue
            if not any(name.startswith(h) for h in known):
                bad.append(f"{path.relative_to(ROOT)}: §{name[:60]}")
    assert bad == []


OUTSIDE_NOTES = "DESIGN" + ".md"  # design notes that live outside the repository (spelt so this file passes)
# Files allowed to cite them while being rewritten; each entry must still cite the notes (so the list cannot
# go stale). Empty: nothing in the repository cites them.
PENDING_CITATIONS: dict[str, str] = {}


def test_nothing_cites_notes_outside_the_repository() -> None:
    import subprocess

    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    citing = set()
    for name in tracked:
        path = ROOT / name
        if path.suffix in {".png", ".parquet", ".gguf", ".duckdb"} or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if OUTSIDE_NOTES in text:
            citing.add(name)
    assert citing - set(PENDING_CITATIONS) == set(), "cite docs/method.md §<heading> or arXiv 2510.05095"
    assert set(PENDING_CITATIONS) - citing == set(), "fixed: remove it from PENDING_CITATIONS"
