"""D_t and D_e in TRL's preference format: Parquet, JSONL or a ``datasets`` folder.

See docs/method.md §Pipeline stages.

Each pair becomes ``{prompt, chosen, rejected}``. The conversational layout (the default) writes the prompt
as one user message and each response as one assistant message whose content keeps the reasoning inline in
think tags (D_t) or an empty think block (D_e); TRL applies the model's chat template itself. The standard
layout writes the strings this pipeline trains on: the chat-rendered prompt and the responses. Extra
columns (``pair_id``, ``prompt_id``, ``mode``, ``chosen_score``, ``rejected_score``, and the exact token ids
``prompt_token_ids`` / ``chosen_token_ids`` / ``rejected_token_ids``) ride along; TRL ignores them and
``bvpo import pairs`` reads them back, so a round trip scores the very tokens that were sampled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.generation.reasoning import TraceFormat
from pipeline.interop.formats import MODES, Mode, inline_content

Layout = Literal["conversational", "standard"]
FileFormat = Literal["parquet", "jsonl", "hf"]
PAIR_KINDS: dict[Mode, str] = {"trace": "pairs_trace", "empty": "pairs_empty"}
EXTRA_COLUMNS = ("pair_id", "prompt_id", "mode", "chosen_score", "rejected_score")
TOKEN_COLUMNS = ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids")


@dataclass(frozen=True)
class ExportedFile:
    mode: Mode
    dataset: str  # the pairs dataset it came from, e.g. pairs_trace__v2
    path: Path
    rows: int


def trl_records(
    pairs: list[dict[str, Any]],
    mode: Mode,
    fmt: TraceFormat,
    layout: Layout,
    user_message: Callable[[dict[str, Any]], str] | None = None,
    token_ids: bool = True,
) -> list[dict[str, Any]]:
    """Preference records of one mode; ``user_message(pair)`` gives the prompt (conversational layout)."""
    out = []
    for pair in pairs:
        if layout == "conversational":
            if user_message is None:
                raise ValueError("the conversational layout needs the user message of each pair")
            record: dict[str, Any] = {
                "prompt": [{"role": "user", "content": user_message(pair)}],
                "chosen": [
                    {"role": "assistant", "content": inline_content(fmt, mode, pair["chosen_response"])}
                ],
                "rejected": [
                    {"role": "assistant", "content": inline_content(fmt, mode, pair["rejected_response"])}
                ],
            }
        else:
            record = {
                "prompt": pair["prompt_text"],
                "chosen": pair["chosen_response"],
                "rejected": pair["rejected_response"],
            }
        record.update({column: pair.get(column) for column in EXTRA_COLUMNS})
        if token_ids and all(pair.get(column) is not None for column in TOKEN_COLUMNS):
            record.update({column: list(pair[column]) for column in TOKEN_COLUMNS})
        record["mode"] = mode
        out.append(record)
    return out


def write_records(records: list[dict[str, Any]], path: Path, file_format: FileFormat) -> Path:
    """Write records as ``path``.parquet / ``path``.jsonl, or as a ``save_to_disk`` folder at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "parquet":
        target = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(records), target)
    elif file_format == "jsonl":
        target = path.with_suffix(".jsonl")
        with open(target, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        from datasets import Dataset

        target = path
        Dataset.from_list(records).save_to_disk(str(target))
    return target


def export_pairs(
    pairs: dict[Mode, tuple[str, list[dict[str, Any]]]],
    output_dir: Path,
    fmt: TraceFormat,
    *,
    layout: Layout = "conversational",
    file_format: FileFormat = "parquet",
    user_message: Callable[[dict[str, Any]], str] | None = None,
    token_ids: bool = True,
) -> list[ExportedFile]:
    """Write each mode's pairs (``mode -> (dataset name, rows)``) to ``output_dir/pairs_<mode>*``."""
    written = []
    for mode in MODES:
        if mode not in pairs:
            continue
        name, rows = pairs[mode]
        records = trl_records(rows, mode, fmt, layout, user_message, token_ids)
        path = write_records(records, output_dir / PAIR_KINDS[mode], file_format)
        written.append(ExportedFile(mode=mode, dataset=name, path=path, rows=len(records)))
    return written
