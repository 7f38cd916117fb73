"""Write a query result (an Arrow table) as CSV, JSON or Parquet, in Python (never through DuckDB COPY).

A file is written next to its destination under a temporary name and renamed into place, so a failed or
interrupted export never leaves a half file under the requested name.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

FORMATS = ("csv", "json", "parquet")


def write_result(table: pa.Table, fmt: str, output: Path | None, stdout: BinaryIO | None = None) -> None:
    """Write ``table`` as ``fmt`` to ``output``, or to ``stdout`` (CSV and JSON only) when it is None."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if output is None:
        if fmt == "parquet":
            raise ValueError("--format parquet needs --output FILE")
        if stdout is None:
            raise ValueError("no output given")
        _WRITERS[fmt](table, stdout)
        stdout.flush()
        return
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "wb") as handle:
            _WRITERS[fmt](table, handle)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def _write_parquet(table: pa.Table, sink: BinaryIO) -> None:
    pq.write_table(table, sink, compression="zstd")


def _write_csv(table: pa.Table, sink: BinaryIO) -> None:
    """CSV with a header; nested values (lists, structs, maps) become JSON text."""
    columns = []
    for column, field in zip(table.columns, table.schema, strict=True):
        if pa.types.is_nested(field.type):
            column = pa.array(
                [None if v is None else json.dumps(v, default=_json_value) for v in column.to_pylist()],
                pa.string(),
            )
        columns.append(column)
    pacsv.write_csv(pa.table(columns, names=table.column_names), sink)


def _write_json(table: pa.Table, sink: BinaryIO) -> None:
    """A JSON array of objects, one per row, written batch by batch."""
    sink.write(b"[")
    first = True
    for batch in table.to_batches(max_chunksize=10_000):
        for row in batch.to_pylist():
            sink.write((b"\n" if first else b",\n") + json.dumps(row, default=_json_value).encode())
            first = False
    sink.write(b"\n]\n" if not first else b"]\n")


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)


_WRITERS = {"csv": _write_csv, "json": _write_json, "parquet": _write_parquet}
