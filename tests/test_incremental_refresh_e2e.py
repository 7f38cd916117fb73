"""Recurring refreshes end to end on configs/tiny.yaml: real vLLM, a real Prefect server and `bvpo serve`.

One workspace, one sequence of flow runs (module fixture). `bvpo server` and `bvpo serve` run as processes
(tests/prefect_stack.py), the data-refresh deployment on a schedule of every 30 seconds that the test pauses
between the runs it wants (the server's scheduler is made to look every 2 s and to keep one future run):

1. ``data_refresh`` (a plain call, in this process) with ``refresh.incremental`` on a JSONL source of
   6 prompts;
2. 4 train-split prompts appended, the next **scheduled** run of ``data-refresh``: only the new train
   prompts are generated (rows and shards counted), D_t and D_e are the previous versions plus the new
   pairs, nothing twice; it announces its new pairs, the automation creates one ``train-bvpo`` run, which
   `bvpo serve` executes (its data_refresh subflow reuses everything), and its completion creates an
   ``evaluate`` run, executed there too (each eval_results row carries its model's round);
3. the schedule resumed for one more scheduled ``data-refresh`` run, with nothing new: nothing registered,
   no training started;
4. ``data_refresh`` (in this process) with ``generation.policy: latest``: round 2, sampled from round 1's
   checkpoint;

then both processes are stopped and none of the stack's processes may be left.
The fast tests (tests/test_incremental_refresh.py) cover the bad input, the lock and round 2's training.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from pipeline.config import PipelineConfig, load_config
from pipeline.prompts.builtin import build_builtin_prompts
from storage import DatasetStore
from tests.prefect_stack import (
    FAST_SCHEDULER,
    TINY,
    Stack,
    api_client,
    runs_of,
    table_artifact,
    wait_final,
    wait_for_deployments,
)
from tests.reliability_helpers import catalog_rows

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

FIRST, APPENDED, SHARD = 6, 4, 4
EVERY_30_S = "* * * * * */30"  # croniter's optional sixth field: seconds


def _append(path: Path, records: list[Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for r in records:
            row = {"prompt": r.prompt, "task_type": r.task_type, "constraints": r.constraints}
            if r.reference_answer is not None:
                row["answer"] = r.reference_answer
            handle.write(json.dumps(row) + "\n")


def _instruction_prompts() -> list[Any]:
    """Built-in instruction prompts with 2-3 constraints (partial credit: few ties even on a 135M model):
    the first FIRST as they come, then APPENDED of the train split (so the refresh has new train prompts)."""
    found = [
        r
        for r in build_builtin_prompts(80, seed=3)
        if r.task_type == "instruction" and len(r.constraints) > 1
    ]
    first, rest = found[:FIRST], found[FIRST:]
    return first + [r for r in rest if r.split == "train"][:APPENDED]


def _wait_for_runs(client: Any, deployment_id: UUID, count: int, timeout_s: float = 120.0) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = runs_of(client, deployment_id)
        if len(runs) >= count:
            return runs
        time.sleep(1.0)
    raise AssertionError(
        f"no run of deployment {deployment_id} was created by its trigger in {timeout_s:.0f} s"
    )


def _next_scheduled_run(client: Any, stack: Stack, deployment_id: UUID, timeout_s: float = 120.0) -> Any:
    """Resume the deployment's schedule until a scheduled run of it that has not finished starts, pause it
    again (the run after is 30 s away, and pausing deletes it), then wait for the started run to complete.

    The schedule is active from the moment `bvpo serve` registers the deployment until the fixture pauses
    it, so a run may have started in between: that run is the one wanted (CI on 2026-12-02 failed when it
    was skipped as already seen and the run after it was taken).
    """
    finished = {r.id for r in runs_of(client, deployment_id) if r.state is not None and r.state.is_final()}
    client.resume_deployment(deployment_id)
    deadline = time.monotonic() + timeout_s
    started: list[Any] = []
    while not started and time.monotonic() < deadline:
        fresh = [r for r in runs_of(client, deployment_id) if r.id not in finished]
        started = [
            r for r in fresh if r.state is not None and not (r.state.is_scheduled() or r.state.is_cancelled())
        ]
        if not started:
            time.sleep(0.5)
    client.pause_deployment(deployment_id)
    assert len(started) == 1, f"expected one scheduled run to start in {timeout_s:.0f} s, got {started}"
    return wait_final(client, started[0].id, stack)


def _refresh_output(client: Any, store: DatasetStore, run_id: UUID) -> Any:
    """What a data-refresh run returned, from its datasets artifact (the run executed in `bvpo serve`)."""
    from flows.pipeline import DataRefreshOutput

    rows = table_artifact(client, run_id, "data-refresh-datasets")
    return DataRefreshOutput(**{row["kind"]: store.catalog.resolve(row["dataset"]) for row in rows})


def _train_output(client: Any, store: DatasetStore, run_id: UUID) -> Any:
    """The checkpoint a train-bvpo run recorded (artifact ``bvpo-checkpoint``) and its train_metrics."""
    from tasks.stages import TrainOutput

    (row,) = table_artifact(client, run_id, "bvpo-checkpoint")
    return TrainOutput(metrics=store.catalog.resolve(row["train_metrics"]), checkpoint=row["checkpoint"])


@pytest.fixture(scope="module")
def rounds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from flows.deployments import DATA_REFRESH, EVALUATE, TRAIN
    from flows.pipeline import data_refresh

    root = tmp_path_factory.mktemp("incremental")
    source = root / "prompts.jsonl"
    records = _instruction_prompts()
    _append(source, records[:FIRST])
    overrides = [
        f"prompts.source={source}",
        "prompts.num_prompts=1000",
        "refresh.incremental=true",
        "refresh.train_min_new_pairs=1",
        f"generation.shard_size={SHARD}",
        "pairing.allow_cut_chosen=true",  # more pairs from few prompts (48-token answers are often cut)
        "train.max_steps=1",
        "eval.baselines=false",
        "eval.bootstrap_samples=50",
    ]
    stack = Stack(root, overrides, env=FAST_SCHEDULER)
    config = stack.config
    latest = load_config(TINY, [*stack.overrides, "generation.policy=latest"])
    store = DatasetStore(config.workspace)
    out: dict[str, Any] = {"config": config, "latest": latest, "seconds": {}}

    def timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        out["seconds"][name] = round(time.perf_counter() - started, 1)
        return result

    try:
        timed("server", stack.start_server)
        with stack.api(), api_client() as client:
            out["first"] = timed("first", data_refresh, config)  # a plain call announces nothing
            _append(source, records[FIRST:])
            stack.start_serve("--cron", EVERY_30_S)
            timed("serve", wait_for_deployments, client, stack)
            ids = {name: client.read_deployment_by_name(f"{flow}/{name}").id for flow, name in (
                ("data_refresh", DATA_REFRESH), ("train_bvpo", TRAIN), ("evaluate", EVALUATE)
            )}  # fmt: skip
            out["ids"] = ids
            client.pause_deployment(ids[DATA_REFRESH])  # active since registered: a run may have started
            second = timed("second (scheduled)", _next_scheduled_run, client, stack, ids[DATA_REFRESH])
            out["second_run"], out["second"] = second, _refresh_output(client, store, second.id)
            (train_run,) = _wait_for_runs(client, ids[TRAIN], 1)
            out["train_run"] = timed("train1", wait_final, client, train_run.id, stack)
            out["train1"] = _train_output(client, store, train_run.id)
            out["eval_runs"] = _wait_for_runs(client, ids[EVALUATE], 1)
            out["eval_run"] = timed("evaluate", wait_final, client, out["eval_runs"][0].id, stack)
            out["catalog_before_third"] = catalog_rows(config.workspace)
            third = timed("third (scheduled)", _next_scheduled_run, client, stack, ids[DATA_REFRESH])
            out["third_run"], out["third"] = third, _refresh_output(client, store, third.id)
            out["catalog_after_third"] = catalog_rows(config.workspace)
            out["round2"] = timed("round2", data_refresh, latest)  # gives the trigger time to (not) fire
            out["train_runs"] = runs_of(client, ids[TRAIN])
            out["refresh_runs"] = runs_of(client, ids[DATA_REFRESH])
    finally:
        out["left_over"] = stack.stop()
    print(f"incremental e2e flow times (s): {out['seconds']}")
    return out


def _train_ids(store: DatasetStore, ref: Any) -> set[str]:
    return {r["prompt_id"] for r in store.read_rows(ref) if r["split"] == "train"}


def _shards(store: DatasetStore, ref: Any) -> int:
    return len({g["shard_index"] for g in store.read_rows(ref)})


def test_appended_prompts_alone_are_generated(rounds: dict[str, Any]) -> None:
    config: PipelineConfig = rounds["config"]
    store = DatasetStore(config.workspace)
    first, second = rounds["first"], rounds["second"]
    assert (first.prompts.row_count, second.prompts.row_count) == (FIRST, FIRST + APPENDED)
    parents, settings = store.catalog.parents_of(second.prompts)
    assert parents == [first.prompts.qualified] and settings["added"] == APPENDED
    old, new = (
        _train_ids(store, first.prompts),
        _train_ids(store, second.prompts) - _train_ids(store, first.prompts),
    )
    assert old and new
    samples = config.generation.samples_per_prompt
    for out, ids in ((first, old), (second, new)):
        rows = store.read_rows(out.generations)
        assert {g["prompt_id"] for g in rows} == ids
        assert len(rows) == len(ids) * 2 * samples
        assert _shards(store, out.generations) == math.ceil(len(ids) / SHARD)
        assert {s["prompt_id"] for s in store.read_rows(out.scores)} == ids
    assert store.catalog.parents_of(second.generations)[1]["new_since"] == first.prompts.qualified


def test_the_pairs_grow_by_the_new_pairs_and_hold_none_twice(rounds: dict[str, Any]) -> None:
    store = DatasetStore(rounds["config"].workspace)
    first, second = rounds["first"], rounds["second"]
    new_prompts = {g["prompt_id"] for g in store.read_rows(second.generations)}
    for mode in ("trace", "empty"):
        before, after = getattr(first, f"pairs_{mode}"), getattr(second, f"pairs_{mode}")
        rows = store.read_rows(after)
        ids = [p["pair_id"] for p in rows]
        assert len(ids) == len(set(ids)) >= before.row_count
        assert {p["pair_id"] for p in store.read_rows(before)} <= set(ids)
        added = [p for p in rows if p["pair_id"] not in {q["pair_id"] for q in store.read_rows(before)}]
        assert {p["prompt_id"] for p in added} <= new_prompts
        assert before.qualified in store.catalog.parents_of(after)[0]
    ref_ids = [r["pair_id"] for r in store.read_rows(second.ref_logps)]
    assert len(ref_ids) == len(set(ref_ids)) == second.pairs_trace.row_count + second.pairs_empty.row_count
    assert (
        second.pairs_trace.row_count + second.pairs_empty.row_count
        > first.pairs_trace.row_count + first.pairs_empty.row_count
    )


def test_the_refreshes_were_created_by_the_schedule(rounds: dict[str, Any]) -> None:
    runs = rounds["refresh_runs"]
    assert [r.id for r in runs] == [rounds["second_run"].id, rounds["third_run"].id]  # paused in between
    for run in runs:
        assert run.created_by is not None and run.created_by.type == "SCHEDULE", run.created_by
        assert run.auto_scheduled and run.state.is_completed()


def test_a_refresh_with_nothing_new_registers_nothing(rounds: dict[str, Any]) -> None:
    second, third = rounds["second"], rounds["third"]
    assert rounds["catalog_after_third"] == rounds["catalog_before_third"]
    assert (third.prompts, third.pairs_trace, third.pairs_empty, third.ref_logps) == (
        second.prompts,
        second.pairs_trace,
        second.pairs_empty,
        second.ref_logps,
    )
    assert third.generations is None  # nothing generated: no new train prompts


def test_the_refresh_with_new_pairs_started_one_training_and_its_evaluation(rounds: dict[str, Any]) -> None:
    train_run, eval_run = rounds["train_run"], rounds["eval_run"]
    assert [r.id for r in rounds["train_runs"]] == [train_run.id]  # once: not again for nothing new
    assert train_run.created_by is not None and train_run.created_by.type == "AUTOMATION"
    assert train_run.parameters["config"] == rounds["second_run"].parameters["config"]
    assert train_run.parameters["config"]["refresh"]["incremental"] is True
    assert [r.id for r in rounds["eval_runs"]] == [eval_run.id]
    assert eval_run.created_by is not None and eval_run.created_by.type == "AUTOMATION"
    assert eval_run.parameters["train_run_id"] == str(train_run.id)


def test_the_evaluation_reports_the_round_of_each_model(rounds: dict[str, Any]) -> None:
    store = DatasetStore(rounds["config"].workspace)
    (results,) = [
        store.catalog.resolve(d["name"])
        for d in store.catalog.list_datasets()
        if d["kind"] == "eval_results" and d["flow_run_id"] == str(rounds["eval_run"].id)
    ]
    assert rounds["train1"].metrics.qualified in {n.qualified for _, n, _ in store.catalog.lineage(results)}
    assert {(r["model_label"], r["round"]) for r in store.read_rows(results)} == {
        ("reference", 0),
        ("trained", 1),
    }


def test_no_process_of_the_stack_outlives_it(rounds: dict[str, Any]) -> None:
    assert rounds["left_over"] == []


def test_training_reads_the_grown_pairs(rounds: dict[str, Any]) -> None:
    store = DatasetStore(rounds["config"].workspace)
    parents, settings = store.catalog.parents_of(rounds["train1"].metrics)
    second = rounds["second"]
    assert parents == [second.pairs_trace.qualified, second.pairs_empty.qualified, second.ref_logps.qualified]
    assert "policy" not in settings  # round 1: the base model


def test_round_two_samples_from_round_one_checkpoint(rounds: dict[str, Any]) -> None:
    store = DatasetStore(rounds["config"].workspace)
    checkpoint, round2 = rounds["train1"].checkpoint, rounds["round2"]
    _, settings = store.catalog.parents_of(round2.generations)
    assert settings["model"] == checkpoint
    assert settings["policy"]["round"] == 2
    assert settings["policy"]["train_metrics"] == rounds["train1"].metrics.qualified
    rows = store.read_rows(round2.generations)
    assert {g["model"] for g in rows} == {checkpoint}  # the engine's model label: the checkpoint
    assert {g["prompt_id"] for g in rows} == _train_ids(store, rounds["second"].prompts)  # a new round: all
    chain = [node for _, node, _ in store.catalog.lineage(round2.pairs_trace)]
    assert rounds["second"].pairs_trace not in chain  # another sampler: a new chain of pairs
    for ref in (round2.scores, round2.pairs_trace, round2.pairs_empty, round2.ref_logps):
        assert store.catalog.parents_of(ref)[1]["policy"]["round"] == 2, ref.name
    assert store.catalog.parents_of(round2.ref_logps)[1]["ref_model"] == checkpoint
