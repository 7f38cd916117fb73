"""End to end on a real Prefect server: `bvpo server`, `bvpo serve`, runs created the way the UI creates them.

One served stack and one workspace (configs/tiny.yaml) for the whole module:

1. a data-refresh run is killed (the serving process group, SIGKILL) while it computes reference log-probs;
   the serving process is restarted and the same run is created again: it completes, and the catalog
   holds exactly the datasets of an uninterrupted run (one version per stage, no orphan files);
2. data-refresh runs again with the same parameters and reuses every dataset;
3. a train-bvpo run (the UI's quick run: the deployment's default parameters) trains, and its completion
   triggers an evaluate run of the new checkpoint through the deployment trigger;
4. the killed run is marked Crashed by the heartbeat automation.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest

from storage import DatasetStore
from tasks.orchestration import GPU_TAG
from tests.prefect_stack import (
    RUN_TIMEOUT_S,
    Stack,
    api_client,
    artifact,
    create_run,
    runs_of,
    table_artifact,
    wait_final,
    wait_for_deployments,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

DATA_KINDS = ("prompts", "generations", "scores", "pairs_trace", "pairs_empty", "ref_logps")
SIDE_KINDS = ("rejects", "logp_agreement")  # registered beside a stage's output, not as one
OVERRIDES = ["eval.bootstrap_samples=50", "train.max_steps=1"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("orchestration"), OVERRIDES)
    try:
        stack.start_server()
        with stack.api():
            stack.start_serve()
            with api_client() as client:
                wait_for_deployments(client, stack)
            yield stack
    finally:
        stack.stop()


def _wait_for_task(client: Any, run_id: UUID, prefix: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
    """Wait until a task run of ``run_id`` whose name starts with ``prefix`` is Running."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        if any(t.name.startswith(prefix) and t.state and t.state.is_running() for t in tasks):
            return
        run = client.read_flow_run(run_id)
        assert not run.state.is_final(), f"the run ended ({run.state}) before '{prefix}' was caught running"
        time.sleep(0.25)
    raise TimeoutError(f"task '{prefix}' of {run_id} never ran")


def _datasets(stack: Stack) -> list[dict[str, Any]]:
    return DatasetStore(stack.workspace).catalog.list_datasets()


@pytest.fixture(scope="module")
def refresh(stack: Stack) -> dict[str, Any]:
    """Kill a data-refresh run mid-flow, restart serving, rerun it, then run it once more."""
    timings: dict[str, float] = {}
    with stack.api(), api_client() as client:
        start = time.monotonic()
        killed = create_run(client, "data_refresh/data-refresh")
        _wait_for_task(client, killed.id, "reference-logps")
        stack.kill_serve()
        killed_at = time.monotonic()
        timings["until kill"] = killed_at - start
        at_kill = _datasets(stack)
        # The dead run held the GPU slot; its lease would lapse in about a minute. Restarting with
        # --reset-gpu-slots frees it at once.
        stack.start_serve("--reset-gpu-slots")
        wait_for_deployments(client, stack)

        start = time.monotonic()
        rerun = wait_final(client, create_run(client, "data_refresh/data-refresh").id, stack)
        timings["rerun after restart"] = time.monotonic() - start
        after_rerun = _datasets(stack)

        start = time.monotonic()
        again = wait_final(client, create_run(client, "data_refresh/data-refresh").id, stack)
        timings["second identical run"] = time.monotonic() - start
        return {
            "killed": killed,
            "killed_at": killed_at,
            "at_kill": at_kill,
            "rerun": rerun,
            "after_rerun": after_rerun,
            "again": again,
            "after_again": _datasets(stack),
            "again_summary": artifact(client, again.id, "data-refresh-summary"),
            "gpu_limit": client.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit,
            "timings": timings,
        }


def test_server_ui_auth_and_served_forms(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/", timeout=10).status_code == 200  # the UI
    # ... which calls the API on this port (prefect's default would be 4200)
    assert httpx.get(f"{stack.url}/ui-settings", timeout=10).json()["api_url"] == f"{stack.url}/api"
    assert httpx.post(f"{stack.url}/api/deployments/filter", json={}, timeout=10).status_code == 401
    assert f"Prefect UI: {stack.url}" in stack.serve_log.read_text()
    with stack.api(), api_client() as client:
        refresh = client.read_deployment_by_name("data_refresh/data-refresh")
        assert refresh.schedules and refresh.schedules[0].schedule.cron == "0 3 * * *"
        evaluate = client.read_deployment_by_name("evaluate/evaluate")
        assert {"config", "checkpoint", "train_metrics", "train_run_id"} <= set(
            evaluate.parameter_openapi_schema["properties"]
        )
        names = {a.name for a in client.read_automations()}
        assert "evaluate after train_bvpo" in names


def test_killed_run_reruns_without_duplicating_data(stack: Stack, refresh: dict[str, Any]) -> None:
    print("timings (s):", {k: round(v, 1) for k, v in refresh["timings"].items()})
    at_kill = {d["kind"] for d in refresh["at_kill"]}
    assert {"prompts", "generations"} <= at_kill and "ref_logps" not in at_kill  # killed mid-flow
    datasets = refresh["after_rerun"]
    kinds = Counter(d["kind"] for d in datasets)
    # An uninterrupted run registers each stage's output once (plus one rejects dataset per stage at most,
    # and one sampler/trainer agreement summary for the reference pass).
    assert {k: kinds[k] for k in DATA_KINDS} == dict.fromkeys(DATA_KINDS, 1), kinds
    assert set(kinds) <= {*DATA_KINDS, *SIDE_KINDS} and kinds["logp_agreement"] == 1, kinds
    store = DatasetStore(stack.workspace)
    rejects_for = [
        store.catalog.parents_of(store.catalog.resolve(d["name"]))[1]["for"]
        for d in datasets
        if d["kind"] == "rejects"
    ]
    assert len(rejects_for) == len(set(rejects_for))
    # What the killed run registered was kept; the rerun registered only what was missing.
    kept = {d["name"] for d in refresh["at_kill"]}
    by_rerun = {d["name"] for d in datasets if d["flow_run_id"] == str(refresh["rerun"].id)}
    assert by_rerun == {d["name"] for d in datasets} - kept and "ref_logps__v1" in by_rerun
    # Every registered dataset reads back whole, and no published folder is outside the catalog.
    refs = {d["kind"]: store.catalog.resolve(d["name"]) for d in datasets if d["kind"] in DATA_KINDS}
    for ref in refs.values():
        assert store.read(ref).num_rows == ref.row_count
    config = stack.config
    prompts = store.read_rows(refs["prompts"])
    train = [p for p in prompts if p["split"] == "train"]
    assert len(prompts) == config.prompts.num_prompts
    assert refs["generations"].row_count == len(train) * 2 * config.generation.samples_per_prompt
    assert refs["ref_logps"].row_count == refs["pairs_trace"].row_count + refs["pairs_empty"].row_count
    lake = stack.workspace / "lake"
    published = {
        (p.parent.name, p.name) for p in lake.glob("*/*") if p.is_dir() and not p.name.startswith(".")
    }
    assert published == {(d["kind"], store.catalog.resolve(d["name"]).version) for d in datasets}


def test_second_identical_refresh_reuses_every_dataset(refresh: dict[str, Any]) -> None:
    assert refresh["after_again"] == refresh["after_rerun"]
    assert not any(d["flow_run_id"] == str(refresh["again"].id) for d in refresh["after_again"])
    assert "0 dataset(s) registered by this run, 6 reused" in refresh["again_summary"]
    assert refresh["gpu_limit"] == 1  # created by `bvpo serve`


@pytest.fixture(scope="module")
def trained(stack: Stack, refresh: dict[str, Any]) -> dict[str, Any]:
    """A train-bvpo run with the deployment's default parameters, and the evaluate run it triggers."""
    with stack.api(), api_client() as client:
        start = time.monotonic()
        train = wait_final(client, create_run(client, "train_bvpo/train-bvpo").id, stack)
        train_s = time.monotonic() - start
        checkpoint = table_artifact(client, train.id, "bvpo-checkpoint")[0]
        evaluate = client.read_deployment_by_name("evaluate/evaluate")
        deadline = time.monotonic() + 120
        triggered = []
        while not triggered and time.monotonic() < deadline:
            runs = runs_of(client, evaluate.id)
            triggered = [r for r in runs if r.parameters.get("train_run_id") == str(train.id)]
            time.sleep(1)
        assert triggered, "no evaluate run was created when the train_bvpo run completed"
        (evaluation,) = triggered
        evaluation = wait_final(client, evaluation.id, stack)
        eval_s = time.monotonic() - start - train_s
        killed = client.read_flow_run(refresh["killed"].id)
        deadline = refresh["killed_at"] + 180  # 3 missed 30 s heartbeats, and the server's evaluation loop
        while not killed.state.is_crashed() and time.monotonic() < deadline:
            time.sleep(2)
            killed = client.read_flow_run(refresh["killed"].id)
        return {
            "train": train,
            "checkpoint": checkpoint,
            "evaluation": evaluation,
            "killed": killed,
            "datasets": _datasets(stack),
            "timings": {"train run": train_s, "triggered evaluate run": eval_s},
        }


def test_training_completion_triggers_evaluation_of_the_new_checkpoint(
    stack: Stack, refresh: dict[str, Any], trained: dict[str, Any]
) -> None:
    print("timings (s):", {k: round(v, 1) for k, v in trained["timings"].items()})
    train, evaluation = trained["train"], trained["evaluation"]
    # The evaluate run came from the automation, with the train run's own config.
    assert evaluation.created_by is not None and evaluation.created_by.type == "AUTOMATION"
    assert evaluation.parameters["config"] == train.parameters["config"]
    # The train run reused every dataset of the refresh (through its data_refresh subflow) and trained.
    kinds = Counter(d["kind"] for d in trained["datasets"])
    assert {k: kinds[k] for k in DATA_KINDS} == dict.fromkeys(DATA_KINDS, 1)
    store = DatasetStore(stack.workspace)
    metrics = store.catalog.resolve(trained["checkpoint"]["train_metrics"])
    assert metrics.row_count == stack.config.train.max_steps
    assert (Path(trained["checkpoint"]["checkpoint"]) / "config.json").is_file()
    # The evaluation's results descend from exactly that checkpoint's training metrics.
    results = store.catalog.resolve("eval_results")
    lineage = {node.qualified for _, node, _ in store.catalog.lineage(results)}
    assert metrics.qualified in lineage
    assert {r["model_label"] for r in store.read_rows(results)} == {"reference", "trained"}


def test_killed_run_is_marked_crashed_by_the_heartbeat_automation(trained: dict[str, Any]) -> None:
    assert trained["killed"].state.is_crashed(), trained["killed"].state
