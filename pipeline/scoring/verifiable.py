"""Verifiable scorer: math answers checked for equivalence with math-verify, instructions by constraints.

It scores the final answer only; the caller strips the reasoning trace first.

Threads: math-verify's own timeouts use ``signal.alarm``, which only works in the main thread; in any
other thread ``parse``/``verify`` raise ``ValueError`` (even with ``raise_on_error=False``). The scorer
therefore passes timeouts only in the main thread and ``None`` elsewhere. Without a timeout a power
tower such as ``10^10^10`` makes ``verify`` run for ever, so parsed expressions whose magnitude cannot
be bounded cheaply are dropped before comparison (they count as wrong answers).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import mpmath
import sympy
from math_verify import parse, verify
from sympy.matrices import MatrixBase
from tqdm.auto import tqdm

from pipeline.scoring.base import ScoreInput, ScoreResult
from pipeline.scoring.constraints import check_constraint

__all__ = ["ScoreResult", "VerifiableScorer"]

_MAX_EXPONENT = 10_000
"""Largest |exponent| of a power with a numeric exponent and a numeric base."""
_MAX_SYMBOLIC_EXPONENT = 100
"""Largest |exponent| of a power whose base holds symbols (expansion cost)."""
_MAX_LOG2_SIZE = 14_000
"""Largest |log2| of a numeric sub-expression's absolute value (about 10^±4200)."""


def _approx_abs(value: sympy.Basic) -> mpmath.mpf | None:
    """Floating-point |value| (largest of real and imaginary part), or None if it has no finite value."""
    parts = [part for part in value.evalf(15).as_real_imag() if isinstance(part, sympy.Float)]
    if not parts:
        return None
    return max(abs(mpmath.mpf(part._mpf_)) for part in parts)


def _is_bounded(expr: Any) -> bool:
    """Whether comparing ``expr`` cannot blow up (no huge powers or numbers); checked bottom-up."""
    if isinstance(expr, MatrixBase):
        return all(_is_bounded(item) for item in expr)
    if not isinstance(expr, sympy.Basic):
        return True
    if not all(_is_bounded(arg) for arg in expr.args):
        return False
    if isinstance(expr, sympy.Pow) and expr.exp.is_number:
        exponent = _approx_abs(expr.exp)
        limit = _MAX_SYMBOLIC_EXPONENT if expr.base.free_symbols else _MAX_EXPONENT
        if exponent is not None and exponent > limit:
            return False
    if expr.is_number and not expr.is_Atom:
        size = _approx_abs(expr)
        if size is not None and size != 0 and abs(mpmath.mag(size)) > _MAX_LOG2_SIZE:
            return False
    return True


class VerifiableScorer:
    """Scores math rows by answer equivalence and instruction rows by the share of constraints met."""

    name = "verifiable"

    def __init__(self, timeout_seconds: int | None = 5) -> None:
        """``timeout_seconds`` bounds each math-verify call, in the main thread only (signal-based)."""
        self.timeout_seconds = timeout_seconds

    def score(
        self, task_type: str, reference_answer: str | None, constraints: list[dict], answer: str
    ) -> ScoreResult:
        """Score one final answer."""
        if task_type == "math":
            return self._score_math(reference_answer, answer)
        if task_type == "instruction":
            return self._score_instruction(constraints, answer)
        return ScoreResult(0.0, {}, error=f"unknown task_type {task_type!r}")

    def score_batch(self, items: Sequence[ScoreInput | dict[str, Any]]) -> list[ScoreResult]:
        """Score items (:class:`ScoreInput`, or dicts with ``task_type``, ``reference_answer``,
        ``constraints`` and ``answer``), with a progress bar."""
        results = []
        for item in tqdm(items, desc="verifiable", unit="answer", disable=len(items) < 2):
            if isinstance(item, ScoreInput):
                task_type, reference, constraints, answer = (
                    item.task_type,
                    item.reference_answer,
                    list(item.constraints),
                    item.answer,
                )
            else:
                task_type, reference = item["task_type"], item.get("reference_answer")
                constraints, answer = item.get("constraints") or [], item["answer"]
            results.append(self.score(task_type, reference, constraints, answer))
        return results

    def _timeout(self) -> int | None:
        if threading.current_thread() is threading.main_thread():
            return self.timeout_seconds
        return None

    def _parse(self, text: str, timeout: int | None) -> list[Any]:
        parsed = parse(text, parsing_timeout=timeout)  # type: ignore[arg-type]  # None disables signals
        return [item for item in parsed if _is_bounded(item)]

    def _score_math(self, reference_answer: str | None, answer: str) -> ScoreResult:
        if reference_answer is None or not str(reference_answer).strip():
            return ScoreResult(0.0, {}, error="missing reference answer")
        if not answer or not answer.strip():
            return ScoreResult(0.0, {"answer_correct": False})
        timeout = self._timeout()
        try:
            gold = self._parse(str(reference_answer), timeout)
            if not gold:
                return ScoreResult(0.0, {}, error=f"reference answer {reference_answer!r} cannot be parsed")
            target = self._parse(answer, timeout)
            correct = bool(target) and bool(verify(gold, target, timeout_seconds=timeout))
        except Exception:  # math-verify and sympy raise many types; a crash is a wrong answer
            correct = False
        return ScoreResult(1.0 if correct else 0.0, {"answer_correct": correct})

    def _score_instruction(self, constraints: list[dict], answer: str) -> ScoreResult:
        if not constraints:
            return ScoreResult(0.0, {}, error="no constraints to check")
        checks: dict[str, bool] = {}
        for constraint in constraints:
            try:
                passed = check_constraint(constraint, answer or "")
            except ValueError as exc:
                return ScoreResult(0.0, {}, error=str(exc))
            key = str(constraint["type"])
            suffix = 2
            while key in checks:
                key = f"{constraint['type']}#{suffix}"
                suffix += 1
            checks[key] = passed
        return ScoreResult(sum(checks.values()) / len(checks), checks)
