from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.winrate import (
    Judgement,
    lc_intercept,
    lc_win_rate,
    outcomes,
    position_consistency,
    score_judgements,
    win_rate,
)


def _j(pid: str, first: str, second: str, ml: float = 10, rl: float = 10) -> Judgement:
    return Judgement(pid, first, second, ml, rl)  # type: ignore[arg-type]


def test_hand_built_table_with_ties_and_position_inconsistency() -> None:
    table = [
        _j("a", "model", "model"),  # 1
        _j("b", "reference", "reference"),  # 0
        _j("c", "tie", "tie"),  # 0.5
        _j("d", "model", "reference"),  # inconsistent -> 0.5
        _j("e", "model", "tie"),  # 0.75
        _j("f", "reference", "tie"),  # 0.25
    ]
    assert outcomes(table).tolist() == [1.0, 0.0, 0.5, 0.5, 0.75, 0.25]
    result = win_rate(table, bootstrap=2000, seed=1)
    assert result.value == pytest.approx(3.0 / 6)
    assert result.n == 6
    # Bootstrap bounds of a mean of values in [0, 1] lie inside the observed range and around the mean.
    assert 0.0 <= result.ci_low < 0.5 < result.ci_high <= 1.0
    assert position_consistency(table) == pytest.approx(3 / 6)


def test_interval_bounds_are_exact_for_a_constant_table() -> None:
    table = [_j(str(i), "model", "model") for i in range(20)]
    result = win_rate(table, bootstrap=200)
    assert (result.value, result.ci_low, result.ci_high) == (1.0, 1.0, 1.0)


def test_lc_win_rate_equals_raw_when_lengths_match() -> None:
    table = [_j(str(i), v, v) for i, v in enumerate(["model"] * 7 + ["reference"] * 3 + ["tie"] * 2)]
    raw = win_rate(table, bootstrap=100)
    lc = lc_win_rate(table, bootstrap=100)
    assert lc.value == pytest.approx(raw.value, abs=1e-6)


def test_lc_win_rate_discounts_wins_explained_by_length() -> None:
    rng = np.random.default_rng(0)
    table = []
    for i in range(400):
        longer = bool(rng.random() < 0.5)
        # The judge prefers the longer answer 80% of the time, whatever the model: no real skill.
        wins = rng.random() < (0.8 if longer else 0.2)
        verdict = "model" if wins else "reference"
        table.append(_j(str(i), verdict, verdict, ml=60 if longer else 20, rl=40))
    skewed = [j for j in table if j.model_length > j.reference_length] + [
        j for j in table if j.model_length < j.reference_length
    ][:60]
    raw = win_rate(skewed, bootstrap=50).value
    lc = lc_win_rate(skewed, bootstrap=50).value
    assert raw > 0.6  # mostly longer answers: the raw win rate looks good
    assert abs(lc - 0.5) < abs(raw - 0.5)  # length control pulls it back towards no skill


def test_lc_intercept_matches_the_mean_for_a_constant_feature() -> None:
    y = np.array([1.0, 0.0, 1.0, 0.5])
    assert lc_intercept(y, np.zeros(4)) == pytest.approx(y.mean(), abs=1e-8)


def test_pointwise_scores_give_order_independent_verdicts() -> None:
    table = score_judgements(["a", "b", "c"], [0.9, 0.1, 0.5], [0.2, 0.3, 0.5], [5, 5, 5], [5, 5, 5])
    assert [(j.model_first, j.reference_first) for j in table] == [
        ("model", "model"),
        ("reference", "reference"),
        ("tie", "tie"),
    ]
    assert position_consistency(table) == 1.0
