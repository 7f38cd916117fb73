"""Sharded, resumable generation output.

Prompts are cut into shards of ``shard_size`` in their stored order; shard ``i`` is sampled with engine seed
``seed + i``. Each finished shard is written (temporary file, then an atomic rename) as
``<staging>/shard-<i>.parquet``, where the staging folder is keyed by the dataset version the shards will
form. A rerun after a crash finds the finished shards and generates only the missing ones; a shard file
whose rows do not match its plan (other prompts, other row count) counts as missing.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class Shard:
    """One unit of generation and of persistence."""

    index: int
    seed: int
    prompts: tuple[dict[str, Any], ...]

    @property
    def prompt_ids(self) -> list[str]:
        return [p["prompt_id"] for p in self.prompts]


def plan_shards(prompts: Sequence[dict[str, Any]], shard_size: int, seed: int) -> list[Shard]:
    """Consecutive shards of at most ``shard_size`` prompts; shard ``i`` has seed ``seed + i``."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    return [
        Shard(index=i, seed=seed + i, prompts=tuple(prompts[start : start + shard_size]))
        for i, start in enumerate(range(0, len(prompts), shard_size))
    ]


class ShardStore:
    """The staging folder of one generation version: one Parquet file per finished shard."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, index: int) -> Path:
        return self.root / f"shard-{index:05d}.parquet"

    def write(self, index: int, rows: list[dict[str, Any]]) -> Path:
        """Persist a finished shard atomically (a crash leaves no half shard)."""
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(index)
        tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            pq.write_table(pa.Table.from_pylist(rows), tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def read(self, index: int) -> list[dict[str, Any]] | None:
        """The shard's rows, or None when it is absent or unreadable."""
        try:
            return pq.read_table(self.path(index)).to_pylist()
        except (OSError, pa.ArrowException):
            return None

    def finished(self, shard: Shard, rows_per_prompt: int) -> list[dict[str, Any]] | None:
        """The shard's rows if a complete shard for exactly this plan is on disk, else None."""
        rows = self.read(shard.index)
        if rows is None or len(rows) != rows_per_prompt * len(shard.prompts):
            return None
        if {r.get("prompt_id") for r in rows} != set(shard.prompt_ids):
            return None
        if any(r.get("shard_index") != shard.index for r in rows):
            return None
        return rows

    def remove(self) -> None:
        """Drop the staging folder once its dataset is registered."""
        shutil.rmtree(self.root, ignore_errors=True)
