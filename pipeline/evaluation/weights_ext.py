"""vLLM worker extension for the evaluation engine: load another checkpoint's weights in place
(``docs/method.md`` §Evaluation).

``bvpo_reload_weights`` runs inside every vLLM worker through ``LLM.collective_rpc`` (named, not pickled).
It calls vLLM's own ``reload_weights(weights_path=...)`` and then repacks the vocabulary layers on CPU:
there a layer's matrix is packed for the CPU GEMM kernel when it is loaded, and a head tied to the
embeddings (SmolLM2, Qwen3-0.6B) receives no weights of its own in a reload, so vLLM keeps its old
packed copy and the reloaded model would score tokens with the previous model's head.
"""

from __future__ import annotations

from pipeline.generation.vllm_ext import SamplerSeedExtension

RELOAD_EXTENSION = "pipeline.evaluation.weights_ext.WeightReloadExtension"


class WeightReloadExtension(SamplerSeedExtension):
    """Mixed into vLLM's worker class (``self`` is the worker)."""

    def bvpo_reload_weights(self, path: str) -> int:
        """Load the weights of the checkpoint folder ``path``; return the vocabulary layers repacked."""
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
        from vllm.platforms import current_platform

        self.reload_weights(weights_path=path)  # type: ignore[attr-defined]
        if not current_platform.is_cpu():
            return 0
        repacked = 0
        for module in self.model_runner.get_model().modules():  # type: ignore[attr-defined]
            method = getattr(module, "quant_method", None)
            if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear") and method:
                method.process_weights_after_loading(module)  # rebuilds cpu_linear from module.weight
                repacked += 1
        return repacked
