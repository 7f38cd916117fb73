"""Aggregates of one run's datasets for the run report, each one read-only SQL query over the catalog."""

from __future__ import annotations

from typing import Any

from storage import DatasetStore, run_readonly_query
from storage.runs import Entry, RunDatasets


class RunStats:
    """Aggregates of the run's datasets, through the read-only SQL interface (one query each)."""

    def __init__(self, store: DatasetStore, run: RunDatasets) -> None:
        self.store = store
        self.run = run

    def query(self, sql: str) -> list[dict[str, Any]]:
        columns, rows = run_readonly_query(self.store.catalog, self.store.lake, sql)
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def rows(self, entry: Entry | None) -> list[dict[str, Any]]:
        if entry is None:
            return []
        return self.query(f'SELECT * FROM "{entry.name}"')

    def prompts(self) -> list[dict[str, Any]]:
        entry = self.run.one("prompts")
        if entry is None:
            return []
        return self.query(
            f'SELECT split, task_type, count(*) AS prompts FROM "{entry.name}" GROUP BY ALL ORDER BY ALL'
        )

    def generations(self) -> list[dict[str, Any]]:
        entry = self.run.one("generations")
        if entry is None:
            return []
        return self.query(
            "SELECT mode, count(*) AS rows, count(DISTINCT prompt_id) AS prompts, "
            "sum(CASE WHEN parse_ok THEN 0 ELSE 1 END) AS parse_failures, "
            "avg(trace_tokens) AS trace_tokens, avg(answer_tokens) AS answer_tokens, "
            "avg(CASE WHEN budget_forced THEN 1.0 ELSE 0.0 END) AS budget_closed, "
            "avg(CASE WHEN finish_reason = 'length' THEN 1.0 ELSE 0.0 END) AS answer_cut "
            f'FROM "{entry.name}" GROUP BY mode ORDER BY mode DESC'
        )

    def scores(self) -> list[dict[str, Any]]:
        entry = self.run.one("scores")
        if entry is None:
            return []
        return self.query(
            "SELECT mode, count(*) AS answers, avg(score) AS mean_score, "
            "avg(CASE WHEN score >= 1 THEN 1.0 ELSE 0.0 END) AS full_score "
            f'FROM "{entry.name}" GROUP BY mode ORDER BY mode DESC'
        )

    def pairs(self) -> list[dict[str, Any]]:
        out = []
        for kind in ("pairs_trace", "pairs_empty"):
            entry = self.run.one(kind)
            if entry is None:
                continue
            row = self.query(
                "SELECT count(*) AS pairs, avg(margin) AS margin, avg(chosen_score) AS chosen, "
                f'avg(rejected_score) AS rejected FROM "{entry.name}"'
            )[0]
            out.append({"kind": kind, "mode": kind.removeprefix("pairs_"), "name": entry.name, **row})
        return out

    def rejects(self) -> list[dict[str, Any]]:
        if not self.run.rejects:
            return []
        union = " UNION ALL ".join(f'SELECT stage, reason FROM "{r.name}"' for r in self.run.rejects)
        return self.query(
            f"SELECT stage, reason, count(*) AS n FROM ({union}) GROUP BY ALL ORDER BY n DESC, stage, reason"
        )

    def agreement(self) -> list[dict[str, Any]]:
        """Agreement rows of the run's reference pass (docs/method.md §Sampler/trainer agreement)."""
        return self.rows(self.run.agreement)
