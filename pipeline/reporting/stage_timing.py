"""Where the time went: per-stage wall time, tokens/s and engine starts of a run, from measured timestamps
(docs/method.md §Training throughput).

Stages record themselves with :func:`timed_stage` (wall-clock start and end, the rows and tokens of what they
produced, the inference engines they started) as one JSON line each in
``<workspace>/timings/<flow run id>.jsonl``; the run report and the Prefect artifact read them back with
:func:`read_timings` and format them with :func:`stage_table`. A stage whose dataset was reused records
its (short) lookup, marked reused.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TIMINGS_DIR = "timings"
# Columns whose sum is a dataset's tokens: generated tokens, trained tokens, scored tokens.
TOKEN_COLUMNS = {
    "generations": ("trace_tokens", "answer_tokens"),
    "eval_generations": ("trace_tokens", "answer_tokens"),
    "train_metrics": ("tokens",),
    "ref_logps": ("prompt_tokens", "chosen_tokens", "rejected_tokens"),
}

_engine_starts = 0
_engine_lock = threading.Lock()


def note_engine_start() -> None:
    """Count one inference-engine start (vLLM) in this process; :func:`timed_stage` records the count."""
    global _engine_starts
    with _engine_lock:
        _engine_starts += 1


def engine_starts() -> int:
    return _engine_starts


@dataclass
class StageTiming:
    """One stage of one flow run."""

    stage: str
    started_at: float  # Unix time
    seconds: float
    rows: int | None = None
    tokens: int | None = None
    engine_starts: int = 0
    reused: bool = False
    failed: bool = False
    flow_run_id: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        if not self.tokens or self.seconds <= 0 or self.reused:
            return None
        return self.tokens / self.seconds


@dataclass
class _Recorder:
    stage: str
    rows: int | None = None
    tokens: int | None = None
    reused: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def produced(self, kind: str, table: Any) -> None:
        """Take the rows and tokens of a produced Arrow table of dataset kind ``kind``."""
        self.rows = int(table.num_rows)
        columns = [c for c in TOKEN_COLUMNS.get(kind, ()) if c in table.column_names]
        if columns:
            self.tokens = sum(int(table.column(c).fill_null(0).to_numpy().sum()) for c in columns)


def timings_path(workspace: Path, flow_run_id: str | None) -> Path:
    return Path(workspace) / TIMINGS_DIR / f"{flow_run_id or 'no-flow-run'}.jsonl"


@contextlib.contextmanager
def timed_stage(workspace: Path, flow_run_id: str | None, stage: str) -> Iterator[_Recorder]:
    """Time the body as ``stage`` and append its record (also when it fails, marked failed)."""
    recorder = _Recorder(stage)
    started, clock, engines = time.time(), time.perf_counter(), engine_starts()
    failed = True
    try:
        yield recorder
        failed = False
    finally:
        record = StageTiming(
            stage=stage,
            started_at=started,
            seconds=time.perf_counter() - clock,
            rows=recorder.rows,
            tokens=recorder.tokens,
            engine_starts=engine_starts() - engines,
            reused=recorder.reused,
            failed=failed,
            flow_run_id=flow_run_id,
        )
        line = json.dumps(asdict(record)) + "\n"
        # The root flow run's file too, so a parent flow's artifact sees the stages of its subflows.
        for run_id in dict.fromkeys([flow_run_id, _root_flow_run_id()]):
            if run_id is None and flow_run_id is not None:
                continue
            path = timings_path(workspace, run_id)
            with contextlib.suppress(OSError):  # timing is a report, never a reason to fail a stage
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a", encoding="utf-8") as handle:
                    handle.write(line)


_root_lookup: Callable[[], str | None] | None = None


def set_root_flow_run_lookup(lookup: Callable[[], str | None]) -> None:
    """How to find the root flow run of the current one; the orchestration layer (tasks/) installs it."""
    global _root_lookup
    _root_lookup = lookup


def _root_flow_run_id() -> str | None:
    return _root_lookup() if _root_lookup is not None else None


def read_timings(workspace: Path, flow_run_ids: Iterable[str]) -> list[StageTiming]:
    """The records of these flow runs, in start order, each once; unreadable lines are skipped."""
    out: dict[tuple[str, float, str | None], StageTiming] = {}
    for run_id in dict.fromkeys(flow_run_ids):
        path = timings_path(workspace, run_id)
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                timing = StageTiming(**json.loads(line))
            except (ValueError, TypeError):
                continue
            out[(timing.stage, timing.started_at, timing.flow_run_id)] = timing
    return sorted(out.values(), key=lambda t: t.started_at)


def stage_table(timings: Sequence[StageTiming]) -> list[dict[str, Any]]:
    """One row per stage record, plus a total: wall time, its share, tokens, tokens/s, engine starts."""
    if not timings:
        return []
    first = min(t.started_at for t in timings)
    last = max(t.started_at + t.seconds for t in timings)
    span = last - first
    rows: list[dict[str, Any]] = []
    for t in timings:
        rate = t.tokens_per_s
        rows.append(
            {
                "stage": t.stage + (" (reused)" if t.reused else "") + (" (failed)" if t.failed else ""),
                "start_s": round(t.started_at - first, 1),
                "wall_s": round(t.seconds, 1),
                "share": t.seconds / span if span > 0 else None,
                "rows": t.rows,
                "tokens": t.tokens,
                "tokens_per_s": round(rate, 1) if rate is not None else None,
                "engine_starts": t.engine_starts,
            }
        )
    staged = sum(t.seconds for t in timings)
    rows.append(
        {
            "stage": "total (first start to last end)",
            "start_s": 0.0,
            "wall_s": round(span, 1),
            "share": 1.0 if span > 0 else None,
            "rows": None,
            "tokens": None,
            "tokens_per_s": None,
            "engine_starts": sum(t.engine_starts for t in timings),
            "outside_stages_s": round(max(0.0, span - staged), 1),
        }
    )
    return rows


def stage_markdown(timings: Sequence[StageTiming]) -> list[str]:
    """The table as Markdown lines (empty when nothing was recorded)."""
    rows = stage_table(timings)
    if not rows:
        return []
    total = rows[-1]
    lines = [
        "| stage | starts at (s) | wall time (s) | share | rows | tokens | tokens/s | engine starts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{r['share']:.0%}" if r["share"] is not None else "-"
        lines.append(
            f"| {r['stage']} | {r['start_s']} | {r['wall_s']} | {share} | {_dash(r['rows'])} | "
            f"{_dash(r['tokens'])} | {_dash(r['tokens_per_s'])} | {r['engine_starts']} |"
        )
    lines += [
        "",
        f"Measured timestamps of each stage; {total['outside_stages_s']} s of the span ran outside any "
        "timed stage (flow start, plots, reports, artifacts). Tokens: generated (generation, evaluation), "
        "trained (training: prompt + response of every sequence), scored (reference log-probs).",
    ]
    return lines


def report_section(workspace: Path, flow_run_ids: Iterable[str]) -> list[str]:
    """The run report's "Where the time went" section (empty when the runs recorded no timings)."""
    table = stage_markdown(read_timings(workspace, flow_run_ids))
    return ["", "## Where the time went", "", *table] if table else []


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)
