"""The incremental data refresh (``refresh.incremental``) and the event that starts training after it.

New prompts only: the prompts version registers the source's unseen prompts, generation and scoring run
for them, and D_t / D_e (and their reference log-probs) are registered as the previous versions plus the
new pairs (tasks/incremental.py). One incremental refresh runs at a time per workspace: a second waits for
the lock (``refresh.lock_timeout_s``), then finds the first one's datasets and reuses them.

A ``data-refresh`` deployment run that registered at least ``refresh.train_min_new_pairs`` new pairs per
mode emits :data:`NEW_PAIRS_EVENT`; the ``train-bvpo`` deployment's trigger (flows/deployments.py) reacts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prefect import get_run_logger

from pipeline.config import PipelineConfig
from storage import DatasetStore
from storage.locks import LockTimeout, file_lock
from tasks.incremental import (
    incremental_prompts_task,
    new_train_prompts,
    pair_union_task,
    previous_pairs,
)
from tasks.stages import generate_task, reference_logps_task, score_task

if TYPE_CHECKING:
    from flows.pipeline import DataRefreshOutput

NEW_PAIRS_EVENT = "bvpo.refresh.new-pairs"
"""Emitted by a data-refresh deployment run that registered enough new pairs (refresh.train_min_new_pairs)."""

LOCK_NAME = "refresh.lock"


class RefreshBusy(RuntimeError):
    """Another incremental refresh held the workspace's refresh lock for longer than the timeout."""


@contextmanager
def refresh_lock(config: PipelineConfig) -> Iterator[None]:
    """Hold the workspace's refresh lock; a refresh already running is waited for."""
    path = DatasetStore(config.workspace).workspace / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    timeout = config.refresh.lock_timeout_s
    try:
        with file_lock(path, shared=False, timeout_s=timeout):
            yield
    except LockTimeout:
        raise RefreshBusy(
            f"another incremental refresh of {config.workspace} is still running (lock {path} held for "
            f"more than refresh.lock_timeout_s={timeout:g} s); nothing was registered by this one: run it "
            "again when the other has finished"
        ) from None


def incremental_refresh(config: PipelineConfig) -> tuple[DataRefreshOutput, dict[str, int]]:
    """New prompts → generate → score → pair (union with the previous D_t / D_e) → reference log-probs.

    Returns the datasets and the pairs per mode this refresh added (0 when it reused everything).
    """
    from flows.pipeline import DataRefreshOutput

    logger = get_run_logger()
    with refresh_lock(config):
        step = incremental_prompts_task(config)
        before = previous_pairs(config)
        covered = before.prompts if before is not None else None
        if before is not None and new_train_prompts(config, step.prompts, covered) == 0:
            logger.info(
                "data_refresh: no new train prompts since %s; %s and %s stay as they are",
                covered.name if covered else "-",
                before.pairs_trace.name,
                before.pairs_empty.name,
            )
            ref_logps = reference_logps_task(config, before.pairs_trace, before.pairs_empty)
            out = DataRefreshOutput(
                prompts=step.prompts,
                pairs_trace=before.pairs_trace,
                pairs_empty=before.pairs_empty,
                ref_logps=ref_logps,
            )
            return out, {"trace": 0, "empty": 0}
        generations = generate_task(config, step.prompts, since=covered)
        scores = score_task(config, step.prompts, generations)
        pairs = pair_union_task(config, step.prompts, generations, scores, before)
        previous = [before.pairs_trace, before.pairs_empty] if before is not None else None
        ref_logps = reference_logps_task(config, pairs.pairs_trace, pairs.pairs_empty, previous=previous)
    out = DataRefreshOutput(
        prompts=step.prompts,
        generations=generations,
        scores=scores,
        pairs_trace=pairs.pairs_trace,
        pairs_empty=pairs.pairs_empty,
        ref_logps=ref_logps,
    )
    return out, pairs.added


def modes_trained(config: PipelineConfig) -> list[str]:
    """The pair modes training draws from (α > 0: D_t, α < 1: D_e)."""
    alpha = config.train.alpha_value
    return [mode for mode, used in (("trace", alpha > 0), ("empty", alpha < 1)) if used]


def enough_new_pairs(config: PipelineConfig, new_pairs: dict[str, int]) -> bool:
    """Whether a refresh registered ``refresh.train_min_new_pairs`` new pairs in every mode training uses."""
    wanted = config.refresh.train_min_new_pairs
    return wanted is not None and all(new_pairs.get(mode, 0) >= wanted for mode in modes_trained(config))


def announce_new_pairs(config: PipelineConfig, new_pairs: dict[str, int]) -> bool:
    """Emit :data:`NEW_PAIRS_EVENT` when this is a data-refresh deployment run with enough new pairs.

    Only a deployment's own run announces: the data_refresh subflow of a train_bvpo run must not start
    another training. Returns whether the event was emitted.
    """
    from prefect.context import FlowRunContext
    from prefect.events import emit_event

    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    own_deployment_run = run is not None and run.deployment_id is not None and run.parent_task_run_id is None
    if run is None or not own_deployment_run or not enough_new_pairs(config, new_pairs):
        return False
    emit_event(
        event=NEW_PAIRS_EVENT,
        resource={"prefect.resource.id": f"prefect.flow-run.{run.id}", "prefect.resource.name": run.name},
        related=[
            {
                "prefect.resource.id": f"prefect.deployment.{run.deployment_id}",
                "prefect.resource.role": "deployment",
            }
        ],
        payload={"new_pairs": new_pairs, "min_new_pairs": config.refresh.train_min_new_pairs},
    )
    get_run_logger().info("data_refresh: %s new pairs, announced %s", new_pairs, NEW_PAIRS_EVENT)
    return True
