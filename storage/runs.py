"""Which datasets make up one pipeline run, found through the catalog alone.

Every dataset records the Prefect flow run that registered it (``flow_run_id``) and its parents, so from one
dataset of the run (its ``eval_results``, or the most downstream dataset a flow run registered) the lineage
gives every other one, reused datasets included. Nothing here talks to Prefect: :mod:`flows.runs` maps flow
run names and parent runs to ids first. The run report (:mod:`pipeline.reporting.run_report`) is built from
the :class:`RunDatasets` this module collects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from storage.catalog import DatasetRef
from storage.store import DatasetStore

# Most downstream first: the dataset a run is anchored on when a flow run registered several.
ANCHOR_ORDER = (
    "eval_results",
    "train_metrics",
    "ref_logps",
    "pairs_trace",
    "pairs_empty",
    "scores",
    "generations",
    "prompts",
    "eval_generations",
)
_UUID_PREFIX = re.compile(r"^[0-9a-fA-F-]{6,36}$")


class RunNotFound(LookupError):
    """Nothing in the catalog matches the run asked for."""


@dataclass(frozen=True)
class Entry:
    """One row of the catalog's ``datasets`` table."""

    name: str
    kind: str
    version: str
    number: int
    path: str
    row_count: int
    config: dict[str, Any]
    parents: tuple[str, ...]
    flow_run_id: str | None
    created_at: datetime | None

    @property
    def qualified(self) -> str:
        return f"{self.kind}:{self.version}"

    @property
    def ref(self) -> DatasetRef:
        return DatasetRef(
            kind=self.kind, version=self.version, number=self.number, path=self.path, row_count=self.row_count
        )


class CatalogView:
    """The ``datasets`` table read once, with lineage helpers (no connection is kept open)."""

    def __init__(self, store: DatasetStore) -> None:
        self.store = store
        rows = store.catalog.snapshot().to_pylist()
        self.entries = [
            Entry(
                name=r["name"],
                kind=r["kind"],
                version=r["version"],
                number=int(r["number"]),
                path=r["path"],
                row_count=int(r["row_count"]),
                config=json.loads(r["config"]) if isinstance(r["config"], str) else dict(r["config"] or {}),
                parents=tuple(r["parents"] or ()),
                flow_run_id=r["flow_run_id"],
                created_at=r["created_at"],
            )
            for r in rows
            if r["status"] == "complete"
        ]
        self._by_qualified = {e.qualified: e for e in self.entries}

    def get(self, qualified: str) -> Entry | None:
        return self._by_qualified.get(qualified)

    def find(self, name: str) -> Entry | None:
        """A dataset by ``kind__v<N>``, ``kind:<version>``, ``<version>`` or ``kind`` (its latest version)."""
        if ":" in name:
            return self.get(name)
        if any(e.kind == name for e in self.entries):
            return self.latest(name)
        return next((e for e in self.entries if name in (e.name, e.version)), None)

    def latest(self, kind: str) -> Entry | None:
        found = [e for e in self.entries if e.kind == kind]
        return max(found, key=lambda e: (e.created_at or datetime.min, e.number)) if found else None

    def ancestors(self, entry: Entry) -> list[Entry]:
        """``entry`` and every dataset it was derived from, each once, nearest first."""
        out, seen, queue = [], set(), [entry]
        while queue:
            node = queue.pop(0)
            if node.qualified in seen:
                continue
            seen.add(node.qualified)
            out.append(node)
            queue += [p for p in (self.get(q) for q in node.parents) if p is not None]
        return out

    def children(self, entry: Entry, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind and entry.qualified in e.parents]

    def run_ids(self, prefix: str) -> list[str]:
        """Flow run ids in the catalog equal to, or starting with, ``prefix``."""
        ids = sorted({e.flow_run_id for e in self.entries if e.flow_run_id})
        exact = [i for i in ids if i == prefix]
        return exact or ([i for i in ids if i.startswith(prefix)] if _UUID_PREFIX.match(prefix) else [])

    def anchor_of_runs(self, run_ids: Sequence[str]) -> Entry | None:
        """The most downstream dataset the flow runs registered, extended from training to its evaluation."""
        registered = [e for e in self.entries if e.flow_run_id in set(run_ids)]
        for kind in ANCHOR_ORDER:
            found = [e for e in registered if e.kind == kind]
            if found:
                return self.downstream(max(found, key=lambda e: (e.created_at or datetime.min, e.number)))
        return None

    def downstream(self, entry: Entry) -> Entry:
        """A ``train_metrics`` dataset's latest evaluation (``eval_results``), else the entry itself."""
        if entry.kind != "train_metrics":
            return entry
        results = [
            r for g in self.children(entry, "eval_generations") for r in self.children(g, "eval_results")
        ]
        return max(results, key=lambda e: (e.created_at or datetime.min, e.number)) if results else entry


def resolve_run(view: CatalogView, run: str) -> Entry:
    """The anchor dataset of ``run``: ``latest``, a dataset name, or a flow run id (or unique prefix)."""
    if run == "latest":
        for kind in ("eval_results", "train_metrics", *ANCHOR_ORDER):
            entry = view.latest(kind)
            if entry is not None:
                return view.downstream(entry)
        raise RunNotFound(f"the catalog {view.store.catalog.path} holds no dataset yet: run `bvpo run` first")
    entry = view.find(run)
    if entry is not None:
        return view.downstream(entry)
    ids = view.run_ids(run)
    if len(ids) > 1:
        raise RunNotFound(
            f"'{run}' matches {len(ids)} flow runs ({', '.join(ids[:3])}, ...): give more of the id"
        )
    anchor = view.anchor_of_runs(ids) if ids else None
    if anchor is None:
        raise RunNotFound(f"no dataset in {view.store.catalog.path} was registered by a flow run '{run}'")
    return anchor


@dataclass
class RunDatasets:
    """The datasets of one run, by kind (the lineage of its anchor, its rejects and probe rows)."""

    anchor: Entry
    lineage: list[Entry]
    by_kind: dict[str, list[Entry]]
    rejects: list[Entry]
    grad_stats: Entry | None = None
    agreement: Entry | None = None  # sampler/trainer log-prob agreement of the run's reference pass

    def one(self, kind: str) -> Entry | None:
        found = self.by_kind.get(kind, [])
        return found[0] if found else None


def collect_run(view: CatalogView, anchor: Entry) -> RunDatasets:
    """The run ``anchor`` belongs to: its lineage, the rejects of its stages and its gradient-probe rows."""
    lineage = view.ancestors(anchor)
    by_kind: dict[str, list[Entry]] = {}
    for entry in lineage:
        by_kind.setdefault(entry.kind, []).append(entry)
    # Rejects are siblings, not ancestors: those registered with the same inputs as one of the run's datasets.
    rejects = []
    for r in view.entries:
        if r.kind != "rejects":
            continue
        target = dict(r.config)
        kind = target.pop("for", None)
        if any(e.kind == kind and e.parents == r.parents and e.config == target for e in lineage):
            rejects.append(r)
    trained = [
        e for e in by_kind.get("eval_generations", []) if e.config.get("label") == "trained" and e.parents
    ]
    if trained and "train_metrics" in by_kind:  # the main checkpoint first (baselines may follow)
        main = {p for e in trained for p in e.parents}
        by_kind["train_metrics"].sort(key=lambda e: e.qualified not in main)
    run = RunDatasets(anchor, lineage, by_kind, rejects)
    train = run.one("train_metrics")
    if train is not None:  # the gradient probe's rows: registered with the same inputs as the training
        probes = [
            e
            for e in view.entries
            if e.kind == "grad_stats" and e.parents == train.parents and e.config == train.config
        ]
        run.grad_stats = probes[-1] if probes else None
    ref = run.one("ref_logps")
    if ref is not None:  # registered by the reference pass with its inputs: {"for": "ref_logps", **config}
        found = [
            e
            for e in view.entries
            if e.kind == "logp_agreement"
            and e.parents == ref.parents
            and e.config == {"for": "ref_logps", **ref.config}
        ]
        run.agreement = found[-1] if found else None
    return run
