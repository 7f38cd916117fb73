"""Bring-your-own preference pairs: read, validate row by row, and build D_t / D_e rows (docs/method.md
§Pipeline stages).

Sources are Parquet or JSONL files, a ``datasets`` folder written by ``save_to_disk``, or ``hf:ID[:SPLIT]``
on a machine that reaches the hub, in the layouts of :mod:`pipeline.interop.formats`: one source per mode,
or one source with a ``mode`` column (a source with neither must hold one mode only). Each kept row becomes
a row of the ``pairs_trace`` / ``pairs_empty`` schema: the prompt rendered with the model's chat template
for its mode, the responses in the stored trace-block layout, and token ids. Token ids come from the
source's ``prompt_token_ids`` / ``chosen_token_ids`` / ``rejected_token_ids`` columns when it has them
(``bvpo export pairs`` writes them), else from :mod:`pipeline.training.encoding`, the one place text is
tokenized for training (docs/method.md §Token-exact sequences).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.generation.reasoning import TraceFormat
from pipeline.interop.chat_prompt import template_frame, user_message
from pipeline.interop.formats import (
    MODES,
    Mode,
    PairFormatError,
    RowError,
    SourcePair,
    check_columns,
    check_single_mode,
    parse_row,
    payload,
    response_text,
    settle_mode,
)
from pipeline.prompts.builtin import prompt_id_for
from pipeline.prompts.source import ERROR_KEY, PromptSourceError, _read_hf, _read_jsonl, _read_parquet

STAGE = "import_pairs"


@dataclass(frozen=True)
class PairSource:
    """Where pairs come from, and the mode of all its rows when it is one source per mode."""

    location: str  # a .parquet / .jsonl file, a save_to_disk folder, or hf:ID[:SPLIT]
    mode: Mode | None = None

    @property
    def label(self) -> str:
        return self.location if self.mode is None else f"{self.location} ({self.mode})"


@dataclass
class ImportResult:
    pairs: dict[Mode, list[dict[str, Any]]] = field(default_factory=lambda: {m: [] for m in MODES})
    rejects: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return sum(len(rows) for rows in self.pairs.values())


def read_source(location: str, hf_config: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(row_key, record)`` of every row of a pair source; unreadable rows carry an error instead."""
    try:
        if location.startswith("hf:"):
            return _read_hf(location[3:], hf_config)
        path = Path(location).expanduser()
        if path.is_dir():
            return _read_hf(str(path), hf_config)
        if not path.is_file():
            raise PairFormatError(f"pair source '{location}' is not a file, a dataset folder or hf:<id>")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return _read_parquet(path)
        if suffix in (".jsonl", ".json"):
            return _read_jsonl(path)
        raise PairFormatError(f"{path}: unsupported pair file type '{path.suffix}' (use .parquet or .jsonl)")
    except PromptSourceError as exc:
        raise PairFormatError(str(exc)) from exc


def load_pairs(
    sources: list[PairSource],
    tokenizer: Any,
    fmt: TraceFormat,
    *,
    max_prompt_chars: int,
    max_response_chars: int,
    hf_config: str | None = None,
) -> ImportResult:
    """Validate every row of every source; raise :class:`PairFormatError` for a source unusable as a whole.

    Every source is read and checked before anything is returned, so a bad second source leaves nothing
    behind from the first.
    """
    result = ImportResult()
    frames = {mode: template_frame(tokenizer, fmt, mode) for mode in MODES}
    seen: dict[Mode, set[str]] = {mode: set() for mode in MODES}

    def reject(key: str, reason: str, record: dict[str, Any]) -> None:
        result.rejects.append({"stage": STAGE, "row_key": key, "reason": reason, "payload": payload(record)})

    for source in sources:
        try:
            records = list(read_source(source.location, hf_config))
        except PromptSourceError as exc:
            raise PairFormatError(str(exc)) from exc
        readable = [(k, r) for k, r in records if ERROR_KEY not in r]
        for key, record in records:
            if ERROR_KEY in record:
                reject(key, record[ERROR_KEY], {})
        check_columns({c for _, r in readable for c in r} or set(), source.label)
        parsed: list[tuple[SourcePair, dict[str, Any]]] = []
        for key, record in readable:
            try:
                parsed.append(
                    (
                        parse_row(
                            key,
                            record,
                            fmt,
                            max_prompt_chars=max_prompt_chars,
                            max_response_chars=max_response_chars,
                        ),
                        record,
                    )
                )
            except RowError as exc:
                reject(key, str(exc), record)
        if source.mode is None and not any("mode" in r for _, r in readable):
            check_single_mode([p for p, _ in parsed], source.label)
        for pair, record in parsed:
            try:
                mode = settle_mode(pair, source.mode)
                row = _pair_row(pair, mode, record, tokenizer, fmt, frames[mode], seen[mode])
            except RowError as exc:
                reject(pair.row_key, str(exc), record)
                continue
            seen[mode].add(row["pair_id"])
            result.pairs[mode].append(row)
    return result


def _pair_row(
    pair: SourcePair,
    mode: Mode,
    record: dict[str, Any],
    tokenizer: Any,
    fmt: TraceFormat,
    frame: tuple[str, str],
    seen: set[str],
) -> dict[str, Any]:
    """One row of the pairs schema (``pairs_trace`` / ``pairs_empty``)."""
    user = pair.prompt if pair.prompt_is_chat else (user_message(pair.prompt, frame) or pair.prompt)
    prompt_id = pair.prompt_id or prompt_id_for(user.strip())
    pair_id = pair.pair_id
    if pair_id is None:
        pair_id, n = f"{prompt_id}-{mode}", 1
        while pair_id in seen:  # several pairs of one prompt: -<mode>-2, -3, ...
            n += 1
            pair_id = f"{prompt_id}-{mode}-{n}"
    elif pair_id in seen:
        raise RowError(f"duplicate pair_id '{pair_id}' in {mode} pairs")
    chosen = response_text(fmt, mode, pair.chosen)
    rejected = response_text(fmt, mode, pair.rejected)
    chosen_score = 1.0 if pair.chosen_score is None else pair.chosen_score
    rejected_score = 0.0 if pair.rejected_score is None else pair.rejected_score
    row = {
        "pair_id": pair_id,
        "prompt_id": prompt_id,
        "mode": mode,
        "prompt_text": fmt.render_prompt(tokenizer, user, mode),
        "chosen_response": chosen,
        "rejected_response": rejected,
        "chosen_answer": pair.chosen.answer,
        "rejected_answer": pair.rejected.answer,
        "chosen_score": chosen_score,
        "rejected_score": rejected_score,
        "margin": chosen_score - rejected_score,
        "chosen_generation_id": f"imported:{pair_id}:chosen",
        "rejected_generation_id": f"imported:{pair_id}:rejected",
        "num_candidates": None,
        "length_ratio": len(pair.chosen.answer) / len(pair.rejected.answer),
    }
    row.update(_token_ids(record, tokenizer, fmt, user, mode, row))
    return row


def _token_ids(
    record: dict[str, Any], tokenizer: Any, fmt: TraceFormat, user: str, mode: Mode, row: dict[str, Any]
) -> dict[str, list[int]]:
    """The pair's token ids: the source's own when it has them (they must decode to the pair's text), else
    built by the encoding module as generation would feed them: the rendered prompt, the fixed prefix of
    the mode, then the rest of each response, which ends with end-of-sequence."""
    from pipeline.training.encoding import (
        PAIR_TOKEN_COLUMNS,
        encode_text,
        pair_decode_problem,
        render_prompt_ids,
        response_prefix_ids,
    )

    given = {c: record.get(c) for c in PAIR_TOKEN_COLUMNS}
    if any(v is not None for v in given.values()):
        vocab = len(tokenizer)
        for column, ids in given.items():
            if not isinstance(ids, list) or not ids:
                raise RowError(f"{column}: missing or empty while the other token-id columns are given")
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
                raise RowError(f"{column}: not a list of token ids of this tokenizer (vocabulary {vocab})")
        problem = pair_decode_problem(tokenizer, {**row, **given})
        if problem is not None:
            raise RowError(problem)
        return {c: list(v) for c, v in given.items()}  # type: ignore[arg-type]
    prefix, prefix_ids = fmt.response_prefix(mode), response_prefix_ids(tokenizer, mode, fmt.config)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def response_ids(text: str) -> list[int]:
        head = prefix_ids if prefix and text.startswith(prefix) else []
        return head + encode_text(tokenizer, text[len(prefix) if head else 0 :]) + eos

    return {
        "prompt_token_ids": render_prompt_ids(tokenizer, user, mode, fmt.config),
        "chosen_token_ids": response_ids(row["chosen_response"]),
        "rejected_token_ids": response_ids(row["rejected_response"]),
    }
