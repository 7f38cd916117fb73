"""On-policy rounds: which model a refresh samples from (``generation.policy``) and which round that is.

Round 1 samples from the base model (or from a checkpoint not trained in this workspace); a refresh that
samples from a checkpoint trained here on round-k data is round k + 1. The round and the sampling checkpoint
go into the settings of the datasets it produces (:func:`round_tag`), so ``bvpo lineage`` and SQL on
``datasets.config`` show them. The base model stays ``model.name_or_path``: evaluation compares every round
with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.config import ModelConfig, PipelineConfig
from pipeline.models import model_identity
from storage import CatalogError, DatasetRef, DatasetStore
from storage.lineage import ancestor_of_kind

BASE = "base"
LATEST = "latest"


class NoCheckpointYet(ValueError):
    """``generation.policy: latest`` in a workspace where nothing was trained yet."""


class SamplingPolicy(BaseModel):
    """The resolved ``generation.policy``."""

    checkpoint: str | None = None  # None: the base model
    train_metrics: DatasetRef | None = None  # the checkpoint's training run, when trained in this workspace
    round: int = 1


def resolve_policy(config: PipelineConfig) -> SamplingPolicy:
    """The checkpoint ``generation.policy`` names (None for ``base``) and the round sampling from it is."""
    policy = config.generation.policy
    if policy == BASE:
        return SamplingPolicy()
    store = DatasetStore(config.workspace)
    ref: DatasetRef | None
    if policy == LATEST:
        try:
            ref = store.catalog.resolve("train_metrics")
        except CatalogError:
            raise NoCheckpointYet(
                f"generation.policy=latest: no checkpoint was trained in {store.workspace} yet; run a "
                "round with generation.policy=base (and train it) first, or name a checkpoint directory"
            ) from None
        path = store.workspace / "checkpoints" / ref.version
    else:
        path = Path(policy).expanduser().resolve()
        ref = store.catalog.lookup("train_metrics", path.name)
        if ref is not None and path.parent != store.workspace / "checkpoints":
            ref = None
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"generation.policy={policy}: no checkpoint at {path} (no config.json there)")
    return SamplingPolicy(checkpoint=str(path), train_metrics=ref, round=_round_after(store, ref))


def pin_policy(config: PipelineConfig) -> PipelineConfig:
    """``config`` with ``generation.policy`` resolved to a checkpoint directory (``base`` stays).

    A flow pins it once, so every stage of the run samples from, trains and scores with the same model
    even if another run registers a newer checkpoint meanwhile.
    """
    if config.generation.policy == BASE:
        return config
    checkpoint = resolve_policy(config).checkpoint
    generation = config.generation.model_copy(update={"policy": checkpoint})
    return config.model_copy(update={"generation": generation})


def policy_model(config: PipelineConfig) -> ModelConfig:
    """The model responses are sampled from and training starts from."""
    checkpoint = resolve_policy(config).checkpoint
    if checkpoint is None:
        return config.model
    return config.model.model_copy(update={"name_or_path": checkpoint})


def reference_model(config: PipelineConfig) -> ModelConfig:
    """The reference model of the DPO terms: the sampling policy or the base model (``train.reference``)."""
    return config.model if config.train.reference == BASE else policy_model(config)


def round_tag(config: PipelineConfig) -> dict[str, Any]:
    """Settings entry recording the round and the sampling checkpoint (nothing for the base model)."""
    policy = resolve_policy(config)
    if policy.checkpoint is None:
        return {}
    return {
        "policy": {
            "round": policy.round,
            "checkpoint": policy.checkpoint,
            "train_metrics": policy.train_metrics.qualified if policy.train_metrics else None,
            "base_model": model_identity(config.model),
        }
    }


def round_of(store: DatasetStore, ref: DatasetRef) -> int:
    """The round of a dataset: that of the generations it descends from (1 when none records one)."""
    try:
        generations = ancestor_of_kind(store, ref, "generations")
    except ValueError:  # imported pairs: sampled elsewhere
        return 1
    _, settings = store.catalog.parents_of(generations)
    return int((settings.get("policy") or {}).get("round") or 1)


def model_round(store: DatasetStore, trained_by: DatasetRef | None) -> int | None:
    """The round of an evaluated model: 0 for the base model (``trained_by`` None), the round of the data a
    ``train_metrics`` dataset trained on, None for a checkpoint not trained in this workspace."""
    if trained_by is None:
        return 0
    return round_of(store, trained_by) if trained_by.kind == "train_metrics" else None


def _round_after(store: DatasetStore, train_metrics: DatasetRef | None) -> int:
    return 1 if train_metrics is None else round_of(store, train_metrics) + 1
