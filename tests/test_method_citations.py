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
