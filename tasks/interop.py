"""Prefect tasks of the interop stages: imported pairs, and the model card / trackers after train and eval."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.config import PipelineConfig
from storage import DatasetRef, DatasetStore
from tasks.orchestration import HOUR, TRANSIENT_RETRIES


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return str(run_id) if run_id else None


@task(name="import-pairs", cache_policy=NO_CACHE, timeout_seconds=HOUR, **TRANSIENT_RETRIES)
def import_pairs_task(config: PipelineConfig) -> tuple[DatasetRef, DatasetRef]:
    """D_t and D_e from the ``pairs.*`` sources instead of generate → score → pair."""
    from pipeline.interop.catalog_pairs import configured_sources, import_pairs

    logger = get_run_logger()
    sources = configured_sources(config)
    refs, result = import_pairs(DatasetStore(config.workspace), config, sources, flow_run_id=_flow_run_id())
    if result.rejects:
        logger.warning(
            'import pairs: %d row(s) rejected, see `bvpo sql "select * from rejects where stage = '
            "'import_pairs'\"`",
            len(result.rejects),
        )
    logger.info(
        "import pairs: %s (D_t) and %s (D_e) imported from %s: not sampled here",
        refs["trace"].name,
        refs["empty"].name,
        ", ".join(s.label for s in sources),
    )
    return refs["trace"], refs["empty"]


@task(name="publish-training", cache_policy=NO_CACHE, timeout_seconds=HOUR)
def publish_training_task(
    config: PipelineConfig, metrics: DatasetRef, checkpoint: str, grad_stats: DatasetRef | None = None
) -> Path:
    """The checkpoint's model card (README.md) and the run reported to ``train.report_to``."""
    from pipeline.interop.publish import publish_training

    return publish_training(DatasetStore(config.workspace), config, metrics, Path(checkpoint), grad_stats)


@task(name="publish-evaluation", cache_policy=NO_CACHE, timeout_seconds=HOUR)
def publish_evaluation_task(
    config: PipelineConfig, results: DatasetRef, models: list[tuple[str, str, DatasetRef]]
) -> list[Path]:
    """Each evaluated checkpoint's card gets the eval table; trackers get it too."""
    from pipeline.interop.publish import TrainedModel, publish_evaluation

    trained = [TrainedModel(label, Path(checkpoint), ref) for label, checkpoint, ref in models]
    return publish_evaluation(DatasetStore(config.workspace), config, results, trained)
