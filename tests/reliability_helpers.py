"""Shared by the bad-input, crash-recovery and security tests: stage tasks run without a Prefect API, a
deterministic in-process stand-in for the vLLM child process, checkable prompts, and catalog snapshots.

The stage tasks are called through ``task.fn`` (the function Prefect wraps), so they run exactly the
product code of a flow run (content addressing, rejects, registration) without starting a Prefect server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.generation.engine import Completion, SamplingSpec
from tests.generation_fakes import ScriptedEngine

ARTIFACTS: list[dict[str, Any]] = []
"""Every artifact the stages created while :func:`quiet_prefect` was active (most recent run)."""


class DigitEngine(ScriptedEngine):
    """Answers 'The answer is <d>.', d in 1..3 drawn from (seed, prompt, sample): some right, some wrong."""

    def _one(self, prompt: list[int], spec: SamplingSpec, index: int) -> Completion:
        if spec.stop:
            return super()._one(prompt, spec, index)
        tag = hashlib.sha256(f"{self._seed}|{self.text(prompt)}|{index}".encode()).hexdigest()
        return self.completion(f"The answer is {int(tag[:8], 16) % 3 + 1}.", "stop", None, spec.max_tokens)


def _engine_for(engine_factory: type[ScriptedEngine], model_path: str) -> ScriptedEngine:
    """A scripted engine that speaks the model folder's own tokenizer (as vLLM would), if there is one."""
    engine = engine_factory()
    if (Path(model_path) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        engine.hf_tokenizer = AutoTokenizer.from_pretrained(model_path)
    return engine


def fake_child_process(engine_factory: type[ScriptedEngine] = DigitEngine) -> dict[str, Any]:
    """Replacements for the vLLM child process: the same shard loop, in this process, on a scripted engine.

    Returns the attributes to patch on :mod:`pipeline.generation.worker` (``run_shards_in_child`` for the
    generate stage, ``run_generation`` for evaluation).
    """
    from pipeline.generation.runner import run_shards
    from pipeline.generation.shards import ShardStore

    def run_shards_in_child(
        model_path: str, shards: Any, config: Any, *, staging_dir: Path, model_label: str, **kw: Any
    ) -> None:
        run_shards(
            _engine_for(engine_factory, model_path),
            shards,
            config,
            ShardStore(staging_dir),
            model_label=model_label,
            samples_per_prompt=kw.get("samples_per_prompt"),
            temperature=kw.get("temperature"),
            emit=kw.get("on_event"),
        )

    def run_generation(
        model_path: str, prompts: list[dict[str, Any]], config: Any, *, model_label: str, **kw: Any
    ) -> list[dict[str, Any]]:
        from pipeline.generation.sampler import generate_responses

        engine = _engine_for(engine_factory, model_path)
        # Each model answers differently: the last part of its label (a folder name) is part of the seed.
        name = Path(model_label).name
        engine.reseed(config.seed + int(hashlib.sha256(name.encode()).hexdigest()[:4], 16))
        return generate_responses(
            engine,
            prompts,
            config,
            model_label,
            samples_per_prompt=kw.get("samples_per_prompt"),
            temperature=kw.get("temperature"),
            shard_index=0,
            seed=config.seed,
        )

    return {"run_shards_in_child": run_shards_in_child, "run_generation": run_generation}


def fake_eval_engine(engine_factory: type[ScriptedEngine] = DigitEngine) -> Any:
    """A replacement for :func:`pipeline.evaluation.engine.generate_for_models` (all models of an
    evaluation), answering like :func:`fake_child_process`'s ``run_generation`` for each model."""
    run_generation = fake_child_process(engine_factory)["run_generation"]

    def generate_for_models(models: Any, prompts: Any, config: Any, **kw: Any) -> dict[str, Any]:
        options = {k: kw.get(k) for k in ("samples_per_prompt", "temperature")}
        return {
            m.label: run_generation(m.path, list(prompts), config, model_label=m.identity, **options)
            for m in models
        }

    return generate_for_models


def install_fake_child_process(monkeypatch: Any, engine_factory: type[ScriptedEngine] = DigitEngine) -> None:
    """Patch :mod:`pipeline.generation.worker` with :func:`fake_child_process` and the evaluation engine
    with :func:`fake_eval_engine` (pytest ``monkeypatch``)."""
    import pipeline.evaluation.engine as eval_engine
    import pipeline.generation.worker as worker

    for name, value in fake_child_process(engine_factory).items():
        monkeypatch.setattr(worker, name, value)
    monkeypatch.setattr(eval_engine, "generate_for_models", fake_eval_engine(engine_factory))


@contextlib.contextmanager
def quiet_prefect(logger: logging.Logger | None = None) -> Iterator[list[dict[str, Any]]]:
    """Run stage tasks' functions outside a flow: logs go to ``logger`` (or nowhere), artifacts to a list."""
    from prefect.logging import disable_run_logger

    import tasks.stages as stages

    ARTIFACTS.clear()

    def record(**kwargs: Any) -> None:
        ARTIFACTS.append(kwargs)

    saved = stages.create_table_artifact, stages.get_run_logger
    stages.create_table_artifact = record  # type: ignore[assignment]
    if logger is not None:
        stages.get_run_logger = lambda: logger  # type: ignore[assignment]
    try:
        with disable_run_logger():
            yield ARTIFACTS
    finally:
        stages.create_table_artifact, stages.get_run_logger = saved


def write_prompt_file(path: Path, count: int = 8) -> Path:
    """A JSONL file of ``count`` math prompts whose answers are 1, 2 or 3."""
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            answer = i % 3 + 1
            record = {"prompt": f"Question {i}: what is {answer} times 1?", "answer": str(answer)}
            handle.write(json.dumps(record) + "\n")
    return path


def pipeline_config(
    workspace: Path, model_dir: Path, source: Path, **sections: dict[str, Any]
) -> PipelineConfig:
    """A small, fast configuration over a tiny model folder and a prompt file."""
    data: dict[str, Any] = {
        "workspace": str(workspace),
        "model": {"name_or_path": str(model_dir)},
        "prompts": {"source": str(source), "num_prompts": 1000, "eval_fraction": 0.3},
        "generation": {
            "samples_per_prompt": 4,
            # The tiny model's tokenizer has one token per character.
            "max_trace_tokens": 16,
            "max_answer_tokens": 32,
            "max_model_len": 512,
            "shard_size": 2,
        },
        "pairing": {"min_margin": 0.1},
        "train": {
            "max_steps": 4,
            "batch_size": 2,
            "max_length": 512,
            "bf16": False,
            "checkpoint_every": 1,
            "learning_rate": 1e-3,
            "warmup_steps": 0,
        },
        "eval": {"bootstrap_samples": 20},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return PipelineConfig.model_validate(data)


def catalog_rows(workspace: Path) -> list[tuple[str, str, int]]:
    """``(name, version, rows)`` of every registered dataset; [] when there is no catalog yet."""
    from storage import DatasetStore

    store = DatasetStore(workspace)
    if not store.catalog.path.exists():
        return []
    return [(d["name"], d["version"], d["row_count"]) for d in store.catalog.list_datasets()]


def lake_tree(workspace: Path) -> list[str]:
    """Every file and folder under the workspace's lake and staging areas, relative (sorted)."""
    out = []
    for area in ("lake", "staging"):
        root = workspace / area
        if root.exists():
            out += sorted(str(p.relative_to(workspace)) for p in root.rglob("*"))
    return out


def generation_row(prompt_id: str, mode: str, index: int, answer: str, **overrides: Any) -> dict[str, Any]:
    """A complete ``generations`` row (schema-valid) with a given answer."""
    block = "<think>\nhmm\n</think>\n\n" if mode == "trace" else "<think>\n\n</think>\n\n"
    row = {
        "generation_id": f"{prompt_id}-{mode}-{index}",
        "prompt_id": prompt_id,
        "mode": mode,
        "sample_index": index,
        "model": "tiny",
        "prompt_text": f"<|user|>{prompt_id}\n<|assistant|>",
        "response_text": block + answer,
        "trace": "hmm" if mode == "trace" else None,
        "answer": answer,
        "trace_tokens": 3 if mode == "trace" else 0,
        "answer_tokens": len(answer),
        "trace_finish_reason": "close_tag" if mode == "trace" else None,
        "finish_reason": "stop",
        "trace_closed": mode == "trace",
        "budget_forced": False,
        "parse_ok": True,
        "parse_error": None,
        "reasoning_control": "prefill",
        "open_tag": "<think>",
        "close_tag": "</think>",
        "prompt_tokens": 10,
        "engine": "fake",
        "shard_index": 0,
        "seed": 0,
    }
    return with_token_ids(row | overrides)


def with_token_ids(row: dict[str, Any]) -> dict[str, Any]:
    """Add the tiny tokenizer's ids of a generation row's texts (EOS where it ended by itself)."""
    from tests.tiny_checkpoint import EOS_ID, char_ids

    response = char_ids(row["response_text"])
    eos = row["finish_reason"] == "stop"
    response += [EOS_ID] if eos else []
    defaults = {
        "prompt_token_ids": char_ids(row["prompt_text"]),
        "response_token_ids": response,
        "response_segments": [3] * (len(response) - eos) + [4] * eos,
        "eos_emitted": eos,
        "sampler_logprobs": None,
        "sampler_processed_logprobs": None,
        "temperature": 0.8,
        "top_p": 0.95,
        "logprobs_mode": "raw",
    }
    return defaults | row


def pair_with_token_ids(pair: dict[str, Any]) -> dict[str, Any]:
    """Add the tiny tokenizer's ids of a pair's texts (responses end with EOS, as emitted)."""
    from tests.tiny_checkpoint import EOS_ID, char_ids

    return {
        "prompt_token_ids": char_ids(pair["prompt_text"]),
        "chosen_token_ids": [*char_ids(pair["chosen_response"]), EOS_ID],
        "rejected_token_ids": [*char_ids(pair["rejected_response"]), EOS_ID],
    } | pair


def score_row(generation: dict[str, Any], score: float) -> dict[str, Any]:
    """A ``scores`` row for a generation."""
    keys = ("generation_id", "prompt_id", "mode")
    extra = {"scorer": "test", "score": score, "checks": "{}", "components": None, "details": None}
    return {k: generation[k] for k in keys} | extra
