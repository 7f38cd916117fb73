"""The DuckDB catalog: one row per registered dataset version, and SQL views over the Parquet files.

Connections are short-lived (open, work, close) because DuckDB lets only one process hold a file open for
writing. Cooperating processes also take an advisory lock on ``<catalog>.lock`` around each connection
(exclusive to write, shared to read), so concurrent writers queue instead of failing; the DuckDB-level
retry stays for processes that do not take the lock (e.g. a ``duckdb`` shell left open on the file).
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
import pyarrow as pa
from pydantic import BaseModel

from storage.lakefs import is_remote
from storage.locks import LockTimeout, file_lock
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

_REF_COLUMNS = "kind, version, number, path, row_count"
_LOCK_TIMEOUT_S = 120.0
_LOCK_RETRIES = 40
_LOCK_WAIT_S = 0.25
# Never download an extension behind the user's back (these machines are offline anyway).
_DUCKDB_CONFIG: dict[str, str | bool | int | float | list[str]] = {"autoinstall_known_extensions": False}


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


def _ref(row: tuple[Any, ...]) -> DatasetRef:
    return DatasetRef(kind=row[0], version=row[1], number=row[2], path=row[3], row_count=row[4])


class CatalogWriter:
    """The catalog opened for writing, with the writer lock held: look up, then register, race-free."""

    def __init__(self, conn: duckdb.DuckDBPyConnection) -> None:
        self.conn = conn

    def find(self, kind: str, version: str) -> DatasetRef | None:
        row = self.conn.execute(
            f"SELECT {_REF_COLUMNS} FROM datasets WHERE kind = ? AND version = ? AND status = 'complete'",
            [kind, version],
        ).fetchone()
        return None if row is None else _ref(row)

    def insert(
        self,
        *,
        kind: str,
        version: str,
        path: str,
        row_count: int,
        schema_fingerprint: str,
        config_hash: str,
        config: dict[str, Any],
        parents: list[str],
        flow_run_id: str | None,
    ) -> DatasetRef:
        """Record a complete dataset and refresh its views, all in one transaction."""
        conn = self.conn
        conn.execute("BEGIN TRANSACTION")
        try:
            existing = conn.execute(
                "SELECT number FROM datasets WHERE kind = ? AND version = ?", [kind, version]
            ).fetchone()
            if existing is not None:  # its files went missing and were written again: keep its number
                number = int(existing[0])
                conn.execute("DELETE FROM datasets WHERE kind = ? AND version = ?", [kind, version])
            else:
                row = conn.execute(
                    "SELECT coalesce(max(number), 0) + 1 FROM datasets WHERE kind = ?", [kind]
                ).fetchone()
                number = int(row[0])  # type: ignore[index]
            conn.execute(
                "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'complete')",
                [
                    f"{kind}__v{number}",
                    kind,
                    version,
                    number,
                    path,
                    row_count,
                    schema_fingerprint,
                    config_hash,
                    json.dumps(config, sort_keys=True),
                    parents,
                    flow_run_id,
                    datetime.now(UTC).replace(tzinfo=None),
                ],
            )
            if not is_remote(path):  # binding a view over s3:// would need httpfs in the writer
                glob = sql_literal(dataset_glob(path))
                select = f"SELECT * FROM read_parquet({glob})"
                conn.execute(f'CREATE OR REPLACE VIEW "{kind}__v{number}" AS {select}')
                conn.execute(f'CREATE OR REPLACE VIEW "{kind}" AS {select}')
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return DatasetRef(kind=kind, version=version, number=number, path=path, row_count=row_count)


class Catalog:
    """Registers dataset versions and keeps one view per kind (latest) and per version."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection, holding the catalog lock (shared to read, exclusive to write)."""
        if read_only and not self.path.exists():
            raise CatalogError(f"no catalog at {self.path}: run `bvpo run` first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with file_lock(self.lock_path, shared=read_only, timeout_s=_LOCK_TIMEOUT_S):
                conn = _connect_with_retry(self.path, read_only)
                try:
                    if not read_only:
                        conn.execute(_CREATE_TABLE)
                    yield conn
                finally:
                    conn.close()
        except LockTimeout as exc:
            raise CatalogError(f"catalog {self.path} is busy: {exc}") from exc

    @contextmanager
    def writer(self) -> Iterator[CatalogWriter]:
        """The catalog opened for writing; the lock is held until the block ends."""
        with self.connect() as conn:
            yield CatalogWriter(conn)

    def _query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Rows of a read-only query; none when there is no catalog (or no ``datasets`` table) yet."""
        if not self.path.exists():
            return []
        with self.connect(read_only=True) as conn:
            try:
                return conn.execute(sql, params or []).fetchall()
            except duckdb.CatalogException:
                return []

    def lookup(self, kind: str, version: str) -> DatasetRef | None:
        rows = self._query(
            f"SELECT {_REF_COLUMNS} FROM datasets WHERE kind = ? AND version = ? AND status = 'complete'",
            [kind, version],
        )
        return _ref(rows[0]) if rows else None

    def register(self, **fields: Any) -> DatasetRef:
        """Record a complete dataset (see :meth:`CatalogWriter.insert`)."""
        with self.writer() as writer:
            return writer.insert(**fields)

    def resolve(self, name: str) -> DatasetRef:
        """Find a dataset by ``kind`` (latest), ``kind__v<N>``, ``kind:<version>`` or ``<version>``."""
        kind, _, rest = name.partition(":")
        if "__v" in name and not rest:
            kind, _, number = name.partition("__v")
            if not number.isdigit():
                raise CatalogError(f"no registered dataset matches '{name}'")
            where, params = "kind = ? AND number = ?", [kind, int(number)]
        elif rest:
            where, params = "kind = ? AND version = ?", [kind, rest]
        elif name in KINDS:
            where, params = "kind = ? ORDER BY created_at DESC, number DESC LIMIT 1", [name]
        else:
            where, params = "version = ?", [name]
        if not self.path.exists():
            raise CatalogError(f"no catalog at {self.path}: run `bvpo run` first")
        rows = self._query(
            f"SELECT {_REF_COLUMNS} FROM datasets WHERE status = 'complete' AND {where}", params
        )
        if not rows:
            raise CatalogError(f"no registered dataset matches '{name}'")
        return _ref(rows[0])

    def parents_of(self, ref: DatasetRef) -> tuple[list[str], dict[str, Any]]:
        rows = self._query(
            "SELECT parents, config FROM datasets WHERE kind = ? AND version = ?", [ref.kind, ref.version]
        )
        if not rows:
            raise CatalogError(f"{ref.qualified} is not registered")
        return list(rows[0][0]), json.loads(rows[0][1])

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

    def find_latest(
        self, kind: str, config: dict[str, str] | None = None, parent: str | None = None
    ) -> DatasetRef | None:
        """The most recently registered ``kind`` whose config has these top-level string values and whose
        parents include ``parent`` (``kind:version``), if any."""
        where, params = ["kind = ?", "status = 'complete'"], [kind]
        for key, value in (config or {}).items():
            where.append("json_extract_string(config, ?) = ?")
            params += [f"$.{key}", value]
        if parent is not None:
            where.append("list_contains(parents, ?)")
            params.append(parent)
        rows = self._query(
            f"SELECT {_REF_COLUMNS} FROM datasets WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, number DESC LIMIT 1",
            params,
        )
        return _ref(rows[0]) if rows else None

    def list_datasets(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            raise CatalogError(f"no catalog at {self.path}: run `bvpo run` first")
        columns = ["name", "kind", "version", "row_count", "created_at", "flow_run_id", "path"]
        rows = self._query(
            f"SELECT {', '.join(columns)} FROM datasets WHERE status = 'complete' ORDER BY created_at, name"
        )
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def snapshot(self) -> pa.Table:
        """Every row of the ``datasets`` table, as Arrow; raises :class:`CatalogError` without a catalog."""
        with self.connect(read_only=True) as conn:
            try:
                return conn.sql("SELECT * FROM datasets ORDER BY kind, number").to_arrow_table()
            except duckdb.CatalogException:  # a catalog file without the table yet
                pass
        with duckdb.connect() as conn:
            conn.execute(_CREATE_TABLE)
            return conn.sql("SELECT * FROM datasets").to_arrow_table()


def dataset_glob(path: str) -> str:
    """The Parquet glob of a dataset folder (a local path or a URI)."""
    return path.rstrip("/") + "/part-*.parquet"


def _connect_with_retry(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    last: Exception | None = None
    for _ in range(_LOCK_RETRIES):
        try:
            return duckdb.connect(str(path), read_only=read_only, config=_DUCKDB_CONFIG)
        except duckdb.IOException as exc:  # another process holds DuckDB's own file lock
            last = exc
            time.sleep(_LOCK_WAIT_S)
    raise CatalogError(f"catalog {path} is locked by another process: {last}")


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
