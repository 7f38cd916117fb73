"""The α study's numbers, report and eval-set sizing (pipeline/evaluation/study.py, flows/study.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import PipelineConfig
from pipeline.evaluation.study import Arm, alpha_key, arms_of, study_rows, write_study_report

PROMPTS = [f"p{i}" for i in range(8)]


def _answers(label: str, mode: str, scores: list[float]) -> list[dict[str, Any]]:
    return [
        {"model_label": label, "mode": mode, "prompt_id": pid, "score": s}
        for pid, s in zip(PROMPTS, scores, strict=True)
    ]


def _rows() -> tuple[list[dict[str, Any]], list[Arm], dict[str, list[dict[str, Any]]]]:
    arms = arms_of(["0", 1.0, "auto"], [0, 1])
    scores = {
        "reference": [0, 0, 0, 0, 1, 1, 0, 0],
        "alpha=0/seed=0": [0, 0, 0, 0, 1, 1, 0, 0],
        "alpha=0/seed=1": [0, 0, 0, 0, 1, 1, 0, 0],
        "alpha=1/seed=0": [1, 1, 0, 0, 1, 1, 0, 0],  # α = 1 beats α = 0 by 2/8 on seed 0 ...
        "alpha=1/seed=1": [1, 0, 0, 0, 1, 1, 0, 0],  # ... and 1/8 on seed 1: pooled 0.1875
        "alpha=auto/seed=0": [1, 1, 1, 1, 1, 1, 1, 1],
        "alpha=auto/seed=1": [1, 1, 1, 1, 1, 1, 1, 1],
    }
    rows = [r for label, s in scores.items() for mode in ("trace", "empty") for r in _answers(label, mode, s)]
    metrics = {
        a.label: [
            {"step": 1, "alpha": 0.5 if a.alpha == "auto" else float(a.alpha), "pairs_t": 2, "pairs_e": 2,
             "tokens": 100},
            {"step": 2, "alpha": 0.7 if a.alpha == "auto" else float(a.alpha), "pairs_t": 2, "pairs_e": 2,
             "tokens": 120},
        ]
        for a in arms
    }  # fmt: skip
    return rows, arms, metrics


def test_study_rows_pool_seeds_and_compare_paired() -> None:
    rows, arms, metrics = _rows()
    out = {(r["alpha"], r["mode"]): r for r in study_rows(rows, arms, metrics, samples=4000, seed=0)}
    assert set(out) == {(a, m) for a in ("reference", "0", "1", "auto") for m in ("trace", "empty")}
    ref, zero, one, auto = (out[(a, "trace")] for a in ("reference", "0", "1", "auto"))
    assert ref["score"] == 0.25 and ref["seeds"] == 0 and ref["diff_ref"] is None
    assert one["score"] == pytest.approx(0.4375)  # (4/8 + 3/8) / 2: seeds pooled per prompt
    assert one["diff_ref"] == pytest.approx(0.1875)
    assert one["seed_sd"] == pytest.approx(0.0883883, abs=1e-6)  # SD of (0.5, 0.375)
    assert zero["diff_ref"] == 0.0 and zero["diff_ref_low"] == 0.0 == zero["diff_ref_high"]
    # Identical to the reference on every prompt: the MDE falls back to uncorrelated scores, SD √(2 · 3/14).
    assert zero["mde_ref"] == pytest.approx(2.801585 * (2 * 3 / 14) ** 0.5 / 8**0.5, abs=1e-5)
    # The better baseline is α = 1; α = auto is compared with it, and α = 1 is not compared with itself.
    assert {r["best_baseline"] for r in out.values() if r["alpha"] != "reference"} == {"1"}
    assert one["diff_best"] is None
    assert auto["diff_best"] == pytest.approx(1 - 0.4375)
    assert auto["diff_best_low"] > 0  # every prompt is better: significant
    assert zero["diff_best"] == pytest.approx(-0.1875)
    assert auto["alpha_final"] == pytest.approx(0.7) and one["alpha_final"] == 1.0
    assert auto["pairs_per_step"] == 4 and auto["tokens_per_step"] == 110
    assert auto["n"] == 8 and auto["seeds"] == 2


def test_study_rows_need_every_arm_evaluated() -> None:
    rows, arms, metrics = _rows()
    missing = [
        r for r in rows if r["model_label"] != "alpha=0/seed=0" and r["model_label"] != "alpha=0/seed=1"
    ]
    with pytest.raises(ValueError, match="α=0"):
        study_rows(missing, arms, metrics, samples=100)


def test_study_report_has_tables_mde_and_chart(tmp_path: Path) -> None:
    rows, arms, metrics = _rows()
    results = study_rows(rows, arms, metrics, samples=500, seed=0)
    markdown, chart = write_study_report(results, tmp_path / "study")
    text = markdown.read_text()
    assert "## Reasoning on (trace)" in text and "## Reasoning off (empty)" in text
    assert "| auto | 0.700 | 1.000 [1.000, 1.000] |" in text
    assert "Minimum detectable difference" in text and "Pairs per optimizer step: 4" in text
    assert chart.read_bytes()[:4] == b"\x89PNG" and f"]({chart.name})" in text


def test_arms_and_alpha_keys() -> None:
    assert [a.label for a in arms_of([0, "0.50", "dpo_trace", "auto", 0.0], [3])] == [
        "alpha=0/seed=3", "alpha=0.5/seed=3", "alpha=1/seed=3", "alpha=auto/seed=3",
    ]  # fmt: skip
    assert alpha_key("dpo_empty") == "0"
    with pytest.raises(ValueError):
        alpha_key(1.5)
    with pytest.raises(ValueError, match="distinct"):
        arms_of([0], [1, 1])


def test_study_sizes_the_builtin_eval_set_and_keeps_the_train_prompts() -> None:
    from flows.study import arm_config, size_eval_set

    config = PipelineConfig()  # 64 built-in prompts, a quarter for evaluation: 48 train
    sized, planned = size_eval_set(config, None, target_mde=0.1, planning_sd=0.5)
    assert planned == 197  # ceil((2.8016 · 0.5 / 0.1)²)
    assert sized.prompts.num_prompts == 48 + 197
    assert sized.prompts.eval_fraction == pytest.approx(197 / 245)
    explicit, n = size_eval_set(config, 30, target_mde=0.1, planning_sd=0.5)
    assert n == 30 and explicit.prompts.num_prompts == 78
    external = config.model_copy(update={"prompts": config.prompts.model_copy(update={"source": "x.jsonl"})})
    assert size_eval_set(external, None, 0.1, 0.5) == (external, None)
    arm = arm_config(sized, Arm("0.25", 7))
    assert arm.train.alpha == 0.25 and arm.train.seed == 7 and arm.prompts == sized.prompts
    assert arm_config(sized, Arm("auto", 0)).train.alpha == "auto"
