"""The scorer interface: every scorer sees the prompt and the final answer, never the reasoning trace.

docs/method.md §Pipeline stages ('score'): scorers score the final answer only. :class:`ScoreInput`
has no field for a trace, so a scorer cannot see one even by mistake.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ScoreInput:
    """What a scorer may look at for one generation."""

    prompt: str
    """The user's prompt (as in the ``prompts`` dataset, not chat-rendered)."""
    answer: str
    """The final answer, with the reasoning trace already stripped."""
    task_type: str = "instruction"
    reference_answer: str | None = None
    constraints: tuple[dict[str, Any], ...] | list[dict[str, Any]] = ()


@dataclass(frozen=True)
class ScoreResult:
    """Outcome of scoring one answer."""

    score: float
    """The component's score (the verifiable scorer: the fraction of checks passed, in [0, 1])."""
    checks: dict[str, bool]
    """Named checks, e.g. ``{"answer_correct": True}`` or ``{"max_words": False}``."""
    error: str | None = None
    """Why the row could not be scored, if it could not (the row becomes a reject)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Extra facts worth keeping (raw reward, token count, judge rating and text)."""


class Scorer(Protocol):
    """A batched final-answer scorer."""

    name: str

    def score_batch(self, items: Sequence[ScoreInput]) -> list[ScoreResult]:
        """One result per item, in order."""
        ...
