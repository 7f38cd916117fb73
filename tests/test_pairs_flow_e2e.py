"""The pipeline flow started from imported pairs (pairs.source), on a real temporary Prefect API.

No generation, scoring or pairing runs: the imported D_t and D_e go through the reference pass, training and
evaluation (a scripted engine answers the eval prompts, tests/reliability_helpers.py), and the checkpoint
ends with its model card (eval table included) and TensorBoard events.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import PipelineConfig
from storage import DatasetStore
from tests.reliability_helpers import install_fake_child_process, write_prompt_file
from tests.tiny_checkpoint import save_tiny_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_bvpo_pipeline_from_imported_pairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import bvpo_pipeline

    install_fake_child_process(monkeypatch)
    model = save_tiny_checkpoint(tmp_path / "model")
    think = "<think>\nLet me see.\n</think>\n\n"
    rows = [
        {
            "prompt": f"What is {i} + {i}?",
            "chosen": f"{think}{2 * i}.",
            "rejected": f"{think}{2 * i + 1}.",
            "mode": "trace",
        }
        for i in range(4)
    ] + [
        {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 3}.", "mode": "empty"}
        for i in range(4)
    ]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = PipelineConfig.model_validate(
        {
            "workspace": str(tmp_path / "ws"),
            "model": {"name_or_path": str(model)},
            "prompts": {"source": str(write_prompt_file(tmp_path / "eval.jsonl", 12)), "eval_fraction": 0.5},
            "pairs": {"source": str(source)},
            "generation": {"max_trace_tokens": 8, "max_answer_tokens": 8, "max_model_len": 256},
            "train": {
                "max_steps": 2, "batch_size": 2, "max_length": 128, "bf16": False, "checkpoint_every": 0,
                "warmup_steps": 0, "report_to": ["tensorboard"],
            },
            "eval": {"baselines": False, "bootstrap_samples": 20},
        }
    )  # fmt: skip
    with prefect_test_harness(server_startup_timeout=120):
        out = bvpo_pipeline(config)

    assert out.data.generations is None and out.data.scores is None
    assert (out.data.pairs_trace.row_count, out.data.pairs_empty.row_count) == (4, 4)
    store = DatasetStore(config.workspace)
    _, settings = store.catalog.parents_of(out.data.pairs_trace)
    assert settings["imported_from"] == [str(source)]
    assert out.train.metrics.row_count == 2
    card = (Path(out.train.checkpoint) / "README.md").read_text()
    assert f"imported from {source}: not sampled here" in card
    assert "| trained | trace |" in card and "Not evaluated yet" not in card
    events = list((Path(out.train.checkpoint) / "runs").glob("events.out.tfevents.*"))
    assert events
    assert "pairs" in out.summary and out.summary["pairs"] == {"trace": 4, "empty": 4}
