"""Model loading and mixed precision shared by the reference pass and the trainer."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def load_model_and_tokenizer(
    model_path: str, trust_remote_code: bool, *, weights: bool = True
) -> tuple[Any, Any]:
    """Load a causal LM with fp32 master weights (autocast gives bf16 compute) and its tokenizer.

    ``weights=False``: the tokenizer only (the model is ``None``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not weights:
        return None, tokenizer
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), tokenizer


def load_on_meta(model_path: str, trust_remote_code: bool) -> Any:
    """The model's modules with no weights (meta device): what FSDP ranks other than 0 start from; rank 0
    loads the weights once and broadcasts them shard by shard (``BVPOTrainer``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code
        )


def source_dtype(model_path: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype the model's ``config.json`` names (fp32 when it names none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else torch.float32


def checkpoint_dtype(setting: str, model_path: str, trust_remote_code: bool = False) -> torch.dtype:
    """``train.checkpoint_dtype``: 'model' (the base model's own dtype) or a dtype name."""
    if setting == "model":
        return source_dtype(model_path, trust_remote_code)
    return getattr(torch, setting)  # type: ignore[no-any-return]


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
