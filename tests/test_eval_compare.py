"""`bvpo compare`: eval_results of several runs in one table, found by dataset name or flow run id; the
round column and the score-per-round chart when the evaluated models span training rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from flows.cli import app
from pipeline.evaluation.metrics import summarize
from pipeline.evaluation.report import (
    comparison_markdown,
    rounds_chart_path,
    rounds_compared,
    write_comparison_report,
)
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


def _round_rows(run: str, trained_round: int, trained_score: float) -> list[dict[str, Any]]:
    """Hand-built eval_results rows of one evaluation: the base model (round 0) and one checkpoint."""
    return [
        {
            "model_label": f"{run}/{label}", "model": f"m-{label}", "mode": mode, "metric": "score",
            "value": value, "ci_low": value - 0.1, "ci_high": value + 0.1, "n": 4, "round": rnd,
        }
        for label, rnd, value in (("reference", 0, 0.25), ("trained", trained_round, trained_score))
        for mode in ("trace", "empty")
    ]  # fmt: skip


def test_the_table_has_a_round_column_only_when_the_models_span_rounds() -> None:
    one = _round_rows("v1", 1, 0.5)
    assert rounds_compared(one) == [1]
    assert comparison_markdown(one).splitlines()[0] == "| model | mode | score |"
    both = one + _round_rows("v2", 2, 0.75)
    assert rounds_compared(both) == [1, 2]
    lines = comparison_markdown(both).splitlines()
    assert lines[0] == "| model | round | mode | score |" and lines[1] == "|---|---|---|---|"
    assert "| v2/trained | 2 | trace | 0.750 [0.650, 0.850] |" in lines
    assert "| v1/reference | 0 | empty | 0.250 [0.150, 0.350] |" in lines
    unknown = [{**r, "round": None} if r["model_label"] == "v2/trained" else r for r in both]
    assert "| model | mode | score |" in comparison_markdown(unknown)  # one known round: no column


def test_the_report_of_rounds_links_a_score_per_round_chart(tmp_path: Path) -> None:
    rows = _round_rows("v1", 1, 0.5) + _round_rows("v2", 2, 0.75)
    markdown, _ = write_comparison_report(rows, tmp_path / "cmp")
    by_round = rounds_chart_path(tmp_path / "cmp")
    assert by_round == tmp_path / "cmp-rounds.png" and by_round.read_bytes()[:4] == b"\x89PNG"
    assert f"![score per training round]({by_round.name})" in markdown.read_text()
    single, _ = write_comparison_report(_round_rows("v1", 1, 0.5), tmp_path / "one")
    assert not rounds_chart_path(tmp_path / "one").exists() and "-rounds.png" not in single.read_text()


def test_compare_across_rounds_shows_the_round_and_writes_its_plot(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path / "ws")
    for rnd, scores in ((1, [1.0, 1.0, 0.0, 0.0]), (2, [1.0, 1.0, 1.0, 1.0])):
        table = _results(scores).to_pylist()
        rows = [{**r, "round": 0 if r["model_label"] == "reference" else rnd} for r in table]
        store.put("eval_results", pa.Table.from_pylist(rows, schema=schema_for("eval_results")),
                  config={"round": rnd}, parents=[], flow_run_id=f"run-{rnd}")  # fmt: skip
    out = tmp_path / "reports" / "rounds"
    result = CliRunner().invoke(
        app, ["compare", "eval_results__v1", "eval_results__v2", "-w", str(tmp_path / "ws"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "| eval_results__v2/trained | 2 | trace | 1.000 [" in result.output
    assert "| eval_results__v1/trained | 1 | trace | 0.500 [" in result.output
    assert rounds_chart_path(out).read_bytes()[:4] == b"\x89PNG"
    assert rounds_chart_path(out).name in result.output.replace("\n", "")


def test_an_evaluation_registered_before_the_round_column_reads_it_as_null(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path)
    ref = store.put("eval_results", _results([1.0, 0.0, 0.0, 0.0]), config={}, parents=[])
    part = Path(ref.path) / "part-00000.parquet"
    pq.write_table(pq.read_table(part).drop(["round"]), part)  # as written before the column existed
    rows = store.read_rows(ref)
    assert rows and {r["round"] for r in rows} == {None}
    assert comparison_markdown(rows).startswith("| model | mode |")
