"""Experiment trackers: TensorBoard event files and MLflow runs (docs/method.md §The BVPO mixture).

A run is reported after the fact from the rows the pipeline stores, so trackers never slow or break
training: every ``train_metrics`` column per step (``train/<column>``, α among them), the gradient probe's
α̂* and its interval per probe (``probe/<column>``), the run's settings (``params``), and, once evaluation
ran, the eval table (``eval/<model label>/<mode>/<metric>`` with ``…/ci_low`` and ``…/ci_high``, at the
last training step, plus the table as text).

TensorBoard needs the ``tensorboard`` package; MLflow ``mlflow`` or ``mlflow-skinny`` (``pip install -e
".[track]"``). A tracker whose package is missing is an error naming the extra, not a silent no-op.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

EXPERIMENT = "bvpo"
RUN_TAG = "bvpo.train_metrics"
"""MLflow tag holding the train_metrics version a run reports, so evaluation finds the same run."""
SKIP_COLUMNS = {"step", "checkpoint"}


class TrackerError(RuntimeError):
    """A tracker cannot be used (its package is missing or its server refused)."""


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, step: int, values: dict[str, float]) -> None: ...
    def log_text(self, name: str, text: str) -> None: ...
    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars and text in TensorBoard event files under ``log_dir``."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TrackerError(
                "train.report_to has tensorboard, but the tensorboard package is missing: "
                'pip install -e ".[track]"'
            ) from exc
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_params(self, params: dict[str, Any]) -> None:
        self._writer.add_text("params", "\n".join(f"    {k}: {json.dumps(v)}" for k, v in params.items()))

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, global_step=step)

    def log_text(self, name: str, text: str) -> None:
        self._writer.add_text(name, text)

    def close(self) -> None:
        self._writer.close()


class MLflowTracker:
    """One MLflow run per training run (tagged with its train_metrics version), through ``MlflowClient``."""

    def __init__(
        self, tracking_uri: str, run_key: str, run_name: str, artifact_location: str | None = None
    ) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise TrackerError(
                'train.report_to has mlflow, but the mlflow package is missing: pip install -e ".[track]"'
            ) from exc
        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri)
        experiment = self._client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._client.create_experiment(EXPERIMENT, artifact_location=artifact_location)
        )
        found = self._client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_key}'")
        if found:
            self.run_id = found[0].info.run_id
        else:
            run = self._client.create_run(experiment_id, tags={RUN_TAG: run_key}, run_name=run_name)
            self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self._client.get_run(self.run_id).data.params
        for key, value in params.items():
            text = str(value)[:6000]
            if key not in existing:  # MLflow params are write-once
                self._client.log_param(self.run_id, key, text)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._client.log_metric(self.run_id, key, value, step=step)

    def log_text(self, name: str, text: str) -> None:
        self._client.log_text(self.run_id, text, f"{name}.md")

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def mlflow_store(configured: str | None, workspace: Path) -> tuple[str, str | None]:
    """``(tracking URI, artifact location)``: the configured URI, else ``$MLFLOW_TRACKING_URI`` (the
    server decides where artifacts go), else a local SQLite store ``<workspace>/mlflow.db`` with artifacts
    in ``<workspace>/mlartifacts`` (MLflow 3 refuses new plain-file stores)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    root = Path(workspace).resolve()
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()


def open_trackers(
    report_to: Sequence[str],
    *,
    log_dir: Path,
    mlflow_tracking_uri: str,
    run_key: str,
    run_name: str,
    mlflow_artifacts: str | None = None,
) -> list[Tracker]:
    """The configured trackers, opened (an unavailable one raises :class:`TrackerError`)."""
    trackers: list[Tracker] = []
    for name in report_to:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(log_dir))
        elif name == "mlflow":
            trackers.append(MLflowTracker(mlflow_tracking_uri, run_key, run_name, mlflow_artifacts))
        else:
            raise TrackerError(f"unknown tracker '{name}' (tensorboard | mlflow)")
    return trackers


def numeric(row: dict[str, Any], prefix: str) -> dict[str, float]:
    """The finite numeric columns of a row as ``prefix/column`` (booleans, text and None left out)."""
    out = {}
    for key, value in row.items():
        if key in SKIP_COLUMNS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


def report_training(
    trackers: Sequence[Tracker],
    params: dict[str, Any],
    metrics: Sequence[dict[str, Any]],
    grad_stats: Sequence[dict[str, Any]] = (),
) -> None:
    """Settings, every ``train_metrics`` row (per step) and every probe row (α̂* and its interval)."""
    for tracker in trackers:
        tracker.log_params(params)
        for row in metrics:
            tracker.log_metrics(int(row["step"]), numeric(row, "train"))
        for row in grad_stats:
            tracker.log_metrics(int(row["step"]), numeric(row, "probe"))


def eval_scalars(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``eval/<label>/<mode>/<metric>`` and its ``ci_low`` / ``ci_high`` for every ``eval_results`` row."""
    out: dict[str, float] = {}
    for row in rows:
        key = f"eval/{row['model_label']}/{row['mode']}/{row['metric']}"
        for suffix, column in (("", "value"), ("/ci_low", "ci_low"), ("/ci_high", "ci_high")):
            value = row.get(column)
            if value is not None and math.isfinite(value):
                out[key + suffix] = float(value)
    return out


def report_evaluation(
    trackers: Sequence[Tracker], step: int, rows: Sequence[dict[str, Any]], table_markdown: str
) -> None:
    """The eval table: one scalar per label, mode and metric (with its interval), and the table as text."""
    scalars = eval_scalars(rows)
    for tracker in trackers:
        tracker.log_metrics(step, scalars)
        tracker.log_text("eval_table", table_markdown)
