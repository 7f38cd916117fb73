"""The DuckDB catalog: one row per registered dataset version, and SQL views over the Parquet files.

Connections are short-lived (open, work, close) because DuckDB lets only one process hold a file open for
writing; a reader such as ``bvpo sql`` can then open the catalog between the pipeline's writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
from pydantic import BaseModel

from storage.schemas import KINDS

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS datasets (
    name VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    version VARCHAR NOT NULL,
    number INTEGER NOT NULL,
    path VARCHAR NOT NULL,
    row_count BIGINT NOT NULL,
    schema_fingerprint VARCHAR NOT NULL,
    config_hash VARCHAR NOT NULL,
    config JSON NOT NULL,
    parents VARCHAR[] NOT NULL,
    flow_run_id VARCHAR,
    created_at TIMESTAMP NOT NULL,
    status VARCHAR NOT NULL,
    PRIMARY KEY (kind, version)
)
"""

_LOCK_RETRIES = 40
_LOCK_WAIT_S = 0.25


class CatalogError(RuntimeError):
    """The catalog cannot be opened or does not hold what was asked for."""


class DatasetRef(BaseModel):
    """A registered dataset version (small and serializable, so Prefect tasks can pass it around)."""

    kind: str
    version: str
    number: int
    path: str
    row_count: int

    @property
    def name(self) -> str:
        return f"{self.kind}__v{self.number}"

    @property
    def qualified(self) -> str:
        """``kind:version``, the form lineage and parents use."""
        return f"{self.kind}:{self.version}"


class Catalog:
    """Registers dataset versions and keeps one view per kind (latest) and per version."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.path.exists():
            raise CatalogError(f"no catalog at {self.path}: run `bvpo run` first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect_with_retry(self.path, read_only)
        try:
            if not read_only:
                conn.execute(_CREATE_TABLE)
            yield conn
        finally:
            conn.close()

    def lookup(self, kind: str, version: str) -> DatasetRef | None:
        if not self.path.exists():
            return None
        with self.connect() as conn:
            row = conn.execute(
                "SELECT kind, version, number, path, row_count FROM datasets "
                "WHERE kind = ? AND version = ? AND status = 'complete'",
                [kind, version],
            ).fetchone()
        if row is None or not Path(row[3]).is_dir():
            return None
        return DatasetRef(kind=row[0], version=row[1], number=row[2], path=row[3], row_count=row[4])

    def register(
        self,
        *,
        kind: str,
        version: str,
        path: Path,
        row_count: int,
        schema_fingerprint: str,
        config_hash: str,
        config: dict[str, Any],
        parents: list[str],
        flow_run_id: str | None,
    ) -> DatasetRef:
        """Record a complete dataset and refresh its views, all in one transaction."""
        with self.connect() as conn:
            conn.execute("BEGIN TRANSACTION")
            try:
                existing = conn.execute(
                    "SELECT number FROM datasets WHERE kind = ? AND version = ?", [kind, version]
                ).fetchone()
                if existing is not None:
                    number = int(existing[0])
                    conn.execute("DELETE FROM datasets WHERE kind = ? AND version = ?", [kind, version])
                else:
                    number = int(
                        conn.execute(
                            "SELECT coalesce(max(number), 0) + 1 FROM datasets WHERE kind = ?", [kind]
                        ).fetchone()[0]  # type: ignore[index]
                    )
                conn.execute(
                    "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'complete')",
                    [
                        f"{kind}__v{number}",
                        kind,
                        version,
                        number,
                        str(path),
                        row_count,
                        schema_fingerprint,
                        config_hash,
                        json.dumps(config, sort_keys=True),
                        parents,
                        flow_run_id,
                        datetime.now(UTC).replace(tzinfo=None),
                    ],
                )
                glob = _sql_literal(str(Path(path) / "part-*.parquet"))
                conn.execute(
                    f'CREATE OR REPLACE VIEW "{kind}__v{number}" AS SELECT * FROM read_parquet({glob})'
                )
                conn.execute(f'CREATE OR REPLACE VIEW "{kind}" AS SELECT * FROM read_parquet({glob})')
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return DatasetRef(kind=kind, version=version, number=number, path=str(path), row_count=row_count)

    def resolve(self, name: str) -> DatasetRef:
        """Find a dataset by ``kind`` (latest), ``kind__v<N>``, ``kind:<version>`` or ``<version>``."""
        kind, _, rest = name.partition(":")
        if "__v" in name and not rest:
            kind, _, number = name.partition("__v")
            where, params = "kind = ? AND number = ?", [kind, int(number)]
        elif rest:
            where, params = "kind = ? AND version = ?", [kind, rest]
        elif name in KINDS:
            where, params = "kind = ? ORDER BY created_at DESC LIMIT 1", [name]
        else:
            where, params = "version = ?", [name]
        with self.connect(read_only=True) as conn:
            row = conn.execute(
                "SELECT kind, version, number, path, row_count FROM datasets "
                f"WHERE status = 'complete' AND {where}",
                params,
            ).fetchone()
        if row is None:
            raise CatalogError(f"no registered dataset matches '{name}'")
        return DatasetRef(kind=row[0], version=row[1], number=row[2], path=row[3], row_count=row[4])

    def parents_of(self, ref: DatasetRef) -> tuple[list[str], dict[str, Any]]:
        with self.connect(read_only=True) as conn:
            row = conn.execute(
                "SELECT parents, config FROM datasets WHERE kind = ? AND version = ?", [ref.kind, ref.version]
            ).fetchone()
        if row is None:
            raise CatalogError(f"{ref.qualified} is not registered")
        return list(row[0]), json.loads(row[1])

    def lineage(self, ref: DatasetRef) -> list[tuple[int, DatasetRef, dict[str, Any]]]:
        """``(depth, dataset, config)`` for ``ref`` and every ancestor, depth-first back to the prompts."""
        out: list[tuple[int, DatasetRef, dict[str, Any]]] = []
        seen: set[str] = set()

        def walk(node: DatasetRef, depth: int) -> None:
            parents, config = self.parents_of(node)
            out.append((depth, node, config))
            if node.qualified in seen:
                return
            seen.add(node.qualified)
            for parent in parents:
                walk(self.resolve(parent), depth + 1)

        walk(ref, 0)
        return out

    def list_datasets(self) -> list[dict[str, Any]]:
        with self.connect(read_only=True) as conn:
            cursor = conn.execute(
                "SELECT name, kind, version, row_count, created_at, flow_run_id, path FROM datasets "
                "WHERE status = 'complete' ORDER BY created_at"
            )
            columns = [d[0] for d in cursor.description]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def _connect_with_retry(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    last: Exception | None = None
    for _ in range(_LOCK_RETRIES):
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:  # another process holds the write lock
            last = exc
            time.sleep(_LOCK_WAIT_S)
    raise CatalogError(f"catalog {path} is locked by another process: {last}")


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
