"""Model loading and mixed precision shared by the reference pass and the trainer."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def load_model_and_tokenizer(model_path: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """Load a causal LM with fp32 master weights (autocast gives bf16 compute) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), tokenizer


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    # CPU autocast supports bf16 everywhere; it is fast where the CPU has AVX512-BF16 or AMX.
    return True


def autocast(enabled: bool | str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on the model's device when enabled (``"auto"``: where fast) and supported, else no-op."""
    from pipeline.training.precision import resolve_bf16

    if not resolve_bf16(enabled) or not bf16_supported():
        return contextlib.nullcontext()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
