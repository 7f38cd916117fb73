"""Prompt sources: the built-in set, JSONL / Parquet files, or a Hugging Face dataset.

Every source ends in the same rows (``prompts`` schema) with a stable content-hash ``prompt_id`` and a
hash-based train/eval split. Bad rows are not dropped silently: they come back as rejects with a reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import PromptsConfig
from pipeline.prompts.builtin import build_builtin_prompts, prompt_id_for, split_for


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
    raw = _read_external(config)
    return _validate(raw, config)


def _read_external(config: PromptsConfig) -> list[tuple[str, dict[str, Any]]]:
    """``(row_key, record)`` pairs from a file or a Hugging Face dataset."""
    source = config.source
    if source.startswith("hf:"):
        from datasets import load_dataset

        name, _, split = source[3:].partition(":")
        try:
            dataset = load_dataset(name, split=split or "train")
        except Exception as exc:  # datasets raises many types; the message is what the user needs
            raise PromptSourceError(f"cannot load Hugging Face dataset '{name}': {exc}") from exc
        return [(f"{name}[{i}]", dict(r)) for i, r in enumerate(dataset)]
    path = Path(source).expanduser()
    if not path.is_file():
        raise PromptSourceError(f"prompt source '{source}' is not 'builtin', 'hf:<id>' or an existing file")
    if path.suffix == ".jsonl":
        return list(_read_jsonl(path))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise PromptSourceError(f"{path}: not a readable Parquet file: {exc}") from exc
        return [(f"{path.name}[{i}]", r) for i, r in enumerate(table.to_pylist())]
    raise PromptSourceError(f"{path}: unsupported prompt file type '{path.suffix}' (use .jsonl or .parquet)")


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            key = f"{path.name}:{number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append((key, {"__error__": "line is not valid UTF-8"}))
                continue
            except json.JSONDecodeError as exc:
                out.append((key, {"__error__": f"invalid JSON: {exc.msg}"}))
                continue
            if not isinstance(record, dict):
                out.append((key, {"__error__": "line is not a JSON object"}))
                continue
            out.append((key, record))
    return out


def _validate(raw: list[tuple[str, dict[str, Any]]], config: PromptsConfig) -> PromptLoadResult:
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    seen: set[str] = set()

    def reject(key: str, reason: str, record: dict[str, Any]) -> None:
        payload = json.dumps(record, default=str, ensure_ascii=False)[:2000]
        rejects.append({"stage": "prompts", "row_key": key, "reason": reason, "payload": payload})

    if raw and all(config.prompt_field not in r and "__error__" not in r for _, r in raw):
        raise PromptSourceError(
            f"prompt source '{config.source}' has no '{config.prompt_field}' field "
            f"(fields seen: {', '.join(sorted(raw[0][1]))}); set prompts.prompt_field"
        )
    for key, record in raw:
        if "__error__" in record:
            reject(key, record["__error__"], {})
            continue
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
        seen.add(prompt_id)
        constraints = record.get("constraints") or []
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
            }
        )
        if len(rows) >= config.num_prompts:
            break
    return PromptLoadResult(rows=rows, rejects=rejects)
