"""Multi-node training through torchrun's c10d rendezvous: 2 "nodes" x 1 process on localhost (gloo)
give the same model as one process. Under FSDP the second node builds its model on the meta device and
receives its shards from rank 0 (weights materialized once)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.training.run import request_dir_for, torchrun_command, train_bvpo
from tests.pair_rows import made_up_refs, stored_pairs
from tests.tiny_checkpoint import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_command_uses_the_rendezvous_of_the_config() -> None:
    one = torchrun_command(TrainConfig(num_processes=2), Path("r.json"))
    assert "--standalone" in one and "--nproc-per-node=2" in one
    two = TrainConfig(num_nodes=2, num_processes=4, rdzv_endpoint="node0:29400", rdzv_id="run7")
    command = torchrun_command(two, Path("r.json"))
    assert "--standalone" not in command
    assert {"--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400"} <= set(
        command
    )
    assert "--rdzv-id=run7" in command and command[-2:] == ["pipeline.training.launch", "r.json"]
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        TrainConfig(num_nodes=2)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


@pytest.mark.e2e  # four interpreters import torch: a few minutes on a busy 2-core machine
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_match_one_process(tmp_path: Path, strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # both "nodes" are this machine
    model = save_tiny_checkpoint(tmp_path / "model", hidden=32, layers=2)
    pairs = stored_pairs(str(model))
    refs = made_up_refs(pairs)
    base: dict[str, Any] = {"max_steps": 3, "batch_size": 2, "bf16": False, "max_length": 96, "alpha": 0.4}
    single = train_bvpo(
        str(model), pairs["trace"], pairs["empty"], refs, TrainConfig(**base), tmp_path / "single"
    )
    config = TrainConfig(
        **base,
        distributed=strategy,
        num_nodes=2,
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        rdzv_id=f"test-{strategy}",
    )
    output = tmp_path / "multi"
    outcome: dict[str, Any] = {}

    def first_node() -> None:
        try:
            outcome["result"] = train_bvpo(str(model), pairs["trace"], pairs["empty"], refs, config, output)
        except BaseException as exc:
            outcome["error"] = exc

    node0 = threading.Thread(target=first_node)
    node0.start()
    request = request_dir_for(output) / "request.json"
    joined = subprocess.run(
        [sys.executable, "-m", "pipeline.training.launch", "--join", str(request)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=800,
    )
    node0.join(timeout=120)
    assert joined.returncode == 0, joined.stdout[-2000:] + joined.stderr[-3000:]
    assert "error" not in outcome, outcome.get("error")
    multi = outcome["result"]
    assert [m["loss"] for m in multi.metrics] == pytest.approx([m["loss"] for m in single.metrics], abs=1e-5)
    a, b = _weights(tmp_path / "single"), _weights(output)
    for name, value in a.items():
        assert torch.allclose(value, b[name], atol=1e-5), name
    assert not request.parent.exists()  # the request is removed once the run succeeded
