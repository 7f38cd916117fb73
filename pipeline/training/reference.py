"""Reference log-probs, once per (pair, reference model) before training (docs/method.md §Pipeline stages).

Training then holds no reference model: ``log π_ref`` comes from the ``ref_logps`` dataset. Each pair is
scored on its stored token ids (:mod:`pipeline.training.encoding`), so the reference pass and the trainer
score exactly the sequences the sampler produced. A pair whose ids disagree with its text, or that does not
fit ``train.max_length`` under ``train.truncation``, is rejected with a reason instead.

The same pass measures sampler/trainer agreement (docs/method.md §Token-exact sequences): for every sampled
token of a pair's two generations, the reference model's log-prob against the engine's raw log-prob of the
same token. Before any training both are the same model, so the differences measure only numerics (dtype,
kernels) and any drift of template or tokenizer between the two.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.generation.segments import SEGMENT_NAMES
from pipeline.training.encoding import (
    TokenizedPair,
    fit_length,
    pair_decode_problem,
    pair_tokens,
    require_token_columns,
    sampled_logprobs,
)
from pipeline.training.modeling import autocast, load_model_and_tokenizer
from pipeline.training.sequences import pairs_batch, response_token_logps


@dataclass
class ReferenceResult:
    """``ref_logps`` rows, rejects (pairs that cannot be scored) and the agreement summary rows."""

    rows: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    agreement: list[dict[str, Any]] = field(default_factory=list)


def compute_reference_logps(
    model_path: str,
    pairs_by_mode: dict[str, Sequence[dict[str, Any]]],
    *,
    model_label: str,
    max_length: int,
    bf16: bool,
    truncation: str = "reject",
    append_eos: str = "emitted",
    generations: Mapping[str, Mapping[str, Any]] | None = None,
    sampler_dtype: str | None = None,
    batch_size: int = 4,
    trust_remote_code: bool = False,
) -> ReferenceResult:
    """Score every pair of every mode with the reference model.

    ``generations``: generation rows by ``generation_id`` (with ``sampler_logprobs``); when given, each
    pair's per-token log-probs are compared with the sampler's and summarized per mode and segment.
    """
    model, tokenizer = load_model_and_tokenizer(model_path, trust_remote_code)
    model.eval()
    eos_id = tokenizer.eos_token_id if append_eos == "always" else None
    result = ReferenceResult([], [])
    deltas: dict[tuple[str, str], list[float]] = defaultdict(list)
    total = sum(len(p) for p in pairs_by_mode.values())
    with tqdm(total=total, desc="reference log-probs", unit="pair") as bar, torch.no_grad():
        for mode, pairs in pairs_by_mode.items():
            if pairs:
                require_token_columns(pairs[0].keys(), f"the {mode} pairs dataset")
            kept: list[tuple[dict[str, Any], TokenizedPair]] = []
            for pair in pairs:
                tokens, reason = _prepare(tokenizer, pair, max_length, truncation, eos_id)
                if tokens is None:
                    result.rejects.append(_reject(pair, mode, str(reason)))
                else:
                    kept.append((pair, tokens))
            for start in range(0, len(kept), batch_size):
                chunk = kept[start : start + batch_size]
                batch = pairs_batch([t for _, t in chunk], tokenizer.pad_token_id)
                with autocast(bf16):
                    per_token = [t.float().cpu() for t in response_token_logps(model, batch)]
                half = len(chunk)
                for i, (pair, tokens) in enumerate(chunk):
                    chosen, rejected = per_token[i], per_token[half + i]
                    result.rows.append(_row(tokens, mode, model_label, chosen, rejected))
                    if generations is not None:
                        for gen_key, logps in (
                            ("chosen_generation_id", chosen),
                            ("rejected_generation_id", rejected),
                        ):
                            gen = generations.get(str(pair.get(gen_key)))
                            if gen is not None:
                                _collect(deltas, mode, gen, logps)
                bar.update(half)
    result.agreement = summarize_agreement(deltas, model_label, sampler_dtype)
    return result


def _prepare(
    tokenizer: Any, pair: dict[str, Any], max_length: int, truncation: str, eos_id: int | None
) -> tuple[TokenizedPair | None, str | None]:
    problem = pair_decode_problem(tokenizer, pair)
    if problem is not None:
        return None, problem
    return fit_length(pair_tokens(pair, eos_id=eos_id), max_length, truncation)  # type: ignore[arg-type]


def _row(
    tokens: TokenizedPair, mode: str, model_label: str, chosen: torch.Tensor, rejected: torch.Tensor
) -> dict[str, Any]:
    return {
        "pair_id": tokens.pair_id,
        "mode": mode,
        "ref_model": model_label,
        "ref_chosen_logp": float(chosen.double().sum()),
        "ref_rejected_logp": float(rejected.double().sum()),
        "chosen_tokens": len(tokens.chosen_ids),
        "rejected_tokens": len(tokens.rejected_ids),
        "prompt_tokens": len(tokens.prompt_ids),
        "prompt_cut": tokens.prompt_cut,
    }


def _reject(pair: dict[str, Any], mode: str, reason: str) -> dict[str, Any]:
    payload = {
        "pair_id": pair.get("pair_id"),
        "mode": mode,
        "prompt_tokens": len(pair.get("prompt_token_ids") or []),
        "chosen_tokens": len(pair.get("chosen_token_ids") or []),
        "rejected_tokens": len(pair.get("rejected_token_ids") or []),
    }
    return {
        "stage": "reference",
        "row_key": str(pair.get("pair_id")),
        "reason": reason,
        "payload": json.dumps(payload),
    }


def _collect(
    deltas: dict[tuple[str, str], list[float]], mode: str, gen: Mapping[str, Any], ref: torch.Tensor
) -> None:
    """Add ``ref − sampler`` of each sampled token of ``gen`` (``ref``: its response tokens' log-probs)."""
    for position, segment, sampler in sampled_logprobs(gen):
        if position < ref.shape[0]:
            deltas[(mode, SEGMENT_NAMES[int(segment)])].append(float(ref[position]) - sampler)


def summarize_agreement(
    deltas: Mapping[tuple[str, str], Sequence[float]], model_label: str, sampler_dtype: str | None
) -> list[dict[str, Any]]:
    """Rows of the ``logp_agreement`` schema: per mode, per segment and over all segments."""
    by_mode: dict[str, list[float]] = defaultdict(list)
    groups: dict[tuple[str, str], Sequence[float]] = {}
    for (mode, segment), values in sorted(deltas.items()):
        groups[(mode, segment)] = values
        by_mode[mode].extend(values)
    for mode, values in by_mode.items():
        groups[(mode, "all")] = values
    rows = []
    for (mode, segment), values in groups.items():
        d = torch.tensor(list(values), dtype=torch.float64)
        a = d.abs()
        rows.append(
            {
                "mode": mode,
                "segment": segment,
                "ref_model": model_label,
                "sampler_dtype": sampler_dtype,
                "tokens": int(d.numel()),
                "mean_abs_delta": float(a.mean()) if d.numel() else math.nan,
                "mean_delta": float(d.mean()) if d.numel() else math.nan,
                "p99_abs_delta": float(torch.quantile(a, 0.99)) if d.numel() else math.nan,
                "max_abs_delta": float(a.max()) if d.numel() else math.nan,
            }
        )
    return rows


def agreement_warnings(rows: Sequence[Mapping[str, Any]], threshold: float) -> list[str]:
    """A warning per mode whose mean |Δ| over all sampled tokens exceeds ``threshold`` (nats)."""
    return [
        f"sampler/trainer log-prob agreement in mode {r['mode']}: mean |Δ| {r['mean_abs_delta']:.4f} nats "
        f"per token over {r['tokens']} tokens exceeds train.agreement_warn_mean_abs {threshold}: the "
        "trainer may not score what the sampler produced (chat template, tokenizer, dtype or kernels "
        "differ); see docs/method.md §Token-exact sequences"
        for r in rows
        if r["segment"] == "all" and r["tokens"] and r["mean_abs_delta"] > threshold
    ]
