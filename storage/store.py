"""The dataset store: content-addressed, immutable dataset versions in ``<lake>/<kind>/<version>/``.

A version id is a hash of the kind, the stage config and the parent versions, so a stage rerun with the
same inputs finds its earlier output instead of writing a new one (this makes the flows idempotent).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from storage.catalog import Catalog, DatasetRef
from storage.parquet_io import read_dataset_dir, write_dataset_dir
from storage.schemas import conform, schema_fingerprint, schema_for


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def version_key(kind: str, config: dict[str, Any], parents: list[DatasetRef]) -> str:
    """Content address of a dataset: kind, schema, config and parent versions."""
    return _digest(
        {
            "kind": kind,
            "schema": schema_fingerprint(schema_for(kind)),
            "config": config,
            "parents": sorted(p.qualified for p in parents),
        }
    )


class DatasetStore:
    """Writes datasets atomically and registers them only once complete."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = Path(workspace).resolve()
        self.lake = self.workspace / "lake"
        self.catalog = Catalog(self.workspace / "catalog.duckdb")

    def lookup(self, kind: str, config: dict[str, Any], parents: list[DatasetRef]) -> DatasetRef | None:
        """The registered version for these inputs, if a previous run produced it."""
        return self.catalog.lookup(kind, version_key(kind, config, parents))

    def put(
        self,
        kind: str,
        table: pa.Table,
        *,
        config: dict[str, Any],
        parents: list[DatasetRef],
        flow_run_id: str | None = None,
    ) -> DatasetRef:
        """Validate ``table`` against the kind's schema, write it, then register it."""
        conformed = conform(kind, table)
        version = version_key(kind, config, parents)
        target = self.lake / kind / version
        write_dataset_dir(conformed, target)
        return self.catalog.register(
            kind=kind,
            version=version,
            path=target,
            row_count=conformed.num_rows,
            schema_fingerprint=schema_fingerprint(conformed.schema),
            config_hash=_digest(config),
            config=config,
            parents=[p.qualified for p in parents],
            flow_run_id=flow_run_id,
        )

    def read(self, ref: DatasetRef) -> pa.Table:
        return read_dataset_dir(Path(ref.path), schema_for(ref.kind))

    def read_rows(self, ref: DatasetRef) -> list[dict[str, Any]]:
        return self.read(ref).to_pylist()
