"""Prefect flows: ``data_refresh`` → ``train_bvpo`` → ``evaluate``, and ``bvpo_pipeline`` for all of them.

Each flow takes a :class:`~pipeline.config.PipelineConfig` (plus optional plain values), so the Prefect UI
renders a typed form, and each can run on its own from a deployment: ``train_bvpo`` resolves its datasets
through a ``data_refresh`` subflow (which reuses every content-addressed dataset) and ``evaluate`` finds
its checkpoint in the catalog. Every run publishes artifacts: tables of datasets, metrics and results, and
a Markdown summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from flows.artifacts import (
    CHECKPOINT_ARTIFACT,
    build_summary,
    datasets_artifact,
    eval_artifacts,
    grad_stats_artifacts,
    refresh_markdown,
    registered_here,
    stage_timing_artifact,
    summary_markdown,
    train_artifacts,
)
from pipeline.config import ALPHA_BASELINES, PipelineConfig
from storage import CatalogError, DatasetRef, DatasetStore
from tasks.interop import import_pairs_task, publish_evaluation_task, publish_training_task
from tasks.policy import pin_policy
from tasks.stages import (
    EvalModel,
    TrainOutput,
    eval_report_task,
    evaluate_task,
    generate_task,
    grad_stats_plot_task,
    pair_task,
    prompts_task,
    read_rows,
    reference_logps_task,
    score_task,
    train_task,
    training_plot_task,
)


class DataRefreshOutput(BaseModel):
    prompts: DatasetRef
    generations: DatasetRef | None = None  # None: the pairs were imported (pairs.*), not sampled here
    scores: DatasetRef | None = None
    pairs_trace: DatasetRef
    pairs_empty: DatasetRef
    ref_logps: DatasetRef


class PipelineOutput(BaseModel):
    data: DataRefreshOutput
    train: TrainOutput
    baselines: dict[str, TrainOutput] = {}
    eval_results: DatasetRef
    summary: dict[str, Any]


@flow(name="data_refresh", log_prints=True)
def data_refresh(config: PipelineConfig = PipelineConfig()) -> DataRefreshOutput:  # noqa: B008
    """prompts → generate (vLLM, reasoning on/off) → score → pair (D_t, D_e) → reference log-probs.

    Every dataset is content-addressed: a rerun with the same config reuses what the catalog holds.

    Args:
        config: The pipeline configuration (workspace, model, prompts, generation, scoring, pairing, ...).
            With pairs.source (or pairs.trace_source / pairs.empty_source) the pairs are imported instead
            of generated, scored and paired; the prompts are then only the evaluation's.
    """
    from flows.incremental import announce_new_pairs, incremental_refresh

    config = pin_policy(config)  # generation.policy: latest → the checkpoint, for every stage of the run
    if config.pairs.sources:
        return _imported_refresh(config)
    if config.refresh.incremental:
        out, added = incremental_refresh(config)
        _refresh_artifacts(config, out)
        print(f"data_refresh: new pairs per mode {added}")
        announce_new_pairs(config, added)
        return out
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
    new = _refresh_artifacts(config, out)
    added = {
        m: r.row_count if r.name in new else 0 for m, r in (("trace", pairs_trace), ("empty", pairs_empty))
    }
    announce_new_pairs(config, added)
    return out


def _refresh_artifacts(config: PipelineConfig, out: DataRefreshOutput) -> set[str]:
    """The datasets table and summary of a refresh; returns the names of those it registered."""
    listed = [out.prompts, out.generations, out.scores, out.pairs_trace, out.pairs_empty, out.ref_logps]
    refs = [ref for ref in listed if ref is not None]
    new = registered_here(config, refs)
    datasets_artifact(refs, "data-refresh-datasets", new)
    create_markdown_artifact(key="data-refresh-summary", markdown=refresh_markdown(out, new))
    print(f"data_refresh: {len(new)} dataset(s) registered, {len(refs) - len(new)} reused")
    return new


def _imported_refresh(config: PipelineConfig) -> DataRefreshOutput:
    """Imported pairs (validated row by row), then the reference log-probs, as for sampled pairs."""
    pairs_trace, pairs_empty = import_pairs_task(config)
    prompts = prompts_task(config)
    ref_logps = reference_logps_task(config, pairs_trace, pairs_empty)
    out = DataRefreshOutput(
        prompts=prompts, pairs_trace=pairs_trace, pairs_empty=pairs_empty, ref_logps=ref_logps
    )
    refs = [prompts, pairs_trace, pairs_empty, ref_logps]
    new = registered_here(config, refs)
    datasets_artifact(refs, "data-refresh-datasets", new)
    create_markdown_artifact(key="data-refresh-summary", markdown=refresh_markdown(out, new))
    sources = ", ".join(location for location, _ in config.pairs.sources)
    print(f"data_refresh: pairs imported from {sources} (not sampled here)")
    return out


@flow(name="train_bvpo", log_prints=True)
def train_bvpo(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008
    data: DataRefreshOutput | None = None,
) -> TrainOutput:
    """BVPO training on D_t and D_e with precomputed reference log-probs.

    Args:
        config: The pipeline configuration; its `train` section sets α, β, steps and the optimizer.
        data: The datasets to train on. Leave empty (the usual case from the UI): a data_refresh subflow
            resolves them, reusing every dataset the catalog already holds for this config.
    """
    config = pin_policy(config)  # the data refresh and training use the same checkpoint
    if data is None:
        data = data_refresh(config)
    out = train_task(config, data.pairs_trace, data.pairs_empty, data.ref_logps)
    metrics = read_rows(config, out.metrics)
    train_artifacts(config, out, metrics, training_plot_task(config, out.metrics))
    if out.grad_stats is not None:  # the gradient probe ran (alpha: auto or train.probe.enabled)
        plot = grad_stats_plot_task(config, out.grad_stats, out.metrics)
        grad_stats_artifacts(config, out.grad_stats, plot)
    publish_training_task(config, out.metrics, out.checkpoint, out.grad_stats)  # model card, trackers
    return out


@flow(name="evaluate", log_prints=True)
def evaluate(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008
    checkpoint: str | None = None,
    train_metrics: str | None = None,
    train_run_id: str | None = None,
    baselines: list[str] | None = None,
) -> DatasetRef:
    """Reference vs trained checkpoint (and any baselines) on held-out prompts, both reasoning modes.

    Which checkpoint: `train_metrics` if given, else `checkpoint`, else the one the train_bvpo run
    `train_run_id` produced, else the latest checkpoint trained in this workspace.

    Args:
        config: The pipeline configuration (workspace, eval, generation and scoring sections).
        checkpoint: A checkpoint directory: one under <workspace>/checkpoints/ or any Hugging Face
            checkpoint.
        train_metrics: The train_metrics dataset of the checkpoint, e.g. `train_metrics__v3`.
        train_run_id: A train_bvpo flow run id (set by the eval-after-train trigger).
        baselines: train_metrics datasets of other runs to evaluate alongside (e.g. the α=1 and α=0
            baselines); each is labelled by its α.
    """
    target = resolve_eval_target(config, checkpoint, train_metrics, train_run_id)
    prompts = target.prompts if target.prompts is not None else prompts_task(config)
    parent = target.train_metrics or prompts
    others = [baseline_model(config, name) for name in baselines or []]
    print(
        f"evaluating {target.checkpoint} ({parent.name})"
        + "".join(f", {b.label} ({b.parent.name})" for b in others)
        + f" on the eval split of {prompts.name}"
    )
    results = evaluate_task(config, prompts, target.checkpoint, parent, others)
    report_md, chart = eval_report_task(config, results)
    eval_artifacts(target.checkpoint, parent, read_rows(config, results), report_md, chart)
    trained = [("trained", target.checkpoint, target.train_metrics)] if target.train_metrics else []
    publish_evaluation_task(config, results, trained + [(b.label, b.checkpoint, b.parent) for b in others])
    return results


@flow(name="bvpo_pipeline", log_prints=True)
def bvpo_pipeline(config: PipelineConfig = PipelineConfig()) -> PipelineOutput:  # noqa: B008
    """The whole job: data refresh, BVPO training, then evaluation of the trained checkpoint.

    Args:
        config: The pipeline configuration.
    """
    logger = get_run_logger()
    config = pin_policy(config)
    data = data_refresh(config)
    train = train_bvpo(config, data)
    baselines = {
        name: train_bvpo.with_options(flow_run_name=f"baseline-{name}")(baseline_config(config, name), data)
        for name in baselines_to_train(config)
    }
    results = evaluate(
        config,
        train_metrics=train.metrics.qualified,
        baselines=[b.metrics.qualified for b in baselines.values()],
    )
    summary = build_summary(config, data, train, results, baselines)
    create_markdown_artifact(key="bvpo-run-summary", markdown=summary_markdown(summary))
    stage_timing_artifact(DatasetStore(config.workspace).workspace)  # where the time went, per stage
    logger.info("Run complete. Catalog: %s", summary["paths"]["catalog"])
    return PipelineOutput(data=data, train=train, baselines=baselines, eval_results=results, summary=summary)


def baselines_to_train(config: PipelineConfig) -> list[str]:
    """The baselines (``dpo_trace``: α=1, ``dpo_empty``: α=0) a run trains next to BVPO, if enabled.

    A baseline equal to the run itself (α already 1 or 0) is not trained twice.
    """
    if not config.eval.baselines:
        return []
    return [name for name, value in ALPHA_BASELINES.items() if not _same_alpha(config.train.alpha, value)]


def baseline_config(config: PipelineConfig, name: str) -> PipelineConfig:
    """``config`` with α set to a baseline; every other training setting is kept, so the runs compare."""
    return config.model_copy(update={"train": config.train.model_copy(update={"alpha": name})})


def baseline_model(config: PipelineConfig, train_metrics: str) -> EvalModel:
    """A trained checkpoint to evaluate next to the main one, labelled by the α it was trained with."""
    catalog = DatasetStore(config.workspace).catalog
    ref = catalog.resolve(train_metrics)
    if ref.kind != "train_metrics":
        raise ValueError(f"baseline '{train_metrics}' is a {ref.kind} dataset, not train_metrics")
    path = checkpoint_dir(config, ref)
    _require_checkpoint(path)
    alpha = catalog.parents_of(ref)[1].get("train", {}).get("alpha")
    return EvalModel(label=alpha_label(alpha), checkpoint=str(path), parent=ref)


def alpha_label(alpha: Any) -> str:
    """``dpo_trace`` for α=1, ``dpo_empty`` for α=0, else ``alpha=<α>`` (``alpha=auto`` for the estimate)."""
    for name, value in ALPHA_BASELINES.items():
        if _same_alpha(alpha, value):
            return name
    return f"alpha={alpha}"


def _same_alpha(alpha: Any, value: float) -> bool:
    if isinstance(alpha, str):
        return ALPHA_BASELINES.get(alpha) == value
    return alpha is not None and float(alpha) == value


class EvalTarget(BaseModel):
    """What :func:`evaluate` compares with the reference model."""

    checkpoint: str
    train_metrics: DatasetRef | None = None  # None: a checkpoint not trained in this workspace
    prompts: DatasetRef | None = None  # the prompts it was trained on (None: those of the config)


def resolve_eval_target(
    config: PipelineConfig,
    checkpoint: str | None = None,
    train_metrics: str | None = None,
    train_run_id: str | None = None,
) -> EvalTarget:
    """Find the checkpoint to evaluate, its train_metrics dataset and the prompts it was trained on."""
    catalog = DatasetStore(config.workspace).catalog
    if train_metrics:
        ref = catalog.resolve(train_metrics)
        if ref.kind != "train_metrics":
            raise ValueError(f"'{train_metrics}' is a {ref.kind} dataset, not train_metrics")
    elif checkpoint:
        ref = catalog.lookup("train_metrics", Path(checkpoint).name)
        if ref is None:
            _require_checkpoint(Path(checkpoint))
            return EvalTarget(checkpoint=str(checkpoint))
    elif train_run_id:
        ref = catalog.resolve(_checkpoint_of_run(train_run_id))
    else:
        try:
            ref = catalog.resolve("train_metrics")
        except CatalogError as exc:
            raise ValueError(
                f"nothing to evaluate: no checkpoint was trained in {config.workspace} yet "
                "(run train_bvpo first, or pass a checkpoint)"
            ) from exc
    path = checkpoint_dir(config, ref)
    _require_checkpoint(path)
    prompts = next((node for _, node, _ in catalog.lineage(ref) if node.kind == "prompts"), None)
    return EvalTarget(checkpoint=str(path), train_metrics=ref, prompts=prompts)


def checkpoint_dir(config: PipelineConfig, train_metrics: DatasetRef) -> Path:
    """Where the train stage saved the checkpoint of a train_metrics version."""
    return DatasetStore(config.workspace).workspace / "checkpoints" / train_metrics.version


def _require_checkpoint(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (no config.json there)")


def _checkpoint_of_run(train_run_id: str) -> str:
    """The train_metrics dataset (``kind:version``) a train_bvpo flow run recorded in its artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    run_id = UUID(train_run_id.removeprefix("prefect.flow-run."))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[CHECKPOINT_ARTIFACT]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
            )
        )
    for artifact in artifacts:
        rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
        if rows:
            return str(rows[0]["train_metrics"])
    raise ValueError(f"flow run {run_id} recorded no trained checkpoint (artifact '{CHECKPOINT_ARTIFACT}')")
