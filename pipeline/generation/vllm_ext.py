"""A vLLM worker extension (``LLM(worker_extension_cls=...)``): reseed the sampler between shards.

vLLM on CPU cannot seed single requests, so each shard seeds the whole engine instead. The method runs
inside every vLLM worker process through ``LLM.collective_rpc``; it is named, not pickled, so no insecure
serialization is needed.
"""

from __future__ import annotations

WORKER_EXTENSION = "pipeline.generation.vllm_ext.SamplerSeedExtension"


class SamplerSeedExtension:
    """Mixed into vLLM's worker class."""

    def bvpo_reseed(self, seed: int) -> int:
        """Seed the RNGs the sampler draws from (torch seeds every device)."""
        import random

        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return seed
