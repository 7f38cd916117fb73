"""What a training run leaves on disk: LoRA states and checkpoints hold the adapters (the merged model on
request), checkpoints are in the base model's dtype, resumable states go once the run has succeeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import LoraSettings, TrainConfig
from pipeline.training.run import state_dir_for, train_bvpo
from tests.pair_rows import made_up_refs, stored_pairs
from tests.tiny_checkpoint import save_tiny_checkpoint

LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", hidden=64, layers=2)


@pytest.fixture(scope="module")
def tiny_bf16(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model stored in bf16 (its config.json says so)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("ckpt-bf16") / "model"
    AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return folder


def _train(model: Path, output: Path, **overrides: object) -> None:
    pairs = stored_pairs(str(model))
    base: dict[str, object] = {"max_steps": 2, "batch_size": 2, "bf16": False, "max_length": 96}
    config = TrainConfig.model_validate(base | overrides)
    train_bvpo(str(model), pairs["trace"], pairs["empty"], made_up_refs(pairs), config, output)


def _state_file(output: Path) -> Path:
    (state,) = sorted(state_dir_for(output).glob("step-*.pt"))
    return state


def test_lora_state_and_checkpoint_hold_the_adapters(tiny: Path, tmp_path: Path) -> None:
    _train(tiny, tmp_path / "full", checkpoint_every=1, keep_state=True)
    _train(tiny, tmp_path / "lora", checkpoint_every=1, keep_state=True, lora=LORA)
    full_state, lora_state = _state_file(tmp_path / "full"), _state_file(tmp_path / "lora")
    weights = torch.load(lora_state, weights_only=False)["model"]
    assert weights and all("lora_" in name for name in weights)
    full_bytes, lora_bytes = full_state.stat().st_size, lora_state.stat().st_size
    print(f"resumable state: full fine-tuning {full_bytes} B, LoRA {lora_bytes} B")
    assert lora_bytes < full_bytes / 5
    checkpoint = tmp_path / "lora"
    adapter = json.loads((checkpoint / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    assert (checkpoint / "config.json").is_file()  # merged export (merge_on_save defaults to true)


def test_lora_resume_from_an_adapter_state_continues_exactly(tmp_path: Path) -> None:
    from pipeline.training.run import apply_training_options
    from pipeline.training.trainer import BVPOTrainer
    from tests.tiny_lm import random_pairs, tiny_model

    config = TrainConfig(
        max_steps=4, batch_size=2, bf16=False, checkpoint_every=1, learning_rate=1e-2, lora=LORA
    )

    def fresh() -> BVPOTrainer:
        torch.manual_seed(0)  # the same adapter initialization each time
        model = apply_training_options(tiny_model(), config)
        return BVPOTrainer(model, random_pairs(4, 1, "t"), random_pairs(4, 2, "e"), config, pad_id=0)

    straight = fresh()
    straight.train()
    first = fresh()
    first.train(state_dir=tmp_path, stop_after=2)
    resumed = fresh()
    assert resumed.resume_from(tmp_path) and resumed.step == 2
    resumed.train(state_dir=tmp_path)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-10) for k in a)
    assert [m["loss"] for m in resumed.metrics] == pytest.approx([m["loss"] for m in straight.metrics])


def test_adapters_only_when_no_merge_is_asked(tiny: Path, tmp_path: Path) -> None:
    _train(tiny, tmp_path / "out", lora=LORA.model_copy(update={"merge_on_save": False}))
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "config.json").exists()


def test_states_are_removed_after_success_unless_kept(tiny: Path, tmp_path: Path) -> None:
    _train(tiny, tmp_path / "dropped", checkpoint_every=1)
    assert (tmp_path / "dropped" / "config.json").is_file()
    assert not state_dir_for(tmp_path / "dropped").exists()
    _train(tiny, tmp_path / "kept", checkpoint_every=1, keep_state=True)
    assert _state_file(tmp_path / "kept").name == "step-000002.pt"


@pytest.mark.parametrize(("setting", "expected"), [("model", "bfloat16"), ("float32", "float32")])
def test_checkpoint_dtype(tiny_bf16: Path, tmp_path: Path, setting: str, expected: str) -> None:
    from safetensors import safe_open

    _train(tiny_bf16, tmp_path / "out", checkpoint_dtype=setting)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"BF16" if expected == "bfloat16" else "F32"}
