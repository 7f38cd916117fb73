"""Stored-pair rows (text and token ids, as pairing writes them) for the character tokenizer of a tiny
checkpoint (tests/tiny_checkpoint.py), and made-up reference log-probs for them."""

from __future__ import annotations

from typing import Any


def stored_pairs(model_dir: str, n: int = 4) -> dict[str, list[dict[str, Any]]]:
    """``n`` pairs per mode ("trace", "empty"), tokenized with the model's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def pair(mode: str, i: int) -> dict[str, Any]:
        block = "<think>\nok\n</think>\n\n" if mode == "trace" else "<think>\n\n</think>\n\n"
        texts = {
            "prompt_text": f"<|user|>What is {i} + {i}?\n<|assistant|>",
            "chosen_response": f"{block}It is {2 * i}.",
            "rejected_response": f"{block}It is {2 * i + 1}, I think.",
        }
        ids = {
            f"{key}_token_ids": tokenizer.encode(texts[text], add_special_tokens=False)
            for key, text in (
                ("prompt", "prompt_text"), ("chosen", "chosen_response"), ("rejected", "rejected_response")
            )
        }  # fmt: skip
        return {"pair_id": f"q{i}-{mode}", **texts, **ids}

    return {mode: [pair(mode, i) for i in range(n)] for mode in ("trace", "empty")}


def made_up_refs(pairs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``ref_logps`` rows with fixed reference log-probs (training needs some, not these exact ones)."""
    return [
        {"pair_id": p["pair_id"], "mode": mode, "ref_chosen_logp": -20.0 - i, "ref_rejected_logp": -25.0 - i}
        for mode, rows in pairs.items()
        for i, p in enumerate(rows)
    ]
