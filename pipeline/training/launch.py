"""Entry point for one rank of a distributed BVPO run: ``torchrun -m pipeline.training.launch req.json``.

Initializes the process group (nccl on GPUs, gloo on CPU), trains, and rank 0 writes the result file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from pipeline.config import TrainConfig
from pipeline.training.run import train_bvpo


def main(request_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    try:
        result = train_bvpo(
            request["model_path"],
            pq.read_table(request["pairs_trace"]).to_pylist(),
            pq.read_table(request["pairs_empty"]).to_pylist(),
            pq.read_table(request["ref_logps"]).to_pylist(),
            TrainConfig.model_validate(request["config"]),
            Path(request["output_dir"]),
            trust_remote_code=request["trust_remote_code"],
            generations=(
                pq.read_table(request["generations"]).to_pylist() if "generations" in request else None
            ),
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
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
