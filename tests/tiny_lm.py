"""A tiny randomly initialized causal LM and random preference pairs, for fast offline trainer tests."""

from __future__ import annotations

import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.training.sequences import TokenizedPair
from pipeline.training.trainer import RefPair

VOCAB = 64


def tiny_model(
    seed: int = 0, dtype: torch.dtype = torch.float64, attn_implementation: str = "eager"
) -> LlamaForCausalLM:
    """``attn_implementation="sdpa"``: a float64 softmax (eager's runs in float32, so its rounding depends on
    where a sequence sits in a packed row)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        # Eager computes its softmax in float32 (~1e-9 in float64 log-probs); float64 SDPA matched a
        # one-sequence-at-a-time reference to 0.0 here (tests/test_packing.py).
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).to(dtype)


def random_pairs(n: int, seed: int, prefix: str) -> list[RefPair]:
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(k)]

    return [
        RefPair(
            TokenizedPair(
                f"{prefix}{i}", ids(rng.randint(2, 5)), ids(rng.randint(1, 6)), ids(rng.randint(1, 6)), False
            ),
            ref_chosen=-rng.uniform(5, 15),
            ref_rejected=-rng.uniform(5, 15),
        )
        for i in range(n)
    ]
