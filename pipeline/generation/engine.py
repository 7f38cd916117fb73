"""The in-process vLLM engine behind a small interface (``tokenizer``, ``complete``, ``reseed``).

Token in, token out (docs/method.md §Token-exact sequences): prompts are token-id lists, completions come back
as the token ids the engine sampled with the log-prob of each one, so nothing is re-tokenized downstream.
The HTTP engine for a served vLLM (:mod:`pipeline.generation.openai_engine`) has the same interface.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipeline.config import GenerationConfig
from pipeline.generation.engine_log import log_request
from pipeline.generation.vllm_ext import WORKER_EXTENSION


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling settings of one request (a subset of vLLM's ``SamplingParams``)."""

    n: int
    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    """One sampled continuation.

    ``token_ids``: every token the engine sampled, in order (a stop string's tokens and an end-of-sequence
    token included); ``logprobs``: the engine's log-prob of each of them (``None`` when the engine gave
    none), raw (before temperature / top-p) or processed, as the engine was configured
    (``GenerationConfig.logprobs_mode``).
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" | "length"
    stop_reason: str | None  # the stop string that ended it, None for end-of-sequence
    logprobs: tuple[float, ...] | None = None

    @property
    def token_count(self) -> int:
        return len(self.token_ids)


def on_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def cpu_thread_env(bind: str, ranks: int, cores: set[int] | None = None) -> dict[str, str]:
    """vLLM CPU thread-binding variables for ``GenerationConfig.cpu_omp_bind``.

    'all' splits the cores this process may use between the ranks and reserves none for vLLM's scheduler
    (which mostly waits while the model runs); 'auto' keeps vLLM's own choice.
    """
    if bind == "auto":
        return {}
    if bind != "all":
        return {"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    available = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(available) < ranks:
        return {}
    per_rank = len(available) // ranks
    lists = [available[r * per_rank : (r + 1) * per_rank] for r in range(ranks)]
    return {
        "VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(str(c) for c in cpus) for cpus in lists),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }


def single_process(config: GenerationConfig) -> bool:
    """Whether a CPU engine runs in this process (``GenerationConfig.cpu_single_process``): one rank only."""
    return config.cpu_single_process and config.tensor_parallel_size == 1


class VLLMEngine:
    """``vllm.LLM`` with this project's defaults; use :func:`open_vllm_engine` to get one."""

    name = "vllm"

    def __init__(self, llm: Any) -> None:
        self._llm = llm

    @property
    def tokenizer(self) -> Any:
        return self._llm.get_tokenizer()

    def reseed(self, seed: int) -> int | None:
        """Reseed the sampler of every worker (per shard); the seed applied."""
        self._llm.collective_rpc("bvpo_reseed", args=(seed,))
        return seed

    def complete(self, prompts: list[list[int]], specs: list[SamplingSpec]) -> list[list[Completion]]:
        """One list of ``spec.n`` completions per token-id prompt, in order."""
        from vllm import SamplingParams, TokensPrompt

        params = [
            SamplingParams(
                n=s.n,
                temperature=s.temperature,
                top_p=s.top_p if s.temperature > 0 else 1.0,
                max_tokens=s.max_tokens,
                stop=list(s.stop) or None,
                include_stop_str_in_output=True,  # the text then matches the token ids
                logprobs=0,  # the log-prob of each sampled token
            )
            for s in specs
        ]
        outputs = self._generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params)
        for prompt, out in zip(prompts, outputs, strict=True):
            log_request(prompt, [c.token_ids for c in out.outputs])
        return [[_completion(c) for c in out.outputs] for out in outputs]

    def _generate(self, prompts: list[Any], params: list[Any]) -> list[Any]:
        """``generate`` with every request queued before the first step.

        With vLLM's engine in its own process, the engine may start stepping while requests are still being
        added, so batches (and so the sampler's random draws) depend on timing: the same seed could give
        other samples. Pausing the scheduler while adding makes the first batch hold every request, so a
        seed gives the same samples. Engines without this API fall back to plain ``generate``.
        """
        core = getattr(self._llm.llm_engine, "engine_core", None)
        call = getattr(core, "call_utility", None)
        if not (callable(call) and hasattr(self._llm, "enqueue")):
            return list(self._llm.generate(prompts, params, use_tqdm=True))
        try:
            call("pause_scheduler", "keep", False)
        except Exception:  # an engine version without pause: plain generate
            return list(self._llm.generate(prompts, params, use_tqdm=True))
        try:
            self._llm.enqueue(prompts, params, use_tqdm=False)
        finally:
            call("resume_scheduler")
        return list(self._llm.wait_for_completion(use_tqdm=True))


def _completion(output: Any) -> Completion:
    """A vLLM ``CompletionOutput`` as a :class:`Completion` (one log-prob per sampled token)."""
    token_ids = tuple(int(t) for t in output.token_ids)
    logprobs = None
    if output.logprobs is not None and len(output.logprobs) == len(token_ids):
        logprobs = tuple(float(step[t].logprob) for step, t in zip(output.logprobs, token_ids, strict=True))
    return Completion(
        text=output.text,
        token_ids=token_ids,
        finish_reason=str(output.finish_reason),
        stop_reason=output.stop_reason if isinstance(output.stop_reason, str) else None,
        logprobs=logprobs,
    )


@contextmanager
def open_vllm_engine(
    model_path: str, config: GenerationConfig, trust_remote_code: bool
) -> Iterator[VLLMEngine]:
    """Start an engine (CPU or GPU), yield it, and shut it down."""
    gpu = on_gpu()
    if not gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_gb))
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # the user's own binding wins
            os.environ.update(cpu_thread_env(config.cpu_omp_bind, config.tensor_parallel_size))
        if single_process(config):  # read by vLLM when the engine is built: this process is the engine's
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    from pipeline.generation.precision import resolve_vllm_dtype

    kwargs: dict[str, Any] = {
        "model": model_path,
        "seed": config.seed,
        "max_model_len": config.max_model_len,
        "enforce_eager": config.enforce_eager,
        "tensor_parallel_size": config.tensor_parallel_size,
        "trust_remote_code": trust_remote_code,
        "dtype": resolve_vllm_dtype(config.dtype),
        "worker_extension_cls": WORKER_EXTENSION,
        "logprobs_mode": f"{config.logprobs_mode}_logprobs",
    }
    if gpu:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    elif single_process(config):
        kwargs["distributed_executor_backend"] = "uni"
    llm = LLM(**kwargs)
    try:
        yield VLLMEngine(llm)
    finally:
        shutdown = getattr(getattr(llm, "llm_engine", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm
