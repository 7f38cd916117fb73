"""Every model of one evaluation through one vLLM engine (``docs/method.md`` §Evaluation).

An engine start costs ~25 s on CPU (~55 s in vLLM's multi-process layout), more than generating a small
eval set, so the engine starts once on the first model and every further model's weights are loaded in
place: vLLM's worker method ``reload_weights(weights_path=...)`` through ``LLM.collective_rpc``
(:mod:`pipeline.evaluation.weights_ext` also repacks a tied head on CPU), then the prefix cache is dropped
(its KV blocks were computed with the old weights). Each model is sampled after reseeding the engine with
the same seed, so it gets the samples a fresh engine on that checkpoint would give
(``tests/test_eval_engine_e2e.py``).
Models whose architectures differ (another shape, another vocabulary) cannot share weights' storage: they
get an engine each. Like generation, the engine lives in a child process
(``python -m pipeline.evaluation.engine <request.json>``), so its memory is returned when it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import GenerationConfig
from pipeline.generation.shards import ShardStore
from pipeline.generation.worker import EVENT_PREFIX, ChildOutput, GenerationError

# config.json fields two checkpoints must share for one to be loaded into the other's engine.
ARCHITECTURE_KEYS = (
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
)  # fmt: skip


@dataclass(frozen=True)
class EngineModel:
    """A model to generate with: its label in the results, the folder to load, the name to record."""

    label: str
    path: str
    identity: str


def architecture(path: str) -> tuple[Any, ...]:
    """The fields of ``<path>/config.json`` that decide whether weights can be swapped in place."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():  # a hub id: compared by name only
        return ("name", path)
    config = json.loads(config_file.read_text(encoding="utf-8"))
    return tuple(json.dumps(config.get(key), sort_keys=True) for key in ARCHITECTURE_KEYS)


def engine_groups(models: Sequence[EngineModel]) -> list[list[EngineModel]]:
    """Models that can share one engine, in first-seen order (usually a single group)."""
    groups: dict[tuple[Any, ...], list[EngineModel]] = {}
    for model in models:
        groups.setdefault(architecture(model.path), []).append(model)
    return list(groups.values())


def generate_for_models(
    models: Sequence[EngineModel],
    prompts: Sequence[dict[str, Any]],
    config: GenerationConfig,
    *,
    trust_remote_code: bool = False,
    samples_per_prompt: int | None = None,
    temperature: float | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    echo: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """``generations`` rows per model label, one engine start per :func:`engine_groups` group."""
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}")
    out: dict[str, list[dict[str, Any]]] = {}
    for group in engine_groups(models):
        with tempfile.TemporaryDirectory(prefix="bvpo-eval-") as tmp:
            request = Path(tmp) / "request.json"
            request.write_text(
                json.dumps(
                    {
                        "models": [asdict(m) for m in group],
                        "prompts": [{"prompt_id": p["prompt_id"], "prompt": p["prompt"]} for p in prompts],
                        "config": config.model_dump(mode="json"),
                        "trust_remote_code": trust_remote_code,
                        "samples_per_prompt": samples_per_prompt,
                        "temperature": temperature,
                        "staging_dir": str(Path(tmp) / "out"),
                    }
                ),
                encoding="utf-8",
            )
            _run_child(request, on_event, echo)
            store = ShardStore(Path(tmp) / "out")
            for index, model in enumerate(group):
                rows = store.read(index)
                if rows is None:
                    raise GenerationError(f"the evaluation engine wrote no output for {model.label}")
                out[model.label] = rows
    return out


def _run_child(request: Path, on_event: Callable[[dict[str, Any]], None] | None, echo: bool) -> None:
    env = dict(os.environ)
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.evaluation.engine", str(request)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the engine's own processes join this session and end with it
    )
    output = ChildOutput(sys.stderr if echo else None)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        for chunk in iter(lambda: os.read(fd, 65536), b""):
            for event in output.feed(chunk):
                if on_event is not None:
                    on_event(event)
        code = proc.wait()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
    if code != 0:
        raise GenerationError(f"evaluation generation failed (exit code {code}):\n{output.tail_text()}")


def reload_weights(engine: Any, path: str) -> None:
    """Load ``path``'s weights into a running :class:`~pipeline.generation.engine.VLLMEngine` in place.

    The engine must have been opened with :data:`~pipeline.evaluation.weights_ext.RELOAD_EXTENSION`.
    """
    llm = engine._llm  # the wrapped vllm.LLM
    llm.collective_rpc("bvpo_reload_weights", args=(path,))
    llm.reset_prefix_cache()  # cached KV blocks belong to the previous weights


def _emit(event: dict[str, Any]) -> None:
    print(f"\n{EVENT_PREFIX}{json.dumps(event)}", flush=True)


def _main(request_path: str) -> None:
    import pipeline.generation.engine as generation_engine
    from pipeline.evaluation.weights_ext import RELOAD_EXTENSION
    from pipeline.generation.sampler import generate_responses

    # This child's engine gets the reload method next to the reseed one (a superset of that extension).
    generation_engine.WORKER_EXTENSION = RELOAD_EXTENSION

    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    config = GenerationConfig.model_validate(request["config"])
    models = [EngineModel(**m) for m in request["models"]]
    prompts = tuple(request["prompts"])
    store = ShardStore(Path(request["staging_dir"]))
    started = time.perf_counter()
    open_engine = generation_engine.open_vllm_engine
    with open_engine(models[0].path, config, request["trust_remote_code"]) as engine:
        _emit({"event": "engine_ready", "seconds": time.perf_counter() - started, "pid": os.getpid()})
        for index, model in enumerate(models):
            began = time.perf_counter()
            if index > 0:
                reload_weights(engine, model.path)
                _emit(
                    {"event": "weights_loaded", "label": model.label, "seconds": time.perf_counter() - began}
                )
            seed = engine.reseed(config.seed)  # as a fresh engine's single shard: the same samples
            rows = generate_responses(
                engine,
                prompts,
                config,
                model.identity,
                samples_per_prompt=request["samples_per_prompt"],
                temperature=request["temperature"],
                shard_index=0,
                seed=seed,
            )
            store.write(index, rows)
            _emit(
                {
                    "event": "model_done",
                    "label": model.label,
                    "rows": len(rows),
                    "seconds": time.perf_counter() - began,
                }
            )


if __name__ == "__main__":
    _main(sys.argv[1])
