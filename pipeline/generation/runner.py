"""The shard loop shared by the vLLM child process and the in-process HTTP engine."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import GenerationConfig
from pipeline.generation.sampler import Engine, generate_responses
from pipeline.generation.shards import Shard, ShardStore


def run_shards(
    engine: Engine,
    shards: Sequence[Shard],
    config: GenerationConfig,
    store: ShardStore,
    *,
    model_label: str,
    samples_per_prompt: int | None = None,
    temperature: float | None = None,
    emit: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Generate each shard with its own seed and persist it before starting the next one."""
    for shard in shards:
        started = time.perf_counter()
        reseed = getattr(engine, "reseed", None)
        seed = reseed(shard.seed) if callable(reseed) else None
        rows = generate_responses(
            engine,
            shard.prompts,
            config,
            model_label,
            samples_per_prompt=samples_per_prompt,
            temperature=temperature,
            shard_index=shard.index,
            seed=seed,
        )
        store.write(shard.index, rows)
        if emit is not None:
            emit(
                {
                    "event": "shard_done",
                    "index": shard.index,
                    "prompts": len(shard.prompts),
                    "rows": len(rows),
                    "tokens": sum(r["trace_tokens"] + r["answer_tokens"] for r in rows),
                    "seconds": time.perf_counter() - started,
                }
            )
