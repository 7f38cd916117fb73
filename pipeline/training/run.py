"""Train BVPO from stored pairs: load the model, tokenize, resume if a state exists, train, save.

``num_processes > 1`` launches the same work under ``torchrun`` (:mod:`pipeline.training.launch`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import TrainConfig
from pipeline.training.encoding import fit_length, pair_decode_problem, pair_tokens
from pipeline.training.modeling import checkpoint_dtype, load_model_and_tokenizer, load_on_meta
from pipeline.training.trainer import BVPOTrainer, RefPair, TrainingDataError, save_hf_checkpoint, scalar


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    metrics: list[dict[str, Any]]
    weight_delta_l2: float  # ‖θ_final − θ_initial‖₂ over the trained parameters
    resumed_from_step: int
    grad_stats: list[dict[str, Any]] = field(default_factory=list)  # gradient-probe rows (grad_probe.py)


def state_dir_for(output_dir: Path) -> Path:
    """Where resumable training states of a checkpoint live."""
    return output_dir.parent / f"{output_dir.name}.state"


def join_reference(
    tokenizer: Any, pairs: Sequence[dict[str, Any]], ref_rows: dict[str, dict[str, Any]], config: TrainConfig
) -> list[RefPair]:
    """The pairs' stored token ids with their reference log-probs (docs/method.md §Token-exact sequences).

    Pairs the reference pass rejected (ids that do not decode to the text, too long for ``max_length``) are
    left out here by the same rules; any other pair without reference log-probs is an error.
    """
    eos_id = tokenizer.eos_token_id if config.append_eos == "always" else None
    out = []
    for pair in pairs:
        tokens, reason = fit_length(pair_tokens(pair, eos_id=eos_id), config.max_length, config.truncation)
        reason = pair_decode_problem(tokenizer, pair) or reason
        ref = ref_rows.get(pair["pair_id"])
        if tokens is None or reason is not None:
            continue
        if ref is None:
            raise TrainingDataError(f"pair '{pair['pair_id']}' has no reference log-probs")
        out.append(RefPair(tokens, float(ref["ref_chosen_logp"]), float(ref["ref_rejected_logp"])))
    return out


def prepare_model(model_path: str, config: TrainConfig, trust_remote_code: bool) -> tuple[Any, Any]:
    """The model with the training options applied, and its tokenizer. Under FSDP only rank 0 loads the
    weights; the other ranks build the modules on the meta device (the trainer fills their shards)."""
    rank, world = _rank_and_world()
    if config.distributed == "fsdp" and world > 1 and rank != 0:
        _, tokenizer = load_model_and_tokenizer(model_path, trust_remote_code, weights=False)
        return apply_training_options(load_on_meta(model_path, trust_remote_code), config), tokenizer
    model, tokenizer = load_model_and_tokenizer(model_path, trust_remote_code)
    return apply_training_options(model, config), tokenizer


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def apply_training_options(model: Any, config: TrainConfig) -> Any:
    """Gradient checkpointing and LoRA adapters (through ``peft``) as configured."""
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if config.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = config.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model


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
    generations: Sequence[dict[str, Any]] | None = None,
) -> TrainResult:
    """Train with BVPO and save a Hugging Face checkpoint to ``output_dir`` (written atomically).

    ``generations``: the rows the pairs came from; the gradient probe (``alpha: auto`` or
    ``probe.enabled``) reuses their stored reasoning-on traces.
    """
    if (config.num_processes > 1 or config.num_nodes > 1) and not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        return _launch_distributed(
            model_path,
            pairs_trace,
            pairs_empty,
            ref_logps,
            config,
            output_dir,
            trust_remote_code,
            generations,
        )
    torch.manual_seed(config.seed)
    model, tokenizer = prepare_model(model_path, config, trust_remote_code)
    refs = {mode: {r["pair_id"]: r for r in ref_logps if r["mode"] == mode} for mode in ("trace", "empty")}
    alpha = config.alpha_value
    data_t = join_reference(tokenizer, pairs_trace, refs["trace"], config) if alpha > 0 else []
    data_e = join_reference(tokenizer, pairs_empty, refs["empty"], config) if alpha < 1 else []
    probe = None
    if config.probe_active:  # built before resuming: its reference log-probs come from the initial model
        if generations is None:
            raise TrainingDataError("alpha: auto / probe.enabled needs the generations (the stored traces)")
        from pipeline.training.grad_probe import build_probe

        probe = build_probe(model, tokenizer, pairs_trace, generations, config)
    trainer = BVPOTrainer(model, data_t, data_e, config, pad_id=tokenizer.pad_token_id, probe=probe)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state_dir = state_dir_for(output_dir)
    resumed = trainer.step if trainer.resume_from(state_dir) else 0
    trainer.train(state_dir=state_dir, on_step=on_step)
    delta = math.sqrt(
        sum(
            scalar((p.detach() - initial[n]).pow(2).sum())
            for n, p in model.named_parameters()
            if n in initial
        )
    )
    full_weights = trainer.full_model_state_dict() if trainer.fsdp else None  # collective under FSDP
    if trainer.rank == 0:
        save_hf_checkpoint(
            model,
            tokenizer,
            output_dir,
            state_dict=full_weights,
            dtype=checkpoint_dtype(config.checkpoint_dtype, model_path, trust_remote_code),
            merge_lora=config.lora is None or config.lora.merge_on_save,
        )
        if not config.keep_state:  # the checkpoint is in place: the resumable states are not needed
            shutil.rmtree(state_dir, ignore_errors=True)
    return TrainResult(output_dir, trainer.metrics, delta, resumed, probe.rows if probe is not None else [])


def request_dir_for(output_dir: Path) -> Path:
    """Where a multi-node run's request (config and input rows) lies for the other nodes to join."""
    return output_dir.parent / f"{output_dir.name}.request"


def torchrun_command(config: TrainConfig, request: Path) -> list[str]:
    """The torchrun command of one node: standalone on one node, else the c10d rendezvous of the config."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={config.num_processes}"]
    if config.num_nodes == 1:
        command.append("--standalone")
    else:
        command += [
            f"--nnodes={config.num_nodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={config.rdzv_endpoint}",
            f"--rdzv-id={config.rdzv_id}",
        ]
    return [*command, "-m", "pipeline.training.launch", str(request)]


def _launch_distributed(
    model_path: str,
    pairs_trace: Sequence[dict[str, Any]],
    pairs_empty: Sequence[dict[str, Any]],
    ref_logps: Sequence[dict[str, Any]],
    config: TrainConfig,
    output_dir: Path,
    trust_remote_code: bool,
    generations: Sequence[dict[str, Any]] | None = None,
) -> TrainResult:
    """Run :func:`train_bvpo` under torchrun: ``config.num_processes`` ranks on each of ``num_nodes``.

    With several nodes the request goes to :func:`request_dir_for` (the workspace: storage every node
    sees, at the same path), where ``python -m pipeline.training.launch --join <request.json>`` on each
    other node picks it up; the run waits at the rendezvous until all nodes have joined.
    """
    multi_node = config.num_nodes > 1
    with tempfile.TemporaryDirectory(prefix="bvpo-train-") as scratch:
        tmp = request_dir_for(output_dir) if multi_node else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, rows in (
            ("pairs_trace", pairs_trace),
            ("pairs_empty", pairs_empty),
            ("ref_logps", ref_logps),
            *([("generations", generations)] if generations is not None else []),
        ):
            paths[name] = str(tmp / f"{name}.parquet")
            pq.write_table(pa.Table.from_pylist(list(rows)), paths[name])
        request = tmp / "request.json"
        result_path = tmp / "result.json"
        result_path.unlink(missing_ok=True)
        staging = tmp / ".request.json.tmp"  # renamed into place: a joining node never reads half a file
        staging.write_text(
            json.dumps(
                {
                    "model_path": model_path,
                    "config": config.model_dump(mode="json"),
                    "output_dir": str(output_dir),
                    "trust_remote_code": trust_remote_code,
                    "result": str(result_path),
                    **paths,
                }
            )
        )
        staging.rename(request)
        env = dict(os.environ)
        if not torch.cuda.is_available() and not multi_node:
            # All ranks are on this machine: gloo must not follow the hostname to an interface that a
            # sandboxed or firewalled host cannot reach (ranks then wait out the 30-minute timeout).
            env.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
        proc = subprocess.run(torchrun_command(config, request), env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
            raise RuntimeError(f"distributed training failed (exit code {proc.returncode}):\n{tail}")
        result = json.loads(result_path.read_text())  # written by global rank 0, on whichever node
        if multi_node:
            shutil.rmtree(tmp, ignore_errors=True)
    return TrainResult(
        output_dir,
        result["metrics"],
        result["weight_delta_l2"],
        result["resumed_from_step"],
        result.get("grad_stats", []),
    )
