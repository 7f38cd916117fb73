"""Read-only SQL over the catalog, confined to the lake.

Three independent guards:

1. only read statements are accepted, checked on DuckDB's own parse (:mod:`storage.sql_guard`);
2. the query never touches the catalog file: the ``datasets`` rows are copied (under a shared lock held
   for milliseconds) into a private in-memory DuckDB, with views over the lake built there, so a long
   query neither blocks the pipeline's writers nor can change the catalog;
3. that connection has external access disabled except for the lake (``allowed_directories``) and its
   configuration locked, so ``read_csv('/etc/passwd')``, ``glob('/etc/*')``, ``INSTALL`` or ``LOAD`` fail
   even if a statement slipped past the first guard. No extension is ever installed or auto-loaded.

Views: ``datasets`` (every registered version), one per kind (its latest version) and ``kind__v<N>`` for
each version the query names. A view whose files cannot be read fails with a message naming the dataset.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from storage.catalog import Catalog, dataset_glob, sql_literal
from storage.lakefs import LakeFS
from storage.sql_guard import QueryError, QueryRefused, check_read_only

__all__ = ["QueryError", "QueryRefused", "run_readonly_arrow", "run_readonly_preview", "run_readonly_query"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def run_readonly_query(
    catalog: Catalog, lake: Path | str | LakeFS, sql: str
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one or more read statements; return the column names and rows of the last one."""
    table = run_readonly_arrow(catalog, lake, sql)
    columns = [c.to_pylist() for c in table.columns]
    return table.column_names, list(zip(*columns, strict=True)) if columns else []


def run_readonly_arrow(catalog: Catalog, lake: Path | str | LakeFS, sql: str) -> pa.Table:
    """Run one or more read statements; return the result of the last one as an Arrow table."""
    with _readonly_session(catalog, lake, sql) as (conn, queries):
        result: pa.Table | None = None
        for query in queries:
            try:
                relation = conn.sql(query)
                result = relation.to_arrow_table() if relation is not None else None
            except duckdb.Error as exc:
                raise QueryError(str(exc).splitlines()[0]) from exc
        return result if result is not None else pa.table({})


def run_readonly_preview(
    catalog: Catalog, lake: Path | str | LakeFS, sql: str, max_rows: int
) -> tuple[pa.Table, int]:
    """Like :func:`run_readonly_arrow`, but keep only the first ``max_rows`` rows of the last result.

    The result is streamed in record batches: rows past ``max_rows`` are counted, never held, so a preview
    of ``select * from range(10000000)`` costs the memory of one batch. Returns the kept rows and the total.
    """
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    with _readonly_session(catalog, lake, sql) as (conn, queries):
        kept: pa.Table = pa.table({})
        total = 0
        for index, query in enumerate(queries):
            try:
                relation = conn.sql(query)
                if relation is None:
                    kept, total = pa.table({}), 0
                    continue
                if index < len(queries) - 1:  # an earlier statement: run it, as the full query does
                    relation.to_arrow_table()
                    continue
                reader = relation.to_arrow_reader(batch_size=max(min(max_rows, 100_000), 1024))
                batches, total = [], 0
                for batch in reader:
                    room = max_rows - total
                    if room > 0:
                        batches.append(batch.slice(0, room))
                    total += batch.num_rows
                kept = pa.Table.from_batches(batches, schema=reader.schema)
            except duckdb.Error as exc:
                raise QueryError(str(exc).splitlines()[0]) from exc
        return kept, total


@contextmanager
def _readonly_session(
    catalog: Catalog, lake: Path | str | LakeFS, sql: str
) -> Iterator[tuple[duckdb.DuckDBPyConnection, list[str]]]:
    """A private in-memory connection with the guards of this module in place, and the checked statements."""
    lake_fs = lake if isinstance(lake, LakeFS) else LakeFS(lake)
    with (
        tempfile.TemporaryDirectory(prefix="bvpo-sql-") as spill,
        duckdb.connect(config=_config(spill)) as conn,
    ):
        queries = check_read_only(sql, conn)  # before anything is loaded: a refusal touches nothing
        snapshot = catalog.snapshot()
        if not lake_fs.is_local:
            _enable_object_store(conn, lake_fs)
        conn.execute(f"SET allowed_directories=[{sql_literal(lake_fs.sql_prefix())}]")
        conn.execute("SET enable_external_access=false")
        conn.execute("SET lock_configuration=true")
        _load_catalog(conn, snapshot, set(_IDENTIFIER.findall(sql.lower())))
        yield conn, list(queries)


def _config(spill: str) -> dict[str, Any]:
    return {
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "temp_directory": spill,  # a private, empty spill folder (DuckDB allows its temp folder)
    }


def _load_catalog(conn: duckdb.DuckDBPyConnection, snapshot: pa.Table, referenced: set[str]) -> None:
    """Create ``datasets``, the latest view per kind, and the ``kind__v<N>`` views ``referenced`` names."""
    conn.register("_catalog_snapshot", snapshot)
    conn.execute("CREATE TABLE datasets AS SELECT * FROM _catalog_snapshot")
    conn.unregister("_catalog_snapshot")
    rows = conn.execute(
        "SELECT name, kind, version, path, row_number() OVER "
        "(PARTITION BY kind ORDER BY created_at DESC, number DESC) = 1 AS latest "
        "FROM datasets WHERE status = 'complete'"
    ).fetchall()
    for name, kind, version, path, latest in rows:
        if name.lower() in referenced:
            _create_view(conn, name, name, version, path)
        if latest:
            _create_view(conn, kind, name, version, path)


def _create_view(conn: duckdb.DuckDBPyConnection, view: str, name: str, version: str, path: str) -> None:
    try:
        conn.execute(f'CREATE VIEW "{view}" AS SELECT * FROM read_parquet({sql_literal(dataset_glob(path))})')
    except duckdb.Error as exc:  # the files are gone or unreadable: fail only the queries that use it
        reason = str(exc).splitlines()[0]
        message = f"dataset {name} (version {version}, path {path}) cannot be read: {reason}"
        fail = f"error({sql_literal(message)})"  # in the filter too, so count(*) cannot skip it
        conn.execute(f'CREATE VIEW "{view}" AS SELECT {fail} AS error FROM range(1) WHERE {fail} IS NULL')


def _enable_object_store(conn: duckdb.DuckDBPyConnection, lake: LakeFS) -> None:
    """Load httpfs (installed beforehand by the user; never downloaded here) and S3 keys from the env."""
    try:
        conn.execute("LOAD httpfs")
    except duckdb.Error as exc:
        raise QueryError(
            f"the lake {lake.root} needs DuckDB's httpfs extension: install it once with "
            f"`duckdb -c 'INSTALL httpfs'` ({str(exc).splitlines()[0]})"
        ) from exc
    if lake.root.startswith("s3://") and os.environ.get("AWS_ACCESS_KEY_ID"):
        options = {
            "KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
            "SECRET": os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            "SESSION_TOKEN": os.environ.get("AWS_SESSION_TOKEN"),
            "REGION": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        }
        body = ", ".join(f"{key} {sql_literal(value)}" for key, value in options.items() if value)
        conn.execute(f"CREATE TEMPORARY SECRET bvpo_lake (TYPE s3, {body})")
