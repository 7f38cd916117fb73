"""Incremental prompts: what a refresh adds to the prompts registered before, and what it refuses.

A prompt is known by its content id (``prompt_id``, a hash of its text) and found in the source by its
``source_key`` (``file:line``, ``file[row]``, ``dataset[row]``). Against the previous prompts version of the
same source, the current source may only *add* prompts: a previous prompt whose id is gone is either
*changed* (its place in the source now holds another text) or *lost* (its place is gone too). Both are
refused with the places named, so nothing trained on silently disappears or changes meaning.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import PromptsConfig

_SHOWN = 5
_IDENTITY_EXCLUDED = {"num_prompts"}  # a larger cap continues the same source


class PromptSourceChanged(ValueError):
    """The source no longer holds every prompt registered before (rows lost, or texts changed)."""


@dataclass(frozen=True)
class PromptDiff:
    """The current source against the previous prompts version."""

    added: list[dict[str, Any]]  # rows whose prompt_id was not registered before, in source order
    kept: int  # previous prompts still in the source


def prompt_series(config: PromptsConfig) -> str:
    """Identity of a prompt source and its split: incremental versions of one series extend each other."""
    settings = config.model_dump(mode="json", exclude=_IDENTITY_EXCLUDED)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def diff_prompts(previous: Sequence[dict[str, Any]], current: Sequence[dict[str, Any]]) -> PromptDiff:
    """The prompts of ``current`` not in ``previous``; raises :class:`PromptSourceChanged` on a lost or
    changed prompt."""
    current_ids = {row["prompt_id"] for row in current}
    at_key = {row.get("source_key"): row for row in current if row.get("source_key") is not None}
    changed: list[str] = []
    lost: list[str] = []
    for row in previous:
        if row["prompt_id"] in current_ids:
            continue
        key = row.get("source_key")
        now = at_key.get(key) if key is not None else None
        if now is not None:
            changed.append(
                f"{key}: prompt_id {row['prompt_id']} ({_short(row['prompt'])}) is now {now['prompt_id']} "
                f"({_short(now['prompt'])})"
            )
        else:
            lost.append(f"{key or '?'}: prompt_id {row['prompt_id']} ({_short(row['prompt'])})")
    if changed or lost:
        raise PromptSourceChanged(_message(changed, lost, len(previous)))
    known = {row["prompt_id"] for row in previous}
    added = [row for row in current if row["prompt_id"] not in known]
    return PromptDiff(added=added, kept=len(previous))


def _message(changed: list[str], lost: list[str], registered: int) -> str:
    parts = []
    if changed:
        parts.append(f"{len(changed)} prompt(s) changed text at the same place: " + _list(changed))
    if lost:
        parts.append(f"{len(lost)} prompt(s) are no longer in the source: " + _list(lost))
    return (
        f"incremental refresh refused: the prompt source no longer holds all {registered} prompts "
        f"registered before; {'; '.join(parts)}. Nothing was registered. Restore those rows (append new "
        "prompts at the end), or run a full refresh with refresh.incremental=false."
    )


def _list(items: list[str]) -> str:
    more = f" (and {len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return "; ".join(items[:_SHOWN]) + more


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")
