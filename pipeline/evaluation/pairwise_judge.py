"""Pairwise LLM judge for win rates against the reference, asked in both orders (position swap).

For each prompt the judge sees the two final answers twice: the model's answer as "A" and the reference's
as "B", then swapped. Each order yields a :class:`~pipeline.evaluation.winrate.Judgement` verdict; an
order whose verdict cannot be read counts as a tie (and is counted, so a report can say how often). The
win rate, its length-controlled version and the intervals come from :mod:`pipeline.evaluation.winrate`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.evaluation.winrate import Judgement, Verdict
from pipeline.scoring.judge import ChatClient, Message, strip_reasoning

PAIRWISE_SYSTEM_PROMPT = (
    "You compare two answers written by AI assistants to the same user request and decide which one "
    "serves the user better. Judge correctness first, then how well the instructions are followed, then "
    "clarity. Do not prefer an answer for being longer or for being shown first."
)

PAIRWISE_TEMPLATE = """[User request]
{question}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Explain your comparison in at most three sentences. Then write your verdict on the last line in exactly \
this format: "Verdict: [[A]]" if A is better, "Verdict: [[B]]" if B is better, or "Verdict: [[tie]]"."""

_VERDICT = re.compile(r"\[\[\s*(A|B|tie)\s*\]\]", re.IGNORECASE)

Letter = Literal["A", "B", "tie"]


def pairwise_messages(question: str, answer_a: str, answer_b: str) -> list[Message]:
    """The chat conversation asking which of two answers is better."""
    content = PAIRWISE_TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)
    return [
        {"role": "system", "content": PAIRWISE_SYSTEM_PROMPT},
        {"role": "user", "content": content},
    ]


def parse_verdict(text: str) -> Letter | None:
    """``A``, ``B`` or ``tie`` from the judge's text; None when absent or contradictory.

    The judge's own reasoning block (``<think>…</think>``) is ignored; if several verdict marks remain
    they must agree.
    """
    found = {m.group(1).lower() for m in _VERDICT.finditer(strip_reasoning(text))}
    if len(found) != 1:
        return None
    letter = found.pop()
    return "tie" if letter == "tie" else "A" if letter == "a" else "B"


@dataclass(frozen=True)
class PairwiseItem:
    """One prompt's two answers (model under test, reference) and their lengths."""

    prompt_id: str
    question: str
    model_answer: str
    reference_answer: str
    model_length: float
    reference_length: float


@dataclass(frozen=True)
class PairwiseResult:
    judgements: list[Judgement]
    unreadable: int  # orders whose verdict could not be read (counted as ties)


def _verdict(letter: Letter | None, model_is: Letter) -> Verdict:
    if letter is None or letter == "tie":
        return "tie"
    return "model" if letter == model_is else "reference"


def judge_against_reference(client: ChatClient, items: Sequence[PairwiseItem]) -> PairwiseResult:
    """Ask ``client`` about every item in both orders; return one judgement per item.

    Raises:
        RuntimeError: the client answered a different number of conversations than it was asked.
    """
    conversations = []
    for item in items:
        conversations.append(pairwise_messages(item.question, item.model_answer, item.reference_answer))
        conversations.append(pairwise_messages(item.question, item.reference_answer, item.model_answer))
    texts = client.chat(conversations) if conversations else []
    if len(texts) != len(conversations):
        raise RuntimeError(f"judge answered {len(texts)} of {len(conversations)} comparisons")
    judgements, unreadable = [], 0
    for index, item in enumerate(items):
        first, second = parse_verdict(texts[2 * index]), parse_verdict(texts[2 * index + 1])
        unreadable += (first is None) + (second is None)
        judgements.append(
            Judgement(
                item.prompt_id,
                model_first=_verdict(first, "A"),
                reference_first=_verdict(second, "B"),
                model_length=item.model_length,
                reference_length=item.reference_length,
            )
        )
    return PairwiseResult(judgements, unreadable)


def items_against_reference(
    rows: Sequence[dict[str, Any]], prompts: dict[str, str], label: str, mode: str, reference_label: str
) -> list[PairwiseItem]:
    """Pair the first sample of ``label`` with the reference's first sample, per prompt, in one mode.

    Args:
        rows: scored eval generations (``eval_generations`` rows) of every model.
        prompts: prompt id → the user's request as plain text.
    """

    def first(of: str) -> dict[str, dict[str, Any]]:
        chosen: dict[str, dict[str, Any]] = {}
        for row in sorted(rows, key=lambda r: (r["prompt_id"], r["sample_index"])):
            if row["model_label"] == of and row["mode"] == mode:
                chosen.setdefault(row["prompt_id"], row)
        return chosen

    mine, theirs = first(label), first(reference_label)
    return [
        PairwiseItem(
            pid,
            prompts[pid],
            mine[pid]["answer"],
            theirs[pid]["answer"],
            float(mine[pid]["answer_tokens"]),
            float(theirs[pid]["answer_tokens"]),
        )
        for pid in sorted(set(mine) & set(theirs))
    ]
