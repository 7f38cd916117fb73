"""Prefect really retries a stage task after a transient failure (tasks/orchestration.py), on a real API.

The prompts task runs inside a flow on a temporary Prefect server (``prefect_test_harness``). Its catalog
write fails once with a busy catalog *after* the rejects of the stage were registered, the worst moment: the
retry must run the task again, the run must complete, and the catalog must hold each dataset once (the retried
rejects registration finds the version already there). A non-transient failure is not retried.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import PipelineConfig
from storage import CatalogError, DatasetStore
from storage.store import DatasetStore as StoreClass


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _config(tmp_path: Path) -> PipelineConfig:
    source = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(6)] + [{"prompt": "  "}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return PipelineConfig.model_validate(
        {"workspace": str(tmp_path / "ws"), "prompts": {"source": str(source), "num_prompts": 7}}
    )


def _fail_main_put_once(monkeypatch: pytest.MonkeyPatch, error: Exception) -> list[str]:
    """Make the first registration of the ``prompts`` dataset raise ``error``; returns every kind put."""
    calls: list[str] = []
    real_put = StoreClass.put

    def put(self: StoreClass, kind: str, table: Any, **kwargs: Any) -> Any:
        calls.append(kind)
        if kind == "prompts" and calls.count("prompts") == 1:
            raise error
        return real_put(self, kind, table, **kwargs)

    monkeypatch.setattr(StoreClass, "put", put)
    return calls


def _run(config: PipelineConfig) -> tuple[Any, list[Any]]:
    """Run the prompts task in a flow (no retry delay); the flow's final state and its task runs."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.stages import prompts_task

    task = prompts_task.with_options(retry_delay_seconds=0)

    @flow(name="retry-test")
    def retry_flow(cfg: PipelineConfig) -> Any:
        return task(cfg)

    state = retry_flow(config, return_state=True)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return state, runs


def _registered(config: PipelineConfig) -> list[str]:
    return sorted(r["kind"] for r in DatasetStore(config.workspace).catalog.list_datasets())


def test_a_transient_failure_is_retried_and_nothing_is_registered_twice(
    prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.orchestration import retry_if_transient
    from tasks.stages import prompts_task

    assert prompts_task.retries == 2 and prompts_task.retry_condition_fn is retry_if_transient
    config = _config(tmp_path)
    calls = _fail_main_put_once(monkeypatch, CatalogError("the catalog is busy (locked by another writer)"))
    state, task_runs = _run(config)
    assert state.is_completed(), state.message
    (run,) = task_runs
    assert run.run_count == 2 and run.state.is_completed()  # failed once, retried once, done
    assert calls == ["rejects", "prompts", "rejects", "prompts"]  # the retry redid the whole stage
    assert _registered(config) == ["prompts", "rejects"]  # ... and registered each version once
    assert state.result().row_count == 6


def test_a_permanent_failure_is_not_retried(
    prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    calls = _fail_main_put_once(monkeypatch, ValueError("prompts: a column has the wrong type"))
    state, task_runs = _run(config)
    assert state.is_failed()
    (run,) = task_runs
    assert run.run_count == 1 and run.state.is_failed()
    assert calls == ["rejects", "prompts"]
    assert _registered(config) == ["rejects"]  # the rejects record stays; no partial prompts dataset
