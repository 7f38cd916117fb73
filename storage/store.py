"""The dataset store: content-addressed, immutable dataset versions in ``<lake>/<kind>/<version>/``.

A version id is a hash of the kind, the stage config and the parent versions, so a stage rerun with the
same inputs finds its earlier output instead of writing a new one (this makes the flows idempotent).

The lake is ``<workspace>/lake`` unless the ``lake`` argument or the ``BVPO_LAKE`` environment variable
names another folder or an object-store URI (see :mod:`storage.lakefs` and docs/storage.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from storage.catalog import Catalog, DatasetRef
from storage.lakefs import LakeFS
from storage.parquet_io import read_dataset, write_staging
from storage.schemas import conform, schema_fingerprint, schema_for

LAKE_ENV = "BVPO_LAKE"


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

    def __init__(self, workspace: Path, lake: str | Path | LakeFS | None = None) -> None:
        self.workspace = Path(workspace).resolve()
        root = lake or os.environ.get(LAKE_ENV) or self.workspace / "lake"
        self.fs = root if isinstance(root, LakeFS) else LakeFS(root)
        self.catalog = Catalog(self.workspace / "catalog.duckdb")

    @property
    def lake(self) -> Path | str:
        """The lake root: a ``Path`` for a local lake, the URI for an object store."""
        return self.fs.root_path

    def lookup(self, kind: str, config: dict[str, Any], parents: list[DatasetRef]) -> DatasetRef | None:
        """The registered version for these inputs, if a previous run produced it and its files exist."""
        ref = self.catalog.lookup(kind, version_key(kind, config, parents))
        return ref if ref is not None and self.fs.is_dir(ref.path) else None

    def put(
        self,
        kind: str,
        table: pa.Table,
        *,
        config: dict[str, Any],
        parents: list[DatasetRef],
        flow_run_id: str | None = None,
    ) -> DatasetRef:
        """Validate ``table`` against the kind's schema, write it, then publish and register it.

        The Parquet parts are written outside the catalog lock; publishing (rename) and registering happen
        under it, so two writers of the same version cannot race. Versions are immutable: when this version
        is already registered and its files exist, that dataset is returned and ``table`` is discarded.
        """
        conformed = conform(kind, table)
        version = version_key(kind, config, parents)
        target = self.fs.child(kind, version)
        staging = write_staging(self.fs, conformed, kind, version)
        try:
            with self.catalog.writer() as writer:
                existing = writer.find(kind, version)
                if existing is not None and self.fs.is_dir(existing.path):
                    return existing
                self.fs.publish(staging, target)
                return writer.insert(
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
        finally:
            self.fs.remove_tree(staging)  # already gone once published

    def read(self, ref: DatasetRef) -> pa.Table:
        """The dataset's rows, checked against its kind's schema and registered row count.

        Raises :class:`storage.parquet_io.DatasetReadError` when its files are missing, truncated,
        corrupted or of another schema.
        """
        return read_dataset(
            self.fs,
            ref.path,
            schema_for(ref.kind),
            name=ref.name,
            version=ref.version,
            expected_rows=ref.row_count,
        )

    def read_rows(self, ref: DatasetRef) -> list[dict[str, Any]]:
        return self.read(ref).to_pylist()
