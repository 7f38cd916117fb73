"""Model cards: each checkpoint folder gets a README.md in Hugging Face model-card form.

Built from the synthetic workspace's catalog (tests/synthetic_workspace.py); the card is checked for its
YAML front matter, the lineage, α/β/steps, the eval table once evaluation ran, and the reproducing config.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import PipelineConfig, load_config
from pipeline.interop.publish import TrainedModel, publish_evaluation, publish_training
from pipeline.training.model_card import hub_base_model
from storage import DatasetStore
from tests.synthetic_workspace import build_workspace


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def test_card_after_training_then_after_evaluation(tmp_path: Path) -> None:
    run = build_workspace(tmp_path / "ws", num_prompts=16, steps=6)
    store = DatasetStore(run.workspace)
    refs = run.datasets
    config = PipelineConfig.model_validate(
        {"workspace": str(run.workspace), "train": {"alpha": 0.5, "beta": 0.1, "max_steps": 6}}
    )
    checkpoint = run.workspace / "checkpoints" / refs["train_metrics"].version
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")

    card = publish_training(store, config, refs["train_metrics"], checkpoint)
    text = card.read_text()
    assert card == checkpoint / "README.md"
    meta = _front_matter(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "transformers" and "bvpo" in meta["tags"]
    assert "| α (alpha) | 0.5 |" in text and "| β (beta) | 0.1 |" in text
    assert "| steps | 6 (max_steps 6) |" in text
    for kind in ("pairs_trace", "pairs_empty", "ref_logps", "generations", "prompts"):
        ref = refs[kind]
        assert f"| {ref.name} | `{ref.version}` | {ref.row_count} |" in text, kind
    assert "sampled here with embedded:smollm2-135m-instruct" in text
    assert "Not evaluated yet" in text
    assert "bvpo run --config bvpo-config.yaml" in text
    reproduced = load_config(checkpoint / "bvpo-config.yaml")
    assert reproduced == config

    results = store.read_rows(refs["eval_results"])
    publish_evaluation(
        store, config, refs["eval_results"], [TrainedModel("trained", checkpoint, refs["train_metrics"])]
    )
    text = (checkpoint / "README.md").read_text()
    assert "Not evaluated yet" not in text
    assert refs["eval_results"].name in text
    score = next(
        r for r in results if (r["model_label"], r["mode"], r["metric"]) == ("trained", "trace", "score")
    )
    cell = f"{score['value']:.3f} [{score['ci_low']:.3f}, {score['ci_high']:.3f}]"
    trained_line = next(line for line in text.splitlines() if line.startswith("| trained | trace |"))
    assert cell in trained_line
    assert any(line.startswith("| reference | trace |") for line in text.splitlines())
    first, last = store.read_rows(refs["train_metrics"])[0], store.read_rows(refs["train_metrics"])[-1]
    assert f"| loss | {first['loss']:.4f} | {last['loss']:.4f} |" in text


def test_base_model_names_only_hub_ids(tmp_path: Path) -> None:
    assert hub_base_model("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert hub_base_model(str(tmp_path)) is None
    assert hub_base_model("embedded:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
