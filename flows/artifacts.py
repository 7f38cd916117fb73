"""Prefect artifacts of the flows: dataset tables, Markdown summaries and inlined figures.

The flows in :mod:`flows.pipeline` call these after each stage; the builders only format what the stages
registered (rows come from the catalog), so a flow reads as its stages.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from pipeline.config import PipelineConfig
from pipeline.reporting.stage_timing import read_timings, stage_markdown
from storage import DatasetRef, DatasetStore
from tasks.stages import TrainOutput, read_rows, workspace_paths

if TYPE_CHECKING:
    from flows.pipeline import DataRefreshOutput

CHECKPOINT_ARTIFACT = "bvpo-checkpoint"
"""Key of the table artifact in which a train_bvpo run records the checkpoint it trained."""


def build_summary(
    config: PipelineConfig,
    data: DataRefreshOutput,
    train: TrainOutput,
    results: DatasetRef,
    baselines: dict[str, TrainOutput] | None = None,
) -> dict[str, Any]:
    """What a user wants at the end of a run: rows, pairs per mode, loss, eval scores and where things are."""
    metrics = read_rows(config, train.metrics)
    evals = read_rows(config, results)
    scores = {(r["model_label"], r["mode"]): r for r in evals if r["metric"] == "score"}
    labels = eval_labels({label for label, _ in scores})
    datasets = [
        data.prompts,
        data.generations,
        data.scores,
        data.pairs_trace,
        data.pairs_empty,
        data.ref_logps,
    ]
    datasets = [ref for ref in datasets if ref is not None]  # imported pairs: no generations, scores
    return {
        "datasets": {
            ref.kind: {"name": ref.name, "rows": ref.row_count} for ref in [*datasets, train.metrics, results]
        },
        "pairs": {"trace": data.pairs_trace.row_count, "empty": data.pairs_empty.row_count},
        "loss": {"first": metrics[0]["loss"], "last": metrics[-1]["loss"], "steps": len(metrics)},
        "weight_delta_l2": train.weight_delta_l2,
        "eval": {
            mode: {label: scores[(label, mode)]["value"] for label in labels if (label, mode) in scores}
            for mode in ("trace", "empty")
        },
        "baselines": {name: b.checkpoint for name, b in (baselines or {}).items()},
        "checkpoint": train.checkpoint,
        "paths": {k: str(v) for k, v in workspace_paths(config).items()},
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    """The run summary of :func:`build_summary` as Markdown (the ``bvpo-run-summary`` artifact)."""
    lines = ["# BVPO run summary", "", "| dataset | version | rows |", "|---|---|---|"]
    lines += [f"| {kind} | {d['name']} | {d['rows']} |" for kind, d in summary["datasets"].items()]
    lines += [
        "",
        f"Pairs: D_t (trace) {summary['pairs']['trace']}, D_e (empty) {summary['pairs']['empty']}.",
        f"Loss: {summary['loss']['first']:.4f} → {summary['loss']['last']:.4f} "
        f"over {summary['loss']['steps']} steps.",
    ]
    labels = eval_labels({label for values in summary["eval"].values() for label in values})
    lines += ["", "| mode | " + " | ".join(f"{label} score" for label in labels) + " |"]
    lines.append("|---|" + "---|" * len(labels))
    for mode, values in summary["eval"].items():
        lines.append(f"| {mode} | " + " | ".join(_fmt(values.get(label)) for label in labels) + " |")
    lines += ["", f"Checkpoint: `{summary['checkpoint']}`", f"Catalog: `{summary['paths']['catalog']}`"]
    return "\n".join(lines)


def registered_here(config: PipelineConfig, refs: list[DatasetRef]) -> set[str]:
    """Names of the datasets among ``refs`` that this flow run registered (the others were reused)."""
    run_id = flow_run.id
    if not run_id:
        return set()
    wanted = {ref.name for ref in refs}
    rows = DatasetStore(config.workspace).catalog.list_datasets()
    return {r["name"] for r in rows if r["name"] in wanted and r["flow_run_id"] == str(run_id)}


def datasets_artifact(refs: list[DatasetRef], key: str, new: set[str] | None = None) -> None:
    """A table of ``refs``; with ``new``, each marked registered (by this run) or reused."""
    create_table_artifact(
        key=key,
        table=[
            {
                "dataset": r.name,
                "kind": r.kind,
                "version": r.version,
                "rows": r.row_count,
                **({} if new is None else {"status": "registered" if r.name in new else "reused"}),
            }
            for r in refs
        ],
        description='Datasets of this run; query them with `bvpo sql "select * from <kind>"`.',
    )


def refresh_markdown(out: DataRefreshOutput, new: set[str]) -> str:
    """Summary of a data refresh: datasets registered or reused, pairs per mode."""
    refs = [out.prompts, out.generations, out.scores, out.pairs_trace, out.pairs_empty, out.ref_logps]
    refs = [ref for ref in refs if ref is not None]  # imported pairs: no generations, scores
    lines = [
        "# Data refresh",
        "",
        f"{len(new)} dataset(s) registered by this run, {len(refs) - len(new)} reused from the catalog.",
        "",
        "| dataset | rows | |",
        "|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.row_count} | {'new' if r.name in new else 'reused'} |" for r in refs]
    lines += [
        "",
        f"Pairs: D_t (reasoning on) {out.pairs_trace.row_count}, "
        f"D_e (reasoning off) {out.pairs_empty.row_count}.",
    ]
    return "\n".join(lines)


def train_markdown(config: PipelineConfig, out: TrainOutput, metrics: list[dict[str, Any]]) -> str:
    """Summary of a training run: α, β, steps, first and last loss, where metrics and checkpoint are."""
    lines = [
        "# BVPO training",
        "",
        f"alpha = {config.train.alpha}, beta = {config.train.beta}, {len(metrics)} step(s).",
    ]
    if metrics:
        lines.append(f"Loss: {metrics[0]['loss']:.4f} → {metrics[-1]['loss']:.4f}.")
    lines += [
        "",
        f"Metrics: `{out.metrics.name}`. Checkpoint: `{out.checkpoint}`.",
        "",
        f'Inspect: `bvpo sql -w {config.workspace} "select * from {out.metrics.name}"`',
    ]
    return "\n".join(lines)


def eval_markdown(checkpoint: str, parent: DatasetRef, rows: list[dict[str, Any]]) -> str:
    """The evaluation table (value [95% interval]) of ``checkpoint`` against the reference."""
    from pipeline.evaluation.report import comparison_markdown

    return "\n".join(
        [
            "# Evaluation",
            "",
            f"Checkpoint `{checkpoint}` (from `{parent.name}`, label `trained`) against the reference "
            "model; value [95% bootstrap interval over prompts].",
            "",
            comparison_markdown(rows),
        ]
    )


def eval_labels(found: set[str]) -> list[str]:
    """Model labels in report order: reference, trained, then the baselines."""
    first = [label for label in ("reference", "trained") if label in found]
    return first + sorted(found - set(first))


def grad_stats_artifacts(config: PipelineConfig, grad_stats: DatasetRef, plot: Path) -> None:
    """α̂* over steps, the MSE(α) curve and the measured tr Var_r[g_t] (``plot``), and the grad_stats rows
    (table; per-prompt ESS and the MSE(α) curve with its interval as lists)."""
    create_markdown_artifact(
        key="grad-stats-plot",
        markdown="# α̂*, the estimated MSE(α) and the trace-induced variance\n\n"
        f"![gradient probe]({data_uri(plot)})\n\nPNG: `{plot}`. "
        f'Rows: `bvpo sql -w {config.workspace} "select * from {grad_stats.name}"`',
    )
    create_table_artifact(
        key="grad-stats",
        table=[
            {k: [round_value(x) for x in v] if isinstance(v, list) else round_value(v) for k, v in r.items()}
            for r in read_rows(config, grad_stats)
        ],
        description="Gradient probe: α̂* (95% CI), MSE(α) on alpha_grid with 95% intervals, measured "
        "tr Var_r[g_t], biases, ESS of the importance weights per prompt.",
    )


def train_artifacts(
    config: PipelineConfig, out: TrainOutput, metrics: list[dict[str, Any]], plot: Path
) -> None:
    """Training curves (``plot``), the metrics table, the checkpoint record and the Markdown summary."""
    create_markdown_artifact(
        key="train-curves",
        markdown=f"# BVPO training curves\n\n![training curves]({data_uri(plot)})\n\nPNG: `{plot}`",
    )
    create_table_artifact(
        key="train-metrics",
        table=[{k: round_value(v) for k, v in row.items() if k != "checkpoint"} for row in metrics],
        description=f"BVPO training (alpha={config.train.alpha}); checkpoint: {out.checkpoint}",
    )
    create_table_artifact(
        key=CHECKPOINT_ARTIFACT,
        table=[
            {"train_metrics": out.metrics.qualified, "name": out.metrics.name, "checkpoint": out.checkpoint}
        ],
        description="The checkpoint this run trained (the evaluate deployment reads it from here).",
    )
    create_markdown_artifact(key="train-summary", markdown=train_markdown(config, out, metrics))


def eval_artifacts(
    checkpoint: str, parent: DatasetRef, rows: list[dict[str, Any]], report_md: Path, chart: Path
) -> None:
    """The eval_results table and the evaluation summary with its chart."""
    create_table_artifact(
        key="eval-results",
        table=[{k: round_value(v) for k, v in row.items()} for row in rows],
        description="Evaluation on the eval split (95% bootstrap intervals over prompts).",
    )
    create_markdown_artifact(
        key="eval-summary",
        markdown=eval_markdown(checkpoint, parent, rows)
        + f"\n\n![scores]({data_uri(chart)})\n\nReport: `{report_md}`, chart: `{chart}`",
    )


def stage_timing_artifact(workspace: Path) -> str | None:
    """The stage-timing table of the current flow run (its subflows' stages included) as an artifact.

    Returns its Markdown (None outside a flow run or when no stage recorded a timing).
    """
    run_id = flow_run.id
    lines = stage_markdown(read_timings(workspace, [str(run_id)])) if run_id else []
    if not lines:
        return None
    markdown = "\n".join(["# Where the time went", "", *lines])
    create_markdown_artifact(key="stage-timing", markdown=markdown, description="Stage wall times of the run")
    return markdown


def data_uri(path: Path) -> str:
    """A PNG inlined into Markdown (Prefect artifacts cannot link local files)."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def round_value(value: Any) -> Any:
    """Floats to 5 decimals for artifact tables; other values unchanged."""
    return round(value, 5) if isinstance(value, float) else value


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
