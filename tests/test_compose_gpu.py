"""docker-compose on a GPU host, checked structurally (no Docker engine here): each GPU service gets its own
GPU, and the pipeline runs a GPU config whose model is the one the vllm service serves."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
_DEFAULT = re.compile(r"\$\{(\w+):-(.*)\}", re.S)


def _default(value: str) -> str:
    """The value of a ``${VAR:-default}`` with VAR unset (what a plain `docker compose up` uses)."""
    match = _DEFAULT.fullmatch(value.strip())
    return match.group(2) if match else value


def _compose() -> tuple[dict[str, Any], dict[str, Any]]:
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    gpu = yaml.safe_load((ROOT / "docker" / "compose.gpu.yml").read_text())["services"]
    return base, gpu


def _gpu_ids(service: dict[str, Any]) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    ids: list[str] = []
    for device in devices:
        assert "count" not in device, "a GPU count lets Docker pick the same GPU for two services"
        ids += [_default(str(i)) for i in device["device_ids"]]
    return ids


def test_each_gpu_service_has_its_own_gpu() -> None:
    base, gpu = _compose()
    serve, server = _gpu_ids(gpu["bvpo-serve"]), _gpu_ids(base["vllm"])
    assert len(serve) == 1 and len(server) == 1
    assert serve != server


def test_the_gpu_recipe_runs_a_gpu_config_on_the_served_model() -> None:
    base, gpu = _compose()
    env = gpu["bvpo-serve"]["environment"]
    config_path = _default(env["BVPO_CONFIG"])
    assert config_path.startswith("configs/gpu-")
    args = shlex.split(_default(env["BVPO_SERVE_ARGS"]))
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    config = load_config(ROOT / config_path, overrides)
    assert config.generation.engine == "openai"
    assert config.generation.base_url == "http://vllm:8000/v1"
    assert str(config.workspace) == "/app/workspace"  # the bvpo-workspace volume
    served = re.search(r"--model (\S+)", " ".join(base["vllm"]["command"].split()))
    assert served is not None
    assert _default(served.group(1)) == config.model.name_or_path
