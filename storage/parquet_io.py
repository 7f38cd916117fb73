"""Atomic Parquet writes: write into a hidden temporary folder, then rename it into place."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS_PER_PART = 100_000


def write_dataset_dir(table: pa.Table, target: Path) -> None:
    """Write ``table`` as ``target/part-*.parquet`` (zstd); ``target`` appears whole or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        parts = max(1, -(-table.num_rows // ROWS_PER_PART))
        for index in range(parts):
            chunk = table.slice(index * ROWS_PER_PART, ROWS_PER_PART)
            path = staging / f"part-{index:05d}.parquet"
            pq.write_table(chunk, path, compression="zstd")
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if target.exists():
            # Left by a run that crashed before registering it: never visible, safe to replace.
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_dataset_dir(path: Path, schema: pa.Schema) -> pa.Table:
    """Read every part of a dataset folder with its declared schema."""
    parts = sorted(path.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"dataset folder {path} holds no Parquet parts")
    tables = [pq.read_table(p, schema=schema) for p in parts]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
