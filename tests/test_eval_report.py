from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.evaluation.metrics import summarize
from pipeline.evaluation.report import comparison_chart, comparison_markdown


def _rows() -> list[dict[str, object]]:
    rows = []
    for label, scores in (("reference", [0.0, 1.0, 0.5, 0.0]), ("trained", [1.0, 1.0, 0.5, 0.0])):
        for mode in ("trace", "empty"):
            for i, score in enumerate(scores):
                rows.append(
                    {
                        "model_label": label, "model": f"m-{label}", "mode": mode, "prompt_id": f"p{i}",
                        "score": score, "answer_tokens": 10, "trace_tokens": 5 if mode == "trace" else 0,
                    }
                )  # fmt: skip
    return rows


def test_summary_has_valid_ranges_and_win_rates() -> None:
    results = summarize(_rows(), reference_label="reference", bootstrap_samples=200, seed=0)
    by_key = {(r["model_label"], r["mode"], r["metric"]): r for r in results}
    win = by_key[("trained", "trace", "win_rate_vs_reference")]
    assert win["value"] == 0.625  # one win, three ties of four prompts
    # Equal lengths: the length-controlled win rate equals the raw one.
    assert by_key[("trained", "trace", "lc_win_rate_vs_reference")]["value"] == pytest.approx(0.625, abs=1e-6)
    assert ("reference", "trace", "win_rate_vs_reference") not in by_key
    for r in results:
        if r["metric"] in ("score", "win_rate_vs_reference", "lc_win_rate_vs_reference"):
            assert 0.0 <= r["ci_low"] <= r["value"] <= r["ci_high"] <= 1.0


def test_markdown_table_and_chart(tmp_path: Path) -> None:
    results = summarize(_rows(), reference_label="reference", bootstrap_samples=50, seed=0)
    table = comparison_markdown(results)
    assert table.splitlines()[0].startswith("| model | mode | score | win_rate_vs_reference")
    assert "| trained | trace | 0.625 [" in table
    png = comparison_chart(results, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_files_name_every_model(tmp_path: Path) -> None:
    from pipeline.evaluation.report import write_comparison_report

    results = summarize(_rows(), reference_label="reference", bootstrap_samples=50, seed=0)
    markdown, chart = write_comparison_report(results, tmp_path / "reports" / "eval_results-abc")
    text = markdown.read_text()
    assert markdown.name == "eval_results-abc.md" and chart.name == "eval_results-abc.png"
    assert "| reference | `m-reference` |" in text and "| trained | `m-trained` |" in text
    assert f"]({chart.name})" in text and chart.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "alpha,expected",
    [
        (0.5, ["dpo_trace", "dpo_empty"]),
        (1.0, ["dpo_empty"]),
        ("dpo_empty", ["dpo_trace"]),
        (0.0, ["dpo_trace"]),
    ],
)
def test_baselines_are_trained_unless_the_run_is_one(alpha: float | str, expected: list[str]) -> None:
    from flows.pipeline import alpha_label, baseline_config, baselines_to_train
    from pipeline.config import PipelineConfig

    config = PipelineConfig.model_validate({"train": {"alpha": alpha, "max_steps": 7}})
    assert baselines_to_train(config) == expected
    assert (
        baselines_to_train(
            config.model_copy(update={"eval": config.eval.model_copy(update={"baselines": False})})
        )
        == []
    )
    for name in expected:
        baseline = baseline_config(config, name)
        assert baseline.train.alpha == name and baseline.train.max_steps == 7
        assert alpha_label(baseline.train.alpha) == name
    assert (
        alpha_label(0.5) == "alpha=0.5"
        and alpha_label(1) == "dpo_trace"
        and alpha_label("auto") == "alpha=auto"
    )
