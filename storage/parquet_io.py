"""Parquet datasets in the lake: staged writes, stale-staging cleanup, and checked reads.

A dataset is a folder ``<lake>/<kind>/<version>/`` of ``part-NNNNN.parquet`` files (zstd). It is written
into a hidden staging folder ``<lake>/<kind>/.tmp-<version>-<pid>-<host>-<random>/`` first; the store
publishes it (rename) and registers it afterwards. A staging folder left by a killed writer is removed by
a later write once its owner is known to be dead (same host, pid gone) or it is older than a day.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.lakefs import LakeFS
from storage.schemas import may_be_missing

ROWS_PER_PART = 100_000
STAGING_PREFIX = ".tmp-"
STALE_STAGING_AGE_S = 24 * 3600
_PART = re.compile(r"^part-(\d{5,})\.parquet$")


class DatasetReadError(RuntimeError):
    """A registered dataset cannot be read back as registered: missing, truncated, corrupted or mistyped."""

    def __init__(self, name: str, version: str, path: str, reason: str) -> None:
        super().__init__(f"dataset {name} (version {version}, path {path}) cannot be read: {reason}")
        self.name = name
        self.version = version
        self.path = path
        self.reason = reason


def _host_id() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def staging_name(version: str) -> str:
    """``.tmp-<version>-<pid>-<host>-<random>``: enough for a later writer to tell whether it is stale."""
    return f"{STAGING_PREFIX}{version}-{os.getpid()}-{_host_id()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def is_stale_staging(name: str, mtime: float | None, now: float, max_age_s: float) -> bool:
    """A staging folder is stale if its writer (on this host) is dead, or it is older than ``max_age_s``.

    The age rule covers other hosts, reused pids and older names; a writer refreshes its folder's mtime
    with every part it adds, so only a writer stalled for ``max_age_s`` could lose its folder.
    """
    if not name.startswith(STAGING_PREFIX):
        return False
    if mtime is not None and now - mtime > max_age_s:
        return True
    fields = name[len(STAGING_PREFIX) :].split("-")
    return (
        len(fields) == 4
        and fields[1].isdigit()
        and fields[2] == _host_id()
        and not _pid_alive(int(fields[1]))
    )


def clean_stale_staging(lake: LakeFS, folder: str, max_age_s: float = STALE_STAGING_AGE_S) -> list[str]:
    """Remove the stale staging folders directly under ``folder``; return their names."""
    now = time.time()
    removed = []
    for entry in lake.list(folder):
        if entry.is_dir and is_stale_staging(entry.name, entry.mtime, now, max_age_s):
            lake.remove_tree(entry.location)
            removed.append(entry.name)
    return removed


def write_staging(lake: LakeFS, table: pa.Table, kind: str, version: str) -> str:
    """Write ``table`` as parts into a fresh staging folder next to its final place; return that folder.

    On any failure the staging folder is removed before the error propagates.
    """
    folder = lake.child(kind)
    lake.makedirs(folder)
    clean_stale_staging(lake, folder)
    staging = lake.child(kind, staging_name(version))
    lake.makedirs(staging)
    try:
        parts = max(1, -(-table.num_rows // ROWS_PER_PART))
        for index in range(parts):
            chunk = table.slice(index * ROWS_PER_PART, ROWS_PER_PART)
            lake.write_file(f"{staging}/part-{index:05d}.parquet", functools.partial(_write_part, chunk))
    except OSError as exc:  # e.g. a full disk: say which dataset could not be written, keep the errno
        lake.remove_tree(staging)
        message = f"cannot write dataset {kind} (version {version}) under {folder}: {exc.strerror or exc}"
        raise (OSError(exc.errno, message) if exc.errno else OSError(message)) from exc
    except BaseException:
        lake.remove_tree(staging)
        raise
    return staging


def _write_part(chunk: pa.Table, sink: Any) -> None:
    pq.write_table(chunk, sink, compression="zstd")


def read_dataset(
    lake: LakeFS,
    path: str,
    schema: pa.Schema,
    *,
    name: str,
    version: str,
    expected_rows: int | None = None,
) -> pa.Table:
    """Read every part of a dataset, checking the parts, their schema and the row count.

    Raises :class:`DatasetReadError` naming the dataset, its version and its path on any problem.
    """

    def fail(reason: str) -> DatasetReadError:
        return DatasetReadError(name, version, path, reason)

    if not lake.is_dir(path):
        raise fail("its folder is missing")
    parts = [e for e in lake.list(path) if _PART.match(e.name)]
    if not parts:
        raise fail("its folder holds no part-*.parquet files")
    numbers = [int(_PART.match(p.name).group(1)) for p in parts]  # type: ignore[union-attr]
    missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
    if missing:
        raise fail(f"part file(s) missing: {', '.join(f'part-{n:05d}.parquet' for n in missing)}")
    tables = [_read_part(lake, p.location, p.name, schema, fail) for p in parts]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if expected_rows is not None and table.num_rows != expected_rows:
        raise fail(
            f"it holds {table.num_rows} rows but {expected_rows} were registered "
            "(a part file is missing or was replaced)"
        )
    return table


def _read_part(
    lake: LakeFS, location: str, part: str, schema: pa.Schema, fail: Callable[[str], DatasetReadError]
) -> pa.Table:
    try:
        with lake.open_input(location) as handle:
            parquet = pq.ParquetFile(handle)
            problem = schema_difference(parquet.schema_arrow, schema)
            if problem:
                raise fail(f"schema mismatch in {part}: {problem}")
            table = parquet.read()
    except (pa.ArrowException, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise fail(f"{part} is not a readable Parquet file (truncated or corrupted?): {reason}") from exc
    return pa.Table.from_arrays([_column(table, f) for f in schema], schema=schema)


def _column(table: pa.Table, field: pa.Field) -> pa.ChunkedArray | pa.Array:
    """``field``'s column of ``table``; nulls for a column added to the kind after the part was written."""
    if field.name in table.column_names:
        return table.column(field.name)
    return pa.nulls(table.num_rows, field.type)


def schema_difference(found: pa.Schema, expected: pa.Schema) -> str:
    """Describe how ``found`` differs from ``expected`` in column names and types ('' when it does not).

    A column marked as added later (``schemas.added_later``) that ``found`` lacks is no difference: a version
    written before the column existed reads it as nulls. Any other missing column is.
    """
    problems = []
    missing = [f.name for f in expected if f.name not in found.names and not may_be_missing(f)]
    extra = [f.name for f in found if f.name not in expected.names]
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected column(s) {', '.join(extra)}")
    for field in expected:
        if field.name in found.names and found.field(field.name).type != field.type:
            problems.append(f"column '{field.name}' is {found.field(field.name).type}, expected {field.type}")
    return "; ".join(problems)
