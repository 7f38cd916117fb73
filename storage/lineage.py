"""Walks up a dataset's lineage in the catalog to the ancestor of a given kind."""

from __future__ import annotations

from storage.catalog import DatasetRef
from storage.store import DatasetStore


def ancestor_of_kind(store: DatasetStore, ref: DatasetRef, kind: str) -> DatasetRef:
    """The nearest dataset of ``kind`` in ``ref``'s lineage (``ref`` itself when it is of that kind)."""
    for _, node, _ in store.catalog.lineage(ref):
        if node.kind == kind:
            return node
    raise ValueError(f"{ref.name} has no {kind} dataset in its lineage")


def generations_for(store: DatasetStore, pairs: DatasetRef) -> DatasetRef:
    """The generations dataset a pairs dataset was built from (its stored traces feed the gradient probe)."""
    return ancestor_of_kind(store, pairs, "generations")


def ancestors_of_kind(store: DatasetStore, ref: DatasetRef, kind: str) -> list[DatasetRef]:
    """Every dataset of ``kind`` in ``ref``'s lineage, nearest first, each once.

    An incrementally grown pairs dataset descends from one generations dataset per refresh.
    """
    found: dict[str, DatasetRef] = {}
    for _, node, _ in store.catalog.lineage(ref):
        if node.kind == kind:
            found.setdefault(node.qualified, node)
    if not found:
        raise ValueError(f"{ref.name} has no {kind} dataset in its lineage")
    return list(found.values())
