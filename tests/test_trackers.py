"""Experiment trackers: real TensorBoard event files and a real MLflow store, read back and checked.

The run is the synthetic workspace (tests/synthetic_workspace.py): registered train_metrics, grad_stats and
eval_results, as a `bvpo run` leaves them. What the trackers logged is read back with TensorBoard's own
EventAccumulator and MLflow's client and compared with the stored rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import PipelineConfig
from pipeline.interop.publish import TrainedModel, publish_evaluation, publish_training
from storage import DatasetStore
from tests.synthetic_workspace import build_workspace

pytest.importorskip("tensorboard")


def _run(tmp_path: Path, report_to: list[str]) -> tuple[DatasetStore, PipelineConfig, Path, dict]:
    run = build_workspace(tmp_path / "ws", num_prompts=16, steps=6)
    store = DatasetStore(run.workspace)
    config = PipelineConfig.model_validate(
        {"workspace": str(run.workspace), "train": {"report_to": report_to}}
    )
    checkpoint = run.workspace / "checkpoints" / run.datasets["train_metrics"].version
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    return store, config, checkpoint, run.datasets


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_event_files_hold_the_train_metrics_probe_and_eval_table(tmp_path: Path) -> None:
    store, config, checkpoint, refs = _run(tmp_path, ["tensorboard"])
    metrics = store.read_rows(refs["train_metrics"])
    probes = store.read_rows(refs["grad_stats"])
    publish_training(store, config, refs["train_metrics"], checkpoint, refs["grad_stats"])
    model = TrainedModel("trained", checkpoint, refs["train_metrics"])
    publish_evaluation(store, config, refs["eval_results"], [model])

    scalars = _scalars(checkpoint / "runs")
    for column in ("loss", "loss_t", "loss_e", "alpha", "reward_acc_t", "grad_norm", "tokens_per_s"):
        logged = scalars[f"train/{column}"]
        assert [step for step, _ in logged] == [m["step"] for m in metrics]
        assert [v for _, v in logged] == pytest.approx([m[column] for m in metrics], rel=1e-6)
    assert [v for _, v in scalars["probe/alpha_hat"]] == pytest.approx([p["alpha_hat"] for p in probes])
    assert [s for s, _ in scalars["probe/alpha_hat"]] == [p["step"] for p in probes]
    assert [v for _, v in scalars["probe/ci_high"]] == pytest.approx([p["ci_high"] for p in probes])
    results = store.read_rows(refs["eval_results"])
    trained_score = next(
        r for r in results if (r["model_label"], r["mode"], r["metric"]) == ("trained", "trace", "score")
    )
    assert scalars["eval/trained/trace/score"] == [(6, pytest.approx(trained_score["value"], rel=1e-6))]
    assert scalars["eval/trained/trace/score/ci_low"][0][1] == pytest.approx(
        trained_score["ci_low"], rel=1e-6
    )
    assert "eval/reference/empty/score" in scalars


def test_a_rerun_does_not_log_the_curves_twice(tmp_path: Path) -> None:
    store, config, checkpoint, refs = _run(tmp_path, ["tensorboard"])
    publish_training(store, config, refs["train_metrics"], checkpoint)
    publish_training(store, config, refs["train_metrics"], checkpoint)
    assert len(_scalars(checkpoint / "runs")["train/loss"]) == 6


def test_mlflow_local_store_holds_the_same_values(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store, config, checkpoint, refs = _run(tmp_path, ["mlflow"])
    publish_training(store, config, refs["train_metrics"], checkpoint, refs["grad_stats"])
    publish_evaluation(
        store, config, refs["eval_results"], [TrainedModel("trained", checkpoint, refs["train_metrics"])]
    )
    publish_training(store, config, refs["train_metrics"], checkpoint)  # a rerun: logs nothing again

    client = MlflowClient(tracking_uri=f"sqlite:///{store.workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bvpo")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["bvpo.train_metrics"] == refs["train_metrics"].version
    assert run.data.params["alpha"] == "0.5" and run.data.params["beta"] == "0.1"
    assert run.data.params["pairs_trace"] == refs["pairs_trace"].name
    history = client.get_metric_history(run.info.run_id, "train/loss")
    metrics = store.read_rows(refs["train_metrics"])
    assert sorted((m.step, m.value) for m in history) == [
        (m["step"], pytest.approx(m["loss"])) for m in metrics
    ]
    probes = store.read_rows(refs["grad_stats"])
    alpha_hat = client.get_metric_history(run.info.run_id, "probe/alpha_hat")
    assert sorted(m.value for m in alpha_hat) == pytest.approx(sorted(p["alpha_hat"] for p in probes))
    results = store.read_rows(refs["eval_results"])
    score = next(
        r for r in results if (r["model_label"], r["mode"], r["metric"]) == ("trained", "empty", "score")
    )
    assert run.data.metrics["eval/trained/empty/score"] == pytest.approx(score["value"])
    assert run.data.metrics["eval/trained/empty/score/ci_high"] == pytest.approx(score["ci_high"])
    table = client.download_artifacts(run.info.run_id, "eval_table.md", str(tmp_path))
    assert "| trained | empty |" in Path(table).read_text()


def test_an_unknown_tracker_is_refused_by_the_config() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="report_to"):
        PipelineConfig.model_validate({"train": {"report_to": ["wandb"]}})
