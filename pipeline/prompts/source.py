"""Prompt sources: the built-in set, JSONL / Parquet / CSV files, or a Hugging Face dataset.

Every source ends in the same rows (``prompts`` schema) with a stable content-hash ``prompt_id`` and a
hash-based train/eval split. Bad rows are not dropped silently: they come back as rejects with a reason
(unreadable line, missing or non-text prompt, empty or whitespace-only prompt, too many characters,
duplicate content). Sources are read lazily and reading stops once ``num_prompts`` prompts are kept.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import PromptsConfig
from pipeline.prompts.builtin import build_builtin_prompts, prompt_id_for, split_for

Record = tuple[str, dict[str, Any]]  # (where in the source, the record)
ERROR_KEY = "__error__"


class PromptSourceError(ValueError):
    """The prompt source cannot be read at all."""


@dataclass(frozen=True)
class PromptLoadResult:
    rows: list[dict[str, Any]]
    rejects: list[dict[str, Any]]


def load_prompts(config: PromptsConfig) -> PromptLoadResult:
    """Read, validate, deduplicate and split prompts according to ``config``."""
    if config.source == "builtin":
        records = build_builtin_prompts(
            config.num_prompts, seed=config.seed, eval_fraction=config.eval_fraction
        )
        rows = []
        for record in records:
            row = asdict(record)
            row["constraints"] = json.dumps(row["constraints"])
            rows.append(row)
        return PromptLoadResult(rows=rows, rejects=[])
    return _validate(_read_external(config), config)


def _read_external(config: PromptsConfig) -> Iterator[Record]:
    """``(row_key, record)`` pairs from a file or a Hugging Face dataset."""
    source = config.source
    if source.startswith("hf:"):
        return _read_hf(source[3:], config.hf_config)
    path = Path(source).expanduser()
    if not path.is_file():
        raise PromptSourceError(f"prompt source '{source}' is not 'builtin', 'hf:<id>' or an existing file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise PromptSourceError(
        f"{path}: unsupported prompt file type '{path.suffix}' (use .jsonl, .parquet or .csv)"
    )


def _read_hf(spec: str, subset: str | None) -> Iterator[Record]:
    """A hub dataset id, a local dataset folder (parquet/json/csv files), or a ``save_to_disk`` folder."""
    name, _, split = spec.rpartition(":") if _has_split(spec) else (spec, "", "")
    split = split or "train"
    try:
        folder = Path(name).expanduser()
        if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
            from datasets import DatasetDict, load_from_disk

            loaded = load_from_disk(str(folder))
            dataset = loaded[split] if isinstance(loaded, DatasetDict) else loaded
        else:
            from datasets import load_dataset

            dataset = load_dataset(name, subset, split=split)
    except Exception as exc:  # datasets raises many types; the message is what the user needs
        message = f"cannot load Hugging Face dataset '{name}' (split '{split}'): {exc}"
        raise PromptSourceError(message) from exc
    return ((f"{name}[{i}]", dict(r)) for i, r in enumerate(dataset))


def _has_split(spec: str) -> bool:
    """Whether ``<id>:<split>`` names a split (a Windows drive letter or a bare id does not)."""
    head, sep, tail = spec.rpartition(":")
    return bool(sep and head and tail and "/" not in tail and "\\" not in tail)


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise PromptSourceError(f"{path}: not a readable Parquet file: {exc}") from exc
    index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield f"{path.name}[{index}]", record
            index += 1


def _read_csv(path: Path) -> Iterator[Record]:
    """Rows of a CSV file with a header line (UTF-8; a byte-order mark is accepted)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                return
            for record in reader:
                key = f"{path.name}:{reader.line_num}"  # the line the record ends on
                if None in record:
                    yield key, {ERROR_KEY: "row has more fields than the header"}
                    continue
                yield key, {k: (None if v is None or v == "" else v) for k, v in record.items()}
    except UnicodeDecodeError as exc:
        raise PromptSourceError(f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise PromptSourceError(f"{path}: not a readable CSV file: {exc}") from exc


def _read_jsonl(path: Path) -> Iterator[Record]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            key = f"{path.name}:{number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield key, {ERROR_KEY: "line is not valid UTF-8"}
                continue
            except json.JSONDecodeError as exc:
                yield key, {ERROR_KEY: f"invalid JSON: {exc.msg}"}
                continue
            if not isinstance(record, dict):
                yield key, {ERROR_KEY: "line is not a JSON object"}
                continue
            yield key, record


def _constraints(value: Any) -> list[Any]:
    """Constraints as a list; a JSON string (CSV cells, string columns) is decoded."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("field 'constraints' is not a JSON list") from None
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError("field 'constraints' is not a list")
    return value


def _validate(raw: Iterator[Record], config: PromptsConfig) -> PromptLoadResult:
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    seen: set[str] = set()
    field_seen = False
    first_fields: list[str] | None = None

    def reject(key: str, reason: str, record: dict[str, Any]) -> None:
        payload = json.dumps(record, default=str, ensure_ascii=False)[:2000]
        rejects.append({"stage": "prompts", "row_key": key, "reason": reason, "payload": payload})

    for key, record in raw:
        if ERROR_KEY in record:
            reject(key, record[ERROR_KEY], {})
            continue
        if first_fields is None:
            first_fields = sorted(record)
        field_seen = field_seen or config.prompt_field in record
        text = record.get(config.prompt_field)
        if not isinstance(text, str):
            reject(key, f"field '{config.prompt_field}' is missing or not text", record)
            continue
        text = text.strip()
        if not text:
            reject(key, "empty prompt", record)
            continue
        if len(text) > config.max_prompt_chars:
            reject(
                key,
                f"prompt has {len(text)} characters, over max_prompt_chars={config.max_prompt_chars}",
                record,
            )
            continue
        prompt_id = prompt_id_for(text)
        if prompt_id in seen:
            reject(key, f"duplicate prompt (prompt_id {prompt_id})", record)
            continue
        try:
            constraints = _constraints(record.get("constraints"))
        except ValueError as exc:
            reject(key, str(exc), record)
            continue
        seen.add(prompt_id)
        answer = record.get("reference_answer", record.get("answer"))
        rows.append(
            {
                "prompt_id": prompt_id,
                "prompt": text,
                "split": split_for(prompt_id, config.eval_fraction),
                "task_type": str(
                    record.get("task_type") or ("math" if answer is not None else "instruction")
                ),
                "reference_answer": None if answer is None else str(answer),
                "constraints": json.dumps(constraints),
                "source": config.source,
                "source_key": key,
            }
        )
        if len(rows) >= config.num_prompts:
            break
    if first_fields is not None and not field_seen:
        raise PromptSourceError(
            f"prompt source '{config.source}' has no '{config.prompt_field}' field "
            f"(fields seen: {', '.join(first_fields)}); set prompts.prompt_field"
        )
    return PromptLoadResult(rows=rows, rejects=rejects)
