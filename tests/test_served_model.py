"""pipeline/preflight.py's check_served_model: the HTTP engine refuses a server that serves another model
than ``model.name_or_path`` (the compose stack's vLLM service, started with VLLM_MODEL)."""

from __future__ import annotations

import re

import pytest

from pipeline.preflight import ServedModelError, check_served_model


def test_the_served_id_matches_the_config() -> None:
    check_served_model([{"id": "Qwen/Qwen3-8B"}], "Qwen/Qwen3-8B", None)


def test_an_alias_matches_through_the_root_vllm_reports() -> None:
    models = [{"id": "policy", "root": "/models/Qwen3-8B"}]
    check_served_model(models, "Qwen/Qwen3-8B", "policy")  # a local copy of the same model, by folder name


def test_another_model_is_refused() -> None:
    with pytest.raises(
        ServedModelError, match=re.escape("serves Qwen/Qwen3-8B, but model.name_or_path is 'embedded'")
    ):
        check_served_model([{"id": "Qwen/Qwen3-8B", "root": "Qwen/Qwen3-8B"}], "embedded", None)


def test_a_configured_served_model_must_be_served() -> None:
    with pytest.raises(ServedModelError, match="'other' is not served"):
        check_served_model([{"id": "Qwen/Qwen3-8B"}], "Qwen/Qwen3-8B", "other")
    with pytest.raises(ServedModelError, match="lists no model"):
        check_served_model([], "Qwen/Qwen3-8B", None)
