"""Entry point for one rank of a distributed BVPO run: ``torchrun -m pipeline.training.launch req.json``.

Initializes the process group (nccl on GPUs, gloo on CPU), trains, and rank 0 writes the result file.
``python -m pipeline.training.launch --join <request.json>`` starts the ranks of another node of a
multi-node run (``train.num_nodes``; docs/orchestration.md).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from pipeline.config import TrainConfig
from pipeline.training.run import train_bvpo

T = TypeVar("T")


def run_in_process_group(work: Callable[[], T], **init_kwargs: Any) -> T:
    """Run ``work`` inside the default process group, then destroy the group once nothing else holds it.

    ``init_kwargs`` go to ``dist.init_process_group`` (backend: nccl with CUDA, else gloo). A DDP model's
    reducer holds the group from C++: if it outlives ``destroy_process_group()``, the group's last
    reference is dropped inside the reducer's destructor, which runs with the GIL held and joins gloo's
    worker threads, while a worker thread needs the GIL to free the Python tensors of the last
    collective: both wait forever. So ``work``'s objects (its frame, reference cycles, the frames an
    exception keeps) are released first; ``destroy_process_group`` then drops the last reference with
    the GIL released.
    """
    init_kwargs.setdefault("backend", "nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(**init_kwargs)
    try:
        return work()
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the failed frames' locals (a trainer) go now
        raise
    finally:
        gc.collect()  # a trainer caught in a reference cycle would keep its reducer alive
        dist.destroy_process_group()


def _train_rank(request: dict[str, Any]) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    result = train_bvpo(
        request["model_path"],
        pq.read_table(request["pairs_trace"]).to_pylist(),
        pq.read_table(request["pairs_empty"]).to_pylist(),
        pq.read_table(request["ref_logps"]).to_pylist(),
        TrainConfig.model_validate(request["config"]),
        Path(request["output_dir"]),
        trust_remote_code=request["trust_remote_code"],
        generations=(pq.read_table(request["generations"]).to_pylist() if "generations" in request else None),
    )
    if dist.get_rank() == 0:
        Path(request["result"]).write_text(
            json.dumps(
                {
                    "metrics": result.metrics,
                    "weight_delta_l2": result.weight_delta_l2,
                    "resumed_from_step": result.resumed_from_step,
                    "grad_stats": result.grad_stats,
                }
            )
        )


def main(request_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    run_in_process_group(lambda: _train_rank(request))


def join(request_path: str, wait_s: float = 3600.0) -> int:
    """Another node of a multi-node run: wait for the request (see ``run.request_dir_for``), then start
    this node's ranks with the same torchrun rendezvous; the exit code of torchrun."""
    from pipeline.training.run import torchrun_command

    request = Path(request_path)
    deadline = time.monotonic() + wait_s
    while not request.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no training request appeared at {request} within {wait_s:.0f} s")
        time.sleep(1.0)
    config = TrainConfig.model_validate(json.loads(request.read_text())["config"])
    return subprocess.run(torchrun_command(config, request)).returncode


if __name__ == "__main__":
    if sys.argv[1] == "--join":
        sys.exit(join(sys.argv[2]))
    main(sys.argv[1])
