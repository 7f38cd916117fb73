"""After training and after evaluation: the checkpoint's model card and the experiment trackers.

Both read what the catalog recorded (train_metrics, grad_stats, eval_results and their lineage), so they
run after the stage that produced the rows and never inside the training loop. A tracker logs each thing
once: ``<checkpoint>/runs/.reported.json`` remembers what each tracker already received, so a rerun that
reuses a trained checkpoint does not log its curves twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PipelineConfig
from pipeline.evaluation.report import comparison_markdown
from pipeline.training.model_card import CardFacts, LineageEntry, write_model_card
from pipeline.training.trackers import mlflow_store, open_trackers, report_evaluation, report_training
from storage import DatasetRef, DatasetStore

RUNS_DIR = "runs"
REPRODUCE = "bvpo run --config bvpo-config.yaml"


@dataclass(frozen=True)
class TrainedModel:
    """A checkpoint and how an evaluation labels it (``trained``, ``dpo_trace``, ``dpo_empty``, …)."""

    label: str
    checkpoint: Path
    train_metrics: DatasetRef


def lineage_entries(store: DatasetStore, ref: DatasetRef) -> list[LineageEntry]:
    """Every dataset ``ref`` was trained from, with where its rows came from."""
    out: list[LineageEntry] = []
    seen = {ref.qualified}
    for _, node, config in store.catalog.lineage(ref):
        if node.qualified in seen:
            continue
        seen.add(node.qualified)
        out.append(
            LineageEntry(node.kind, node.name, node.version, node.row_count, _origin(node.kind, config))
        )
    return out


def card_facts(
    store: DatasetStore,
    train_metrics: DatasetRef,
    *,
    eval_rows: list[dict[str, Any]] | None = None,
    eval_dataset: str | None = None,
) -> CardFacts:
    """The facts of a checkpoint's model card, from its train_metrics dataset and lineage."""
    _, settings = store.catalog.parents_of(train_metrics)
    train = settings.get("train", {})
    lineage = lineage_entries(store, train_metrics)
    sources = [s for e in lineage for s in _imported(store, e)]
    return CardFacts(
        name=train_metrics.version,
        base_model=str(settings.get("model", "unknown")),
        alpha=train.get("alpha"),
        beta=float(train.get("beta", float("nan"))),
        train=train,
        lineage=lineage,
        metrics=store.read_rows(train_metrics),
        command=REPRODUCE,
        eval_rows=eval_rows,
        eval_dataset=eval_dataset,
        hub_datasets=sorted({s.removeprefix("hf:").split(":")[0] for s in sources if s.startswith("hf:")}),
    )


def publish_training(
    store: DatasetStore,
    config: PipelineConfig,
    train_metrics: DatasetRef,
    checkpoint: Path,
    grad_stats: DatasetRef | None = None,
) -> Path:
    """Write the checkpoint's model card and reproducing config; report the run to the trackers."""
    facts = card_facts(store, train_metrics)
    card = write_model_card(checkpoint, facts, config_yaml=_config_yaml(config))
    if config.train.report_to:
        params = _params(facts, train_metrics)
        grad_rows = store.read_rows(grad_stats) if grad_stats is not None else []
        with _Reporter(store, config, train_metrics, checkpoint) as reporter:
            for tracker in reporter.pending("train"):
                report_training([tracker], params, facts.metrics, grad_rows)
    return card


def publish_evaluation(
    store: DatasetStore, config: PipelineConfig, results: DatasetRef, models: Sequence[TrainedModel]
) -> list[Path]:
    """Add the evaluation table (this model next to the reference) to each model's card and trackers."""
    rows = store.read_rows(results)
    cards = []
    for model in models:
        mine = [r for r in rows if r["model_label"] in (model.label, "reference")]
        if not (model.checkpoint / "config.json").is_file():
            continue
        facts = card_facts(store, model.train_metrics, eval_rows=mine, eval_dataset=results.name)
        cards.append(write_model_card(model.checkpoint, facts))
        if config.train.report_to:
            step = max((int(m["step"]) for m in facts.metrics), default=0)
            with _Reporter(store, config, model.train_metrics, model.checkpoint) as reporter:
                for tracker in reporter.pending(f"eval:{results.version}"):
                    report_evaluation([tracker], step, mine, comparison_markdown(mine))
    return cards


class _Reporter:
    """Opens the configured trackers of one training run and yields those that still need ``what``."""

    def __init__(
        self, store: DatasetStore, config: PipelineConfig, train_metrics: DatasetRef, checkpoint: Path
    ) -> None:
        self.marker = checkpoint / RUNS_DIR / ".reported.json"
        uri, artifacts = mlflow_store(config.train.mlflow_tracking_uri, store.workspace)
        # The store's URI is keyed by its hash: it may carry credentials (http://user:token@host).
        self.names = {
            "tensorboard": "tensorboard",
            "mlflow": f"mlflow:{hashlib.sha256(uri.encode()).hexdigest()[:16]}",
        }
        self.trackers = open_trackers(
            config.train.report_to,
            log_dir=checkpoint / RUNS_DIR,
            mlflow_tracking_uri=uri,
            mlflow_artifacts=artifacts,
            run_key=train_metrics.version,
            run_name=train_metrics.name,
        )
        self.order = list(config.train.report_to)
        self.done: dict[str, list[str]] = json.loads(self.marker.read_text()) if self.marker.is_file() else {}

    def __enter__(self) -> _Reporter:
        return self

    def pending(self, what: str) -> list[Any]:
        out = []
        for name, tracker in zip(self.order, self.trackers, strict=True):
            key = self.names[name]
            if what not in self.done.get(key, []):
                out.append(tracker)
                self.done.setdefault(key, []).append(what)
        return out

    def __exit__(self, *exc: object) -> None:
        for tracker in self.trackers:
            tracker.close()
        if exc[0] is None:
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(json.dumps(self.done, indent=1))


def _origin(kind: str, config: dict[str, Any]) -> str:
    if config.get("imported_from"):
        return f"imported from {', '.join(config['imported_from'])}: not sampled here"
    if kind == "prompts":
        return f"prompts from {config.get('source', '?')}"
    if kind == "generations":
        return f"sampled here with {config.get('model', '?')}"
    if kind == "scores":
        names = [s.get("label") or s.get("name") for s in config.get("scorers", [])]
        return "scored with " + (", ".join(str(n) for n in names) or "?")
    if kind in ("pairs_trace", "pairs_empty"):
        return "paired here (best vs worst answer per prompt)"
    if kind == "ref_logps":
        return f"reference log-probs of {config.get('ref_model', '?')}"
    return kind


def _imported(store: DatasetStore, entry: LineageEntry) -> list[str]:
    if entry.kind not in ("pairs_trace", "pairs_empty"):
        return []
    _, config = store.catalog.parents_of(store.catalog.resolve(entry.name))
    return [str(s).split(" (")[0] for s in config.get("imported_from") or []]


def _params(facts: CardFacts, train_metrics: DatasetRef) -> dict[str, Any]:
    keys = ("alpha", "beta", "max_steps", "learning_rate", "batch_size", "budget", "seed", "lora")
    params: dict[str, Any] = {"model": facts.base_model, "train_metrics": train_metrics.name}
    params.update({k: facts.train[k] for k in keys if k in facts.train})
    params.update({e.kind: e.name for e in facts.lineage if e.kind in ("pairs_trace", "pairs_empty")})
    return params


def _config_yaml(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100)
