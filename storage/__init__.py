"""Storage: immutable, versioned Parquet datasets in a lake directory, catalogued in DuckDB.

``storage`` imports nothing from ``pipeline``, ``tasks`` or ``flows``.
"""

from storage.catalog import Catalog, CatalogError, DatasetRef
from storage.query import QueryError, run_readonly_query
from storage.schemas import KINDS, SchemaError, conform, schema_for
from storage.store import DatasetStore, version_key

__all__ = [
    "KINDS",
    "Catalog",
    "CatalogError",
    "DatasetRef",
    "DatasetStore",
    "QueryError",
    "SchemaError",
    "conform",
    "run_readonly_query",
    "schema_for",
    "version_key",
]
