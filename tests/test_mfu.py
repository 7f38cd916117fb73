"""MFU: model FLOPs of the packed layout and the measured matmul peak."""

from __future__ import annotations

import torch

from pipeline.config import TrainConfig
from pipeline.training.encoding import TokenizedPair
from pipeline.training.mfu import flop_model, matmul_peak
from pipeline.training.packing import pack_pairs
from pipeline.training.trainer import BVPOTrainer
from tests.tiny_lm import random_pairs, tiny_model


def test_flop_model_counts_matmul_weights_not_the_untied_embedding() -> None:
    model = tiny_model()  # vocab 64, hidden 16, 2 layers, untied head
    counted = flop_model(model)
    total = sum(p.numel() for p in model.parameters())
    assert counted.matmul_params == total - 64 * 16
    assert (counted.layers, counted.attention_width) == (2, 16)
    assert counted.step_flops(10, 30) == 6 * counted.matmul_params * 10 + 12 * 2 * 16 * 30


def test_attended_keys_follow_the_shared_layout() -> None:
    pairs = [TokenizedPair("a", [1, 2, 3], [4, 5], [6], False)]
    # Prompt sees 1+2+3; chosen 4+5; rejected 4 (the prompt and itself).
    assert pack_pairs(pairs, pad_id=0).attended_keys == 6 + 9 + 4
    # Unshared: [x, y_w] (1..5) and [x, y_l] (1..4).
    assert pack_pairs(pairs, pad_id=0, shared_prefix=False).attended_keys == 15 + 10


def test_matmul_peak_is_a_positive_cached_rate() -> None:
    first = matmul_peak("cpu", torch.float32)
    assert first > 1e8 and matmul_peak("cpu", torch.float32) == first


def test_train_metrics_carry_forward_tokens_and_mfu() -> None:
    config = TrainConfig.model_validate(
        {"batch_size": 2, "bf16": False, "max_steps": 2, "checkpoint_every": 0}
    )
    trainer = BVPOTrainer(tiny_model(), random_pairs(4, 1, "t"), random_pairs(4, 2, "e"), config, pad_id=0)
    row = trainer.train_step()
    assert row["forward_tokens"] < row["tokens"]  # each prompt ran once for two sequences
    assert 0 < row["mfu"] < 1
