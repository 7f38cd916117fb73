"""Decide, from DuckDB's own parse, whether a SQL text only reads.

Accepted: ``SELECT`` statements (including ``FROM …``, ``VALUES``, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE``)
whose every query node is a plain select, a set operation or a CTE, and ``EXPLAIN [ANALYZE]`` of such a
statement. Refused: everything else, by statement class: INSERT, UPDATE, DELETE, MERGE, CREATE, DROP,
ALTER, ATTACH, DETACH, COPY, EXPORT, INSTALL, LOAD, SET, RESET, USE, PRAGMA (all of them, including the
read-only ones: use the ``pragma_*`` table functions in a SELECT), CALL, CHECKPOINT, VACUUM, PREPARE,
EXECUTE, transactions, and data-modifying CTEs (``WITH d AS (DELETE … RETURNING *) SELECT …``).
Anything that cannot be checked (e.g. PIVOT, which DuckDB runs as several statements) is refused too.
"""

from __future__ import annotations

import json
import re
from typing import Any

import duckdb

_READ_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}
_EXPLAIN = re.compile(r"^\s*explain\s+(?:analy[sz]e\s+)?(?:\([^()]*\)\s*)?", re.IGNORECASE)
_FIRST_WORD = re.compile(r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*([A-Za-z]+)", re.DOTALL)
_CLASS_BY_WORD = {
    "install": "INSTALL",
    "force": "INSTALL",
    "load": "LOAD",
    "reset": "RESET",
    "use": "USE",
    "checkpoint": "CHECKPOINT",
    "force_checkpoint": "CHECKPOINT",
    "import": "IMPORT",
    "begin": "TRANSACTION",
    "commit": "TRANSACTION",
    "rollback": "TRANSACTION",
    "analyze": "ANALYZE",
}


class QueryError(ValueError):
    """A query was refused or failed."""


class QueryRefused(QueryError):
    """A statement that could write (or that cannot be shown not to) was refused before running."""

    def __init__(self, statement_class: str, detail: str = "", message: str | None = None) -> None:
        self.statement_class = statement_class
        extra = f" ({detail})" if detail else ""
        super().__init__(
            message or f"refused: {statement_class} statements are not allowed{extra}; bvpo sql is read-only"
        )


def statement_class(query: str, statement_type: str) -> str:
    """A user-facing name for a statement's class (INSTALL rather than DuckDB's LOAD, and so on)."""
    if statement_type == "MULTI":  # PIVOT / UNPIVOT: DuckDB runs them as several statements
        found = re.search(r"\b(un)?pivot\b", query, re.IGNORECASE)
        return found.group(0).upper() if found else "MULTI"
    match = _FIRST_WORD.match(query)
    word = match.group(1).lower() if match else ""
    if word == "copy" and re.search(r"\bfrom\s+database\b", query, re.IGNORECASE):
        return "COPY DATABASE"
    if word == "pragma" or statement_type == "PRAGMA":
        return "PRAGMA" if word != "import" else "IMPORT"
    if word in _CLASS_BY_WORD and statement_type not in ("SELECT", "EXPLAIN"):
        return _CLASS_BY_WORD[word]
    if word == "copy":
        return "COPY … TO" if re.search(r"\bto\b", query, re.IGNORECASE) else "COPY … FROM"
    return {"VARIABLE_SET": "SET", "MERGE_INTO": "MERGE"}.get(statement_type, statement_type)


def check_read_only(sql: str, conn: duckdb.DuckDBPyConnection | None = None) -> list[str]:
    """The statements of ``sql`` if every one only reads; raise :class:`QueryRefused` otherwise.

    ``conn``, an in-memory connection to parse with, saves opening one (nothing is run on it).
    """
    try:
        statements = duckdb.extract_statements(sql)
    except (duckdb.Error, ValueError) as exc:
        raise QueryError(f"cannot parse query: {str(exc).splitlines()[0]}") from exc
    if not statements:
        raise QueryError("empty query")
    queries = []
    for statement in statements:
        query = statement.query
        kind = statement.type.name
        if kind == "EXPLAIN":
            inner = _EXPLAIN.sub("", query, count=1)
            inner_statements = duckdb.extract_statements(inner) if inner != query else []
            if len(inner_statements) != 1:
                raise QueryRefused("EXPLAIN", "only EXPLAIN [ANALYZE] of a SELECT is accepted")
            inner_kind = inner_statements[0].type.name
            if inner_kind != "SELECT":
                raise QueryRefused(statement_class(inner, inner_kind), "inside EXPLAIN")
            _check_select(inner, conn)
        elif kind == "SELECT":
            _check_select(query, conn)
        else:
            raise QueryRefused(statement_class(query, kind))
        queries.append(query)
    return queries


def _check_select(query: str, conn: duckdb.DuckDBPyConnection | None) -> None:
    """Refuse a SELECT that holds a data-modifying CTE, from DuckDB's serialized parse tree."""
    if conn is None:
        with duckdb.connect() as own:
            row = own.execute("SELECT json_serialize_sql(?)", [query]).fetchone()
    else:
        row = conn.execute("SELECT json_serialize_sql(?)", [query]).fetchone()
    tree = json.loads(row[0]) if row else {"error": True}
    if tree.get("error"):
        message = "refused: this statement cannot be checked to only read; bvpo sql is read-only"
        raise QueryRefused("UNCHECKED", message=message)
    nodes: set[str] = set()
    _query_nodes(tree, nodes)
    writing = sorted(nodes - _READ_NODES)
    if writing:
        names = ", ".join(n.removesuffix("_QUERY_NODE").removesuffix("_NODE") for n in writing)
        raise QueryRefused(names, "inside a WITH clause")


def _query_nodes(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        if "modifiers" in node and isinstance(node.get("type"), str):
            out.add(node["type"])
        for value in node.values():
            _query_nodes(value, out)
    elif isinstance(node, list):
        for value in node:
            _query_nodes(value, out)
