"""Find flow runs in Prefect for ``bvpo report``: by id or name, with every subflow run below them.

Datasets record the flow run that registered them, which for ``bvpo_pipeline`` is one of its subflows
(``data_refresh``, ``train_bvpo``, ``evaluate``). A user holds the parent's id or its name (what the UI
and the logs show), so the report asks Prefect for that run's family of flow runs.
"""

from __future__ import annotations

import json
from uuid import UUID


def flow_run_family(run: str) -> tuple[str, list[str]]:
    """``(name, ids)`` of the flow run with id or name ``run`` and all its subflow runs (the run first).

    Raises :class:`LookupError` when Prefect knows no such run or the name is ambiguous.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
        FlowRunFilterParentFlowRunId,
    )

    try:
        by = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run)]))
    except ValueError:
        by = FlowRunFilter(name=FlowRunFilterName(any_=[run]))
    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(flow_run_filter=by, limit=10)
        if not found:
            raise LookupError(f"Prefect has no flow run with id or name '{run}'")
        if len(found) > 1:
            ids = ", ".join(str(r.id) for r in found)
            raise LookupError(f"{len(found)} flow runs are named '{run}' ({ids}): give the id")
        root = found[0]
        ids = [root.id]
        frontier = [root.id]
        while frontier:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
            )
            frontier = [child.id for child in children if child.id not in ids]
            ids += frontier
    return str(root.name), [str(i) for i in ids]


def checkpoint_datasets(run_ids: list[str]) -> list[str]:
    """The ``train_metrics`` datasets (``kind:version``) that these flow runs recorded as trained.

    A train_bvpo run that reused every dataset registered nothing, but its ``bvpo-checkpoint`` artifact
    still names the checkpoint it produced.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows.pipeline import CHECKPOINT_ARTIFACT

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[CHECKPOINT_ARTIFACT]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(i) for i in run_ids]),
            )
        )
    out = []
    for artifact in artifacts:
        rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
        out += [str(row["train_metrics"]) for row in rows or [] if row.get("train_metrics")]
    return out
