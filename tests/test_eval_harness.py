"""lm-eval harness runs: the command line, and reading its results file into eval_results rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.evaluation.harness import (
    HarnessUnavailable,
    LmEvalRun,
    harness_available,
    read_results,
    run_lm_eval,
)


def test_command_uses_the_vllm_backend_with_chat_template_and_trace_stripping(tmp_path: Path) -> None:
    command = LmEvalRun("/ckpt/v1", tmp_path, limit=50, tensor_parallel_size=2).command()
    assert command[:3] == ["lm_eval", "--model", "vllm"]
    args = dict(kv.split("=", 1) for kv in command[command.index("--model_args") + 1].split(","))
    assert args["pretrained"] == "/ckpt/v1" and args["tensor_parallel_size"] == "2"
    assert args["think_end_token"] == "</think>"
    assert command[command.index("--tasks") + 1] == "gsm8k,minerva_math500"
    assert "--apply_chat_template" in command and command[-2:] == ["--limit", "50"]
    no_think = LmEvalRun("/ckpt", tmp_path, think_end_token=None).command()
    assert "think_end_token" not in no_think[no_think.index("--model_args") + 1]


def test_results_become_rows_with_normal_intervals(tmp_path: Path) -> None:
    out = tmp_path / "run" / "ckpt"
    out.mkdir(parents=True)
    (out / "results_2026-11-26.json").write_text(
        json.dumps(
            {
                "results": {
                    "gsm8k": {
                        "alias": "gsm8k",
                        "exact_match,strict-match": 0.5,
                        "exact_match_stderr,strict-match": 0.1,
                        "exact_match,flexible-extract": 0.6,
                        "exact_match_stderr,flexible-extract": "N/A",
                    }
                },
                "n-samples": {"gsm8k": {"original": 1319, "effective": 25}},
            }
        )
    )
    rows = {r["metric"]: r for r in read_results(tmp_path, label="trained", model="/ckpt")}
    strict = rows["gsm8k/exact_match,strict-match"]
    assert strict["value"] == 0.5 and strict["n"] == 25 and strict["mode"] == "harness"
    assert strict["ci_low"] == pytest.approx(0.5 - 0.196) and strict["ci_high"] == pytest.approx(0.5 + 0.196)
    assert rows["gsm8k/exact_match,flexible-extract"]["ci_low"] is None
    assert len(rows) == 2


def test_missing_results_and_missing_harness_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no lm-eval results"):
        read_results(tmp_path, label="x", model="y")
    if not harness_available():
        with pytest.raises(HarnessUnavailable, match="pip install"):
            run_lm_eval(LmEvalRun("/ckpt", tmp_path))


def test_cli_dry_run_prints_the_command() -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(
        app, ["lm-eval", "/ckpt/v1", "--tasks", "gsm8k", "--limit", "10", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("lm_eval --model vllm --model_args 'pretrained=/ckpt/v1,")
    assert "--tasks gsm8k" in result.output and "--limit 10" in result.output
