"""Pairwise win rates against a reference: position-swapped verdicts, ties, length control, intervals.

A pairwise judge (an LLM judge, or a reward model comparing two answers) sees each prompt twice, once
with the model's answer first and once with it second. Each order gives 1 (model wins), 0.5 (tie) or 0
(reference wins); the prompt's outcome is the mean of the two orders, so a position-inconsistent pair of
verdicts counts as a tie.

The length-controlled (LC) win rate follows AlpacaEval 2's idea: fit
``P(win_i) = σ(a + b · tanh(Δlen_i / sd(Δlen)))`` on the outcomes and report ``σ(a)``, the win rate the
model would have with the same length as the reference. With equal lengths it equals the raw win rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Verdict = Literal["model", "reference", "tie"]
_VALUE = {"model": 1.0, "tie": 0.5, "reference": 0.0}


@dataclass(frozen=True)
class Judgement:
    """Both orders of one prompt's comparison, and the answers' lengths (tokens or characters)."""

    prompt_id: str
    model_first: Verdict  # verdict when the model's answer was shown first
    reference_first: Verdict  # verdict when the reference's answer was shown first
    model_length: float
    reference_length: float


@dataclass(frozen=True)
class WinRate:
    value: float
    ci_low: float
    ci_high: float
    n: int


def outcomes(judgements: Sequence[Judgement]) -> np.ndarray:
    """Per-prompt outcome in {0, 0.25, 0.5, 0.75, 1}: the mean of the two orders."""
    return np.array(
        [(_VALUE[j.model_first] + _VALUE[j.reference_first]) / 2 for j in judgements], dtype=float
    )


def position_consistency(judgements: Sequence[Judgement]) -> float:
    """Share of prompts whose two orders gave the same verdict."""
    if not judgements:
        return float("nan")
    return float(np.mean([j.model_first == j.reference_first for j in judgements]))


def _length_feature(judgements: Sequence[Judgement]) -> np.ndarray:
    diff = np.array([j.model_length - j.reference_length for j in judgements], dtype=float)
    scale = diff.std()
    return np.tanh(diff / scale) if scale > 0 else np.zeros_like(diff)


def lc_intercept(y: np.ndarray, z: np.ndarray, iterations: int = 50) -> float:
    """σ(a) of the logistic fit ``y ~ σ(a + b z)`` with soft labels ``y ∈ [0, 1]`` (Newton's method)."""
    mean = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    theta = np.array([np.log(mean / (1 - mean)), 0.0])
    design = np.stack([np.ones_like(z), z], axis=1)
    ridge = 1e-6 * np.eye(2)  # keeps the Hessian invertible when z is constant
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(design @ theta)))
        gradient = design.T @ (y - p)
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + ridge
        step = np.linalg.solve(hessian, gradient)
        theta = theta + step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-theta[0])))


def _bootstrap(
    statistic: Callable[[np.ndarray], float], n: int, samples: int, seed: int
) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = np.sort([statistic(rng.integers(0, n, size=n)) for _ in range(samples)])
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def win_rate(judgements: Sequence[Judgement], *, bootstrap: int = 1000, seed: int = 0) -> WinRate:
    """Mean outcome over prompts with a percentile-bootstrap 95% interval."""
    y = outcomes(judgements)
    if y.size == 0:
        return WinRate(float("nan"), float("nan"), float("nan"), 0)
    low, high = _bootstrap(lambda idx: y[idx].mean(), y.size, bootstrap, seed)
    return WinRate(float(y.mean()), low, high, int(y.size))


def lc_win_rate(judgements: Sequence[Judgement], *, bootstrap: int = 1000, seed: int = 0) -> WinRate:
    """Length-controlled win rate with a bootstrap interval (the fit is redone on every resample)."""
    y, z = outcomes(judgements), _length_feature(judgements)
    if y.size == 0:
        return WinRate(float("nan"), float("nan"), float("nan"), 0)
    low, high = _bootstrap(lambda idx: lc_intercept(y[idx], z[idx]), y.size, bootstrap, seed)
    return WinRate(lc_intercept(y, z), low, high, int(y.size))


def score_judgements(
    prompt_ids: Sequence[str],
    model_scores: Sequence[float],
    reference_scores: Sequence[float],
    model_lengths: Sequence[float],
    reference_lengths: Sequence[float],
) -> list[Judgement]:
    """Judgements from pointwise scores (a reward model or a verifiable scorer): order cannot matter."""
    out = []
    for pid, ms, rs, ml, rl in zip(
        prompt_ids, model_scores, reference_scores, model_lengths, reference_lengths, strict=True
    ):
        verdict: Verdict = "model" if ms > rs else "reference" if ms < rs else "tie"
        out.append(Judgement(pid, verdict, verdict, float(ml), float(rl)))
    return out
