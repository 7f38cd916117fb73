"""Constraint checks and the verifiable scorer (math equivalence, instruction constraints, threads)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.scoring.constraints import CHECKS, check_constraint, count_words
from pipeline.scoring.verifiable import ScoreResult, VerifiableScorer

# (constraint, passing answer, failing answer) for every constraint type.
CASES = [
    ({"type": "max_words", "value": 5}, "One two three four five.", "One two three four five six."),
    ({"type": "min_words", "value": 3}, "Don't stop now", "Too short"),
    (
        {"type": "include_keywords", "value": ["river", "light"]},
        "The River caught the light.",
        "The rivers caught the lights.",
    ),
    ({"type": "forbid_words", "value": ["very", "good"]}, "Goodness, a fine day.", "A VERY fine day."),
    ({"type": "all_lowercase"}, "all quiet here, 42 times.", "All quiet here."),
    ({"type": "all_uppercase"}, "ALL QUIET HERE, 42 TIMES.", "ALL QUIET HEre."),
    ({"type": "start_with", "value": "In short"}, "  in short, cook often.", "Cook often. In short, yes."),
    ({"type": "end_with", "value": "The end."}, "A story.\nThe end.  \n", "The end. A story."),
    ({"type": "num_bullets", "value": 2}, "Tips:\n- one\n* two\n**bold** line", "- one\n- two\n- three"),
    ({"type": "no_commas"}, "No commas here.", "One, two."),
    ({"type": "json_format"}, '```json\n{"advice": "cook often"}\n```', "{advice: cook often}"),
]


@pytest.mark.parametrize(("constraint", "good", "bad"), CASES, ids=[c[0]["type"] for c in CASES])
def test_each_constraint_passes_and_fails(constraint: dict, good: str, bad: str) -> None:
    assert check_constraint(constraint, good) is True
    assert check_constraint(constraint, bad) is False


def test_every_constraint_type_has_a_case() -> None:
    assert {c[0]["type"] for c in CASES} == set(CHECKS)


def test_unknown_or_malformed_constraint_raises() -> None:
    with pytest.raises(ValueError, match="num_sentences"):
        check_constraint({"type": "num_sentences", "value": 3}, "text")
    with pytest.raises(ValueError, match="max_words"):
        check_constraint({"type": "max_words"}, "text")
    with pytest.raises(ValueError):
        check_constraint({"type": "include_keywords", "value": []}, "text")


def test_word_counting_and_edge_cases() -> None:
    assert count_words("Don't   stop-now, 3 times!") == 5
    assert count_words("") == 0
    assert check_constraint({"type": "all_lowercase"}, "123") is False  # nothing cased at all
    assert check_constraint({"type": "json_format"}, "[1, 2]") is True
    assert check_constraint({"type": "json_format"}, "") is False
    assert check_constraint({"type": "include_keywords", "value": "light"}, "light it") is True


@pytest.fixture(scope="module")
def scorer() -> VerifiableScorer:
    return VerifiableScorer()


@pytest.mark.parametrize(
    ("reference", "answer", "correct"),
    [
        ("0.5", "$\\frac{1}{2}$", True),
        ("17", "The answer is 17.", True),
        ("17", "So the answer is 12 + 5 = 17.", True),
        ("17", "\\boxed{17}", True),
        ("1200", "1,200", True),
        ("3.5", "7/2", True),
        ("17", "18", False),
        ("17", "no idea", False),
    ],
)
def test_math_equivalence(scorer: VerifiableScorer, reference: str, answer: str, correct: bool) -> None:
    result = scorer.score("math", reference, [], answer)
    assert result == ScoreResult(1.0 if correct else 0.0, {"answer_correct": correct})


def test_math_guards(scorer: VerifiableScorer) -> None:
    assert scorer.score("math", "17", [], "   ") == ScoreResult(0.0, {"answer_correct": False})
    missing = scorer.score("math", None, [], "17")
    assert missing.score == 0.0 and missing.checks == {} and missing.error == "missing reference answer"
    assert scorer.score("math", "no number here", [], "17").error is not None
    assert scorer.score("essay", "17", [], "17").error is not None


def test_instruction_scores_fraction_of_constraints(scorer: VerifiableScorer) -> None:
    constraints = [
        {"type": "max_words", "value": 4},
        {"type": "all_lowercase"},
        {"type": "include_keywords", "value": ["light"]},
    ]
    result = scorer.score("instruction", None, constraints, "the light is Bright")
    assert result.checks == {"max_words": True, "all_lowercase": False, "include_keywords": True}
    assert result.score == pytest.approx(2 / 3)
    assert result.error is None


def test_instruction_errors(scorer: VerifiableScorer) -> None:
    empty = scorer.score("instruction", None, [], "anything")
    assert empty.error == "no constraints to check" and empty.score == 0.0
    unknown = scorer.score("instruction", None, [{"type": "rhymes"}], "anything")
    assert unknown.error is not None and "rhymes" in unknown.error


def test_score_batch(scorer: VerifiableScorer) -> None:
    rows = [
        {"task_type": "math", "reference_answer": "6", "constraints": [], "answer": "It is 6."},
        {
            "task_type": "instruction",
            "reference_answer": None,
            "constraints": [{"type": "no_commas"}],
            "answer": "a,b",
        },
    ]
    assert [r.score for r in scorer.score_batch(rows)] == [1.0, 0.0]


def _score_in_thread(scorer: VerifiableScorer, reference: str, answer: str) -> ScoreResult:
    box: list[ScoreResult | BaseException] = []

    def work() -> None:
        try:
            box.append(scorer.score("math", reference, [], answer))
        except BaseException as exc:  # surfaced below
            box.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "scoring hung in a worker thread"
    assert isinstance(box[0], ScoreResult), box[0]
    return box[0]


def test_scoring_works_in_a_worker_thread(scorer: VerifiableScorer) -> None:
    # math-verify's default signal-based timeout raises in non-main threads; a right answer would score 0.
    assert _score_in_thread(scorer, "0.5", "$\\frac{1}{2}$").score == 1.0
    assert _score_in_thread(scorer, "17", "18").score == 0.0
    with ThreadPoolExecutor(max_workers=4) as pool:
        scores = list(pool.map(lambda a: scorer.score("math", "12", [], a).score, ["12", "13", "x = 12"] * 4))
    assert scores == [1.0, 0.0, 1.0] * 4


HUGE_ANSWERS = ["10^10^10", "9^9^9^9", "$(10^{4000})^{10000}$", "$100000!$", "$x^{10^{10}}$"]
_HUGE_SCRIPT = """
import json, sys, threading
from pipeline.scoring.verifiable import VerifiableScorer
out = []
def work():
    scorer = VerifiableScorer()
    out.extend(scorer.score("math", "17", [], a).score for a in json.loads(sys.argv[1]))
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps(out))
"""


def test_huge_expressions_do_not_hang_without_timeouts() -> None:
    # Without the guard, verify(17, 10^10^10) runs for ever (holding the GIL) once timeouts are off, as they
    # are in worker threads; a subprocess keeps such a regression from hanging the test session.
    proc = subprocess.run(
        [sys.executable, "-c", _HUGE_SCRIPT, json.dumps(HUGE_ANSWERS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [0.0] * len(HUGE_ANSWERS)


def test_reasonable_powers_still_verify(scorer: VerifiableScorer) -> None:
    assert _score_in_thread(scorer, "1024", "2^10").score == 1.0
    assert _score_in_thread(scorer, "$2^{2010}$", "$2^{2010}$").score == 1.0
    assert _score_in_thread(scorer, "3628800", "$10!$").score == 1.0
