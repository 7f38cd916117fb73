"""Training precision: bf16 autocast where the hardware makes it fast, fp32 master weights
(docs/method.md §Precision and MFU)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with native bf16 matmuls


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@functools.cache
def bf16_is_fast() -> bool:
    """A GPU of compute capability ≥ 8 (Ampere or later), or a CPU with AMX / AVX512-BF16.

    Elsewhere bf16 is emulated (CPU) or missing, and fp32 is the faster choice.
    """
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability()[0] >= 8 and torch.cuda.is_bf16_supported()
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    if any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes):
        return True
    return bool(_cpu_flags() & set(BF16_CPU_FLAGS))


def resolve_bf16(setting: bool | str) -> bool:
    """``train.bf16``: ``"auto"`` → :func:`bf16_is_fast`; ``true`` / ``false`` force it."""
    if setting == "auto":
        return bf16_is_fast()
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"bf16 must be 'auto', true or false, got {setting!r}")
