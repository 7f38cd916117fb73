"""Pairwise judge: both orders per prompt, verdict parsing, and the win rates summarize() derives from it."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pipeline.evaluation.metrics import summarize
from pipeline.evaluation.pairwise_judge import (
    PairwiseItem,
    items_against_reference,
    judge_against_reference,
    parse_verdict,
)
from pipeline.scoring.judge import Message


@pytest.mark.parametrize(
    "text,expected",
    [
        ("A is correct.\nVerdict: [[A]]", "A"),
        ("Verdict: [[ b ]]", "B"),
        ("Both fine. Verdict: [[TIE]]", "tie"),
        ("<think>maybe [[A]]</think> On reflection, Verdict: [[B]]", "B"),
        ("Verdict: [[A]] ... final Verdict: [[A]]", "A"),
        ("Verdict: [[A]] or [[B]]", None),
        ("I prefer A.", None),
        ("", None),
    ],
)
def test_verdicts_are_parsed_without_guessing(text: str, expected: str | None) -> None:
    assert parse_verdict(text) == expected


class ScriptedJudge:
    """A judge that decides from the two answers it is shown, recording what it saw."""

    def __init__(self, decide: object) -> None:
        self.decide = decide
        self.seen: list[tuple[str, str]] = []

    def chat(self, conversations: Sequence[list[Message]]) -> list[str]:
        out = []
        for conversation in conversations:
            text = conversation[-1]["content"]
            a = text.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
            b = text.split("[Answer B]\n")[1].split("\n\nExplain")[0]
            self.seen.append((a, b))
            out.append(self.decide(a, b))  # type: ignore[operator]
        return out


def _items(n: int = 4) -> list[PairwiseItem]:
    return [PairwiseItem(f"p{i}", f"q{i}", f"model answer {i}", f"ref {i}", 3.0, 2.0) for i in range(n)]


def test_each_prompt_is_asked_in_both_orders() -> None:
    judge = ScriptedJudge(lambda a, b: "Verdict: [[A]]" if a.startswith("model") else "Verdict: [[B]]")
    result = judge_against_reference(judge, _items())
    assert judge.seen[:2] == [("model answer 0", "ref 0"), ("ref 0", "model answer 0")]
    assert all(j.model_first == j.reference_first == "model" for j in result.judgements)
    assert result.unreadable == 0


def test_a_judge_that_always_picks_the_first_answer_gives_ties() -> None:
    result = judge_against_reference(ScriptedJudge(lambda a, b: "Verdict: [[A]]"), _items())
    rows = [
        {"model_label": label, "model": label, "mode": "trace", "prompt_id": f"p{i}", "score": 0.0,
         "answer_tokens": 3, "trace_tokens": 1}
        for label in ("reference", "trained") for i in range(4)
    ]  # fmt: skip
    results = summarize(
        rows,
        reference_label="reference",
        bootstrap_samples=100,
        seed=0,
        judgements={("trained", "trace"): result.judgements},
    )
    by_metric = {r["metric"]: r for r in results if r["model_label"] == "trained"}
    assert by_metric["win_rate_vs_reference"]["value"] == 0.5
    assert by_metric["judge_position_consistency"]["value"] == 0.0


def test_unreadable_verdicts_count_as_ties_and_are_counted() -> None:
    answers = iter(["Verdict: [[A]]", "no idea", "Verdict: [[B]]", "Verdict: [[A]]"])
    result = judge_against_reference(ScriptedJudge(lambda a, b: next(answers)), _items(2))
    assert result.unreadable == 1
    assert (result.judgements[0].model_first, result.judgements[0].reference_first) == ("model", "tie")
    assert (result.judgements[1].model_first, result.judgements[1].reference_first) == (
        "reference",
        "reference",
    )


def test_a_judge_that_answers_too_few_is_an_error() -> None:
    class Short:
        def chat(self, conversations: Sequence[list[Message]]) -> list[str]:
            return ["Verdict: [[A]]"]

    with pytest.raises(RuntimeError, match="1 of 4"):
        judge_against_reference(Short(), _items(2))


def test_items_pair_first_samples_of_shared_prompts() -> None:
    rows = [
        {"model_label": "trained", "mode": "trace", "prompt_id": "p1", "sample_index": 1, "answer": "late",
         "answer_tokens": 1},
        {"model_label": "trained", "mode": "trace", "prompt_id": "p1", "sample_index": 0, "answer": "first",
         "answer_tokens": 2},
        {"model_label": "reference", "mode": "trace", "prompt_id": "p1", "sample_index": 0, "answer": "ref",
         "answer_tokens": 5},
        {"model_label": "trained", "mode": "trace", "prompt_id": "p2", "sample_index": 0, "answer": "x",
         "answer_tokens": 1},
        {"model_label": "reference", "mode": "empty", "prompt_id": "p2", "sample_index": 0, "answer": "y",
         "answer_tokens": 1},
    ]  # fmt: skip
    items = items_against_reference(rows, {"p1": "Q1", "p2": "Q2"}, "trained", "trace", "reference")
    assert items == [PairwiseItem("p1", "Q1", "first", "ref", 2.0, 5.0)]
