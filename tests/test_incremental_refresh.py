"""Incremental refreshes and on-policy rounds without a Prefect API: the logic, the bad input, the lock.

The pure parts (prompt diff, union by key, catalog look-ups, policy resolution, the train trigger) are
tested directly; the refresh itself runs ``flows.incremental.incremental_refresh`` with each task replaced
by the function Prefect wraps (``task.fn``), a scripted engine for vLLM and a tiny model
(tests/reliability_helpers.py), so every dataset is registered by the product code.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest

import flows.incremental as incremental_flow
import tasks.incremental as incremental_tasks
import tasks.stages as stages
from pipeline.config import PipelineConfig, PromptsConfig
from pipeline.pair_union import DuplicateRowsError, union_by_key
from pipeline.prompts.incremental import PromptSourceChanged, diff_prompts, prompt_series
from storage import DatasetStore
from storage.locks import file_lock
from tests.reliability_helpers import (
    catalog_rows,
    install_fake_child_process,
    pipeline_config,
    quiet_prefect,
)
from tests.tiny_checkpoint import save_tiny_checkpoint

pytestmark = pytest.mark.timeout(300)

LOG = logging.getLogger("test-incremental")


def _row(prompt_id: str, key: str, text: str | None = None) -> dict[str, Any]:
    return {"prompt_id": prompt_id, "source_key": key, "prompt": text or f"prompt {prompt_id}"}


# --- the prompt diff -------------------------------------------------------------------------------------


def test_diff_keeps_the_previous_prompts_and_adds_only_unseen_ones() -> None:
    before = [_row("a", "p.jsonl:1"), _row("b", "p.jsonl:2")]
    now = [_row("a", "p.jsonl:1"), _row("c", "p.jsonl:2"), _row("b", "p.jsonl:3"), _row("d", "p.jsonl:4")]
    diff = diff_prompts(before, now)  # b moved one line down (a row inserted above it): still there
    assert [r["prompt_id"] for r in diff.added] == ["c", "d"] and diff.kept == 2
    assert diff_prompts([], now).added == now
    assert diff_prompts(now, now).added == []


def test_a_source_that_lost_rows_is_refused_naming_them() -> None:
    before = [_row("a", "p.jsonl:1"), _row("b", "p.jsonl:2"), _row("c", "p.jsonl:3")]
    with pytest.raises(PromptSourceChanged) as info:
        diff_prompts(before, [_row("a", "p.jsonl:1")])
    message = str(info.value)
    assert "2 prompt(s) are no longer in the source" in message
    assert "p.jsonl:2: prompt_id b" in message and "p.jsonl:3: prompt_id c" in message
    assert "Nothing was registered" in message and "refresh.incremental=false" in message


def test_a_prompt_whose_text_changed_at_the_same_place_is_refused() -> None:
    before = [_row("a", "p.jsonl:1", "What is 2 + 2?"), _row("b", "p.jsonl:2")]
    now = [_row("z", "p.jsonl:1", "What is 2 + 3?"), _row("b", "p.jsonl:2")]
    with pytest.raises(PromptSourceChanged) as info:
        diff_prompts(before, now)
    message = str(info.value)
    assert "1 prompt(s) changed text at the same place" in message
    assert "p.jsonl:1: prompt_id a ('What is 2 + 2?') is now z ('What is 2 + 3?')" in message
    assert "no longer in the source" not in message


def test_a_series_is_the_source_and_its_split_not_the_cap() -> None:
    base = PromptsConfig(source="p.jsonl")
    assert prompt_series(base) == prompt_series(base.model_copy(update={"num_prompts": 10_000}))
    assert prompt_series(base) != prompt_series(base.model_copy(update={"eval_fraction": 0.5}))
    assert prompt_series(base) != prompt_series(base.model_copy(update={"source": "q.jsonl"}))


# --- union of pairs --------------------------------------------------------------------------------------


def test_union_appends_new_rows_and_refuses_keys_registered_before() -> None:
    old = pa.table({"pair_id": ["a-trace", "b-trace"], "x": [1, 2]})
    grown = union_by_key(old, pa.table({"pair_id": ["c-trace"], "x": [3]}), "pair_id", "pairs_trace")
    assert grown.column("pair_id").to_pylist() == ["a-trace", "b-trace", "c-trace"]
    assert union_by_key(old, old.slice(0, 0), "pair_id", "pairs_trace").num_rows == 2
    with pytest.raises(DuplicateRowsError, match=r"pairs_trace: 1 pair_id\(s\) would be registered twice: b"):
        union_by_key(
            old, pa.table({"pair_id": ["b-trace", "d-trace"], "x": [5, 6]}), "pair_id", "pairs_trace"
        )
    with pytest.raises(DuplicateRowsError, match="registered twice: d-trace"):
        union_by_key(
            old, pa.table({"pair_id": ["d-trace", "d-trace"], "x": [5, 6]}), "pair_id", "pairs_trace"
        )


# --- catalog look-ups ------------------------------------------------------------------------------------


def test_find_latest_matches_config_values_and_a_parent(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path / "ws")
    empty = stages._table("prompts", [])
    assert store.catalog.find_latest("prompts", {"series": "s1"}) is None
    first = store.put("prompts", empty, config={"series": "s1", "n": 1}, parents=[])
    second = store.put("prompts", empty, config={"series": "s1", "n": 2}, parents=[first])
    other = store.put("prompts", empty, config={"series": "s2"}, parents=[])
    assert store.catalog.find_latest("prompts", {"series": "s1"}) == second
    assert store.catalog.find_latest("prompts", {"series": "s2"}) == other
    assert store.catalog.find_latest("prompts", {"series": "s1"}, parent=first.qualified) == second
    assert store.catalog.find_latest("prompts", {"series": "s2"}, parent=first.qualified) is None


# --- policy -----------------------------------------------------------------------------------------------


def test_latest_policy_without_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from tasks.policy import NoCheckpointYet, pin_policy, resolve_policy

    config = PipelineConfig.model_validate(
        {"workspace": str(tmp_path / "ws"), "generation": {"policy": "latest"}}
    )
    with pytest.raises(
        NoCheckpointYet, match=r"generation.policy=latest: no checkpoint was trained in .* yet"
    ):
        pin_policy(config)
    base = config.model_copy(update={"generation": config.generation.model_copy(update={"policy": "base"})})
    assert resolve_policy(base).checkpoint is None and resolve_policy(base).round == 1
    missing = config.model_copy(
        update={"generation": config.generation.model_copy(update={"policy": str(tmp_path / "nope")})}
    )
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nope"):
        resolve_policy(missing)
    with pytest.raises(ValueError, match=r"generation\.policy must be"):
        PipelineConfig.model_validate({"generation": {"policy": " "}})


def test_policy_and_reference_are_not_part_of_the_sampling_or_training_identity() -> None:
    plain, other = PipelineConfig(), PipelineConfig.model_validate({"generation": {"policy": "latest"}})
    assert plain.generation.fingerprint() == other.generation.fingerprint()
    assert "reference" in plain.train.model_dump() and plain.train.reference == "policy"


# --- the lock and the train trigger ----------------------------------------------------------------------


def test_a_second_refresh_waits_for_the_lock_then_fails_with_a_clear_message(tmp_path: Path) -> None:
    config = PipelineConfig.model_validate(
        {"workspace": str(tmp_path / "ws"), "refresh": {"lock_timeout_s": 0.2}}
    )
    lock = DatasetStore(config.workspace).workspace / incremental_flow.LOCK_NAME
    lock.parent.mkdir(parents=True)
    with (
        file_lock(lock, shared=False, timeout_s=1),
        pytest.raises(
            incremental_flow.RefreshBusy, match=r"another incremental refresh of .* is still running"
        ),
        incremental_flow.refresh_lock(config),
    ):
        pass
    with incremental_flow.refresh_lock(config):  # free again
        pass


def test_enough_new_pairs_counts_only_the_modes_training_uses() -> None:
    def config(alpha: Any, n: int | None) -> PipelineConfig:
        return PipelineConfig.model_validate(
            {"train": {"alpha": alpha}, "refresh": {"train_min_new_pairs": n}}
        )

    assert incremental_flow.enough_new_pairs(config(0.5, 2), {"trace": 2, "empty": 3})
    assert not incremental_flow.enough_new_pairs(config(0.5, 2), {"trace": 2, "empty": 1})
    assert incremental_flow.enough_new_pairs(config("dpo_trace", 2), {"trace": 2, "empty": 0})
    assert incremental_flow.enough_new_pairs(config("dpo_empty", 2), {"trace": 0, "empty": 5})
    assert not incremental_flow.enough_new_pairs(config(0.5, None), {"trace": 9, "empty": 9})


def test_the_train_deployment_gets_its_trigger_only_with_a_threshold(tmp_path: Path) -> None:
    from flows.deployments import ServeOptions, build_deployments, train_after_refresh_trigger

    config = PipelineConfig.model_validate({"workspace": str(tmp_path / "ws")})
    by_name = {d.name: d for d in build_deployments(config, ServeOptions())}
    assert not by_name["train-bvpo"].triggers
    by_name = {d.name: d for d in build_deployments(config, ServeOptions(train_min_new_pairs=3))}
    train = by_name["train-bvpo"]
    assert [t.name for t in train.triggers] == ["train after data-refresh"]
    assert train.parameters["config"]["refresh"]["train_min_new_pairs"] == 3
    assert by_name["data-refresh"].parameters["config"]["refresh"]["train_min_new_pairs"] == 3
    trigger = train_after_refresh_trigger()
    assert trigger.expect == {incremental_flow.NEW_PAIRS_EVENT}


# --- the refresh itself (task functions, scripted engine, tiny model) ------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def without_prefect(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The refresh's tasks as plain functions, logs to a test logger, the scripted engine for vLLM."""
    import torch

    install_fake_child_process(monkeypatch)
    for name in ("incremental_prompts_task", "pair_union_task", "generate_task", "score_task"):
        monkeypatch.setattr(incremental_flow, name, getattr(incremental_flow, name).fn)
    monkeypatch.setattr(incremental_flow, "reference_logps_task", stages.reference_logps_task.fn)
    monkeypatch.setattr(incremental_flow, "get_run_logger", lambda: LOG)
    monkeypatch.setattr(incremental_tasks, "get_run_logger", lambda: LOG)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet_prefect(LOG) as artifacts:
            yield artifacts
    finally:
        torch.set_num_threads(threads)


def _refresh(config: PipelineConfig) -> Any:
    """The refresh's datasets, with the pairs it added per mode as ``new_pairs``."""
    out, added = incremental_flow.incremental_refresh(config)
    return SimpleNamespace(**dict(out), new_pairs=added)


def _write(path: Path, first: int, count: int, mode: str = "a") -> Path:
    with open(path, mode, encoding="utf-8") as handle:
        for i in range(first, first + count):
            answer = i % 3 + 1
            handle.write(
                json.dumps({"prompt": f"Question {i}: what is {answer} times 1?", "answer": str(answer)})
            )
            handle.write("\n")
    return path


def _config(tmp_path: Path, tiny: Path, source: Path) -> PipelineConfig:
    return pipeline_config(tmp_path / "ws", tiny, source, refresh={"incremental": True})


def _train_prompts(store: DatasetStore, prompts: Any) -> set[str]:
    return {r["prompt_id"] for r in store.read_rows(prompts) if r["split"] == "train"}


def test_appended_prompts_alone_are_generated_and_the_pairs_grow(
    tmp_path: Path, tiny: Path, without_prefect: Any
) -> None:
    source = _write(tmp_path / "p.jsonl", 0, 10, "w")
    config = _config(tmp_path, tiny, source)
    store = DatasetStore(config.workspace)
    first = _refresh(config)
    assert first.generations is not None and first.new_pairs["trace"] == first.pairs_trace.row_count
    first_train = _train_prompts(store, first.prompts)

    _write(source, 10, 10)
    second = _refresh(config)
    assert second.prompts.row_count == 20
    assert store.catalog.parents_of(second.prompts)[0] == [first.prompts.qualified]
    assert store.catalog.parents_of(second.prompts)[1]["added"] == 10
    new_train = _train_prompts(store, second.prompts) - first_train
    generations = store.read_rows(second.generations)
    assert {g["prompt_id"] for g in generations} == new_train  # only the new prompts were generated
    assert len(generations) == len(new_train) * 2 * config.generation.samples_per_prompt
    assert {g["prompt_id"] for g in store.read_rows(second.scores)} == new_train
    for mode in ("trace", "empty"):
        old, grown = getattr(first, f"pairs_{mode}"), getattr(second, f"pairs_{mode}")
        ids = [p["pair_id"] for p in store.read_rows(grown)]
        assert len(ids) == len(set(ids)) == old.row_count + second.new_pairs[mode]  # nothing twice
        assert {p["pair_id"] for p in store.read_rows(old)} <= set(ids)
        assert old.qualified in store.catalog.parents_of(grown)[0]
    ref_ids = [r["pair_id"] for r in store.read_rows(second.ref_logps)]
    assert len(ref_ids) == len(set(ref_ids)) == second.pairs_trace.row_count + second.pairs_empty.row_count
    # The reference pass scored only the new pairs: its agreement rows count the new pairs' tokens only.
    assert store.catalog.parents_of(second.ref_logps)[0] == [
        second.pairs_trace.qualified,
        second.pairs_empty.qualified,
    ]

    before = catalog_rows(config.workspace)
    third = _refresh(config)  # nothing new: everything reused
    assert catalog_rows(config.workspace) == before
    assert (third.pairs_trace, third.pairs_empty, third.ref_logps) == (
        second.pairs_trace,
        second.pairs_empty,
        second.ref_logps,
    )
    assert third.new_pairs == {"trace": 0, "empty": 0}


def test_lost_or_changed_rows_register_nothing(tmp_path: Path, tiny: Path, without_prefect: Any) -> None:
    source = _write(tmp_path / "p.jsonl", 0, 8, "w")
    config = _config(tmp_path, tiny, source)
    _refresh(config)
    before = catalog_rows(config.workspace)
    lines = source.read_text().splitlines(keepends=True)

    source.write_text("".join(lines[:5]))  # three rows lost
    with pytest.raises(PromptSourceChanged, match=r"3 prompt\(s\) are no longer in the source: p.jsonl:6"):
        _refresh(config)
    assert catalog_rows(config.workspace) == before

    edited = json.loads(lines[1]) | {"prompt": "Question 1: what is 7 times 1?"}
    source.write_text("".join([lines[0], json.dumps(edited) + "\n", *lines[2:]]))
    with pytest.raises(PromptSourceChanged, match=r"1 prompt\(s\) changed text at the same place: p.jsonl:2"):
        _refresh(config)
    assert catalog_rows(config.workspace) == before


def test_two_refreshes_at_once_generate_the_new_prompts_once(
    tmp_path: Path, tiny: Path, without_prefect: Any
) -> None:
    source = _write(tmp_path / "p.jsonl", 0, 8, "w")
    config = _config(tmp_path, tiny, source)
    _refresh(config)
    _write(source, 8, 8)
    outs: list[Any] = []
    errors: list[BaseException] = []

    def refresh() -> None:
        try:
            outs.append(_refresh(config))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=refresh) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not errors, errors
    assert len(outs) == 2 and outs[0].pairs_trace == outs[1].pairs_trace
    names = [name for name, _, _ in catalog_rows(config.workspace)]
    assert sum(n.startswith("generations__") for n in names) == 2  # the first refresh's, and one more
    assert sum(n.startswith("pairs_trace__") for n in names) == 2
    assert sorted(o.new_pairs["trace"] for o in outs)[0] == 0  # the second found the first's pairs


def test_a_round_samples_from_the_latest_checkpoint_and_trains_from_it(
    tmp_path: Path, tiny: Path, without_prefect: Any
) -> None:
    from tasks.policy import pin_policy

    source = _write(tmp_path / "p.jsonl", 0, 10, "w")
    config = _config(tmp_path, tiny, source)
    store = DatasetStore(config.workspace)
    data = _refresh(config)
    round1 = stages.train_task.fn(config, data.pairs_trace, data.pairs_empty, data.ref_logps)

    latest = config.model_copy(
        update={"generation": config.generation.model_copy(update={"policy": "latest"})}
    )
    pinned = pin_policy(latest)
    assert pinned.generation.policy == round1.checkpoint
    data2 = _refresh(pinned)  # same prompts, a new sampler: a new chain
    assert data2.prompts == data.prompts and data2.pairs_trace != data.pairs_trace
    _, settings = store.catalog.parents_of(data2.generations)
    assert settings["model"] == round1.checkpoint
    assert (
        settings["policy"]["round"] == 2 and settings["policy"]["train_metrics"] == round1.metrics.qualified
    )
    assert {g["model"] for g in store.read_rows(data2.generations)} == {round1.checkpoint}
    assert len(store.read_rows(data2.generations)) == len(_train_prompts(store, data.prompts)) * 2 * 4
    _, ref_settings = store.catalog.parents_of(data2.ref_logps)
    assert ref_settings["ref_model"] == round1.checkpoint  # train.reference: policy (the default)
    round2 = stages.train_task.fn(pinned, data2.pairs_trace, data2.pairs_empty, data2.ref_logps)
    _, train_settings = store.catalog.parents_of(round2.metrics)
    assert train_settings["model"] == round1.checkpoint and train_settings["policy"]["round"] == 2

    base_ref = pinned.model_copy(update={"train": pinned.train.model_copy(update={"reference": "base"})})
    ref = stages.reference_logps_task.fn(base_ref, data2.pairs_trace, data2.pairs_empty)
    assert store.catalog.parents_of(ref)[1]["ref_model"] == str(tiny)


def test_only_a_data_refresh_deployment_run_announces_its_new_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.context
    import prefect.events

    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **event: sent.append(event))
    monkeypatch.setattr(incremental_flow, "get_run_logger", lambda: LOG)
    config = PipelineConfig.model_validate({"refresh": {"train_min_new_pairs": 2}})

    def announce_in(run: Any, new_pairs: dict[str, int]) -> bool:
        context = None if run is None else SimpleNamespace(flow_run=run)
        monkeypatch.setattr(prefect.context.FlowRunContext, "get", classmethod(lambda cls: context))
        return incremental_flow.announce_new_pairs(config, new_pairs)

    def run(deployment_id: str | None, parent_task_run_id: str | None = None) -> Any:
        return SimpleNamespace(
            id="r1", name="calm-otter", deployment_id=deployment_id, parent_task_run_id=parent_task_run_id
        )

    enough = {"trace": 2, "empty": 3}
    assert not announce_in(None, enough)  # outside a flow run
    assert not announce_in(run(None), enough)  # a plain flow call (bvpo run)
    assert not announce_in(run("d1", parent_task_run_id="t1"), enough)  # the subflow of train_bvpo
    assert not announce_in(run("d1"), {"trace": 2, "empty": 1})  # too few in one mode
    assert not sent
    assert announce_in(run("d1"), enough)
    assert [e["event"] for e in sent] == [incremental_flow.NEW_PAIRS_EVENT]
    assert sent[0]["resource"]["prefect.resource.id"] == "prefect.flow-run.r1"
    assert sent[0]["payload"]["new_pairs"] == enough
