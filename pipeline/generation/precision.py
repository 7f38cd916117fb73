"""The dtype vLLM computes in: ``generation.dtype: auto`` picks bf16 only where the hardware has it natively.

On a CPU without AMX or AVX512-BF16, bf16 matmuls are emulated: measured on a 2-core Xeon without either,
the generate stage sampled 47.6 tokens/s in bf16 and 120.1 tokens/s in fp32 (``bench/bench_generation.py``).
See docs/generation.md §Precision.
"""

from __future__ import annotations

from pipeline.training.precision import bf16_is_fast


def resolve_vllm_dtype(setting: str) -> str:
    """The ``dtype`` passed to ``vllm.LLM`` for ``generation.dtype``.

    Args:
        setting: ``"auto"`` or an explicit dtype (``"bfloat16"``, ``"float16"``, ``"float32"``).

    Returns:
        The explicit dtype unchanged. For ``"auto"``: on a GPU, ``"auto"`` (vLLM's own choice, the
        checkpoint's dtype); on a CPU, ``"bfloat16"`` where bf16 is native, else ``"float32"``.
    """
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "auto"
    return "bfloat16" if bf16_is_fast() else "float32"
