"""Paired bootstrap, minimum detectable difference and seed spread (pipeline/evaluation/paired.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation.paired import (
    best_baseline,
    minimum_detectable_difference,
    paired_bootstrap,
    per_prompt_scores,
    prompts_needed,
    seed_spread,
)


def test_paired_bootstrap_matches_the_hand_computed_distribution() -> None:
    # Differences (0, 0, 0, 1): a resample's mean is K/4 with K ~ Binomial(4, 1/4), so
    # P(K ≤ 0) = 81/256 = .316, P(K ≤ 1) = .738, P(K ≤ 2) = .949, P(K ≤ 3) = .996.
    # 95% interval: 2.5% quantile 0, 97.5% quantile 3/4; 50% interval: 25% quantile 0, 75% quantile 1/2.
    arm = {"a": 1.0, "b": 0.5, "c": 0.0, "d": 1.0}
    reference = {"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.0, "only-here": 1.0}
    diff = paired_bootstrap(arm, reference, samples=20000, seed=3)
    assert diff.n == 4
    assert diff.mean == pytest.approx(0.25)
    assert (diff.ci_low, diff.ci_high) == (0.0, 0.75)
    half = paired_bootstrap(arm, reference, samples=20000, seed=3, level=0.5)
    assert (half.ci_low, half.ci_high) == (0.0, 0.5)
    # SD of (0, 0, 0, 1) with ddof 1 is 0.5; MDE = 2.8016 · 0.5 / √4.
    assert diff.sd == pytest.approx(0.5)
    assert diff.mde == pytest.approx(2.801585 * 0.5 / 2, abs=1e-5)
    assert not diff.significant  # the interval touches 0


def test_paired_interval_is_narrower_than_unpaired_when_scores_correlate() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 200)
    arm = {str(i): float(b + 0.05) for i, b in enumerate(base)}  # uniformly better by 0.05
    ref = {str(i): float(b) for i, b in enumerate(base)}
    diff = paired_bootstrap(arm, ref, samples=2000, seed=0)
    assert diff.mean == pytest.approx(0.05)
    assert diff.significant and diff.ci_high - diff.ci_low < 1e-9


def test_mde_without_any_differing_prompt_assumes_uncorrelated_scores() -> None:
    same = {"a": 0.0, "b": 1.0, "c": 0.0, "d": 0.0}  # variance (ddof 1) 0.25 each
    diff = paired_bootstrap(same, dict(same), samples=200)
    assert diff.sd == 0.0 and diff.mean == 0.0
    assert diff.mde == pytest.approx(2.801585 * math.sqrt(0.5) / 2, abs=1e-5)


def test_no_shared_prompt_is_an_error() -> None:
    with pytest.raises(ValueError, match="share no"):
        paired_bootstrap({"a": 1.0}, {"b": 0.0})


def test_mde_closed_form() -> None:
    # (z_.975 + z_.80) = 1.959964 + 0.841621 = 2.801585
    assert minimum_detectable_difference(0.5, 49) == pytest.approx(2.801585 * 0.5 / 7, abs=1e-6)
    assert minimum_detectable_difference(0.3, 100, level=0.90, power=0.5) == pytest.approx(
        1.644854 * 0.3 / 10, abs=1e-6
    )
    assert minimum_detectable_difference(0.5, 0) == math.inf
    assert prompts_needed(0.1, 0.5) == 197  # ceil((2.801585 · 0.5 / 0.1)²) = ceil(196.2)


def test_a_true_difference_of_one_mde_is_detected_with_80_percent_power() -> None:
    rng = np.random.default_rng(1)
    n, sd = 200, 0.4
    mde = minimum_detectable_difference(sd, n)
    hits = 0
    trials = 2000
    for _ in range(trials):
        d = rng.normal(mde, sd, n)
        hits += abs(d.mean()) / (d.std(ddof=1) / math.sqrt(n)) > 1.959964
    assert 0.76 < hits / trials < 0.84


def test_per_prompt_scores_pool_samples_and_seeds() -> None:
    rows = [
        {"prompt_id": "p", "score": 1.0, "seed": 0},
        {"prompt_id": "p", "score": 0.0, "seed": 1},
        {"prompt_id": "p", "score": 0.5, "seed": 1},
        {"prompt_id": "q", "score": 0.25, "seed": 0},
    ]
    assert per_prompt_scores(rows) == {"p": 0.5, "q": 0.25}


def test_seed_spread_and_best_baseline() -> None:
    spread = seed_spread({1: {"a": 0.6, "b": 0.8}, 0: {"a": 0.4, "b": 0.6}})
    assert spread.means == pytest.approx((0.5, 0.7))
    assert spread.sd == pytest.approx(math.sqrt(0.02))
    assert spread.range == pytest.approx(0.2)
    assert seed_spread({0: {"a": 1.0}}).sd == 0.0
    arms = {"alpha=0": {"a": 0.2, "b": 0.4}, "alpha=1": {"a": 0.5, "b": 0.5}}
    assert best_baseline(arms, ["alpha=0", "alpha=1"]) == "alpha=1"
    assert best_baseline(arms, ["alpha=0"]) == "alpha=0"
    assert best_baseline({}, ["alpha=0", "alpha=1"]) is None


def test_summary_and_reports_state_the_mde(tmp_path: Path) -> None:
    from pipeline.evaluation.metrics import summarize
    from pipeline.evaluation.report import comparison_markdown, power_lines, write_comparison_report

    rows = [
        {"model_label": label, "model": label, "mode": "trace", "prompt_id": f"p{i}", "score": s,
         "answer_tokens": 5, "trace_tokens": 3}
        for label, scores in (("reference", [0, 0, 0, 0]), ("trained", [0, 0, 0, 1]))
        for i, s in enumerate(scores)
    ]  # fmt: skip
    results = summarize(rows, reference_label="reference", bootstrap_samples=2000, seed=0)
    by = {(r["model_label"], r["metric"]): r for r in results}
    assert by[("trained", "score_diff_vs_reference")]["value"] == pytest.approx(0.25)
    assert by[("trained", "mde_vs_reference")]["value"] == pytest.approx(2.801585 * 0.5 / 2, abs=1e-5)
    assert ("reference", "mde_vs_reference") not in by
    assert "mde_vs_reference" not in comparison_markdown(results)  # prose, not a column
    (sentence,) = power_lines(results)
    assert "trace: 0.700 on 4 prompts" in sentence
    markdown, _ = write_comparison_report(results, tmp_path / "r")
    assert "Minimum detectable difference" in markdown.read_text()
