"""Model FLOPs utilization: the training's model FLOPs per second over the machine's measured matmul peak
(docs/method.md §Precision and MFU).

Model FLOPs of a step: ``6·N`` per token run (forward + backward of every weight matmul, N the weights
that multiply activations: all parameters but an untied input embedding) plus the attention term
``12·layers·d_attn`` per attended key (QKᵀ and AV, forward + backward), counted from the packed layout.
Recomputation (gradient checkpointing, the LM-head chunks) is not model FLOPs and is not counted.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import torch

PEAK_SIZE = 1024  # square matmul timed for the peak
PEAK_SECONDS = 0.3  # time spent measuring it (once per process, device and dtype)


@dataclass(frozen=True)
class FlopModel:
    """What the model FLOPs of a step depend on."""

    matmul_params: int
    layers: int
    attention_width: int  # heads × head dim

    @property
    def key_cost(self) -> float:
        """FLOPs of one attended key relative to one position run (packing's row-layout choice)."""
        return 2.0 * self.layers * self.attention_width / max(1, self.matmul_params)

    def step_flops(self, forward_tokens: int, attended_keys: int) -> float:
        """Forward + backward model FLOPs of ``forward_tokens`` positions seeing ``attended_keys`` keys."""
        weights = 6.0 * self.matmul_params * forward_tokens
        return weights + 12.0 * self.layers * self.attention_width * attended_keys


def flop_model(model: Any) -> FlopModel:
    """Read N, the layer count and the attention width off a Hugging Face causal LM."""
    params = {id(p): p.numel() for p in model.parameters()}
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embed is not None and (head is None or head.weight is not embed.weight):
        params.pop(id(embed.weight), None)  # a lookup, no matmul (a tied one is the head's weight)
    config = getattr(model, "config", None)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    return FlopModel(sum(params.values()), layers, heads * int(head_dim))


@functools.cache
def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of the best of a few ``PEAK_SIZE``² matmuls in ``dtype`` on ``device`` (cached)."""
    a = torch.randn(PEAK_SIZE, PEAK_SIZE, device=device).to(dtype)
    b = torch.randn(PEAK_SIZE, PEAK_SIZE, device=device).to(dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    torch.matmul(a, b)  # warm-up (kernel selection, thread pool)
    sync()
    best, spent = float("inf"), 0.0
    while spent < PEAK_SECONDS or best == float("inf"):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return 2.0 * PEAK_SIZE**3 / best


def training_peak(model: Any, bf16: bool) -> float:
    """The matmul peak in the precision the training computes in (bf16 under autocast, else the weights')."""
    weight = next(model.parameters())
    dtype = torch.bfloat16 if bf16 and weight.dtype != torch.float64 else weight.dtype
    return matmul_peak(str(weight.device), dtype)
