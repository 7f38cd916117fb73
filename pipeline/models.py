"""Which model a config names: its identity in dataset fingerprints and the folder to load it from."""

from __future__ import annotations

from pipeline.config import EMBEDDED_MODEL, ModelConfig
from pipeline.model_assets import EMBEDDED_MODEL_NAME, embedded_checkpoint


def model_identity(model: ModelConfig) -> str:
    """The model's name in dataset configs: the embedded model by a stable name, others by path or hub id."""
    return EMBEDDED_MODEL_NAME if model.name_or_path == EMBEDDED_MODEL else model.name_or_path


def resolve_model_path(model: ModelConfig) -> str:
    """The model folder (or hub id) to load; a local folder lacking config, weights or tokenizer fails.

    The embedded model is converted to a checkpoint on first use (:func:`embedded_checkpoint`).
    """
    from pipeline.preflight import check_model_dir

    path = str(embedded_checkpoint()) if model.name_or_path == EMBEDDED_MODEL else model.name_or_path
    check_model_dir(path)
    return path
