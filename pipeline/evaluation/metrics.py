"""Evaluation metrics with percentile-bootstrap 95% intervals over prompts."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.evaluation.paired import paired_bootstrap
from pipeline.evaluation.winrate import (
    Judgement,
    lc_win_rate,
    position_consistency,
    score_judgements,
    win_rate,
)


def bootstrap_ci(values: Sequence[float], samples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(
    rows: Sequence[dict[str, Any]],
    *,
    reference_label: str,
    bootstrap_samples: int,
    seed: int,
    judgements: Mapping[tuple[str, str], Sequence[Judgement]] | None = None,
) -> list[dict[str, Any]]:
    """Rows of the ``eval_results`` schema from scored eval generations.

    ``judgements`` (per ``(model_label, mode)``, from a pairwise judge asked in both orders) replace the
    score comparison behind the win rates, and add ``judge_position_consistency`` (share of prompts whose
    two orders agreed).

    Metrics per model and mode: ``score`` (mean final-answer score per prompt), ``answer_tokens``,
    ``trace_tokens`` and, for models other than the reference, ``win_rate_vs_reference`` (per prompt: 1 if its
    mean score beats the reference's, 0.5 on a tie, 0 otherwise) and its length-controlled version
    ``lc_win_rate_vs_reference`` (:mod:`pipeline.evaluation.winrate`), ``score_diff_vs_reference`` (mean
    per-prompt score difference with a paired bootstrap interval) and ``mde_vs_reference`` (the eval set's
    minimum detectable difference at 95% / 80% power, from the SD of those differences;
    :mod:`pipeline.evaluation.paired`).
    """
    per_prompt: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    models: dict[str, str] = {}
    for row in rows:
        per_prompt[(row["model_label"], row["mode"])][row["prompt_id"]].append(row)
        models[row["model_label"]] = row["model"]

    def mean_of(key: str, group: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
        return {pid: float(np.mean([r[key] for r in items])) for pid, items in group.items()}

    out: list[dict[str, Any]] = []
    for (label, mode), group in sorted(per_prompt.items()):
        for metric, key in (
            ("score", "score"),
            ("answer_tokens", "answer_tokens"),
            ("trace_tokens", "trace_tokens"),
        ):
            values = list(mean_of(key, group).values())
            low, high = bootstrap_ci(values, bootstrap_samples, seed)
            out.append(
                _result(label, models[label], mode, metric, float(np.mean(values)), low, high, len(values))
            )
        reference = per_prompt.get((reference_label, mode))
        if label != reference_label and reference is not None:
            mine, theirs = mean_of("score", group), mean_of("score", reference)
            my_len, their_len = mean_of("answer_tokens", group), mean_of("answer_tokens", reference)
            shared = sorted(set(mine) & set(theirs))
            if shared:  # paired over prompts, with the eval set's minimum detectable difference
                diff = paired_bootstrap(mine, theirs, samples=bootstrap_samples, seed=seed)
                out.append(
                    _result(label, models[label], mode, "score_diff_vs_reference", diff.mean,
                            diff.ci_low, diff.ci_high, diff.n)
                )  # fmt: skip
                out.append(
                    _result(label, models[label], mode, "mde_vs_reference", diff.mde, None, None, diff.n)
                )
            judged = (judgements or {}).get((label, mode))
            verdicts = (
                list(judged)
                if judged is not None
                else score_judgements(
                    shared,
                    [mine[p] for p in shared],
                    [theirs[p] for p in shared],
                    [my_len[p] for p in shared],
                    [their_len[p] for p in shared],
                )
            )
            if judged:
                agreed = [float(j.model_first == j.reference_first) for j in judged]
                low, high = bootstrap_ci(agreed, bootstrap_samples, seed)
                out.append(
                    _result(
                        label,
                        models[label],
                        mode,
                        "judge_position_consistency",
                        position_consistency(judged),
                        low,
                        high,
                        len(agreed),
                    )
                )
            if verdicts:
                for metric, rate in (
                    ("win_rate_vs_reference", win_rate(verdicts, bootstrap=bootstrap_samples, seed=seed)),
                    (
                        "lc_win_rate_vs_reference",
                        lc_win_rate(verdicts, bootstrap=bootstrap_samples, seed=seed),
                    ),
                ):
                    out.append(
                        _result(
                            label, models[label], mode, metric, rate.value, rate.ci_low, rate.ci_high, rate.n
                        )
                    )
    return out


def _result(
    label: str,
    model: str,
    mode: str,
    metric: str,
    value: float,
    low: float | None,
    high: float | None,
    n: int,
) -> dict[str, Any]:
    return {
        "model_label": label,
        "model": model,
        "mode": mode,
        "metric": metric,
        "value": value,
        "ci_low": low,
        "ci_high": high,
        "n": n,
    }
