"""Prefect tasks of the α study (``flows/study.py``): every arm and the reference evaluated together
through one engine, then the ``study_results`` dataset and its report (``docs/method.md`` §Statistics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.config import PipelineConfig
from pipeline.evaluation.study import Arm, study_rows, write_study_report
from pipeline.isolation import isolated
from pipeline.models import model_identity, resolve_model_path
from pipeline.reporting.stage_timing import timed_stage
from storage import DatasetRef, DatasetStore
from tasks.orchestration import GPU_TAG, TRANSIENT_RETRIES
from tasks.policy import model_round
from tasks.stages import EvalModel, _flow_run_id


@task(name="evaluate-study", cache_policy=NO_CACHE, tags=[GPU_TAG], **TRANSIENT_RETRIES)
def evaluate_arms_task(
    config: PipelineConfig, prompts: DatasetRef, arms: list[EvalModel]
) -> tuple[DatasetRef, dict[str, DatasetRef]]:
    """The reference and every arm on the eval split, one engine for all (weights reloaded in place).

    Returns the ``eval_results`` version and each label's ``eval_generations`` version.
    """
    from pipeline.evaluation.stage import EvalTarget, generate_eval_rows, run_evaluation

    store = DatasetStore(config.workspace)
    targets = [
        EvalTarget("reference", resolve_model_path(config.model), model_identity(config.model), round=0),
        *[
            EvalTarget(a.label, a.checkpoint, a.checkpoint, (a.parent,), model_round(store, a.parent))
            for a in arms
        ],
    ]
    generate = isolated(generate_eval_rows, callbacks=("on_event",))  # the engine's memory leaves with it
    with timed_stage(store.workspace, _flow_run_id(), "evaluation"):
        return run_evaluation(
            config, prompts, targets, flow_run_id=_flow_run_id(), logger=get_run_logger(), generate=generate
        )


@task(name="study-results", cache_policy=NO_CACHE, timeout_seconds=1800)
def study_results_task(
    config: PipelineConfig,
    arms: list[tuple[Arm, DatasetRef]],
    eval_generations: dict[str, DatasetRef],
    samples: int,
) -> tuple[DatasetRef, Path, Path]:
    """Register ``study_results`` (parents: every evaluated model's answers and every arm's training) and
    write its report under ``<workspace>/reports/study-<version>/``."""
    from pipeline.evaluation.stage import register

    store = DatasetStore(config.workspace)
    logger = get_run_logger()
    parents = [eval_generations["reference"]]
    parents += [p for arm, metrics in arms for p in (eval_generations[arm.label], metrics)]
    settings: dict[str, Any] = {
        "arms": [{"alpha": a.alpha, "seed": a.seed} for a, _ in arms],
        "bootstrap_samples": samples,
        "seed": config.eval.seed,
    }
    ref = store.lookup("study_results", settings, parents)
    if ref is None:
        rows = [r for p in parents if p.kind == "eval_generations" for r in store.read_rows(p)]
        metrics = {arm.label: store.read_rows(m) for arm, m in arms}
        results = study_rows(rows, [a for a, _ in arms], metrics, samples=samples, seed=config.eval.seed)
        ref = register(
            store, "study_results", results, [],
            config=settings, parents=parents, flow_run_id=_flow_run_id(), logger=logger,
        )  # fmt: skip
    out_dir = store.workspace / "reports" / f"study-{ref.version}"
    markdown, chart = write_study_report(store.read_rows(ref), out_dir)
    logger.info("study report: %s", markdown)
    return ref, markdown, chart
