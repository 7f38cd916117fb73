"""The BVPO training loop (docs/method.md §The BVPO mixture): every optimizer step draws a D_t batch and a
D_e batch and minimizes ``L = α·L_t + (1−α)·L_e``. With α = 1 the empty-trace forward pass is skipped, with
α = 0 the trace one.

Single process or ``torch.distributed`` (DDP, gloo on CPU / nccl on GPU): every rank draws the same global
batch and keeps its slice, so N ranks take the same steps as one process with the same global batch.
Checkpoints hold model, optimizer, scheduler, sampler and RNG states, so a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import TrainConfig
from pipeline.training.loss import BVPOLoss, DPOOutput, PreferenceLogps
from pipeline.training.mfu import flop_model, training_peak
from pipeline.training.modeling import autocast
from pipeline.training.packing import (
    PackedPairs,
    choose_row_tokens,
    pack_pairs,
    packed_logps,
    shares_prefix,
)
from pipeline.training.precision import resolve_bf16
from pipeline.training.sampling import PairSampler, pairs_per_mode
from pipeline.training.sequences import TokenizedPair

if TYPE_CHECKING:
    from pipeline.training.grad_probe import GradProbe

METRIC_KEYS = (
    "loss",
    "loss_t",
    "loss_e",
    "chosen_reward_t",
    "rejected_reward_t",
    "reward_margin_t",
    "reward_acc_t",
    "chosen_reward_e",
    "rejected_reward_e",
    "reward_margin_e",
    "reward_acc_e",
)


class TrainingDataError(ValueError):
    """The preference data cannot be trained on with this configuration."""


class TrainingStateError(ValueError):
    """A saved training state cannot be resumed by this run (unreadable, or saved by another model/data)."""


@dataclass(frozen=True)
class RefPair:
    """A tokenized pair with its precomputed reference log-probs."""

    tokens: TokenizedPair
    ref_chosen: float
    ref_rejected: float


class PolicyLogps(nn.Module):
    """One forward call computing the summed response log-probs of a D_t batch and a D_e batch.

    Wrapping both modes in one module call lets DDP see a single forward per backward. Each batch is a
    packed, prefix-shared layout (packing.py): one prompt forward per pair, no padding.
    """

    def __init__(self, model: nn.Module, full_forward: bool = False) -> None:
        super().__init__()
        self.model = model
        self.full_forward = full_forward  # FSDP: go through the root module so its hooks gather weights

    def forward(
        self, trace: PackedPairs | None, empty: PackedPairs | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        logps_t = packed_logps(self.model, trace, self.full_forward) if trace is not None else None
        logps_e = packed_logps(self.model, empty, self.full_forward) if empty is not None else None
        return logps_t, logps_e


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 0 at ``max_steps``."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class BVPOTrainer:
    """Owns the model, optimizer, schedule and samplers of one BVPO run."""

    def __init__(
        self,
        model: nn.Module,
        data_t: Sequence[RefPair],
        data_e: Sequence[RefPair],
        config: TrainConfig,
        pad_id: int,
        probe: GradProbe | None = None,
    ) -> None:
        self.config = config
        self.alpha = config.alpha_value
        if self.alpha > 0 and not data_t:
            raise TrainingDataError(f"alpha={self.alpha} needs trace pairs (D_t), but there are none")
        if self.alpha < 1 and not data_e:
            raise TrainingDataError(f"alpha={self.alpha} needs empty-trace pairs (D_e), but there are none")
        self.rank, self.world_size = _world()
        if config.batch_size % self.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} must be divisible by {self.world_size} processes"
            )
        self.model = model
        self.pad_id = pad_id
        self.data_t = list(data_t) if self.alpha > 0 else []
        self.data_e = list(data_e) if self.alpha < 1 else []
        # Pairs per micro-batch and mode: matched budgets give every α the same pairs per step (sampling.py).
        self.batch_t, self.batch_e = pairs_per_mode(
            "auto" if config.alpha == "auto" else self.alpha, config.batch_size, config.budget
        )
        self.sampler_t = (
            PairSampler(len(self.data_t), self.batch_t, config.sampling, config.seed)
            if self.data_t and self.batch_t
            else None
        )
        self.sampler_e = (
            PairSampler(len(self.data_e), self.batch_e, config.sampling, config.seed + 1)
            if self.data_e and self.batch_e
            else None
        )
        self.bf16 = resolve_bf16(config.bf16)  # train.bf16: auto → where the hardware has native bf16
        self.flops = flop_model(model)  # model FLOPs per step, for MFU (before FSDP shards it)
        self.fsdp = self.world_size > 1 and config.distributed == "fsdp"
        if self.fsdp:
            full = dict(model.state_dict()) if self.rank == 0 else None  # rank 0's weights, before sharding
            shard_model(model)  # before the optimizer: FSDP replaces parameters by sharded DTensors
            materialize_from_rank0(model, full)
            del full
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = _adamw(self.params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config))
        self.loss_fn = BVPOLoss(config.beta)
        self.forward: nn.Module = PolicyLogps(model, full_forward=self.fsdp)
        if self.world_size > 1 and not self.fsdp:
            self.forward = nn.parallel.DistributedDataParallel(self.forward)
        self.step = 0
        self.metrics: list[dict[str, Any]] = []
        if config.alpha == "auto" and probe is None:
            raise TrainingDataError("alpha: auto needs a gradient probe (pipeline.training.grad_probe)")
        if probe is not None and self.fsdp:
            raise ValueError("the gradient probe does not support FSDP (use distributed: ddp)")
        self.probe = probe  # α̂* and trace-induced variance every probe.every steps (grad_probe.py)

    # -- one optimizer step -------------------------------------------------------------------------

    def _local(self, data: list[RefPair], sampler: PairSampler | None) -> list[RefPair] | None:
        if sampler is None:
            return None
        batch = [data[i] for i in sampler.next_batch()]
        return batch[self.rank :: self.world_size]

    def _pack(self, batch: list[RefPair] | None) -> PackedPairs | None:
        """The padding-free layout of ``batch`` (prompt shared by both responses where attention allows)."""
        if not batch:
            return None
        pairs = [p.tokens for p in batch]
        if not shares_prefix(self.model):
            return pack_pairs(pairs, self.pad_id, shared_prefix=False)
        rows = choose_row_tokens(pairs, self.flops.key_cost)  # few long rows vs padding (packing.py)
        return pack_pairs(pairs, self.pad_id, row_tokens=rows)

    def _mfu(self, forward_tokens: int, keys: int, elapsed: float) -> float | None:
        """Model FLOPs per second over the measured matmul peak of all processes (mfu.py)."""
        if elapsed <= 0:
            return None
        peak = training_peak(self.model, self.bf16) * self.world_size
        return self.flops.step_flops(forward_tokens, keys) / elapsed / peak

    def _prefs(self, logps: torch.Tensor | None, batch: list[RefPair] | None) -> PreferenceLogps | None:
        if logps is None or batch is None:
            return None
        half = len(batch)
        ref = torch.tensor(
            [[p.ref_chosen, p.ref_rejected] for p in batch], dtype=logps.dtype, device=logps.device
        )
        return PreferenceLogps(logps[:half], logps[half:], ref[:, 0], ref[:, 1])

    def train_step(self) -> dict[str, Any]:
        """Accumulate ``grad_accum_steps`` micro-batches, clip, step; return the step's metrics."""
        if self.probe is not None and self.probe.due(self.step):
            self.alpha = self.probe.run(self.model, self.step, self.alpha)  # alpha: auto → EMA of α̂*
        started = time.perf_counter()
        self.model.train()
        sums = dict.fromkeys(METRIC_KEYS, 0.0)
        counts = dict.fromkeys(METRIC_KEYS, 0)
        tokens = run_tokens = keys = 0  # sequence tokens; positions run; keys attended (MFU)
        mode_tokens = {"trace": 0, "empty": 0}
        accum = self.config.grad_accum_steps
        for micro in range(accum):
            batch_t = self._local(self.data_t, self.sampler_t)
            batch_e = self._local(self.data_e, self.sampler_e)
            seq_t = self._pack(batch_t)
            seq_e = self._pack(batch_e)
            mode_tokens["trace"] += seq_t.num_tokens if seq_t else 0
            mode_tokens["empty"] += seq_e.num_tokens if seq_e else 0
            tokens += (seq_t.num_tokens if seq_t else 0) + (seq_e.num_tokens if seq_e else 0)
            run_tokens += sum(s.forward_tokens for s in (seq_t, seq_e) if s is not None)
            keys += sum(s.attended_keys for s in (seq_t, seq_e) if s is not None)
            # One forward + backward per mode: the gradient of α·L_t + (1−α)·L_e is the sum of the two
            # terms' gradients, and only one mode's activations are alive at a time (lower peak memory).
            passes = [(m, s, b) for m, s, b in (("trace", seq_t, batch_t), ("empty", seq_e, batch_e)) if s]
            loss_value = 0.0
            outs: dict[str, DPOOutput] = {}
            for index, (mode, seq, batch) in enumerate(passes):
                sync = self.world_size == 1 or (micro == accum - 1 and index == len(passes) - 1)
                if self.fsdp:
                    self.model.set_requires_gradient_sync(sync)  # type: ignore[operator]
                    context = _null()
                else:
                    context = self.forward.no_sync() if not sync else _null()  # type: ignore[operator]
                with context:
                    with autocast(self.bf16):
                        logps_t, logps_e = self.forward(
                            seq if mode == "trace" else None, seq if mode == "empty" else None
                        )
                        prefs = self._prefs(logps_t if mode == "trace" else logps_e, batch)
                        assert prefs is not None
                        term, outs[mode] = self.loss_fn.term(prefs, mode, self.alpha)
                    (term / accum).backward()
                loss_value += float(term.detach())
            for key, value in {
                "loss": loss_value,
                **_mode(outs.get("trace"), "t"),
                **_mode(outs.get("empty"), "e"),
            }.items():
                if value is not None:
                    sums[key] += value
                    counts[key] += 1
        grad_norm = scalar(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        values = {k: (sums[k] / counts[k] if counts[k] else None) for k in METRIC_KEYS}
        values, tokens = _reduce_across_ranks(values, tokens, self.world_size)
        _, tokens_t = _reduce_across_ranks({}, mode_tokens["trace"], self.world_size)
        _, tokens_e = _reduce_across_ranks({}, mode_tokens["empty"], self.world_size)
        _, run_tokens = _reduce_across_ranks({}, run_tokens, self.world_size)
        _, keys = _reduce_across_ranks({}, keys, self.world_size)
        elapsed = time.perf_counter() - started
        row = {
            "step": self.step,
            "alpha": self.alpha,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": tokens,
            "pairs_t": (self.batch_t if self.sampler_t else 0) * accum,  # global pairs this step
            "pairs_e": (self.batch_e if self.sampler_e else 0) * accum,
            "tokens_t": tokens_t,
            "tokens_e": tokens_e,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "seconds": elapsed,
            "forward_tokens": run_tokens,  # positions run: the prompt once per pair (packing.py)
            "mfu": self._mfu(run_tokens, keys, elapsed),
            **values,
        }
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"BVPO loss is not finite at step {self.step}: {row['loss']}")
        self.metrics.append(row)
        return row

    # -- checkpoints --------------------------------------------------------------------------------

    def full_model_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded model weights (a collective call under FSDP: every rank must call it)."""
        if not self.fsdp:
            return dict(self.model.state_dict())
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    @property
    def adapters_only(self) -> bool:
        """LoRA: states hold the trained adapters, not the frozen base weights."""
        return self.config.lora is not None

    def _model_state(self) -> dict[str, torch.Tensor]:
        full = self.full_model_state_dict()  # collective under FSDP
        if not self.adapters_only:
            return full
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in full.items() if k in trained}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (collective under FSDP); with LoRA, only the adapters' weights."""
        return {
            "step": self.step,
            "model": self._model_state(),
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "sampler_t": self.sampler_t.state_dict() if self.sampler_t else None,
            "sampler_e": self.sampler_e.state_dict() if self.sampler_e else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "metrics": self.metrics,
            "alpha": self.alpha,
            "probe": self.probe.state_dict() if self.probe is not None else None,
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> dict[str, str]:
        """What a saved state must match to be resumed: the parameters (names, shapes) and the data."""

        def digest(items: Sequence[str]) -> str:
            return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]

        return {
            "model": digest([f"{n}:{tuple(p.shape)}" for n, p in self.model.named_parameters()]),
            "data_t": digest([p.tokens.pair_id for p in self.data_t]),
            "data_e": digest([p.tokens.pair_id for p in self.data_e]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True, strict=not self.adapters_only),
            )
        else:
            result = self.model.load_state_dict(state["model"], strict=not self.adapters_only)
            frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
            if result.unexpected_keys or set(result.missing_keys) - frozen - _buffer_names(self.model):
                raise TrainingStateError(
                    f"training state does not fit the model: unexpected {result.unexpected_keys[:3]}, "
                    f"missing {sorted(set(result.missing_keys) - frozen)[:3]}"
                )
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.sampler_t and state["sampler_t"]:
            self.sampler_t.load_state_dict(state["sampler_t"])
        if self.sampler_e and state["sampler_e"]:
            self.sampler_e.load_state_dict(state["sampler_e"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = int(state["step"])
        self.metrics = list(state["metrics"])
        if self.config.alpha == "auto" and "alpha" in state:
            self.alpha = float(state["alpha"])
        if self.probe is not None and state.get("probe"):
            self.probe.load_state_dict(state["probe"])

    def save_state(self, state_dir: Path) -> Path:
        """Write ``state_dir/step-<k>.pt`` atomically (rank 0 only) and drop older states."""
        path = state_dir / f"step-{self.step:06d}.pt"
        state = self.state_dict()  # collective under FSDP
        if self.rank == 0:
            state_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            try:
                torch.save(state, tmp)
            except BaseException:  # e.g. a full disk: leave no partial file behind
                tmp.unlink(missing_ok=True)
                raise
            tmp.rename(path)
            for old in state_dir.glob("step-*"):  # older states and .tmp files a killed run left
                if old != path:
                    old.unlink(missing_ok=True)
        return path

    def resume_from(self, state_dir: Path) -> bool:
        """Load the newest state in ``state_dir``; return whether one was found."""
        states = sorted(state_dir.glob("step-*.pt")) if state_dir.is_dir() else []
        if not states:
            return False
        try:
            state = torch.load(states[-1], weights_only=False)
        except Exception as exc:
            raise TrainingStateError(
                f"training state {states[-1]} cannot be read ({str(exc).splitlines()[0]}); "
                f"delete it to start over"
            ) from exc
        saved, ours = state.get("fingerprint"), self.fingerprint()
        if saved is not None:  # states of older versions carry none
            what = {"model": "another model (other parameters)", "data_t": "other D_t pairs",
                    "data_e": "other D_e pairs"}  # fmt: skip
            differ = [what[k] for k in ours if saved.get(k) != ours[k]]
            if differ:
                raise TrainingStateError(
                    f"training state {states[-1]} was saved by a run with {' and '.join(differ)}; it "
                    f"cannot be resumed here (delete {state_dir} to start over)"
                )
        self.load_state_dict(state)
        return True

    # -- the loop -----------------------------------------------------------------------------------

    def train(
        self,
        *,
        state_dir: Path | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        stop_after: int | None = None,
    ) -> list[dict[str, Any]]:
        """Run to ``config.max_steps`` (or ``stop_after`` steps, for tests of resuming)."""
        last = self.config.max_steps if stop_after is None else min(stop_after, self.config.max_steps)
        every = self.config.checkpoint_every
        with tqdm(
            total=last, initial=self.step, desc="BVPO training", unit="step", disable=self.rank != 0
        ) as bar:
            while self.step < last:
                row = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                if on_step is not None and self.rank == 0:
                    on_step(row)
                if state_dir is not None and every and (self.step % every == 0 or self.step == last):
                    self.save_state(state_dir)
        return self.metrics


def shard_model(model: nn.Module) -> None:
    """FSDP2: shard every decoder layer, then the rest (embeddings, norm, head) at the root."""
    from torch.distributed.fsdp import fully_shard

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for layer in getattr(decoder, "layers", []):
        fully_shard(layer)
    fully_shard(model)


def materialize_from_rank0(model: nn.Module, full: dict[str, torch.Tensor] | None) -> None:
    """Fill a sharded model's shards from rank 0's full weights (``full``; None on other ranks).

    Ranks other than 0 may have built the model on the meta device: they allocate their shards here and
    receive them by broadcast, so the full weights are materialized once, on rank 0.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=device)
    set_model_state_dict(
        model, full or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    for buffer in model.buffers():  # non-persistent buffers (rotary frequencies) are in no state dict
        dist.broadcast(buffer, src=0)


def _buffer_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_buffers()}


def scalar(value: torch.Tensor) -> float:
    """A Python float from a tensor or a DTensor (FSDP gradient norms are DTensors)."""
    full = getattr(value, "full_tensor", None)
    return float(full() if callable(full) else value)


def _adamw(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it (one kernel, no per-step copies of all parameters)."""
    try:
        return torch.optim.AdamW(
            params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
        )
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def _null() -> Any:
    import contextlib

    return contextlib.nullcontext()


def _mode(out: DPOOutput | None, suffix: str) -> dict[str, float | None]:
    if out is None:
        return {}
    margin = out.chosen_rewards - out.rejected_rewards
    return {
        f"loss_{suffix}": float(out.losses.mean().detach()),
        f"chosen_reward_{suffix}": float(out.chosen_rewards.mean()),
        f"rejected_reward_{suffix}": float(out.rejected_rewards.mean()),
        f"reward_margin_{suffix}": float(margin.mean()),
        f"reward_acc_{suffix}": float((margin > 0).float().mean()),
    }


def _reduce_across_ranks(
    values: dict[str, float | None], tokens: int, world_size: int
) -> tuple[dict[str, float | None], int]:
    if world_size == 1:
        return values, tokens
    keys = [k for k, v in values.items() if v is not None]
    packed = torch.tensor([values[k] for k in keys] + [float(tokens)], dtype=torch.float64)
    dist.all_reduce(packed)
    reduced: dict[str, float | None] = dict(values)
    for i, key in enumerate(keys):
        reduced[key] = float(packed[i]) / world_size
    return reduced, int(packed[-1])


def save_hf_checkpoint(
    model: Any,
    tokenizer: Any,
    output_dir: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    merge_lora: bool = True,
) -> None:
    """Save a standard Hugging Face directory that vLLM can load, in ``dtype``; atomic.

    ``state_dict``: full weights gathered from a sharded (FSDP) model. A LoRA model's adapters go to
    ``output_dir/adapter``; with ``merge_lora`` the adapters merged into the base model are the
    checkpoint itself (else the folder holds only the adapters and the tokenizer). Note: a dtype coarser
    than the fp32 master weights rounds away updates below its resolution.
    """
    if state_dict is not None:
        model = _unsharded_copy(model, state_dict)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".tmp-{output_dir.name}"
    shutil.rmtree(staging, ignore_errors=True)
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(staging / "adapter")  # peft: the adapters and their config only
        model = model.merge_and_unload() if merge_lora else None
    if model is not None:
        model.to(dtype).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)


def _unsharded_copy(model: Any, state_dict: dict[str, torch.Tensor]) -> Any:
    """A plain (unsharded) model of the same architecture holding ``state_dict``."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(state_dict)
    return plain
