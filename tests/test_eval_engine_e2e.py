"""One evaluation engine for several models (pipeline/evaluation/engine.py), through real vLLM on CPU.

An engine started on the embedded model, with a perturbed copy's weights then loaded in place, must sample
exactly what a fresh engine started on that copy samples (same seed); and the copy must really answer
differently from the original (the weights were swapped, not ignored). Two engine starts in all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import GenerationConfig
from pipeline.evaluation.engine import EngineModel, engine_groups, generate_for_models
from pipeline.model_assets import embedded_checkpoint
from pipeline.prompts.builtin import build_builtin_prompts

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CONFIG = GenerationConfig(samples_per_prompt=2, max_trace_tokens=12, max_answer_tokens=16, seed=5)
PROMPTS = [{"prompt_id": r.prompt_id, "prompt": r.prompt} for r in build_builtin_prompts(3, seed=1)]


def _perturbed_copy(folder: Path) -> Path:
    """The embedded model with every weight matrix scaled and shifted a little (same architecture)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(embedded_checkpoint())
    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                noise = torch.randn(param.shape, generator=generator) * param.std() * 0.3
                param.add_(noise)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def _texts(rows: list[dict[str, Any]]) -> dict[str, tuple[str | None, str]]:
    return {r["generation_id"]: (r["trace"], r["answer"]) for r in rows}


def test_reloaded_weights_sample_like_a_fresh_engine(tmp_path: Path) -> None:
    reference = EngineModel("reference", str(embedded_checkpoint()), "smollm2")
    copy = EngineModel("copy", str(_perturbed_copy(tmp_path / "copy")), "copy")
    assert len(engine_groups([reference, copy])) == 1  # same architecture: one engine
    options = {"samples_per_prompt": 2, "temperature": 0.8, "echo": False}
    events: list[dict[str, Any]] = []
    shared = generate_for_models([reference, copy], PROMPTS, CONFIG, on_event=events.append, **options)
    fresh = generate_for_models([copy], PROMPTS, CONFIG, **options)
    assert [e["event"] for e in events].count("engine_ready") == 1
    assert [e["label"] for e in events if e["event"] == "weights_loaded"] == ["copy"]
    assert len(shared["copy"]) == len(PROMPTS) * 2 * 2  # prompts × modes × samples
    assert _texts(shared["copy"]) == _texts(fresh["copy"])
    assert _texts(shared["copy"]) != _texts(shared["reference"])
    assert {r["model"] for r in shared["copy"]} == {"copy"}
