"""Reference log-probs, computed once per (pair, reference model) before training (DESIGN.md §2).

Training then holds no reference model: ``log π_ref`` comes from the ``ref_logps`` dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.training.modeling import autocast, load_model_and_tokenizer
from pipeline.training.sequences import pairs_batch, sequence_logps, tokenize_pair


def compute_reference_logps(
    model_path: str,
    pairs_by_mode: dict[str, Sequence[dict[str, Any]]],
    *,
    model_label: str,
    max_length: int,
    bf16: bool,
    batch_size: int = 4,
    trust_remote_code: bool = False,
) -> list[dict[str, Any]]:
    """Rows of the ``ref_logps`` schema for every pair of every mode."""
    model, tokenizer = load_model_and_tokenizer(model_path, trust_remote_code)
    model.eval()
    rows: list[dict[str, Any]] = []
    total = sum(len(p) for p in pairs_by_mode.values())
    with tqdm(total=total, desc="reference log-probs", unit="pair") as bar, torch.no_grad():
        for mode, pairs in pairs_by_mode.items():
            for start in range(0, len(pairs), batch_size):
                chunk = [tokenize_pair(tokenizer, p, max_length) for p in pairs[start : start + batch_size]]
                with autocast(bf16):
                    logps = sequence_logps(model, pairs_batch(chunk, tokenizer.pad_token_id)).float().cpu()
                half = len(chunk)
                for i, pair in enumerate(chunk):
                    rows.append(
                        {
                            "pair_id": pair.pair_id,
                            "mode": mode,
                            "ref_model": model_label,
                            "ref_chosen_logp": float(logps[i]),
                            "ref_rejected_logp": float(logps[half + i]),
                            "chosen_tokens": len(pair.chosen_ids),
                            "rejected_tokens": len(pair.rejected_ids),
                        }
                    )
                bar.update(half)
    return rows
