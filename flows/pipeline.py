"""Prefect flows: ``data_refresh`` → ``train_bvpo`` → ``evaluate``, and ``bvpo_pipeline`` for all of them.

Each flow takes a :class:`~pipeline.config.PipelineConfig`, so the Prefect UI renders a typed form.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from pipeline.config import PipelineConfig
from storage import DatasetRef
from tasks.stages import (
    TrainOutput,
    evaluate_task,
    generate_task,
    pair_task,
    prompts_task,
    read_rows,
    reference_logps_task,
    score_task,
    train_task,
    training_plot_task,
    workspace_paths,
)


class DataRefreshOutput(BaseModel):
    prompts: DatasetRef
    generations: DatasetRef
    scores: DatasetRef
    pairs_trace: DatasetRef
    pairs_empty: DatasetRef
    ref_logps: DatasetRef


class PipelineOutput(BaseModel):
    data: DataRefreshOutput
    train: TrainOutput
    eval_results: DatasetRef
    summary: dict[str, Any]


@flow(name="data_refresh", log_prints=True)
def data_refresh(config: PipelineConfig = PipelineConfig()) -> DataRefreshOutput:  # noqa: B008
    """prompts → generate (vLLM, reasoning on/off) → score → pair (D_t, D_e) → reference log-probs."""
    prompts = prompts_task(config)
    generations = generate_task(config, prompts)
    scores = score_task(config, prompts, generations)
    pairs_trace, pairs_empty = pair_task(config, generations, scores)
    ref_logps = reference_logps_task(config, pairs_trace, pairs_empty)
    out = DataRefreshOutput(
        prompts=prompts,
        generations=generations,
        scores=scores,
        pairs_trace=pairs_trace,
        pairs_empty=pairs_empty,
        ref_logps=ref_logps,
    )
    _datasets_artifact(
        [prompts, generations, scores, pairs_trace, pairs_empty, ref_logps], "data-refresh-datasets"
    )
    return out


@flow(name="train_bvpo", log_prints=True)
def train_bvpo(config: PipelineConfig, data: DataRefreshOutput) -> TrainOutput:
    """BVPO training on D_t and D_e with precomputed reference log-probs."""
    out = train_task(config, data.pairs_trace, data.pairs_empty, data.ref_logps)
    metrics = read_rows(config, out.metrics)
    plot = training_plot_task(config, out.metrics)
    create_markdown_artifact(
        key="train-curves",
        markdown=f"# BVPO training curves\n\n![training curves]({_data_uri(plot)})\n\nPNG: `{plot}`",
    )
    create_table_artifact(
        key="train-metrics",
        table=[{k: _round(v) for k, v in row.items() if k != "checkpoint"} for row in metrics],
        description=f"BVPO training (alpha={config.train.alpha}); checkpoint: {out.checkpoint}",
    )
    return out


@flow(name="evaluate", log_prints=True)
def evaluate(config: PipelineConfig, prompts: DatasetRef, checkpoint: str, parent: DatasetRef) -> DatasetRef:
    """Reference vs trained checkpoint on held-out prompts, both reasoning modes."""
    results = evaluate_task(config, prompts, checkpoint, parent)
    create_table_artifact(
        key="eval-results",
        table=[{k: _round(v) for k, v in row.items()} for row in read_rows(config, results)],
        description="Evaluation on the eval split (95% bootstrap intervals over prompts).",
    )
    return results


@flow(name="bvpo_pipeline", log_prints=True)
def bvpo_pipeline(config: PipelineConfig = PipelineConfig()) -> PipelineOutput:  # noqa: B008
    """The whole job: data refresh, BVPO training, then evaluation of the trained checkpoint."""
    logger = get_run_logger()
    data = data_refresh(config)
    train = train_bvpo(config, data)
    results = evaluate(config, data.prompts, train.checkpoint, train.metrics)
    summary = build_summary(config, data, train, results)
    create_markdown_artifact(key="bvpo-run-summary", markdown=summary_markdown(summary))
    logger.info("Run complete. Catalog: %s", summary["paths"]["catalog"])
    return PipelineOutput(data=data, train=train, eval_results=results, summary=summary)


def build_summary(
    config: PipelineConfig, data: DataRefreshOutput, train: TrainOutput, results: DatasetRef
) -> dict[str, Any]:
    """What a user wants at the end of a run: rows, pairs per mode, loss, eval scores and where things are."""
    metrics = read_rows(config, train.metrics)
    evals = read_rows(config, results)
    scores = {(r["model_label"], r["mode"]): r for r in evals if r["metric"] == "score"}
    datasets = [
        data.prompts,
        data.generations,
        data.scores,
        data.pairs_trace,
        data.pairs_empty,
        data.ref_logps,
    ]
    return {
        "datasets": {
            ref.kind: {"name": ref.name, "rows": ref.row_count} for ref in [*datasets, train.metrics, results]
        },
        "pairs": {"trace": data.pairs_trace.row_count, "empty": data.pairs_empty.row_count},
        "loss": {"first": metrics[0]["loss"], "last": metrics[-1]["loss"], "steps": len(metrics)},
        "weight_delta_l2": train.weight_delta_l2,
        "eval": {
            mode: {
                label: scores[(label, mode)]["value"]
                for label in ("reference", "trained")
                if (label, mode) in scores
            }
            for mode in ("trace", "empty")
        },
        "checkpoint": train.checkpoint,
        "paths": {k: str(v) for k, v in workspace_paths(config).items()},
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["# BVPO run summary", "", "| dataset | version | rows |", "|---|---|---|"]
    lines += [f"| {kind} | {d['name']} | {d['rows']} |" for kind, d in summary["datasets"].items()]
    lines += [
        "",
        f"Pairs: D_t (trace) {summary['pairs']['trace']}, D_e (empty) {summary['pairs']['empty']}.",
        f"Loss: {summary['loss']['first']:.4f} → {summary['loss']['last']:.4f} "
        f"over {summary['loss']['steps']} steps.",
        "",
        "| mode | reference score | trained score |",
        "|---|---|---|",
    ]
    for mode, values in summary["eval"].items():
        lines.append(f"| {mode} | {_fmt(values.get('reference'))} | {_fmt(values.get('trained'))} |")
    lines += ["", f"Checkpoint: `{summary['checkpoint']}`", f"Catalog: `{summary['paths']['catalog']}`"]
    return "\n".join(lines)


def _datasets_artifact(refs: list[DatasetRef], key: str) -> None:
    create_table_artifact(
        key=key,
        table=[{"dataset": r.name, "kind": r.kind, "version": r.version, "rows": r.row_count} for r in refs],
        description='Datasets of this run; query them with `bvpo sql "select * from <kind>"`.',
    )


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _round(value: Any) -> Any:
    return round(value, 5) if isinstance(value, float) else value


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
