"""Tasks of an incremental refresh (``refresh.incremental``): new prompts only, pairs as a growing union.

Datasets of one *chain* (same prompt source, sampling model, generation, scoring and pairing settings)
extend each other:

- ``prompts``: every prompt so far; a version registers only when the source gained prompts (by content
  id), with the previous version as its parent and ``added`` in its config;
- ``generations`` and ``scores``: the new train prompts only (config ``new_since``: the prompts version
  the previous pairs covered);
- ``pairs_trace`` / ``pairs_empty``: the previous version plus the new prompts' pairs (config ``chain``,
  ``prompts``: the prompts version covered, ``previous``, ``added``), so training reads one dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from pipeline.config import PipelineConfig
from storage import DatasetRef, DatasetStore
from tasks.orchestration import HOUR, TRANSIENT_RETRIES
from tasks.policy import round_tag
from tasks.stages import _generation_config, _materialize, _table, pairing_stats_artifact

MODES = ("trace", "empty")


class PromptsStep(BaseModel):
    """The prompts version of this refresh and how many prompts it added."""

    prompts: DatasetRef
    added: int


class PreviousPairs(BaseModel):
    """The newest D_t / D_e of the chain and the prompts version they cover."""

    pairs_trace: DatasetRef
    pairs_empty: DatasetRef
    prompts: DatasetRef


class PairsStep(BaseModel):
    """D_t and D_e after this refresh, and the pairs it added per mode."""

    pairs_trace: DatasetRef
    pairs_empty: DatasetRef
    added: dict[str, int]


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chain_key(config: PipelineConfig) -> str:
    """Datasets with the same key extend each other: same source, sampler, scoring and pairing."""
    from pipeline.prompts.incremental import prompt_series

    return _digest(
        {
            "series": prompt_series(config.prompts),
            "generation": _generation_config(config),
            "scoring": config.scoring.model_dump(mode="json"),
            "pairing": config.pairing.model_dump(mode="json"),
        }
    )


@task(name="prompts-incremental", cache_policy=NO_CACHE, timeout_seconds=HOUR, **TRANSIENT_RETRIES)
def incremental_prompts_task(config: PipelineConfig) -> PromptsStep:
    """The source's prompts against the previous version of its series: a new version of the prompts so
    far when it gained some (only those are added), else the previous version."""
    from pipeline.prompts.incremental import diff_prompts, prompt_series
    from pipeline.prompts.source import load_prompts

    store = DatasetStore(config.workspace)
    logger = get_run_logger()
    series = prompt_series(config.prompts)
    previous = store.catalog.find_latest("prompts", {"series": series})
    loaded = load_prompts(config.prompts)
    if len(loaded.rows) >= config.prompts.num_prompts:
        logger.warning(
            "prompts: the source was read up to prompts.num_prompts=%d; raise it to take later rows",
            config.prompts.num_prompts,
        )
    before = store.read_rows(previous) if previous is not None else []
    diff = diff_prompts(before, loaded.rows)  # refuses lost or changed prompts, registering nothing
    if previous is not None and not diff.added:
        logger.info("prompts: no new prompts in the source; %s holds all %d", previous.name, len(before))
        return PromptsStep(prompts=previous, added=0)
    if not before and not diff.added:
        reasons = "; ".join(f"{r['row_key']}: {r['reason']}" for r in loaded.rejects[:5])
        raise ValueError(
            f"no usable prompts in '{config.prompts.source}': {reasons or 'the source is empty'}"
        )
    settings = config.prompts.model_dump(mode="json") | {
        "series": series,
        "previous": previous.qualified if previous is not None else None,
        "added": len(diff.added),
    }
    parents = [previous] if previous is not None else []
    ref = _materialize(
        store, "prompts", settings, parents, lambda: (_table("prompts", before + diff.added), loaded.rejects)
    )
    logger.info("prompts: %s adds %d new prompt(s) to %d", ref.name, len(diff.added), len(before))
    return PromptsStep(prompts=ref, added=len(diff.added))


def previous_pairs(config: PipelineConfig) -> PreviousPairs | None:
    """The newest D_t / D_e of this config's chain (None: the chain starts with this refresh)."""
    store = DatasetStore(config.workspace)
    catalog = store.catalog
    trace = catalog.find_latest("pairs_trace", {"chain": chain_key(config)})
    if trace is None:
        return None
    parents, settings = catalog.parents_of(trace)
    generations = next(p for p in parents if p.startswith("generations:"))
    empty = catalog.find_latest(
        "pairs_empty", {"chain": settings["chain"], "prompts": settings["prompts"]}, generations
    )
    if empty is None:
        return None
    return PreviousPairs(pairs_trace=trace, pairs_empty=empty, prompts=catalog.resolve(settings["prompts"]))


def _ready(
    table: pa.Table, rejects: list[dict[str, Any]]
) -> Callable[[], tuple[pa.Table, list[dict[str, Any]]]]:
    """A ``compute`` for :func:`_materialize` whose result is already at hand."""
    return lambda: (table, rejects)


def new_train_prompts(config: PipelineConfig, prompts: DatasetRef, covered: DatasetRef | None) -> int:
    """Train-split prompts of ``prompts`` that ``covered`` does not hold."""
    store = DatasetStore(config.workspace)
    known = {r["prompt_id"] for r in store.read_rows(covered)} if covered is not None else set()
    return sum(r["split"] == "train" and r["prompt_id"] not in known for r in store.read_rows(prompts))


@task(name="pair-incremental", cache_policy=NO_CACHE, timeout_seconds=HOUR, **TRANSIENT_RETRIES)
def pair_union_task(
    config: PipelineConfig,
    prompts: DatasetRef,
    generations: DatasetRef,
    scores: DatasetRef,
    previous: PreviousPairs | None,
) -> PairsStep:
    """Pairs of the new generations, registered as the previous D_t / D_e plus them (no pair twice)."""
    from pipeline.pair_union import union_by_key
    from pipeline.pairing import build_pairs

    store = DatasetStore(config.workspace)
    logger = get_run_logger()
    pairing = config.pairing.model_dump(mode="json") | round_tag(config)
    before = {m: getattr(previous, f"pairs_{m}") if previous else None for m in MODES}
    settings = pairing | {
        "chain": chain_key(config),
        "prompts": prompts.qualified,
        "previous": {m: ref.qualified for m, ref in before.items() if ref is not None} or None,
    }
    parents = {m: [generations, scores] + ([ref] if ref is not None else []) for m, ref in before.items()}
    found = {m: store.lookup(f"pairs_{m}", settings, parents[m]) for m in MODES}
    out = {m: ref for m, ref in found.items() if ref is not None}
    if len(out) < len(MODES):
        result = build_pairs(store.read(generations), store.read(scores), config.pairing)
        pairing_stats_artifact(result.stats, pairing)
        new = {"trace": result.pairs_trace, "empty": result.pairs_empty}
        for mode in MODES:
            kind, old = f"pairs_{mode}", before[mode]
            table = union_by_key(store.read(old), new[mode], "pair_id", kind) if old else new[mode]
            rejects = result.rejects if mode == "trace" else []
            out[mode] = _materialize(store, kind, settings, parents[mode], _ready(table, rejects))
    added: dict[str, int] = {}
    for mode in MODES:
        old = before[mode]
        added[mode] = out[mode].row_count - (old.row_count if old else 0)
        logger.info(
            "pairs_%s: %s = %s + %d new pair(s)",
            mode,
            out[mode].name,
            old.name if old else "nothing before",
            added[mode],
        )
    return PairsStep(pairs_trace=out["trace"], pairs_empty=out["empty"], added=added)
