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


# ---- a hand-written table: answer/expected cases, each with the exact checks it must produce ----

_MAX5 = {"type": "max_words", "value": 5}
_MIN3 = {"type": "min_words", "value": 3}
_KEYS = {"type": "include_keywords", "value": ["river", "light"]}
_FORBID = {"type": "forbid_words", "value": ["very", "good"]}
_LOWER = {"type": "all_lowercase"}
_UPPER = {"type": "all_uppercase"}
_START = {"type": "start_with", "value": "In short"}
_END = {"type": "end_with", "value": "The end."}
_BULLETS3 = {"type": "num_bullets", "value": 3}
_NO_COMMAS = {"type": "no_commas"}
_JSON = {"type": "json_format"}

# (id, task_type, reference answer, constraints, answer, expected checks); the score is their pass rate.
TABLE: list[tuple[str, str, str | None, list[dict], str, dict[str, bool]]] = [
    ("half-vs-decimal", "math", "0.5", [], "1/2", {"answer_correct": True}),
    ("decimal-vs-half", "math", "1/2", [], "0.5", {"answer_correct": True}),
    ("latex-frac", "math", "0.5", [], "$\\frac{1}{2}$", {"answer_correct": True}),
    ("latex-frac-short", "math", "0.5", [], "$\\frac12$", {"answer_correct": True}),
    ("latex-reference", "math", "\\frac{3}{4}", [], "0.75", {"answer_correct": True}),
    ("boxed", "math", "17", [], "\\boxed{17}", {"answer_correct": True}),
    ("boxed-in-sentence", "math", "17", [], "The final answer is $\\boxed{17}$.", {"answer_correct": True}),
    ("boxed-dfrac", "math", "3", [], "$\\boxed{\\dfrac{6}{2}}$", {"answer_correct": True}),
    ("inline-math", "math", "42", [], "\\(42\\)", {"answer_correct": True}),
    ("negative-frac", "math", "-0.5", [], "-\\frac{1}{2}", {"answer_correct": True}),
    ("trailing-zero", "math", "2", [], "2.0", {"answer_correct": True}),
    ("percent", "math", "0.25", [], "25%", {"answer_correct": True}),
    ("thousands", "math", "1000000", [], "1,000,000", {"answer_correct": True}),
    ("power", "math", "8", [], "2^3", {"answer_correct": True}),
    ("with-unit", "math", "12", [], "12 apples", {"answer_correct": True}),
    ("last-number-wins", "math", "7", [], "First 3 + 4 = 7, then 7.", {"answer_correct": True}),
    ("self-correction", "math", "12", [], "I think 11, no wait, 12", {"answer_correct": True}),
    ("wrong-number", "math", "17", [], "18", {"answer_correct": False}),
    ("wrong-boxed", "math", "17", [], "\\boxed{71}", {"answer_correct": False}),
    ("wrong-sign", "math", "-3", [], "3", {"answer_correct": False}),
    ("rounded-third", "math", "1/3", [], "0.33", {"answer_correct": False}),
    ("close-decimal", "math", "0.5", [], "0.55", {"answer_correct": False}),
    ("two-candidates", "math", "12", [], "12 or 13", {"answer_correct": False}),
    ("number-in-words", "math", "2", [], "two", {"answer_correct": False}),
    ("no-number", "math", "17", [], "no idea", {"answer_correct": False}),
    ("empty-answer", "math", "17", [], "", {"answer_correct": False}),
    ("max-words-pass", "instruction", None, [_MAX5], "One two three.", {"max_words": True}),
    ("max-words-fail", "instruction", None, [_MAX5], "one two three four five six", {"max_words": False}),
    ("min-words-pass", "instruction", None, [_MIN3], "Don't stop now", {"min_words": True}),
    ("min-words-fail", "instruction", None, [_MIN3], "Too short", {"min_words": False}),
    ("keywords-pass", "instruction", None, [_KEYS], "LIGHT on the River.", {"include_keywords": True}),
    ("keywords-plural", "instruction", None, [_KEYS], "Rivers of lights.", {"include_keywords": False}),
    ("forbid-pass", "instruction", None, [_FORBID], "Goodness, a fine day.", {"forbid_words": True}),
    ("forbid-fail", "instruction", None, [_FORBID], "A Very fine day.", {"forbid_words": False}),
    ("lower-pass", "instruction", None, [_LOWER], "quiet, 42 times.", {"all_lowercase": True}),
    ("lower-fail", "instruction", None, [_LOWER], "Quiet.", {"all_lowercase": False}),
    ("upper-pass", "instruction", None, [_UPPER], "LOUD, 42 TIMES!", {"all_uppercase": True}),
    ("upper-fail", "instruction", None, [_UPPER], "LOUd", {"all_uppercase": False}),
    ("start-pass", "instruction", None, [_START], "  in short: cook.", {"start_with": True}),
    ("start-fail", "instruction", None, [_START], "Cook. In short", {"start_with": False}),
    ("end-pass", "instruction", None, [_END], "A story. the END.\n", {"end_with": True}),
    ("end-fail", "instruction", None, [_END], "The end. A story.", {"end_with": False}),
    ("bullets-pass", "instruction", None, [_BULLETS3], "Tips:\n- a\n* b\n  - c", {"num_bullets": True}),
    ("bullets-fail", "instruction", None, [_BULLETS3], "- a\n- b\n**bold** c", {"num_bullets": False}),
    ("no-commas-pass", "instruction", None, [_NO_COMMAS], "One two.", {"no_commas": True}),
    ("no-commas-fullwidth", "instruction", None, [_NO_COMMAS], "One，two.", {"no_commas": False}),
    ("json-fenced", "instruction", None, [_JSON], '```json\n{"a": [1, 2]}\n```', {"json_format": True}),
    ("json-invalid", "instruction", None, [_JSON], "{a: 1}", {"json_format": False}),
    (
        "three-constraints-two-met",
        "instruction",
        None,
        [_MAX5, _LOWER, _KEYS],
        "The river and the light",
        {"max_words": True, "all_lowercase": False, "include_keywords": True},
    ),
    (
        "repeated-type",
        "instruction",
        None,
        [{"type": "include_keywords", "value": ["river"]}, {"type": "include_keywords", "value": ["sea"]}],
        "a river",
        {"include_keywords": True, "include_keywords#2": False},
    ),
]


@pytest.mark.parametrize(
    ("task_type", "reference", "constraints", "answer", "checks"),
    [case[1:] for case in TABLE],
    ids=[case[0] for case in TABLE],
)
def test_answer_table(
    scorer: VerifiableScorer,
    task_type: str,
    reference: str | None,
    constraints: list[dict],
    answer: str,
    checks: dict[str, bool],
) -> None:
    result = scorer.score(task_type, reference, constraints, answer)
    assert result.error is None
    assert result.checks == checks
    assert result.score == pytest.approx(sum(checks.values()) / len(checks))


def test_answer_table_covers_every_builtin_constraint_type() -> None:
    from pipeline.prompts.builtin import CONSTRAINT_TYPES

    assert len(TABLE) >= 30
    used = {c["type"] for case in TABLE for c in case[3]}
    assert used >= set(CONSTRAINT_TYPES)
    for kind in CONSTRAINT_TYPES:  # each type both passes and fails somewhere in the table
        outcomes = {checks[kind] for *_, checks in TABLE if kind in checks}
        assert outcomes == {True, False}, kind
    assert {correct for *_, checks in TABLE for k, correct in checks.items() if k == "answer_correct"} == {
        True,
        False,
    }


def test_score_batch_takes_score_inputs_and_never_a_trace(scorer: VerifiableScorer) -> None:
    from pipeline.scoring.base import ScoreInput

    items = [
        ScoreInput(prompt="2+2?", answer="4", task_type="math", reference_answer="4"),
        ScoreInput(prompt="Be brief.", answer="a, b", constraints=({"type": "no_commas"},)),
    ]
    assert [r.score for r in scorer.score_batch(items)] == [1.0, 0.0]
    assert "trace" not in ScoreInput.__dataclass_fields__
