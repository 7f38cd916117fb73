"""BVPO on the embedded SmolLM2-135M: the demo's few steps lower the loss and raise reward accuracy."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config import TrainConfig
from pipeline.model_assets import embedded_checkpoint
from pipeline.training.encoding import encode_text
from pipeline.training.reference import compute_reference_logps
from pipeline.training.run import train_bvpo

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

QUESTIONS = [
    ("What is 7 + 5?", "7 + 5 = 12.", "7 + 5 = 75."),
    ("Name a primary color.", "Red is a primary color.", "Green tea is tasty."),
    ("What is 9 times 3?", "9 times 3 is 27.", "9 times 3 is 93."),
    ("Reply in lowercase: greet me.", "hello there, friend.", "HELLO THERE, FRIEND."),
]


def _pairs(mode: str, tokenizer: Any) -> list[dict[str, Any]]:
    """Hand-written pairs, tokenized once by the encoding module (as imported pairs are), ending with EOS."""
    block = "<think>\nLet me check.\n</think>\n\n" if mode == "trace" else "<think>\n\n</think>\n\n"
    eos = [tokenizer.eos_token_id]
    rows = []
    for i, (q, good, bad) in enumerate(QUESTIONS):
        prompt = f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        rows.append(
            {
                "pair_id": f"q{i}-{mode}",
                "prompt_text": prompt,
                "chosen_response": block + good,
                "rejected_response": block + bad,
                "prompt_token_ids": encode_text(tokenizer, prompt),
                "chosen_token_ids": encode_text(tokenizer, block + good) + eos,
                "rejected_token_ids": encode_text(tokenizer, block + bad) + eos,
            }
        )
    return rows


def test_training_lowers_loss_and_raises_reward_accuracy_on_both_modes(tmp_path) -> None:
    from transformers import AutoTokenizer

    model = str(embedded_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(model)
    pairs = {"trace": _pairs("trace", tokenizer), "empty": _pairs("empty", tokenizer)}
    refs = compute_reference_logps(model, pairs, model_label="embedded", max_length=128, bf16=False).rows
    config = TrainConfig(
        alpha=0.5, batch_size=4, max_steps=8, learning_rate=5e-5, bf16=False, warmup_steps=0, seed=0,
        checkpoint_every=0,
    )  # fmt: skip
    result = train_bvpo(model, pairs["trace"], pairs["empty"], refs, config, tmp_path / "ckpt")
    first, last = result.metrics[0], result.metrics[-1]
    assert last["loss"] < first["loss"]
    for mode in ("t", "e"):
        assert last[f"reward_acc_{mode}"] > first[f"reward_acc_{mode}"]
        assert last[f"reward_margin_{mode}"] > first[f"reward_margin_{mode}"]
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
