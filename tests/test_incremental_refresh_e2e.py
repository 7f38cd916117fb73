"""Recurring refreshes end to end on configs/tiny.yaml, through real vLLM and a real (temporary) Prefect API.

One workspace, one sequence of flow runs (module fixture, so the engines start only where the product
needs them); the deployments data-refresh, train-bvpo and evaluate are registered with their triggers:

1. ``data_refresh`` (a plain call) with ``refresh.incremental`` on a JSONL source of 6 prompts;
2. 4 train-split prompts appended, a run of the ``data-refresh`` deployment: only the new train prompts
   are generated (rows and shards counted), D_t and D_e are the previous versions plus the new pairs,
   nothing twice; it announces its new pairs, the automation creates one ``train-bvpo`` run, executed here
   as ``bvpo serve`` would (its data_refresh subflow reuses everything), and its completion creates an
   ``evaluate`` run (not executed: the evaluation has its own e2e tests);
3. another ``data-refresh`` deployment run with nothing new: nothing registered, no training started;
4. ``data_refresh`` with ``generation.policy: latest``: round 2, sampled from round 1's checkpoint.

The fast tests (tests/test_incremental_refresh.py) cover the bad input, the lock and round 2's training.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import PipelineConfig, load_config
from pipeline.prompts.builtin import build_builtin_prompts
from storage import DatasetStore
from tests.reliability_helpers import catalog_rows

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
FIRST, APPENDED, SHARD = 6, 4, 4


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


def _deployment_run(deployment_id: Any, flow: Any, config: PipelineConfig) -> Any:
    """A run of the deployment, executed in this process the way a serving Runner executes it."""
    from prefect.deployments import run_deployment
    from prefect.flow_engine import run_flow

    run = run_deployment(deployment_id, parameters={"config": config.model_dump(mode="json")}, timeout=0)
    return run_flow(flow, flow_run=run, parameters=run.parameters)


def _runs_of(deployment_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def _wait_for_runs(deployment_id: Any, count: int, timeout_s: float = 120.0) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = _runs_of(deployment_id)
        if len(runs) >= count:
            return runs
        time.sleep(1.0)
    raise AssertionError(
        f"no run of deployment {deployment_id} was created by its trigger in {timeout_s:.0f} s"
    )


@pytest.fixture(scope="module")
def rounds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from prefect.flow_engine import run_flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.deployments import DATA_REFRESH, EVALUATE, TRAIN, ServeOptions, build_deployments
    from flows.pipeline import data_refresh, train_bvpo

    root = tmp_path_factory.mktemp("incremental")
    source = root / "prompts.jsonl"
    records = _instruction_prompts()
    _append(source, records[:FIRST])
    overrides = [
        f"workspace={root / 'ws'}",
        f"prompts.source={source}",
        "prompts.num_prompts=1000",
        "refresh.incremental=true",
        "refresh.train_min_new_pairs=1",
        f"generation.shard_size={SHARD}",
        "pairing.allow_cut_chosen=true",  # more pairs from few prompts (48-token answers are often cut)
        "train.max_steps=1",
        "eval.baselines=false",
    ]
    config = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    latest = load_config(ROOT / "configs" / "tiny.yaml", [*overrides, "generation.policy=latest"])
    out: dict[str, Any] = {"config": config, "latest": latest, "seconds": {}}

    def timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        out["seconds"][name] = round(time.perf_counter() - started, 1)
        return result

    with prefect_test_harness(server_startup_timeout=120):
        deployments = {d.name: d for d in build_deployments(config, ServeOptions(refresh_cron=None))}
        ids = {name: deployments[name].apply() for name in (DATA_REFRESH, TRAIN, EVALUATE)}
        out["ids"] = ids
        out["first"] = timed("first", data_refresh, config)  # a plain call announces nothing
        _append(source, records[FIRST:])
        out["second"] = timed("second", _deployment_run, ids[DATA_REFRESH], data_refresh, config)
        (train_run,) = _wait_for_runs(ids[TRAIN], 1)
        out["train_run"] = train_run
        out["train1"] = timed(
            "train1", run_flow, train_bvpo, flow_run=train_run, parameters=train_run.parameters
        )
        out["eval_runs"] = _wait_for_runs(ids[EVALUATE], 1)
        out["catalog_before_third"] = catalog_rows(config.workspace)
        out["third"] = timed("third", _deployment_run, ids[DATA_REFRESH], data_refresh, config)
        out["catalog_after_third"] = catalog_rows(config.workspace)
        out["round2"] = timed("round2", data_refresh, latest)  # gives the trigger time to (not) fire
        out["train_runs"] = _runs_of(ids[TRAIN])
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


def test_a_refresh_with_nothing_new_registers_nothing(rounds: dict[str, Any]) -> None:
    second, third = rounds["second"], rounds["third"]
    assert rounds["catalog_after_third"] == rounds["catalog_before_third"]
    assert (third.prompts, third.pairs_trace, third.pairs_empty, third.ref_logps) == (
        second.prompts,
        second.pairs_trace,
        second.pairs_empty,
        second.ref_logps,
    )


def test_the_refresh_with_new_pairs_started_one_training_and_its_evaluation(rounds: dict[str, Any]) -> None:
    train_run = rounds["train_run"]
    assert [r.id for r in rounds["train_runs"]] == [train_run.id]  # once: not again for nothing new
    assert train_run.parameters["config"]["refresh"]["incremental"] is True
    (eval_run,) = rounds["eval_runs"]
    assert eval_run.parameters["train_run_id"] == str(train_run.id)


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
