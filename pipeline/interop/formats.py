"""Preference-pair layouts: column detection and row-by-row validation (docs/method.md §Pipeline stages).

A source row is one preference pair in the layout TRL and most hubs use: ``prompt``, ``chosen`` and
``rejected``, each either a string ("standard") or chat messages ("conversational", a list of
``{role, content}`` dicts; the prompt ends with a user turn, each response is one assistant turn). The
reasoning of a response is either inline, ``<think>trace</think>answer`` (the configured tags), or in a
``reasoning_content`` field of the assistant message. An optional ``mode`` column says which dataset a row
belongs to: ``trace`` (D_t, reasoning on) or ``empty`` (D_e, reasoning off).

Whole-source problems (missing columns, rows of both modes without a mode column) raise
:class:`PairFormatError`; a bad row raises :class:`RowError` with the reason it is rejected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.generation.reasoning import TraceFormat

Mode = Literal["trace", "empty"]
MODES: tuple[Mode, Mode] = ("trace", "empty")
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
SCORE_COLUMNS = {"chosen": ("chosen_score", "score_chosen"), "rejected": ("rejected_score", "score_rejected")}


class PairFormatError(ValueError):
    """A pair source cannot be used as a whole (the message says why and what to change)."""


class RowError(ValueError):
    """One source row cannot be imported; the message is the reject reason."""


@dataclass(frozen=True)
class Response:
    """One response split into its reasoning trace and final answer."""

    trace: str | None  # None: the response had no reasoning block at all; "": an empty block
    answer: str
    inline: str | None = None  # the content exactly as given, when the reasoning (if any) was inline


@dataclass(frozen=True)
class SourcePair:
    """A validated source row, before its mode is settled and its prompt rendered."""

    row_key: str
    prompt: str  # the user message, or a string prompt as given (possibly already chat-rendered)
    prompt_is_chat: bool  # the prompt came as chat messages (so it is the user message itself)
    mode: Mode | None  # the row's mode column (None: the source has none)
    chosen: Response
    rejected: Response
    pair_id: str | None
    prompt_id: str | None
    chosen_score: float | None
    rejected_score: float | None

    @property
    def has_trace(self) -> bool:
        """Whether either response carries a non-empty reasoning trace."""
        return bool(self.chosen.trace or self.rejected.trace)


def check_columns(columns: Iterable[str], source: str) -> None:
    """Raise :class:`PairFormatError` naming the preference columns ``source`` lacks."""
    seen = sorted(columns)
    missing = [c for c in REQUIRED_COLUMNS if c not in seen]
    if missing:
        raise PairFormatError(
            f"{source}: missing column(s) {', '.join(missing)} (columns seen: {', '.join(seen) or 'none'}); "
            "a preference source needs prompt, chosen and rejected"
        )


def parse_row(
    row_key: str,
    record: dict[str, Any],
    fmt: TraceFormat,
    *,
    max_prompt_chars: int,
    max_response_chars: int,
) -> SourcePair:
    """Validate one source row; raise :class:`RowError` with the reason it cannot be used."""
    prompt, prompt_is_chat = _prompt(record.get("prompt"), max_prompt_chars)
    responses = {
        side: _response(side, record.get(side), fmt, max_response_chars) for side in ("chosen", "rejected")
    }
    chosen, rejected = responses["chosen"], responses["rejected"]
    if (chosen.trace, chosen.answer) == (rejected.trace, rejected.answer):
        raise RowError("chosen equals rejected")
    return SourcePair(
        row_key=row_key,
        prompt=prompt,
        prompt_is_chat=prompt_is_chat,
        mode=_mode(record["mode"]) if "mode" in record else None,
        chosen=chosen,
        rejected=rejected,
        pair_id=_optional_id(record, "pair_id"),
        prompt_id=_optional_id(record, "prompt_id"),
        chosen_score=_score(record, "chosen"),
        rejected_score=_score(record, "rejected"),
    )


def settle_mode(pair: SourcePair, declared: Mode | None) -> Mode:
    """The row's mode (its mode column, else the source's declared mode, else what its text shows).

    Raises :class:`RowError` when the row contradicts its mode: reasoning in a D_e response, or a D_t
    response without a reasoning block.
    """
    if pair.mode is not None and declared is not None and pair.mode != declared:
        raise RowError(f"mode column says '{pair.mode}' but the row comes from the {declared} source")
    mode = pair.mode or declared or ("trace" if pair.has_trace else "empty")
    for side, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if mode == "empty" and response.trace:
            raise RowError(
                f"{side}: reasoning trace (think tags with text) in a D_e (reasoning-off) response"
            )
        if mode == "trace" and response.trace is None:
            raise RowError(f"{side}: no reasoning block in a D_t (reasoning-on) response")
    return mode


def check_single_mode(pairs: list[SourcePair], source: str) -> None:
    """A source without a mode column and no declared mode must hold rows of one mode only."""
    with_trace = sum(p.has_trace for p in pairs)
    if 0 < with_trace < len(pairs):
        raise PairFormatError(
            f"{source}: mixed modes without a mode column ({with_trace} row(s) with a reasoning trace, "
            f"{len(pairs) - with_trace} without); add a 'mode' column (trace | empty) or give one source "
            "per mode"
        )


def response_text(fmt: TraceFormat, mode: Mode, response: Response) -> str:
    """The response as the trainer scores it: the trace block (or the empty block) then the answer.

    Generation starts every response with a fixed prefix (docs/method.md §Reasoning on/off formats): the
    open tag in D_t, the empty block in D_e (which a native template writes into the prompt instead). An
    inline response that starts with that prefix is kept exactly as given, so pairs sampled here come back
    from an export unchanged; any other spelling is rewritten to the stored layout.
    """
    prefix = fmt.response_prefix(mode)
    inline = response.inline
    if mode == "trace":
        if inline is not None and inline.startswith(prefix):
            return inline
        return fmt.close_trace(response.trace or "") + response.answer
    if inline is not None and response.trace is not None and inline.startswith(fmt.empty_block):
        return prefix + inline[len(fmt.empty_block) :]  # native: the template wrote the block already
    if inline is not None and response.trace is None:
        return prefix + inline
    return prefix + response.answer


def inline_content(fmt: TraceFormat, mode: Mode, response_text_: str) -> str:
    """A stored response as one assistant message: the trace inline in think tags, D_e with an empty block.

    With native reasoning control the chat template writes D_e's empty block into the prompt, so the
    stored response lacks it; the exported message always carries it.
    """
    if mode == "empty" and not response_text_.lstrip().startswith(fmt.config.open_tag):
        return fmt.empty_block + response_text_
    return response_text_


def payload(record: dict[str, Any]) -> str:
    """A bounded JSON copy of a source row for the ``rejects`` dataset."""
    text = json.dumps(record, default=str, ensure_ascii=False)
    return text if len(text) <= 2000 else text[:2000] + "…"


def _prompt(value: Any, max_chars: int) -> tuple[str, bool]:
    is_chat = isinstance(value, list)
    if is_chat:
        if not value or not all(isinstance(m, dict) for m in value):
            raise RowError("prompt: chat messages must be a non-empty list of {role, content} objects")
        roles = [m.get("role") for m in value]
        if roles != ["user"]:
            raise RowError(f"prompt: only one user message is supported (got roles {roles})")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise RowError(f"prompt: content is not a string (got {_type(value)})")
    if not value.strip():
        raise RowError("prompt: empty")
    if len(value) > max_chars:
        raise RowError(f"prompt: {len(value)} characters, over max_prompt_chars={max_chars}")
    return value, is_chat


def _response(side: str, value: Any, fmt: TraceFormat, max_chars: int) -> Response:
    reasoning = None
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            raise RowError(f"{side}: chat messages must be exactly one assistant message (got {len(value)})")
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise RowError(f"{side}: the message role is '{value.get('role')}', not assistant")
        reasoning = value.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise RowError(f"{side}: reasoning_content is not a string (got {_type(reasoning)})")
        value = value.get("content")
    if not isinstance(value, str):
        raise RowError(f"{side}: content is not a string (got {_type(value)})")
    size = len(value) + len(reasoning or "")
    if size > max_chars:
        raise RowError(f"{side}: {size} characters, over max_response_chars={max_chars}")
    open_tag, close_tag = fmt.config.open_tag, fmt.config.close_tag
    text = value.strip()
    if reasoning is not None:
        if open_tag in text or close_tag in text:
            raise RowError(f"{side}: reasoning both inline (think tags) and in reasoning_content")
        trace, answer = reasoning.strip(), text
    elif text.startswith(open_tag):
        end = text.find(close_tag)
        if end < 0:
            raise RowError(f"{side}: {open_tag} block is never closed with {close_tag}")
        trace, answer = text[len(open_tag) : end].strip(), text[end + len(close_tag) :].strip()
    else:
        trace, answer = None, text
    problem = fmt.check_answer(answer)
    if problem is not None:
        raise RowError(f"{side}: {problem}")
    return Response(trace=trace, answer=answer, inline=value if reasoning is None else None)


def _mode(value: Any) -> Mode:
    if isinstance(value, str) and value.strip().lower() in MODES:
        return value.strip().lower()  # type: ignore[return-value]
    raise RowError(f"mode: {value!r} is not 'trace' or 'empty'")


def _optional_id(record: dict[str, Any], column: str) -> str | None:
    value = record.get(column)
    if value is None:
        return None
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
        raise RowError(f"{column}: {value!r} is not a non-empty string")
    return str(value).strip()


def _score(record: dict[str, Any], side: str) -> float | None:
    for column in SCORE_COLUMNS[side]:
        value = record.get(column)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RowError(f"{column}: {value!r} is not a finite number")
        return float(value)
    return None


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__
