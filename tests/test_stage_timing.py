"""Stage-timing table: measured wall times, tokens/s and engine starts per stage of a run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.reporting import stage_timing
from pipeline.reporting.stage_timing import (
    note_engine_start,
    read_timings,
    report_section,
    stage_table,
    timed_stage,
    timings_path,
)


def test_a_stage_records_its_wall_time_rows_tokens_and_engine_starts(tmp_path: Path) -> None:
    with timed_stage(tmp_path, "run-1", "generations") as timing:
        time.sleep(0.05)
        note_engine_start()
        timing.produced("generations", pa.table({"trace_tokens": [10, 20], "answer_tokens": [5, None]}))
    (record,) = read_timings(tmp_path, ["run-1"])
    assert record.stage == "generations" and record.seconds >= 0.05
    assert (record.rows, record.tokens, record.engine_starts) == (2, 35, 1)
    assert not record.reused and not record.failed
    assert record.tokens_per_s == pytest.approx(35 / record.seconds)


def test_a_failed_stage_is_recorded_and_still_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), timed_stage(tmp_path, "run-1", "train_metrics"):
        raise RuntimeError("boom")
    (record,) = read_timings(tmp_path, ["run-1"])
    assert record.failed and record.tokens_per_s is None


def test_subflow_stages_reach_the_root_run_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stage_timing, "_root_flow_run_id", lambda: "root")
    with timed_stage(tmp_path, "child-a", "prompts") as t:
        t.reused, t.rows = True, 7
    with timed_stage(tmp_path, "child-b", "evaluation"):
        pass
    assert [t.stage for t in read_timings(tmp_path, ["root"])] == ["prompts", "evaluation"]
    # Reading the root and a child together does not count the child's stage twice.
    assert len(read_timings(tmp_path, ["root", "child-a", "child-b"])) == 2


def test_table_has_shares_a_total_and_the_time_outside_stages(tmp_path: Path) -> None:
    path = timings_path(tmp_path, "r")
    path.parent.mkdir(parents=True)
    records = [
        {"stage": "generations", "started_at": 100.0, "seconds": 30.0, "tokens": 600, "engine_starts": 1},
        {"stage": "train_metrics", "started_at": 140.0, "seconds": 50.0, "tokens": 1000},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    rows = stage_table(read_timings(tmp_path, ["r"]))
    assert [r["stage"] for r in rows] == ["generations", "train_metrics", "total (first start to last end)"]
    assert rows[0]["tokens_per_s"] == 20.0 and rows[1]["start_s"] == 40.0
    assert rows[-1]["wall_s"] == 90.0 and rows[-1]["outside_stages_s"] == 10.0
    assert rows[-1]["engine_starts"] == 1 and rows[1]["share"] == pytest.approx(50 / 90)
    section = report_section(tmp_path, ["r"])
    assert section[1] == "## Where the time went" and any(
        "| generations | 0.0 | 30.0 |" in s for s in section
    )
    assert report_section(tmp_path, ["other"]) == []
