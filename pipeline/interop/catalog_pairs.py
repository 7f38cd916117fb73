"""Pairs datasets in the catalog: register imported pairs, find a run's D_t and D_e, and their prompts.

Imported pairs are registered like pairing's output (docs/method.md §Pipeline stages): the rejects first,
then ``pairs_trace`` and ``pairs_empty``, each content-addressed by its source, its rows and the settings
that shaped them. Their config records ``imported_from``, which ``bvpo lineage``, the run report and the
model card show ("imported from …: not sampled here").
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

from pipeline.config import PipelineConfig
from pipeline.generation.reasoning import TraceFormat
from pipeline.interop.export_pairs import PAIR_KINDS
from pipeline.interop.formats import MODES, Mode
from pipeline.interop.import_pairs import ImportResult, PairSource, load_pairs
from pipeline.models import model_identity, resolve_model_path
from storage import DatasetRef, DatasetStore, schema_for


class PairImportError(ValueError):
    """No usable pair in the sources (the message gives the first reasons)."""


def configured_sources(config: PipelineConfig) -> list[PairSource]:
    """The ``pairs.*`` sources of a config (empty: pairs are generated here)."""
    return [PairSource(location, mode) for location, mode in config.pairs.sources]  # type: ignore[arg-type]


def load_tokenizer(config: PipelineConfig) -> Any:
    """The policy model's tokenizer (its chat template renders imported prompts)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolve_model_path(config.model), trust_remote_code=config.model.trust_remote_code
    )


def import_settings(config: PipelineConfig, sources: list[PairSource]) -> dict[str, Any]:
    """What shapes imported rows (besides their content): sources, model (template, tokenizer), tags."""
    return {
        "imported_from": [s.label for s in sources],
        "model": model_identity(config.model),
        "reasoning": config.generation.reasoning.model_dump(mode="json"),
        "max_prompt_chars": config.prompts.max_prompt_chars,
        "max_response_chars": config.pairs.max_response_chars,
    }


def import_pairs(
    store: DatasetStore,
    config: PipelineConfig,
    sources: list[PairSource],
    *,
    tokenizer: Any | None = None,
    flow_run_id: str | None = None,
) -> tuple[dict[Mode, DatasetRef], ImportResult]:
    """Validate every source row by row and register the kept pairs; nothing is registered on error."""
    if not sources:
        raise PairImportError("no pair source given (pairs.source, pairs.trace_source or pairs.empty_source)")
    fmt = TraceFormat(config.generation.reasoning)
    result = load_pairs(
        sources,
        tokenizer if tokenizer is not None else load_tokenizer(config),
        fmt,
        max_prompt_chars=config.prompts.max_prompt_chars,
        max_response_chars=config.pairs.max_response_chars,
        hf_config=config.pairs.hf_config,
    )
    if not result.kept:
        reasons = "; ".join(f"{r['row_key']}: {r['reason']}" for r in result.rejects[:5]) or "no rows"
        raise PairImportError(f"no usable pairs in {', '.join(s.label for s in sources)}: {reasons}")
    settings = import_settings(config, sources)
    tables = {mode: _table(PAIR_KINDS[mode], result.pairs[mode]) for mode in MODES}
    settings["content"] = _digest([tables[m].to_pylist() for m in MODES])
    if result.rejects:
        store.put(
            "rejects",
            _table("rejects", result.rejects),
            config={"for": "pairs_trace", **settings},
            parents=[],
            flow_run_id=flow_run_id,
        )
    refs = {
        mode: store.put(PAIR_KINDS[mode], tables[mode], config=settings, parents=[], flow_run_id=flow_run_id)
        for mode in MODES
    }
    return refs, result


def imported_from(store: DatasetStore, ref: DatasetRef) -> list[str] | None:
    """The sources a pairs dataset was imported from (None: it was sampled and paired here)."""
    _, config = store.catalog.parents_of(ref)
    value = config.get("imported_from")
    return list(value) if value else None


def run_pairs(store: DatasetStore, name: str | None = None) -> dict[Mode, DatasetRef]:
    """D_t and D_e of a run: the latest pairs datasets, those in a dataset's lineage, or a pairs dataset
    and the other mode's dataset registered with it (same parents and config)."""
    catalog = store.catalog
    if not name or name == "latest":
        return {mode: catalog.resolve(PAIR_KINDS[mode]) for mode in MODES}
    ref = catalog.resolve(name)
    found: dict[Mode, DatasetRef] = {}
    for _, node, _ in catalog.lineage(ref):
        for mode, kind in PAIR_KINDS.items():
            if node.kind == kind and mode not in found:
                found[mode] = node
    if len(found) == 1:  # a pairs dataset itself: its sibling has the same parents and config
        mode, pairs = next(iter(found.items()))
        other: Mode = "empty" if mode == "trace" else "trace"
        identity = catalog.parents_of(pairs)
        for row in reversed(catalog.list_datasets()):
            if row["kind"] == PAIR_KINDS[other]:
                sibling = catalog.resolve(row["name"])
                if catalog.parents_of(sibling) == identity:
                    found[other] = sibling
                    break
    if not found:
        raise ValueError(f"{ref.name} has no pairs_trace or pairs_empty dataset in its lineage")
    return found


def prompt_texts(store: DatasetStore, refs: list[DatasetRef]) -> dict[str, str]:
    """``prompt_id -> prompt`` from the prompts datasets in the lineage of ``refs`` (empty when imported)."""
    out: dict[str, str] = {}
    for ref in refs:
        for _, node, _ in store.catalog.lineage(ref):
            if node.kind == "prompts":
                out.update({row["prompt_id"]: row["prompt"] for row in store.read_rows(node)})
    return out


def _table(kind: str, rows: list[dict[str, Any]]) -> pa.Table:
    schema = schema_for(kind)
    if not rows:
        return schema.empty_table()
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
