"""The BVPO training loop: each optimizer step draws a D_t batch and a D_e batch (DESIGN.md §1).

``L = α·L_t + (1−α)·L_e``; with α = 1 the empty-trace forward pass is skipped, with α = 0 the trace one.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.config import TrainConfig
from pipeline.training.loss import BVPOLoss, DPOOutput, PreferenceLogps
from pipeline.training.modeling import autocast, load_model_and_tokenizer
from pipeline.training.sequences import TokenizedPair, pairs_batch, sequence_logps, tokenize_pair


class TrainingDataError(ValueError):
    """The preference data cannot be trained on with this configuration."""


@dataclass(frozen=True)
class RefPair:
    tokens: TokenizedPair
    ref_chosen: float
    ref_rejected: float


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    metrics: list[dict[str, Any]]
    weight_delta_l2: float  # ‖θ_final − θ_initial‖₂ over all trained parameters


def pair_sampler(items: Sequence[RefPair], batch_size: int, mode: str, seed: int) -> Iterator[list[RefPair]]:
    """Endless batches: ``cycle`` walks reshuffled epochs, ``replacement`` draws uniformly."""
    rng = random.Random(seed)
    if mode == "replacement":
        while True:
            yield [items[rng.randrange(len(items))] for _ in range(batch_size)]
    order: list[int] = []
    while True:
        batch = []
        for _ in range(batch_size):
            if not order:
                order = list(range(len(items)))
                rng.shuffle(order)
            batch.append(items[order.pop()])
        yield batch


def _join_reference(
    tokenizer: Any, pairs: Sequence[dict[str, Any]], ref_rows: dict[str, dict[str, Any]], max_length: int
) -> list[RefPair]:
    out = []
    for pair in pairs:
        ref = ref_rows.get(pair["pair_id"])
        if ref is None:
            raise TrainingDataError(f"pair '{pair['pair_id']}' has no reference log-probs")
        out.append(
            RefPair(
                tokenize_pair(tokenizer, pair, max_length), ref["ref_chosen_logp"], ref["ref_rejected_logp"]
            )
        )
    return out


def _mode_logps(model: Any, batch: list[RefPair], pad_id: int) -> tuple[PreferenceLogps, int]:
    seq = pairs_batch([p.tokens for p in batch], pad_id)
    logps = sequence_logps(model, seq)
    half = len(batch)
    device = logps.device
    return (
        PreferenceLogps(
            policy_chosen=logps[:half],
            policy_rejected=logps[half:],
            ref_chosen=torch.tensor([p.ref_chosen for p in batch], device=device, dtype=logps.dtype),
            ref_rejected=torch.tensor([p.ref_rejected for p in batch], device=device, dtype=logps.dtype),
        ),
        seq.num_tokens,
    )


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warmup then cosine decay to 0 over ``max_steps``."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _mode_metrics(out: DPOOutput | None, suffix: str) -> dict[str, float | None]:
    if out is None:
        return {f"loss_{suffix}": None, f"reward_margin_{suffix}": None, f"reward_acc_{suffix}": None}
    margin = out.chosen_rewards - out.rejected_rewards
    return {
        f"loss_{suffix}": float(out.losses.mean().detach()),
        f"reward_margin_{suffix}": float(margin.mean()),
        f"reward_acc_{suffix}": float((margin > 0).float().mean()),
    }


def train_bvpo(
    model_path: str,
    pairs_trace: Sequence[dict[str, Any]],
    pairs_empty: Sequence[dict[str, Any]],
    ref_logps: Sequence[dict[str, Any]],
    config: TrainConfig,
    output_dir: Path,
    *,
    trust_remote_code: bool = False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train with BVPO and save a Hugging Face checkpoint to ``output_dir`` (written atomically)."""
    alpha = config.alpha
    if alpha > 0 and not pairs_trace:
        raise TrainingDataError(f"alpha={alpha} needs trace pairs (D_t), but pairs_trace is empty")
    if alpha < 1 and not pairs_empty:
        raise TrainingDataError(f"alpha={alpha} needs empty-trace pairs (D_e), but pairs_empty is empty")
    torch.manual_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(model_path, trust_remote_code)
    refs = {mode: {r["pair_id"]: r for r in ref_logps if r["mode"] == mode} for mode in ("trace", "empty")}
    data_t = _join_reference(tokenizer, pairs_trace, refs["trace"], config.max_length) if alpha > 0 else []
    data_e = _join_reference(tokenizer, pairs_empty, refs["empty"], config.max_length) if alpha < 1 else []
    sample_t = pair_sampler(data_t, config.batch_size, config.sampling, config.seed) if data_t else None
    sample_e = pair_sampler(data_e, config.batch_size, config.sampling, config.seed + 1) if data_e else None

    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_fn = BVPOLoss(config.beta)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    model.train()
    metrics: list[dict[str, Any]] = []
    for step in tqdm(range(config.max_steps), desc="BVPO training", unit="step"):
        started = time.perf_counter()
        tokens = 0
        sums: dict[str, list[float]] = {}
        for _ in range(config.grad_accum_steps):
            with autocast(config.bf16):
                trace_logps = empty_logps = None
                if sample_t is not None:
                    trace_logps, n_t = _mode_logps(model, next(sample_t), tokenizer.pad_token_id)
                    tokens += n_t
                if sample_e is not None:
                    empty_logps, n_e = _mode_logps(model, next(sample_e), tokenizer.pad_token_id)
                    tokens += n_e
                out = loss_fn(trace_logps, empty_logps, alpha)
            (out.loss / config.grad_accum_steps).backward()
            values = {
                "loss": float(out.loss.detach()),
                **_mode_metrics(out.trace, "t"),
                **_mode_metrics(out.empty, "e"),
            }
            for key, value in values.items():
                if value is not None:
                    sums.setdefault(key, []).append(value)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        row: dict[str, Any] = {
            "step": step + 1,
            "alpha": alpha,
            "grad_norm": float(grad_norm),
            "lr": lr,
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "checkpoint": str(output_dir),
        }
        for key in (
            "loss",
            "loss_t",
            "loss_e",
            "reward_margin_t",
            "reward_margin_e",
            "reward_acc_t",
            "reward_acc_e",
        ):
            row[key] = sum(sums[key]) / len(sums[key]) if key in sums else None
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"BVPO loss is not finite at step {step + 1}: {row['loss']}")
        metrics.append(row)
        if on_step is not None:
            on_step(row)

    delta = math.sqrt(
        sum(
            float((p.detach() - initial[n]).pow(2).sum()) for n, p in model.named_parameters() if n in initial
        )
    )
    _save_checkpoint(model, tokenizer, output_dir)
    return TrainResult(checkpoint=output_dir, metrics=metrics, weight_delta_l2=delta)


def _save_checkpoint(model: Any, tokenizer: Any, output_dir: Path) -> None:
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".tmp-{output_dir.name}"
    shutil.rmtree(staging, ignore_errors=True)
    # fp32: a bf16 copy would round away updates smaller than bf16's resolution.
    model.to(torch.float32).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
