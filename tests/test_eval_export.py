from __future__ import annotations

import json
from pathlib import Path

from pipeline.evaluation.export import (
    alpaca_eval_records,
    arena_hard_records,
    write_alpaca_eval,
    write_arena_hard,
)

ROWS = [
    {"prompt_id": "p2", "sample_index": 0, "answer": "Paris.", "answer_tokens": 3, "trace": "hmm"},
    {"prompt_id": "p1", "sample_index": 1, "answer": "second", "answer_tokens": 1, "trace": None},
    {"prompt_id": "p1", "sample_index": 0, "answer": "4", "answer_tokens": 1, "trace": "2+2"},
]
PROMPTS = {"p1": "What is 2+2?", "p2": "Capital of France?"}


def test_alpaca_eval_file_has_the_fields_and_types_alpaca_eval_reads(tmp_path: Path) -> None:
    path = write_alpaca_eval(tmp_path / "out.json", alpaca_eval_records(ROWS, PROMPTS, generator="bvpo-a0.5"))
    data = json.loads(path.read_text())
    assert isinstance(data, list) and len(data) == 2
    for record in data:
        assert set(record) == {"instruction", "output", "generator", "dataset"}
        assert all(isinstance(v, str) for v in record.values())
    assert data[0] == {
        "instruction": "What is 2+2?",
        "output": "4",
        "generator": "bvpo-a0.5",
        "dataset": "bvpo",
    }


def test_arena_hard_answer_file_has_one_record_per_question(tmp_path: Path) -> None:
    path = write_arena_hard(tmp_path / "m.jsonl", arena_hard_records(ROWS, model_id="bvpo", tstamp=1.0))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in lines] == ["p1", "p2"]
    for record in lines:
        assert set(record) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert isinstance(record["answer_id"], str) and record["model_id"] == "bvpo"
        assert isinstance(record["tstamp"], float)
        (choice,) = record["choices"]
        assert choice["index"] == 0
        (turn,) = choice["turns"]
        assert isinstance(turn["content"], str) and isinstance(turn["token_len"], int)
    # Only the final answer is exported, never the trace.
    assert lines[0]["choices"][0]["turns"][0]["content"] == "4"
    assert len({r["answer_id"] for r in lines}) == 2


def test_export_command_writes_both_formats_from_a_workspace(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from storage import DatasetStore
    from tests.synthetic_workspace import build_workspace

    run = build_workspace(tmp_path / "ws")
    runner = CliRunner()
    alpaca = tmp_path / "out" / "trained.json"
    result = runner.invoke(app, ["export", "alpaca-eval", "-o", str(alpaca), "-w", str(run.workspace)])
    assert result.exit_code == 0, result.output
    records = json.loads(alpaca.read_text())
    store = DatasetStore(run.workspace)
    trained = store.read_rows(run.datasets["eval_generations_trained"])
    eval_prompts = {r["prompt_id"] for r in trained if r["mode"] == "trace"}
    assert len(records) == len(eval_prompts) and all(r["generator"].startswith("trained:") for r in records)
    arena = tmp_path / "out" / "ref.jsonl"
    result = runner.invoke(
        app,
        [
            "export",
            "arena-hard",
            "--label",
            "reference",
            "--mode",
            "empty",
            "-o",
            str(arena),
            "-w",
            str(run.workspace),
        ],
    )
    assert result.exit_code == 0, result.output
    assert all(json.loads(line)["model_id"] == "reference-empty" for line in arena.read_text().splitlines())
    missing = runner.invoke(
        app, ["export", "arena-hard", "--label", "nobody", "-o", str(arena), "-w", str(run.workspace)]
    )
    assert (
        missing.exit_code == 1 and "no eval_generations dataset holds answers of 'nobody'" in missing.output
    )
