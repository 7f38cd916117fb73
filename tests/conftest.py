"""Shared fixtures. Tests run offline; Prefect runs on a temporary local API (prefect_test_harness)."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bvpo-prefect-home-"))
os.environ.pop("PREFECT_API_URL", None)
# Stages run in the test process (tests patch engines and crash points there); the tests of
# pipeline/isolation.py and of memory across stages turn child processes back on.
os.environ.setdefault("BVPO_ISOLATE_STAGES", "0")


@pytest.fixture
def engine_env_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables ``open_vllm_engine`` writes for its own process, unset (and restored after the test)."""
    for name in (
        "VLLM_CPU_KVCACHE_SPACE",
        "VLLM_CPU_OMP_THREADS_BIND",
        "VLLM_CPU_NUM_OF_RESERVED_CPU",
        "VLLM_ENABLE_V1_MULTIPROCESSING",
    ):
        monkeypatch.delenv(name, raising=False)
