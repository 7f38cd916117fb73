"""train.bf16: auto follows the hardware (native bf16 matmuls), true / false force it."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.training import precision
from pipeline.training.modeling import autocast


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    precision.bf16_is_fast.cache_clear()
    yield
    precision.bf16_is_fast.cache_clear()


@pytest.mark.usefixtures("cpu_only")
@pytest.mark.parametrize(
    "flags,fast", [({"avx512f", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True), ({"avx512f"}, False)]
)
def test_auto_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: set[str], fast: bool) -> None:
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    assert precision.resolve_bf16("auto") is fast
    assert precision.resolve_bf16(True) is True and precision.resolve_bf16(False) is False


@pytest.mark.usefixtures("cpu_only")
def test_autocast_is_off_for_auto_on_a_cpu_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2"})
    with autocast("auto"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(True):
        assert torch.is_autocast_enabled("cpu")


def test_config_defaults_to_auto_and_rejects_other_words() -> None:
    assert TrainConfig().bf16 == "auto"
    assert TrainConfig.model_validate({"bf16": False}).bf16 is False
    with pytest.raises(ValueError, match="bf16"):
        precision.resolve_bf16("fast")


@pytest.mark.usefixtures("cpu_only")
@pytest.mark.parametrize(
    ("flags", "expected"), [({"avx2"}, "float32"), ({"amx_bf16", "amx_tile"}, "bfloat16")]
)
def test_generation_dtype_auto_samples_in_fp32_where_bf16_is_emulated(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], expected: str
) -> None:
    from pipeline.config import GenerationConfig
    from pipeline.generation.precision import resolve_vllm_dtype

    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    assert resolve_vllm_dtype("auto") == expected and resolve_vllm_dtype("bfloat16") == "bfloat16"
    # The generations' version follows what 'auto' resolved to, so a bf16 and an fp32 sample never mix.
    assert GenerationConfig().fingerprint()["dtype"] == expected


def test_generation_dtype_auto_is_vllms_own_choice_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.generation.precision import resolve_vllm_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_vllm_dtype("auto") == "auto" and resolve_vllm_dtype("float32") == "float32"
