"""External prompt sources (JSONL, Parquet, CSV, Hugging Face ``datasets`` from local folders) and rejects.

Hugging Face sources are tested offline: a ``Dataset.save_to_disk`` folder and a folder of JSON files that
``datasets.load_dataset`` reads with its packaged builder. No hub is contacted.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import PromptsConfig
from pipeline.prompts.builtin import prompt_id_for
from pipeline.prompts.source import PromptSourceError, load_prompts
from storage.schemas import conform


def cfg(source: Path | str, **kwargs: Any) -> PromptsConfig:
    return PromptsConfig(source=str(source), eval_fraction=0.0, **kwargs)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def reasons(result: Any) -> list[str]:
    return [r["reason"] for r in result.rejects]


def test_jsonl_rows_have_ids_splits_and_source_keys(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": " What is 2+2? ", "answer": 4},
            {"prompt": "Write a haiku.", "constraints": [{"type": "lowercase"}], "task_type": "instruction"},
        ],
    )
    result = load_prompts(cfg(path))
    first, second = result.rows
    assert first["prompt"] == "What is 2+2?" and first["prompt_id"] == prompt_id_for("What is 2+2?")
    assert (first["task_type"], first["reference_answer"], first["split"]) == ("math", "4", "train")
    assert json.loads(second["constraints"]) == [{"type": "lowercase"}]
    assert [r["source_key"] for r in result.rows] == ["p.jsonl:1", "p.jsonl:2"]
    assert conform("prompts", pa.Table.from_pylist(result.rows)).num_rows == 2
    assert result.rejects == []


def test_every_reject_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"prompt": "A fine prompt."}),
        json.dumps({"prompt": ""}),  # empty
        json.dumps({"prompt": " \n\t "}),  # whitespace only
        json.dumps({"prompt": 42}),  # not text
        json.dumps({"question": "no prompt field"}),  # missing
        json.dumps({"prompt": "x" * 101}),  # too many characters
        json.dumps({"prompt": "  A fine prompt."}),  # duplicate content
        json.dumps({"prompt": "Bad constraints.", "constraints": "{not json"}),
        "{not json",
        json.dumps(["a", "list"]),
    ]
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe not utf-8\n")
    result = load_prompts(cfg(path, max_prompt_chars=100))
    assert [r["prompt"] for r in result.rows] == ["A fine prompt."]
    assert reasons(result) == [
        "empty prompt",
        "empty prompt",
        "field 'prompt' is missing or not text",
        "field 'prompt' is missing or not text",
        "prompt has 101 characters, over max_prompt_chars=100",
        f"duplicate prompt (prompt_id {prompt_id_for('A fine prompt.')})",
        "field 'constraints' is not a JSON list",
        "invalid JSON: Expecting property name enclosed in double quotes",
        "line is not a JSON object",
        "line is not valid UTF-8",
    ]
    assert [r["row_key"] for r in result.rejects][:2] == ["bad.jsonl:2", "bad.jsonl:3"]
    assert all(r["stage"] == "prompts" for r in result.rejects)
    assert json.loads(result.rejects[2]["payload"]) == {"prompt": 42}


def test_reading_stops_at_num_prompts(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"prompt {i}"} for i in range(10)] + [{"prompt": ""}]
    )
    result = load_prompts(cfg(path, num_prompts=3))
    assert [r["prompt"] for r in result.rows] == ["prompt 0", "prompt 1", "prompt 2"]
    assert result.rejects == []  # the empty prompt at the end was never read


def test_a_source_without_the_prompt_field_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q1"}, {"question": "q2"}])
    with pytest.raises(PromptSourceError, match=r"no 'prompt' field .*question"):
        load_prompts(cfg(path))
    assert [r["prompt"] for r in load_prompts(cfg(path, prompt_field="question")).rows] == ["q1", "q2"]


def test_parquet_source(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["one", "two", None, "one"], "answer": ["1", "2", None, "1"]}), path)
    result = load_prompts(cfg(path))
    assert [(r["prompt"], r["reference_answer"]) for r in result.rows] == [("one", "1"), ("two", "2")]
    assert [r["source_key"] for r in result.rows] == ["p.parquet[0]", "p.parquet[1]"]
    assert reasons(result)[0] == "field 'prompt' is missing or not text"
    assert reasons(result)[1].startswith("duplicate prompt")


def test_csv_source(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "answer", "constraints"])
        writer.writerow(["What is 3, times 3?", "9", ""])
        writer.writerow(['Say "hi"\nin two lines.', "", '[{"type": "lines", "n": 2}]'])
        writer.writerow(["   ", "", ""])
        writer.writerow(["extra", "", "", "field"])
    result = load_prompts(cfg(path))
    first, second = result.rows
    assert (first["prompt"], first["reference_answer"], first["constraints"]) == (
        "What is 3, times 3?",
        "9",
        "[]",
    )
    assert second["prompt"] == 'Say "hi"\nin two lines.' and second["reference_answer"] is None
    assert json.loads(second["constraints"]) == [{"type": "lines", "n": 2}]
    assert second["task_type"] == "instruction" and first["task_type"] == "math"
    assert [r["row_key"] for r in result.rejects] == ["p.csv:5", "p.csv:6"]  # line 4 holds a newline
    assert reasons(result) == ["empty prompt", "row has more fields than the header"]


def test_csv_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(b"prompt\n\xff\xfe\n")
    with pytest.raises(PromptSourceError, match="not valid UTF-8"):
        load_prompts(cfg(path))


def test_hf_dataset_saved_to_disk_with_splits_and_a_column(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "hf_saved"
    DatasetDict(
        {
            "train": Dataset.from_dict(
                {"question": ["q1", "q2", "q1", ""], "answer": ["a1", "a2", "a1", "x"]}
            ),
            "test": Dataset.from_dict({"question": ["t1"], "answer": ["b1"]}),
        }
    ).save_to_disk(str(folder))
    result = load_prompts(cfg(f"hf:{folder}", prompt_field="question"))
    assert [(r["prompt"], r["reference_answer"]) for r in result.rows] == [("q1", "a1"), ("q2", "a2")]
    assert result.rows[0]["source_key"] == f"{folder}[0]"
    assert [r["reason"].split(" (")[0] for r in result.rejects] == ["duplicate prompt", "empty prompt"]
    test = load_prompts(cfg(f"hf:{folder}:test", prompt_field="question"))
    assert [r["prompt"] for r in test.rows] == ["t1"]


def test_hf_single_dataset_saved_to_disk(tmp_path: Path) -> None:
    from datasets import Dataset

    folder = tmp_path / "single"
    Dataset.from_dict({"prompt": ["only"]}).save_to_disk(str(folder))
    assert [r["prompt"] for r in load_prompts(cfg(f"hf:{folder}")).rows] == ["only"]


def test_hf_local_json_folder_through_load_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "json_ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "from json 1"}, {"text": "from json 2"}, {"text": 7}])
    result = load_prompts(cfg(f"hf:{folder}:train", prompt_field="text"))
    assert [r["prompt"] for r in result.rows] == ["from json 1", "from json 2"]
    assert reasons(result) == ["field 'text' is missing or not text"]


def test_unknown_sources_are_errors(tmp_path: Path) -> None:
    with pytest.raises(PromptSourceError, match="existing file"):
        load_prompts(cfg(tmp_path / "missing.jsonl"))
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(PromptSourceError, match="unsupported prompt file type"):
        load_prompts(cfg(tmp_path / "p.txt"))
    with pytest.raises(PromptSourceError, match="cannot load Hugging Face dataset"):
        load_prompts(cfg(f"hf:{tmp_path / 'no_such_folder'}"))
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    with pytest.raises(PromptSourceError, match="not a readable Parquet"):
        load_prompts(cfg(tmp_path / "bad.parquet"))
