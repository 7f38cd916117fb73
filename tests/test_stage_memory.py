"""Memory across stages: the reference pass and training run in child processes (pipeline/isolation.py),
so the flow's process holds no model weights between stages and its RSS returns to its baseline.

A fresh interpreter (so the baseline is this flow process's alone) runs the two stage calls exactly as
``tasks/stages.py`` makes them, on a ~24M-parameter random Llama (94 MB of fp32 weights; training holds
four copies with gradients and AdamW moments), and reports its RSS after each stage.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def measure(model_dir: str, workspace: str) -> None:
    """The flow-process side: baseline, then each isolated stage; prints one JSON line of RSS figures."""
    import torch  # noqa: F401  (imported before the baseline: the flow process has torch loaded too)

    from pipeline.config import TrainConfig
    from pipeline.isolation import run_isolated
    from pipeline.training.reference import compute_reference_logps
    from pipeline.training.run import train_bvpo
    from tests.pair_rows import stored_pairs

    pairs = stored_pairs(model_dir)
    figures = {"baseline_mb": _rss_mb()}
    ref = run_isolated(
        compute_reference_logps, model_dir, pairs, model_label="big", max_length=96, bf16=False
    )
    figures["after_reference_mb"] = _rss_mb()
    config = TrainConfig(max_steps=2, batch_size=2, bf16=False, checkpoint_every=0, max_length=96)
    steps: list[int] = []
    run_isolated(
        train_bvpo,
        model_dir,
        pairs["trace"],
        pairs["empty"],
        ref.rows,
        config,
        Path(workspace) / "checkpoint",
        callbacks={"on_step": lambda row: steps.append(row["step"])},
    )
    figures["after_train_mb"] = _rss_mb()
    figures["steps_logged"] = len(steps)
    figures["child_peak_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("@@memory " + json.dumps(figures), flush=True)


@pytest.mark.e2e  # three fresh interpreters import torch: about a minute
@pytest.mark.timeout(600)
def test_flow_process_rss_returns_to_baseline_after_each_stage(tmp_path: Path) -> None:
    from tests.tiny_checkpoint import save_tiny_checkpoint

    model_dir = save_tiny_checkpoint(tmp_path / "big", hidden=768, layers=4)
    weights_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
    assert weights_mb > 80
    code = f"from tests.test_stage_memory import measure; measure({str(model_dir)!r}, {str(tmp_path)!r})"
    env = {**os.environ, "BVPO_ISOLATE_STAGES": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=540
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("@@memory "))
    figures = json.loads(line.removeprefix("@@memory "))
    print(figures)
    assert figures["steps_logged"] == 2  # the callback crossed the process boundary
    # The stages' children held the weights (and, training, gradients and optimizer state) ...
    assert figures["child_peak_mb"] > figures["baseline_mb"] + weights_mb
    # ... while the flow process stayed near its baseline after each of them.
    for key in ("after_reference_mb", "after_train_mb"):
        assert figures[key] < figures["baseline_mb"] + 48, figures
    assert (tmp_path / "checkpoint" / "config.json").is_file()
