"""Read-only SQL over the catalog, confined to the lake.

Two independent guards: only read statements are accepted (checked on DuckDB's own parse), and the
connection is read-only with file access limited to the lake directory, so functions such as
``read_csv('/etc/passwd')`` or ``COPY … TO`` elsewhere fail even if a statement slipped through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from storage.catalog import Catalog

_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class QueryError(ValueError):
    """A query was refused or failed."""


def run_readonly_query(catalog: Catalog, lake: Path, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one or more read statements; return the column names and rows of the last one."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"cannot parse query: {exc}") from exc
    if not statements:
        raise QueryError("empty query")
    for statement in statements:
        if statement.type not in _ALLOWED:
            raise QueryError(
                f"only SELECT queries are allowed here, not {statement.type.name}: the catalog is read-only"
            )
    with catalog.connect(read_only=True) as conn:
        conn.execute(f"SET allowed_directories=['{Path(lake).resolve()!s}/']")
        conn.execute("SET enable_external_access=false")
        conn.execute("SET lock_configuration=true")
        columns: list[str] = []
        rows: list[tuple[Any, ...]] = []
        for statement in statements:
            try:
                cursor = conn.execute(statement.query)
                columns = [d[0] for d in cursor.description or []]
                rows = cursor.fetchall()
            except duckdb.Error as exc:
                raise QueryError(str(exc).splitlines()[0]) from exc
        return columns, rows
