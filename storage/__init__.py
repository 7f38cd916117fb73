"""Storage: immutable, versioned Parquet datasets in a lake directory, catalogued in DuckDB.

``storage`` imports nothing from ``pipeline``, ``tasks`` or ``flows``. See docs/storage.md.
"""

from storage.catalog import Catalog, CatalogError, DatasetRef
from storage.export import FORMATS, write_result
from storage.lakefs import LakeFS
from storage.parquet_io import DatasetReadError
from storage.query import (
    QueryError,
    QueryRefused,
    run_readonly_arrow,
    run_readonly_preview,
    run_readonly_query,
)
from storage.schemas import KINDS, SchemaError, conform, schema_for
from storage.store import DatasetStore, version_key

__all__ = [
    "FORMATS",
    "KINDS",
    "Catalog",
    "CatalogError",
    "DatasetReadError",
    "DatasetRef",
    "DatasetStore",
    "LakeFS",
    "QueryError",
    "QueryRefused",
    "SchemaError",
    "conform",
    "run_readonly_arrow",
    "run_readonly_preview",
    "run_readonly_query",
    "schema_for",
    "version_key",
    "write_result",
]
