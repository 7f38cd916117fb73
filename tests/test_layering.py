"""Imports point one way (docs/architecture.md): flows → tasks → pipeline → storage.

Every import statement is read with ``ast``, including the lazy ones inside functions, so a command that
imports ``tasks`` only when it runs is caught too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (absolute imports; relative ones are local)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def violations(folder: str, forbidden: set[str]) -> list[str]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(imported_modules(path) & forbidden)
    ]


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("pipeline", {"prefect", "tasks", "flows"}),
        ("storage", {"prefect", "tasks", "flows", "pipeline"}),
        ("tasks", {"flows"}),
        ("flows/cli", {"tasks"}),
    ],
)
def test_layer_does_not_import_upward(folder: str, forbidden: set[str]) -> None:
    assert violations(folder, forbidden) == []


def test_the_checker_sees_lazy_and_dotted_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import os\n"
        "from . import sibling\n"
        "def f():\n"
        "    from tasks.stages import x\n"
        "    import prefect.client\n"
    )
    assert imported_modules(module) == {"os", "tasks", "prefect"}


def test_the_cli_and_the_variance_analysis_load_without_prefect() -> None:
    """`bvpo --help` and the modules `bvpo analyze-variance` needs do not import Prefect."""
    code = (
        "import sys, flows.cli, pipeline.models, storage.lineage\n"
        "from typer.testing import CliRunner\n"
        "assert CliRunner().invoke(flows.cli.app, ['--help']).exit_code == 0\n"
        "print(sorted(m for m in sys.modules if m == 'prefect' or m.startswith(('prefect.', 'tasks'))))\n"
    )
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
