"""`bvpo compare`: eval_results of several runs in one table, found by dataset name or flow run id."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from typer.testing import CliRunner

from flows.cli import app
from pipeline.evaluation.metrics import summarize
from storage import DatasetStore, schema_for


def _results(trained_scores: list[float]) -> pa.Table:
    rows = []
    for label, scores in (("reference", [0.0, 1.0, 0.0, 0.0]), ("trained", trained_scores)):
        for mode in ("trace", "empty"):
            for i, score in enumerate(scores):
                rows.append(
                    {
                        "model_label": label, "model": f"m-{label}", "mode": mode, "prompt_id": f"p{i}",
                        "score": score, "answer_tokens": 10, "trace_tokens": 3,
                    }
                )  # fmt: skip
    summary = summarize(rows, reference_label="reference", bootstrap_samples=50, seed=0)
    return pa.Table.from_pylist(summary, schema=schema_for("eval_results"))


def _workspace(tmp_path: Path) -> Path:
    store = DatasetStore(tmp_path)
    store.put(
        "eval_results", _results([1.0, 1.0, 0.0, 0.0]), config={"run": 1}, parents=[], flow_run_id="run-a"
    )
    store.put(
        "eval_results", _results([1.0, 1.0, 1.0, 1.0]), config={"run": 2}, parents=[], flow_run_id="run-b"
    )
    return tmp_path


def test_compare_two_runs_prefixes_labels_and_writes_the_report(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path / "ws")
    out = tmp_path / "reports" / "cmp"
    result = CliRunner().invoke(
        app, ["compare", "eval_results__v1", "run-b", "-w", str(workspace), "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "| eval_results__v1/trained | trace | 0.500 [" in result.output
    assert "| eval_results__v2/trained | trace | 1.000 [" in result.output
    assert out.with_suffix(".md").read_text().count("eval_results__v2/") >= 2
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_compare_defaults_to_the_latest_evaluation(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["compare", "-w", str(_workspace(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "| trained | trace | 1.000 [" in result.output and "eval_results__v" not in result.output


def test_compare_errors_are_one_clear_line(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path / "ws")
    unknown = CliRunner().invoke(app, ["compare", "nope", "-w", str(workspace)])
    assert unknown.exit_code == 1 and "'nope' is neither a dataset nor the flow run" in unknown.output
    empty = CliRunner().invoke(app, ["compare", "-w", str(tmp_path / "empty")])
    assert empty.exit_code == 1 and "no catalog" in empty.output
    assert "Traceback" not in unknown.output + empty.output
