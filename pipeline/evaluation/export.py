"""Exporters to established harnesses, so users can run the paper's benchmarks on their own hardware.

- AlpacaEval: a JSON list of ``{"instruction", "output", "generator", "dataset"}`` records (model outputs).
- Arena-Hard: one JSON object per line, ``{"question_id", "answer_id", "model_id", "choices": [{"index",
  "turns": [{"content", "token_len"}]}], "tstamp"}``.

Both take eval generation rows (``eval_generations`` schema: prompt, answer, model) and export the final
answer only: the reasoning trace is not part of what these judges read.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _first_samples(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first sample of each prompt, in prompt-id order."""
    first: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (r["prompt_id"], r["sample_index"])):
        first.setdefault(row["prompt_id"], row)
    return list(first.values())


def alpaca_eval_records(
    rows: Sequence[dict[str, Any]], prompts: dict[str, str], generator: str, dataset: str = "bvpo"
) -> list[dict[str, str]]:
    """One record per prompt (the first sample), in prompt order."""
    records = []
    for row in _first_samples(rows):
        records.append(
            {
                "instruction": prompts[row["prompt_id"]],
                "output": row["answer"],
                "generator": generator,
                "dataset": dataset,
            }
        )
    return records


def arena_hard_records(
    rows: Sequence[dict[str, Any]], model_id: str, tstamp: float | None = None
) -> list[dict[str, Any]]:
    """One answer record per prompt (the first sample)."""
    stamp = time.time() if tstamp is None else tstamp
    records = []
    for row in _first_samples(rows):
        answer_id = hashlib.sha256(f"{model_id}:{row['prompt_id']}".encode()).hexdigest()[:22]
        records.append(
            {
                "question_id": row["prompt_id"],
                "answer_id": answer_id,
                "model_id": model_id,
                "choices": [
                    {
                        "index": 0,
                        "turns": [{"content": row["answer"], "token_len": int(row["answer_tokens"])}],
                    }
                ],
                "tstamp": stamp,
            }
        )
    return records


def write_alpaca_eval(path: Path, records: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_arena_hard(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
