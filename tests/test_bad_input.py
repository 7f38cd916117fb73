"""Bad input through the public entry points: every case fails with a message naming the offending row, file
or field, and leaves the catalog unchanged or records the bad rows in ``rejects``.

Entry points: the ``bvpo`` CLI (typer's CliRunner), the stage tasks (``task.fn``: the code a flow run
executes, without a Prefect API), the flows' target resolution, the trainer and the dataset store. Models
are a tiny random Llama saved as a real Hugging Face folder; no vLLM engine starts (the child process is
replaced by an in-process scripted engine, or asserted never to start).
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

import pipeline.evaluation.engine as eval_engine
import pipeline.generation.worker as worker
import storage.parquet_io as pio
import tasks.stages as stages
from flows.cli import app
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.model_assets import ModelAssetError
from pipeline.preflight import TraceFormatError
from pipeline.prompts.source import PromptSourceError
from pipeline.training.trainer import TrainingDataError, TrainingStateError
from storage import CatalogError, DatasetReadError, DatasetStore, SchemaError
from tests.generation_fakes import ScriptedEngine
from tests.reliability_helpers import (
    catalog_rows,
    generation_row,
    install_fake_child_process,
    lake_tree,
    pair_with_token_ids,
    pipeline_config,
    quiet_prefect,
    score_row,
    write_prompt_file,
)
from tests.tiny_checkpoint import CHAT_TEMPLATE, NATIVE_TEMPLATE, save_tiny_checkpoint

pytestmark = pytest.mark.timeout(120)


# --- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny model folder (weights, tokenizer, chat template); never modified by tests."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def _model_copy(tiny: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(tiny, dest)
    for name in drop:
        (dest / name).unlink()
    return dest


@pytest.fixture(autouse=True)
def _stages_without_prefect_api() -> Any:
    """Stage tasks without a Prefect API; one torch thread (the tiny model is 10x faster on a busy CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet_prefect() as artifacts:
            yield artifacts
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a vLLM engine (child process) would start."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a vLLM engine was started for input that should have been refused first")

    monkeypatch.setattr(worker, "run_shards_in_child", refuse)
    monkeypatch.setattr(worker, "run_generation", refuse)
    monkeypatch.setattr(eval_engine, "generate_for_models", refuse)


def _snapshot(workspace: Path) -> tuple[list[tuple[str, str, int]], list[str]]:
    return catalog_rows(workspace), lake_tree(workspace)


def _rejects(workspace: Path, stage: str | None = None) -> dict[str, str]:
    """``row_key -> reason`` over every registered rejects dataset (of one stage)."""
    store = DatasetStore(workspace)
    out: dict[str, str] = {}
    for name, _, _ in catalog_rows(workspace):
        if name.startswith("rejects__"):
            for row in store.read_rows(store.catalog.resolve(name)):
                if stage is None or row["stage"] == stage:
                    out[row["row_key"]] = row["reason"]
    return out


def _config(tmp_path: Path, model: Path, source: Path | str, **sections: dict[str, Any]) -> PipelineConfig:
    prompts = Path(source) if not str(source).startswith("hf:") else tmp_path / "unused.jsonl"
    config = pipeline_config(tmp_path / "ws", model, prompts, **sections)
    if str(source).startswith("hf:"):
        config.prompts.source = str(source)
    return config


def _jsonl(path: Path, lines: list[bytes | str | dict[str, Any]]) -> Path:
    with open(path, "wb") as handle:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            handle.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


def _prompts_fail(config: PipelineConfig, error: type[Exception]) -> str:
    before = _snapshot(config.workspace)
    with pytest.raises(error) as info:
        stages.prompts_task.fn(config)
    assert _snapshot(config.workspace) == before
    return str(info.value)


# --- prompt sources: empty, huge, non-UTF-8, duplicate, missing/mistyped columns, unknown ids -----------


def test_empty_prompt_file_names_the_source_and_registers_nothing(tmp_path: Path, tiny: Path) -> None:
    source = _jsonl(tmp_path / "empty.jsonl", [])
    message = _prompts_fail(_config(tmp_path, tiny, source), ValueError)
    assert message == f"no usable prompts in '{source}': the source is empty"


def test_only_blank_prompts_names_each_row(tmp_path: Path, tiny: Path) -> None:
    source = _jsonl(tmp_path / "blank.jsonl", [{"prompt": ""}, {"prompt": "   \n\t"}])
    message = _prompts_fail(_config(tmp_path, tiny, source), ValueError)
    assert "blank.jsonl:1: empty prompt" in message and "blank.jsonl:2: empty prompt" in message


def test_blank_huge_duplicate_and_non_utf8_rows_go_to_rejects(tmp_path: Path, tiny: Path) -> None:
    source = _jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "What is 1 + 1?", "answer": "2"},
            {"prompt": "  "},
            {"prompt": "x" * 20_000},
            {"prompt": "What is 1 + 1?"},
            b'{"prompt": "caf\xe9?"}',
            b'{"prompt": "unterminated',
            {"prompt": "What is 2 + 2?", "answer": "4"},
        ],
    )
    config = _config(tmp_path, tiny, source)
    ref = stages.prompts_task.fn(config)
    assert ref.row_count == 2
    rows = DatasetStore(config.workspace).read_rows(ref)
    assert [r["source_key"] for r in rows] == ["mixed.jsonl:1", "mixed.jsonl:7"]
    rejects = _rejects(config.workspace, "prompts")
    assert rejects["mixed.jsonl:2"] == "empty prompt"
    assert rejects["mixed.jsonl:3"] == "prompt has 20000 characters, over max_prompt_chars=8000"
    assert rejects["mixed.jsonl:4"].startswith("duplicate prompt (prompt_id ")
    assert rejects["mixed.jsonl:5"] == "line is not valid UTF-8"
    assert rejects["mixed.jsonl:6"].startswith("invalid JSON")
    assert len(rejects) == 5


def test_non_utf8_csv_file_names_the_file_and_byte(tmp_path: Path, tiny: Path) -> None:
    source = tmp_path / "latin1.csv"
    source.write_bytes("prompt\nWhat is 1 + 1?\nCombien coûte un café?\n".encode("latin-1"))
    message = _prompts_fail(_config(tmp_path, tiny, source), PromptSourceError)
    assert message.startswith(f"{source}: not valid UTF-8 text (invalid")
    assert message.endswith("at byte 32)")  # the offset of "û" in the file


def test_missing_prompt_column_names_the_field_and_the_fields_seen(tmp_path: Path, tiny: Path) -> None:
    source = _jsonl(tmp_path / "q.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}])
    message = _prompts_fail(_config(tmp_path, tiny, source), PromptSourceError)
    assert message == (
        f"prompt source '{source}' has no 'prompt' field (fields seen: answer, question); "
        "set prompts.prompt_field"
    )


def test_mistyped_columns_are_rejected_row_by_row(tmp_path: Path, tiny: Path) -> None:
    source = _jsonl(
        tmp_path / "typed.jsonl",
        [
            {"prompt": 42},
            {"prompt": ["a", "list"]},
            {"prompt": "Say hi.", "constraints": "not json"},
            {"prompt": "Say bye.", "constraints": {"a": 1}},
            {"prompt": "Say hello."},
        ],
    )
    config = _config(tmp_path, tiny, source)
    assert stages.prompts_task.fn(config).row_count == 1
    assert _rejects(config.workspace, "prompts") == {
        "typed.jsonl:1": "field 'prompt' is missing or not text",
        "typed.jsonl:2": "field 'prompt' is missing or not text",
        "typed.jsonl:3": "field 'constraints' is not a JSON list",
        "typed.jsonl:4": "field 'constraints' is not a list",
    }


def test_parquet_source_with_an_integer_prompt_column(tmp_path: Path, tiny: Path) -> None:
    source = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"prompt": [1, 2]}), source)
    message = _prompts_fail(_config(tmp_path, tiny, source), ValueError)
    assert "ints.parquet[0]: field 'prompt' is missing or not text" in message
    assert "ints.parquet[1]: field 'prompt' is missing or not text" in message


def test_corrupt_parquet_prompt_file_names_the_file(tmp_path: Path, tiny: Path) -> None:
    source = tmp_path / "broken.parquet"
    pq.write_table(pa.table({"prompt": ["What is 1 + 1?"] * 50}), source)
    source.write_bytes(source.read_bytes()[:-100])  # footer gone
    message = _prompts_fail(_config(tmp_path, tiny, source), PromptSourceError)
    assert message.startswith(f"{source}: not a readable Parquet file")


def test_hf_dataset_id_that_does_not_exist(tmp_path: Path, tiny: Path) -> None:
    config = _config(tmp_path, tiny, "hf:no-such-org/no-such-dataset:test")
    message = _prompts_fail(config, PromptSourceError)
    assert message.startswith("cannot load Hugging Face dataset 'no-such-org/no-such-dataset' (split 'test')")


def test_catalog_dataset_names_that_do_not_exist(tmp_path: Path, tiny: Path) -> None:
    from flows.pipeline import resolve_eval_target

    config = _config(tmp_path, tiny, write_prompt_file(tmp_path / "p.jsonl"))
    stages.prompts_task.fn(config)
    before = _snapshot(config.workspace)
    with pytest.raises(CatalogError, match="no registered dataset matches 'train_metrics__v7'"):
        resolve_eval_target(config, train_metrics="train_metrics__v7")
    with pytest.raises(ValueError, match="nothing to evaluate: no checkpoint was trained in"):
        resolve_eval_target(config)
    result = CliRunner().invoke(app, ["sql", "-w", str(config.workspace), "select * from pairs_trace__v3"])
    assert result.exit_code == 1 and "pairs_trace__v3" in result.stderr
    assert _snapshot(config.workspace) == before


# --- models: weights, tokenizer, chat template, trace tags ---------------------------------------------


@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        (("model.safetensors",), "holds no weights (no *.safetensors or pytorch_model*.bin file)"),
        (
            ("tokenizer.json",),
            "holds no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json, vocab.txt, "
            "spiece.model)",
        ),
        (("config.json",), "has no config.json (not a Hugging Face checkpoint)"),
    ],
)
@pytest.mark.parametrize("stage", ["generate", "train"])
def test_model_folder_without_weights_tokenizer_or_config(
    tmp_path: Path, tiny: Path, no_engine: None, drop: tuple[str, ...], expected: str, stage: str
) -> None:
    model = _model_copy(tiny, tmp_path / "broken-model", drop)
    config = _config(tmp_path, model, write_prompt_file(tmp_path / "p.jsonl"))
    prompts = stages.prompts_task.fn(config)
    pairs = [_empty(config, "pairs_trace"), _empty(config, "pairs_empty")]
    before = _snapshot(config.workspace)
    with pytest.raises(ModelAssetError) as info:
        if stage == "generate":
            stages.generate_task.fn(config, prompts)
        else:
            stages.reference_logps_task.fn(config, *pairs)
    assert str(info.value) == f"model folder {model} {expected}"
    assert _snapshot(config.workspace) == before


def _empty(config: PipelineConfig, kind: str) -> Any:
    from storage import schema_for

    return DatasetStore(config.workspace).put(kind, schema_for(kind).empty_table(), config={}, parents=[])


def test_model_path_that_does_not_exist(tmp_path: Path, tiny: Path, no_engine: None) -> None:
    config = _config(tmp_path, tmp_path / "no-such-model", write_prompt_file(tmp_path / "p.jsonl"))
    prompts = stages.prompts_task.fn(config)
    before = _snapshot(config.workspace)
    with pytest.raises(ModelAssetError, match=f"model path {tmp_path / 'no-such-model'} does not exist"):
        stages.generate_task.fn(config, prompts)
    assert _snapshot(config.workspace) == before


def test_tokenizer_without_a_chat_template(tmp_path: Path, no_engine: None) -> None:
    model = save_tiny_checkpoint(tmp_path / "base-model", chat_template=None)
    config = _config(tmp_path, model, write_prompt_file(tmp_path / "p.jsonl"))
    prompts = stages.prompts_task.fn(config)
    before = _snapshot(config.workspace)
    with pytest.raises(TraceFormatError) as info:
        stages.generate_task.fn(config, prompts)
    assert str(info.value).startswith(f"the tokenizer of {model} has no chat template")
    assert _snapshot(config.workspace) == before


@pytest.mark.parametrize(
    ("template", "reasoning", "expected"),
    [
        (CHAT_TEMPLATE, {"control": "native"}, "ignores enable_thinking"),
        (
            NATIVE_TEMPLATE,
            {"control": "native", "open_tag": "<reasoning>", "close_tag": "</reasoning>"},
            "never writes reasoning.close_tag '</reasoning>' when enable_thinking=False",
        ),
    ],
    ids=["template-ignores-enable_thinking", "tags-never-appear"],
)
def test_native_reasoning_control_whose_tags_never_appear(
    tmp_path: Path, no_engine: None, template: str, reasoning: dict[str, str], expected: str
) -> None:
    model = save_tiny_checkpoint(tmp_path / "model", chat_template=template)
    config = _config(
        tmp_path, model, write_prompt_file(tmp_path / "p.jsonl"), generation={"reasoning": reasoning}
    )
    prompts = stages.prompts_task.fn(config)
    before = _snapshot(config.workspace)
    with pytest.raises(TraceFormatError, match=r"generation\.reasoning\.control is 'native'") as info:
        stages.generate_task.fn(config, prompts)
    assert expected in str(info.value) and str(model) in str(info.value)
    assert _snapshot(config.workspace) == before


def test_native_template_with_the_right_tags_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_child_process(monkeypatch)
    model = save_tiny_checkpoint(tmp_path / "model", chat_template=NATIVE_TEMPLATE)
    config = _config(
        tmp_path,
        model,
        write_prompt_file(tmp_path / "p.jsonl"),
        generation={"reasoning": {"control": "native"}},
    )
    generations = stages.generate_task.fn(config, stages.prompts_task.fn(config))
    assert generations.row_count > 0


def test_prompt_too_long_for_the_context_window_is_rejected_by_id(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_child_process(monkeypatch)
    source = write_prompt_file(tmp_path / "p.jsonl", 4)
    with open(source, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"prompt": "Explain this. " + "word " * 80, "answer": "1"}) + "\n")
    config = _config(
        tmp_path, tiny, source, prompts={"eval_fraction": 0.0}, generation={"max_model_len": 128}
    )
    prompts = stages.prompts_task.fn(config)
    long_id = next(
        p["prompt_id"] for p in DatasetStore(config.workspace).read_rows(prompts) if "word" in p["prompt"]
    )
    generations = stages.generate_task.fn(config, prompts)
    assert generations.row_count == 4 * 2 * 4
    reason = _rejects(config.workspace, "generate")[long_id]
    assert reason.startswith("prompt too long: ") and reason.endswith("> max_model_len 128")


def test_answers_that_contain_the_trace_tags_are_flagged_and_rejected(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_child_process(monkeypatch, lambda: ScriptedEngine(answer="</think> 2"))  # type: ignore[arg-type]
    config = _config(
        tmp_path, tiny, write_prompt_file(tmp_path / "p.jsonl", 2), prompts={"eval_fraction": 0.0}
    )
    generations = stages.generate_task.fn(config, stages.prompts_task.fn(config))
    rows = DatasetStore(config.workspace).read_rows(generations)
    assert rows and not any(r["parse_ok"] for r in rows)
    rejects = _rejects(config.workspace, "generate")
    assert set(rejects) == {r["generation_id"] for r in rows}
    assert set(rejects.values()) == {"answer contains reasoning tags"}


# --- scores and pairs: NaN/inf, identical answers, unknown prompts ---------------------------------------


def _scored(tmp_path: Path, tiny: Path, answers: dict[str, list[tuple[str, float]]]) -> tuple[Any, Any, Any]:
    """Register generations and scores for prompts ``{prompt_id: [(answer, score), ...]}`` (both modes)."""
    config = _config(tmp_path, tiny, tmp_path / "unused.jsonl")
    store = DatasetStore(config.workspace)
    gens, scores = [], []
    for pid, samples in answers.items():
        for mode in ("trace", "empty"):
            for i, (answer, score) in enumerate(samples):
                gens.append(generation_row(pid, mode, i, answer))
                scores.append(score_row(gens[-1], score))
    g = store.put("generations", pa.Table.from_pylist(gens), config={"t": 1}, parents=[])
    s = store.put("scores", pa.Table.from_pylist(scores), config={"t": 1}, parents=[g])
    return config, g, s


def test_nan_and_inf_scores_are_left_out_and_named(tmp_path: Path, tiny: Path) -> None:
    nan, inf = float("nan"), float("inf")
    config, g, s = _scored(
        tmp_path, tiny, {"p1": [("1", 1.0), ("2", nan), ("3", 0.0)], "p2": [("1", inf), ("2", -inf)]}
    )
    trace, empty = stages.pair_task.fn(config, g, s)
    store = DatasetStore(config.workspace)
    pairs = store.read_rows(trace)
    assert [(p["pair_id"], p["chosen_answer"], p["rejected_answer"]) for p in pairs] == [
        ("p1-trace", "1", "3")
    ]
    assert all(math.isfinite(p["chosen_score"]) and math.isfinite(p["rejected_score"]) for p in pairs)
    rejects = _rejects(config.workspace, "pair")
    assert rejects["p1-trace-1"] == "score is nan: not usable for pairing"
    assert rejects["p2-trace-0"] == "score is inf: not usable for pairing"
    assert rejects["p2-trace-1"] == "score is -inf: not usable for pairing"
    assert rejects["p2-trace"].startswith(
        "fewer than 2 usable answers (2 generated: 0 malformed, 2 with a non"
    )
    assert empty.row_count == 1


def test_chosen_text_equal_to_rejected_text_is_dropped(tmp_path: Path, tiny: Path) -> None:
    config, g, s = _scored(
        tmp_path, tiny, {"p1": [("same", 1.0), ("same", 0.0)], "p2": [("a", 1.0), ("b", 0.0)]}
    )
    trace, empty = stages.pair_task.fn(config, g, s)
    assert (trace.row_count, empty.row_count) == (1, 1)
    rejects = _rejects(config.workspace, "pair")
    assert rejects["p1-trace"] == rejects["p1-empty"] == "chosen and rejected answers are identical"


def test_generations_of_unknown_prompts_are_rejected_by_the_scorer(tmp_path: Path, tiny: Path) -> None:
    config = _config(tmp_path, tiny, write_prompt_file(tmp_path / "p.jsonl", 2))
    store = DatasetStore(config.workspace)
    prompts = stages.prompts_task.fn(config)
    known = store.read_rows(prompts)[0]["prompt_id"]
    rows = [generation_row(known, "trace", 0, "The answer is 1."), generation_row("ghost", "trace", 0, "1")]
    g = store.put("generations", pa.Table.from_pylist(rows), config={}, parents=[prompts])
    scores = stages.score_task.fn(config, prompts, g)
    assert scores.row_count == 1
    assert _rejects(config.workspace, "score") == {
        "ghost-trace-0": "generation refers to an unknown prompt_id"
    }


# --- training: empty D_e / D_t, α and β, resuming a state of another model ---------------------------------


@pytest.mark.parametrize(
    ("alpha", "empty_kind"), [(0.5, "pairs_empty"), (0.5, "pairs_trace"), ("dpo_empty", "pairs_empty")]
)
def test_empty_d_e_or_d_t_names_the_dataset_before_loading_the_model(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch, alpha: float | str, empty_kind: str
) -> None:
    import pipeline.training.run as run

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded for data that cannot be trained on")

    monkeypatch.setattr(run, "prepare_model", no_load)
    config = _config(tmp_path, tiny, tmp_path / "unused.jsonl", train={"alpha": alpha})
    store = DatasetStore(config.workspace)
    pair = {
        "pair_id": "p-x", "prompt_id": "p", "mode": "x", "prompt_text": "q", "chosen_response": "a",
        "rejected_response": "b", "chosen_answer": "a", "rejected_answer": "b", "chosen_score": 1.0,
        "rejected_score": 0.0, "margin": 1.0, "chosen_generation_id": "c", "rejected_generation_id": "r",
        "prompt_token_ids": [4], "chosen_token_ids": [5], "rejected_token_ids": [6],
    }  # fmt: skip
    refs = {}
    for kind in ("pairs_trace", "pairs_empty"):
        rows = [] if kind == empty_kind else [pair | {"mode": kind.removeprefix("pairs_")}]
        table = pa.Table.from_pylist(rows, schema=store_schema(kind))
        refs[kind] = store.put(kind, table, config={}, parents=[])
    ref_logps = _empty(config, "ref_logps")
    before = _snapshot(config.workspace)
    with pytest.raises(TrainingDataError) as info:
        stages.train_task.fn(config, refs["pairs_trace"], refs["pairs_empty"], ref_logps)
    mode = "empty-trace pairs (D_e)" if empty_kind == "pairs_empty" else "trace pairs (D_t)"
    assert str(info.value).startswith(
        f"train.alpha={alpha} needs {mode}, but {refs[empty_kind].name} has no rows"
    )
    assert _snapshot(config.workspace) == before
    assert not (config.workspace / "checkpoints").exists()


def store_schema(kind: str) -> pa.Schema:
    from storage import schema_for

    return schema_for(kind)


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ("train.alpha=1.5", "train.alpha", "alpha must be in [0, 1]"),
        ("train.alpha=-0.1", "train.alpha", "alpha must be in [0, 1]"),
        ("train.alpha=nan", "train.alpha", "alpha must be in [0, 1]"),
        ("train.beta=0", "train.beta", "Input should be greater than 0"),
        ("train.beta=-0.5", "train.beta", "Input should be greater than 0"),
    ],
)
def test_alpha_outside_0_1_and_beta_not_positive_are_refused_by_the_cli(
    tmp_path: Path, override: str, field: str, expected: str
) -> None:
    workspace = tmp_path / "ws"
    result = CliRunner().invoke(app, ["run", "--set", f"workspace={workspace}", "--set", override])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: invalid config: {field}: ")
    assert expected in result.stderr and len(result.stderr.splitlines()) == 1
    assert not workspace.exists()


def test_alpha_and_beta_are_checked_in_code_too() -> None:
    for bad in ({"alpha": 1.01}, {"alpha": -1}, {"beta": 0.0}, {"alpha": "dpo"}):
        with pytest.raises(ValidationError) as info:
            TrainConfig.model_validate(bad)
        assert {error["loc"][0] for error in info.value.errors()} == set(bad)  # the field is named


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  alpah: 0.3\n", "train.alpah: unknown key"),
        ("trian:\n  alpha: 0.3\n", "trian: unknown key"),
        (
            "scoring:\n  scorers:\n    - {name: verifiable, options: {timeout: 3}}\n",
            "scoring.scorers.0.verifiable.options.timeout: unknown key",
        ),
        ("train:\n  alpha: 2\n", "train.alpha: Value error, alpha must be in [0, 1]"),
    ],
    ids=["unknown-key", "unknown-section", "unknown-option", "alpha-in-file"],
)
def test_config_file_with_unknown_keys_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    result = CliRunner().invoke(app, ["run", "--config", "bad.yaml"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: invalid config: {expected}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no workspace was created


def test_config_file_that_is_not_yaml_names_the_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.yaml").write_text("train:\n  alpha: [0.3\n")
    (tmp_path / "latin1.yaml").write_bytes("train:\n  alpha: 0.3 # café\n".encode("latin-1"))
    result = CliRunner().invoke(app, ["run", "--config", "broken.yaml"])
    assert (result.exit_code, result.stderr) == (
        1,
        "error: broken.yaml: not valid YAML (line 3, column 1): "
        "expected ',' or ']', but got '<stream end>'\n",
    )
    result = CliRunner().invoke(app, ["run", "--config", "latin1.yaml"])
    assert result.exit_code == 1 and result.stderr.startswith("error: latin1.yaml: not UTF-8 text (invalid")
    result = CliRunner().invoke(app, ["run", "--set", "train.alpha=[0.3"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: override 'train.alpha=[0.3': the value is not valid YAML (line 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml", "latin1.yaml"]


def _train_rows(n: int = 4) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    def pair(mode: str, i: int) -> dict[str, Any]:
        block = "<think>\nok\n</think>\n\n" if mode == "trace" else "<think>\n\n</think>\n\n"
        return pair_with_token_ids(
            {
                "pair_id": f"q{i}-{mode}",
                "prompt_text": f"<|user|>What is {i} + {i}?\n<|assistant|>",
                "chosen_response": f"{block}It is {2 * i}.",
                "rejected_response": f"{block}It is {2 * i + 1}, I think.",
            }
        )

    trace = [pair("trace", i) for i in range(n)]
    empty = [pair("empty", i) for i in range(n)]
    refs = [
        {"pair_id": p["pair_id"], "mode": mode, "ref_chosen_logp": -20.0 - i, "ref_rejected_logp": -25.0 - i}
        for mode, pairs in (("trace", trace), ("empty", empty))
        for i, p in enumerate(pairs)
    ]
    return trace, empty, refs


def test_resuming_a_training_state_of_a_different_model_is_refused(tmp_path: Path, tiny: Path) -> None:
    from pipeline.training.run import state_dir_for, train_bvpo

    config = TrainConfig(
        max_steps=2, batch_size=2, bf16=False, checkpoint_every=1, max_length=96, keep_state=True
    )  # keep_state: a successful run removes its states otherwise
    output = tmp_path / "checkpoints" / "run"
    first = train_bvpo(str(tiny), *_train_rows(), config, output)
    assert len(first.metrics) == 2
    state = state_dir_for(output)
    saved = {p.name: p.read_bytes() for p in state.iterdir()}
    weights = (output / "model.safetensors").read_bytes()

    other = save_tiny_checkpoint(tmp_path / "other-model", hidden=32)
    with pytest.raises(TrainingStateError) as info:
        train_bvpo(str(other), *_train_rows(), TrainConfig(**{**config.model_dump(), "max_steps": 3}), output)
    assert str(info.value) == (
        f"training state {state / 'step-000002.pt'} was saved by a run with another model (other "
        f"parameters); it cannot be resumed here (delete {state} to start over)"
    )
    trace, empty, refs = _train_rows()
    with pytest.raises(TrainingStateError, match="was saved by a run with other D_t pairs"):
        train_bvpo(str(tiny), trace[:3], empty, refs, config, output)
    # Nothing of the first run was lost or overwritten.
    assert {p.name: p.read_bytes() for p in state.iterdir()} == saved
    assert (output / "model.safetensors").read_bytes() == weights


def test_a_corrupt_training_state_is_named(tmp_path: Path, tiny: Path) -> None:
    from pipeline.training.run import state_dir_for, train_bvpo

    config = TrainConfig(
        max_steps=1, batch_size=2, bf16=False, checkpoint_every=1, max_length=96, keep_state=True
    )
    output = tmp_path / "run"
    train_bvpo(str(tiny), *_train_rows(), config, output)
    (state,) = state_dir_for(output).iterdir()
    state.write_bytes(state.read_bytes()[:100])
    weights = (output / "model.safetensors").read_bytes()
    with pytest.raises(TrainingStateError, match=f"training state {state} cannot be read .*delete it"):
        train_bvpo(str(tiny), *_train_rows(), TrainConfig(**{**config.model_dump(), "max_steps": 2}), output)
    assert len(state.read_bytes()) == 100 and (output / "model.safetensors").read_bytes() == weights


# --- storage: corrupt Parquet, a full disk, schema violations ----------------------------------------------


def test_a_corrupt_registered_parquet_file_fails_the_reading_stage_by_name(
    tmp_path: Path, tiny: Path
) -> None:
    config = _config(tmp_path, tiny, write_prompt_file(tmp_path / "p.jsonl", 2))
    store = DatasetStore(config.workspace)
    prompts = stages.prompts_task.fn(config)
    rows = [generation_row(p["prompt_id"], "trace", 0, "1") for p in store.read_rows(prompts)]
    g = store.put("generations", pa.Table.from_pylist(rows), config={}, parents=[prompts])
    part = Path(g.path) / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-64])
    before = _snapshot(config.workspace)
    with pytest.raises(DatasetReadError) as info:
        stages.score_task.fn(config, prompts, g)
    assert str(info.value).startswith(
        f"dataset generations__v1 (version {g.version}, path {g.path}) cannot be read: "
        "part-00000.parquet is not a readable Parquet file (truncated or corrupted?)"
    )
    assert _snapshot(config.workspace) == before


def _disk_full_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> list[int]:
    """Make the lake's Parquet writer raise ENOSPC from its ``calls``-th part on (after writing half)."""
    original = pio.pq.write_table
    count = [0]

    def write_table(table: pa.Table, where: Any, **kwargs: Any) -> None:
        count[0] += 1
        if count[0] >= calls:
            where.write(b"PAR1" + b"\0" * 64)  # a partial part, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        original(table, where, **kwargs)

    monkeypatch.setattr(pio.pq, "write_table", write_table)
    return count


def test_a_full_disk_registers_nothing_partial_and_the_rerun_is_complete(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"Question {i}?"} for i in range(25)] + [{"prompt": ""}]
    )
    config = _config(tmp_path, tiny, source)
    monkeypatch.setattr(pio, "ROWS_PER_PART", 10)
    _disk_full_after(monkeypatch, calls=3)  # rejects: part 1 ok; prompts: part 1 ok, part 2 fails
    with pytest.raises(OSError) as info:
        stages.prompts_task.fn(config)
    assert info.value.errno == errno.ENOSPC
    assert str(info.value).startswith("[Errno 28] cannot write dataset prompts (version ")
    assert "No space left on device" in str(info.value)
    assert [r[0] for r in catalog_rows(config.workspace)] == ["rejects__v1"]  # complete, on its own
    assert [p for p in lake_tree(config.workspace) if "prompts" in p] == ["lake/prompts"]  # no staging left

    monkeypatch.undo()
    monkeypatch.setattr(pio, "ROWS_PER_PART", 10)
    ref = stages.prompts_task.fn(config)
    clean = pipeline_config(tmp_path / "clean", tiny, source)
    stages.prompts_task.fn(clean)
    assert catalog_rows(config.workspace) == catalog_rows(clean.workspace)
    assert (
        DatasetStore(config.workspace)
        .read(ref)
        .equals(DatasetStore(clean.workspace).read(DatasetStore(clean.workspace).catalog.resolve("prompts")))
    )


def test_a_full_disk_while_writing_a_generation_shard_keeps_the_finished_shards(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.generation.shards as shards

    install_fake_child_process(monkeypatch)
    config = _config(
        tmp_path, tiny, write_prompt_file(tmp_path / "p.jsonl", 7), prompts={"eval_fraction": 0.0}
    )
    prompts = stages.prompts_task.fn(config)
    original, count = shards.pq.write_table, [0]

    def write_table(table: pa.Table, where: Any, **kwargs: Any) -> None:
        count[0] += 1
        if count[0] == 3:
            Path(where).write_bytes(b"PAR1 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        original(table, where, **kwargs)

    monkeypatch.setattr(shards.pq, "write_table", write_table)
    before = catalog_rows(config.workspace)
    with pytest.raises(OSError, match="No space left on device"):
        stages.generate_task.fn(config, prompts)
    assert catalog_rows(config.workspace) == before
    (staging,) = (config.workspace / "staging" / "generations").iterdir()
    assert sorted(p.name for p in staging.iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]

    monkeypatch.setattr(shards.pq, "write_table", original)
    generations = stages.generate_task.fn(config, prompts)
    assert generations.row_count == 7 * 2 * 4
    ids = [r["generation_id"] for r in DatasetStore(config.workspace).read_rows(generations)]
    assert len(set(ids)) == len(ids)
    assert not staging.exists()


def test_a_full_disk_while_saving_a_training_state_leaves_no_partial_state(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import pipeline.training.trainer as trainer
    from pipeline.training.run import state_dir_for, train_bvpo

    config = TrainConfig(max_steps=3, batch_size=2, bf16=False, checkpoint_every=1, max_length=96)
    clean = train_bvpo(str(tiny), *_train_rows(), config, tmp_path / "clean")
    original = torch.save

    def save(obj: Any, path: Any, **kwargs: Any) -> None:
        if str(path).endswith("step-000002.tmp"):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        original(obj, path, **kwargs)

    monkeypatch.setattr(trainer.torch, "save", save)
    output = tmp_path / "run"
    with pytest.raises(OSError, match="No space left on device"):
        train_bvpo(str(tiny), *_train_rows(), config, output)
    assert [p.name for p in state_dir_for(output).iterdir()] == ["step-000001.pt"]
    assert not output.exists()
    monkeypatch.setattr(trainer.torch, "save", original)
    resumed = train_bvpo(str(tiny), *_train_rows(), config, output)
    assert resumed.resumed_from_step == 1
    assert [m["loss"] for m in resumed.metrics] == pytest.approx([m["loss"] for m in clean.metrics], abs=1e-6)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t.drop(["score"]), "scores: missing column(s) score"),
        (
            lambda t: t.set_column(4, "score", pa.array(["high"] * t.num_rows)),
            "scores: column 'score' cannot be read as double",
        ),
        (
            lambda t: t.set_column(0, "generation_id", pa.array([None] * t.num_rows, pa.string())),
            "scores: column 'generation_id' has 2 null value(s)",
        ),
    ],
    ids=["missing", "mistyped", "null"],
)
def test_missing_or_mistyped_columns_are_refused_by_the_store(
    tmp_path: Path, change: Any, expected: str
) -> None:
    store = DatasetStore(tmp_path / "ws")
    gens = [generation_row("p", "trace", i, "a") for i in range(2)]
    table = change(pa.Table.from_pylist([score_row(g, 1.0) for g in gens]))
    with pytest.raises(SchemaError) as info:
        store.put("scores", table, config={}, parents=[])
    assert str(info.value).startswith(expected)
    assert catalog_rows(tmp_path / "ws") == [] and lake_tree(tmp_path / "ws") == []
