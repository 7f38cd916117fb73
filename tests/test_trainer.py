"""BVPO trainer: exactness against a plain DPO reference, the α mixture, resume, and data parallelism."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.training.trainer import BVPOTrainer, RefPair, TrainingDataError
from tests.tiny_lm import random_pairs, tiny_model

BETA = 0.3


def _config(**overrides: object) -> TrainConfig:
    base: dict[str, object] = {
        "beta": BETA,
        "batch_size": 4,
        "bf16": False,
        "max_grad_norm": 1e9,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "max_steps": 6,
        "checkpoint_every": 0,
    }
    base.update(overrides)
    return TrainConfig.model_validate(base)


def _naive_logp(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return torch.stack([logp[len(prompt) + i - 1, tok] for i, tok in enumerate(response)]).sum()


def _naive_dpo_loss(model: torch.nn.Module, pairs: list[RefPair]) -> torch.Tensor:
    """Plain DPO, one sequence at a time, written without any trainer code."""
    losses = []
    for p in pairs:
        chosen = _naive_logp(model, p.tokens.prompt_ids, p.tokens.chosen_ids)
        rejected = _naive_logp(model, p.tokens.prompt_ids, p.tokens.rejected_ids)
        margin = (chosen - p.ref_chosen) - (rejected - p.ref_rejected)
        losses.append(-F.logsigmoid(BETA * margin))
    return torch.stack(losses).mean()


def _grads_of_first_step(trainer: BVPOTrainer) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    original = trainer.optimizer.step

    def capture(*args: object, **kwargs: object) -> object:
        for name, param in trainer.model.named_parameters():
            captured[name] = (
                param.grad.detach().clone() if param.grad is not None else torch.zeros_like(param)
            )
        return original(*args, **kwargs)

    trainer.optimizer.step = capture  # type: ignore[method-assign]
    trainer.train_step()
    return captured


def _naive_grads(model: torch.nn.Module, pairs: list[RefPair]) -> tuple[float, dict[str, torch.Tensor]]:
    model = copy.deepcopy(model)
    loss = _naive_dpo_loss(model, pairs)
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "alpha,mode", [(1.0, "trace"), ("dpo_trace", "trace"), (0.0, "empty"), ("dpo_empty", "empty")]
)
def test_baselines_equal_plain_dpo_in_float64(alpha: float | str, mode: str) -> None:
    model = tiny_model()
    data_t, data_e = random_pairs(4, 1, "t"), random_pairs(4, 2, "e")
    expected_loss, expected_grads = _naive_grads(model, data_t if mode == "trace" else data_e)
    trainer = BVPOTrainer(copy.deepcopy(model), data_t, data_e, _config(alpha=alpha), pad_id=0)
    grads = _grads_of_first_step(trainer)
    assert trainer.metrics[0]["loss"] == pytest.approx(expected_loss, abs=1e-6)
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-6), name
    # The baseline of one mode never touches the other mode's data.
    assert trainer.metrics[0][f"loss_{'e' if mode == 'trace' else 't'}"] is None


def test_mixed_gradient_is_alpha_weighted_sum() -> None:
    model = tiny_model()
    data_t, data_e = random_pairs(4, 1, "t"), random_pairs(4, 2, "e")
    grads = {
        alpha: _grads_of_first_step(
            BVPOTrainer(copy.deepcopy(model), data_t, data_e, _config(alpha=alpha), 0)
        )
        for alpha in (1.0, 0.0, 0.3)
    }
    for name in grads[1.0]:
        mixed = 0.3 * grads[1.0][name] + 0.7 * grads[0.0][name]
        # float64 throughout; the residual (~1e-7 relative) comes from HF's float32 rotary tables.
        scale = float(mixed.abs().max()) + 1e-12
        assert float((grads[0.3][name] - mixed).abs().max()) <= 1e-6 * scale, name


def test_training_lowers_the_loss_and_raises_reward_accuracy() -> None:
    model = tiny_model()
    data_t, data_e = random_pairs(4, 1, "t"), random_pairs(4, 2, "e")
    trainer = BVPOTrainer(model, data_t, data_e, _config(alpha=0.5, max_steps=15), pad_id=0)
    metrics = trainer.train()
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[-1]["reward_acc_t"] > metrics[0]["reward_acc_t"] or metrics[-1]["reward_acc_t"] == 1.0
    assert metrics[-1]["reward_acc_e"] > metrics[0]["reward_acc_e"] or metrics[-1]["reward_acc_e"] == 1.0


@pytest.mark.parametrize("sampling", ["cycle", "replacement"])
def test_resume_continues_exactly(tmp_path: Path, sampling: str) -> None:
    data_t, data_e = random_pairs(7, 1, "t"), random_pairs(5, 2, "e")
    config = _config(
        alpha=0.5, batch_size=2, max_steps=8, checkpoint_every=4, sampling=sampling, warmup_steps=2
    )
    full = BVPOTrainer(tiny_model(), data_t, data_e, config, pad_id=0)
    full.train()

    first = BVPOTrainer(tiny_model(), data_t, data_e, config, pad_id=0)
    first.train(state_dir=tmp_path, stop_after=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004.pt"]
    resumed = BVPOTrainer(
        tiny_model(seed=123), data_t, data_e, config, pad_id=0
    )  # different init: state wins
    assert resumed.resume_from(tmp_path) and resumed.step == 4
    resumed.train(state_dir=tmp_path)

    assert [m["loss"] for m in resumed.metrics] == pytest.approx([m["loss"] for m in full.metrics], abs=1e-6)
    for (name, a), (_, b) in zip(
        full.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def test_missing_mode_data_is_a_clear_error() -> None:
    with pytest.raises(TrainingDataError, match="empty-trace pairs"):
        BVPOTrainer(tiny_model(), random_pairs(2, 1, "t"), [], _config(alpha=0.5), pad_id=0)
    # alpha = 1 needs no D_e at all.
    BVPOTrainer(tiny_model(), random_pairs(2, 1, "t"), [], _config(alpha=1.0), pad_id=0)


def _train_rank(out: str, strategy: str) -> None:
    config = _config(alpha=0.4, max_steps=3, distributed=strategy)
    # SDPA: one process and each rank pack different rows, and eager's float32 softmax rounds by row layout.
    model = tiny_model(attn_implementation="sdpa")
    trainer = BVPOTrainer(model, random_pairs(6, 1, "t"), random_pairs(6, 2, "e"), config, 0)
    trainer.train()
    params = trainer.full_model_state_dict()  # collective under FSDP
    if trainer.rank == 0:
        torch.save({"params": params, "metrics": trainer.metrics}, out)


def _distributed_worker(rank: int, world: int, init_file: str, out: str, strategy: str) -> None:
    import datetime
    import functools

    from pipeline.training.launch import run_in_process_group

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both ranks live on this machine
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine: no oversubscribed OpenMP pools
    # Spawned ranks inherit the parent's CPU affinity; an earlier in-process engine may have pinned it.
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    # The trainer (and its DDP reducer) lives only inside _train_rank, so it is gone before the group is
    # destroyed (run_in_process_group explains the deadlock of the other order).
    run_in_process_group(
        functools.partial(_train_rank, out, strategy),
        backend="gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),  # a stuck collective raises instead of hanging the suite
    )


@pytest.mark.timeout(360)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(tmp_path: Path, strategy: str) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "ddp.pt"
    ranks = mp.start_processes(
        _distributed_worker,
        args=(2, str(tmp_path / "init"), str(out), strategy),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 280  # a loaded 2-core machine runs a healthy pair in 30-180 s
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"{strategy}: the two gloo ranks did not finish within 280 s")
    single = BVPOTrainer(
        tiny_model(attn_implementation="sdpa"),
        random_pairs(6, 1, "t"),
        random_pairs(6, 2, "e"),
        _config(alpha=0.4, max_steps=3),
        0,
    )
    single.train()
    ddp = torch.load(out, weights_only=False)
    for name, param in single.model.state_dict().items():
        assert torch.allclose(ddp["params"][name], param, atol=1e-8), name
    assert [m["loss"] for m in ddp["metrics"]] == pytest.approx([m["loss"] for m in single.metrics], abs=1e-8)


def test_lora_trains_only_adapters_and_merges_into_a_plain_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from pipeline.config import LoraSettings
    from pipeline.training.run import apply_training_options
    from pipeline.training.trainer import save_hf_checkpoint

    base = tiny_model(dtype=torch.float32)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    config = _config(
        alpha=0.5, max_steps=3, lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    )
    model = apply_training_options(base, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer = BVPOTrainer(model, random_pairs(4, 1, "t"), random_pairs(4, 2, "e"), config, pad_id=0)
    trainer.train()
    # The base weights are untouched by the optimizer; merging folds the adapters into q/v projections.

    class _NoTokenizer:
        def save_pretrained(self, path: Path) -> None:
            pass

    save_hf_checkpoint(model, _NoTokenizer(), tmp_path / "ckpt")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    names = dict(merged.named_parameters())
    assert not any("lora" in n for n in names)
    changed = {n for n, p in names.items() if not torch.allclose(p, frozen[n])}
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)


def test_gradient_checkpointing_gives_the_same_step() -> None:
    from pipeline.training.run import apply_training_options

    data_t, data_e = random_pairs(4, 1, "t"), random_pairs(4, 2, "e")
    plain = BVPOTrainer(tiny_model(), data_t, data_e, _config(alpha=0.5, max_steps=2), pad_id=0)
    ckpt_config = _config(alpha=0.5, max_steps=2, gradient_checkpointing=True)
    recomputed = BVPOTrainer(
        apply_training_options(tiny_model(), ckpt_config), data_t, data_e, ckpt_config, 0
    )
    plain.train()
    recomputed.train()
    assert [m["loss"] for m in recomputed.metrics] == pytest.approx(
        [m["loss"] for m in plain.metrics], abs=1e-10
    )
