"""Explicit Arrow schemas, one per dataset kind.

Every dataset written to the lake is cast to its kind's schema first, so a stage that produces a wrong
column type fails loudly at write time instead of leaving an unreadable dataset behind.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

_PAIR_FIELDS = [
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("mode", pa.string(), nullable=False),
    pa.field("prompt_text", pa.string(), nullable=False),
    pa.field("chosen_response", pa.string(), nullable=False),
    pa.field("rejected_response", pa.string(), nullable=False),
    pa.field("chosen_answer", pa.string(), nullable=False),
    pa.field("rejected_answer", pa.string(), nullable=False),
    pa.field("chosen_score", pa.float64(), nullable=False),
    pa.field("rejected_score", pa.float64(), nullable=False),
    pa.field("margin", pa.float64(), nullable=False),
    pa.field("chosen_generation_id", pa.string(), nullable=False),
    pa.field("rejected_generation_id", pa.string(), nullable=False),
    pa.field("num_candidates", pa.int32()),  # usable answers the pair was chosen from
    pa.field("length_ratio", pa.float64()),  # chosen / rejected answer length (PairingConfig.length_unit)
    # Token-exact sequences (docs/method.md §Token-exact sequences): what training scores, as sampled.
    pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("chosen_token_ids", pa.list_(pa.int32()), nullable=False),  # trace block + answer (+ EOS)
    pa.field("rejected_token_ids", pa.list_(pa.int32()), nullable=False),
]

_GENERATION_FIELDS = [
    pa.field("generation_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("mode", pa.string(), nullable=False),  # "trace" (reasoning on) | "empty" (reasoning off)
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("prompt_text", pa.string(), nullable=False),  # chat-rendered prompt, before the trace block
    pa.field("response_text", pa.string(), nullable=False),  # trace block + answer, as trained on
    pa.field("trace", pa.string()),  # None in reasoning-off mode
    pa.field("answer", pa.string(), nullable=False),
    pa.field("trace_tokens", pa.int32(), nullable=False),
    pa.field("answer_tokens", pa.int32(), nullable=False),
    pa.field("trace_finish_reason", pa.string()),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("trace_closed", pa.bool_(), nullable=False),  # the model closed the trace itself
    pa.field("budget_forced", pa.bool_(), nullable=False),  # the trace budget closed it
    pa.field("parse_ok", pa.bool_(), nullable=False),
    pa.field("parse_error", pa.string()),
    pa.field("reasoning_control", pa.string(), nullable=False),
    pa.field("open_tag", pa.string()),  # trace tags the rows were rendered and parsed with
    pa.field("close_tag", pa.string()),
    pa.field("prompt_tokens", pa.int32()),  # tokens of prompt_text as the engine counts them
    pa.field("engine", pa.string()),  # "vllm" (in-process) | "openai" (served, over HTTP)
    pa.field("shard_index", pa.int32()),  # the generation shard the row was sampled in
    pa.field("seed", pa.int64()),  # engine seed of that shard (None: a served engine, seeded by its owner)
    # Token-exact sequences (docs/method.md §Token-exact sequences); the text columns above are decoded
    # from these ids.
    pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),  # as fed to the engine
    pa.field("response_token_ids", pa.list_(pa.int32()), nullable=False),  # everything after the prompt
    # One code per response token: 0 prefilled, 1 sampled trace, 2 forced, 3 sampled answer, 4 EOS.
    pa.field("response_segments", pa.list_(pa.int8()), nullable=False),
    pa.field("eos_emitted", pa.bool_(), nullable=False),  # the model ended the response itself
    # The engine's raw log-prob of each response token (NaN where not sampled); None in 'processed' mode.
    pa.field("sampler_logprobs", pa.list_(pa.float32())),
    # Log-prob under the distribution actually sampled from (temperature, top-p; 0 where prefilled or
    # forced), where the engine gave it (GenerationConfig.logprobs_mode 'processed'), else None.
    pa.field("sampler_processed_logprobs", pa.list_(pa.float32())),
    pa.field("temperature", pa.float64()),  # sampling settings of the row (q can be recomputed from them)
    pa.field("top_p", pa.float64()),
    pa.field("logprobs_mode", pa.string()),
]

ADDED_LATER = b"bvpo.added_later"
"""Field metadata key of a nullable column added to its kind after versions without it were written."""


def added_later(field: pa.Field) -> pa.Field:
    """``field`` marked as added later: a version written before it reads the column as nulls."""
    if not field.nullable:
        raise ValueError(f"a column added later must be nullable: {field.name}")
    return field.with_metadata({ADDED_LATER: b"1"})


def may_be_missing(field: pa.Field) -> bool:
    """A column that older versions of its kind may lack (:func:`added_later`); any other must be there."""
    return field.metadata is not None and ADDED_LATER in field.metadata


_SCORE_FIELDS = [
    pa.field("generation_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("mode", pa.string(), nullable=False),
    pa.field("scorer", pa.string(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("checks", pa.string(), nullable=False),  # JSON object: check name -> passed
    pa.field("components", pa.string()),  # JSON object: component name -> its score (score = weighted sum)
    pa.field("details", pa.string()),  # JSON object: component name -> extra facts (raw reward, judge text)
]

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("task_type", pa.string(), nullable=False),
            pa.field("reference_answer", pa.string()),
            pa.field("constraints", pa.string(), nullable=False),  # JSON list
            pa.field("source", pa.string(), nullable=False),
            pa.field("source_key", pa.string()),  # where in the source: file:line, file[row], dataset[row]
        ]
    ),
    "generations": pa.schema(_GENERATION_FIELDS),
    "scores": pa.schema(_SCORE_FIELDS),
    "pairs_trace": pa.schema(_PAIR_FIELDS),
    "pairs_empty": pa.schema(_PAIR_FIELDS),
    "ref_logps": pa.schema(
        [
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("mode", pa.string(), nullable=False),
            pa.field("ref_model", pa.string(), nullable=False),
            pa.field("ref_chosen_logp", pa.float64(), nullable=False),
            pa.field("ref_rejected_logp", pa.float64(), nullable=False),
            pa.field("chosen_tokens", pa.int32(), nullable=False),
            pa.field("rejected_tokens", pa.int32(), nullable=False),
            pa.field("prompt_tokens", pa.int32()),  # prompt tokens scored (after any left cut)
            pa.field("prompt_cut", pa.int32()),  # prompt tokens cut from the left (train.truncation)
        ]
    ),
    # Sampler/trainer agreement (docs/method.md §Token-exact sequences): per mode and segment, the reference
    # pass's log-prob of each sampled token against the engine's raw log-prob of the same token.
    "logp_agreement": pa.schema(
        [
            pa.field("mode", pa.string(), nullable=False),
            pa.field("segment", pa.string(), nullable=False),  # trace | answer | eos | all
            pa.field("ref_model", pa.string(), nullable=False),
            pa.field("sampler_dtype", pa.string()),  # generation.dtype of the engine
            pa.field("tokens", pa.int64(), nullable=False),
            pa.field("mean_abs_delta", pa.float64()),  # mean |ref − sampler| (nats)
            pa.field("mean_delta", pa.float64()),  # mean (ref − sampler)
            pa.field("p99_abs_delta", pa.float64()),
            pa.field("max_abs_delta", pa.float64()),
        ]
    ),
    "train_metrics": pa.schema(
        [
            pa.field("step", pa.int32(), nullable=False),
            pa.field("loss", pa.float64(), nullable=False),
            pa.field("loss_t", pa.float64()),
            pa.field("loss_e", pa.float64()),
            pa.field("alpha", pa.float64(), nullable=False),
            pa.field("chosen_reward_t", pa.float64()),
            pa.field("rejected_reward_t", pa.float64()),
            pa.field("reward_margin_t", pa.float64()),
            pa.field("reward_acc_t", pa.float64()),
            pa.field("chosen_reward_e", pa.float64()),
            pa.field("rejected_reward_e", pa.float64()),
            pa.field("reward_margin_e", pa.float64()),
            pa.field("reward_acc_e", pa.float64()),
            pa.field("grad_norm", pa.float64(), nullable=False),
            pa.field("lr", pa.float64(), nullable=False),
            pa.field("tokens", pa.int64(), nullable=False),
            pa.field("pairs_t", pa.int64()),  # pairs drawn from D_t this step (train.budget)
            pa.field("pairs_e", pa.int64()),
            pa.field("tokens_t", pa.int64()),  # tokens of the D_t sequences this step
            pa.field("tokens_e", pa.int64()),
            pa.field("tokens_per_s", pa.float64(), nullable=False),
            pa.field("seconds", pa.float64(), nullable=False),
            pa.field("forward_tokens", pa.int64()),  # positions run (prompt once per pair, no padding)
            pa.field("mfu", pa.float64()),  # model FLOPs/s over the measured matmul peak
            pa.field("checkpoint", pa.string(), nullable=False),
        ]
    ),
    # Gradient probe of a training run (pipeline/training/grad_probe.py, docs/method.md §Probe estimator),
    # one row per probe. g_t is the trainer's: traces from the sampler's posterior q(r | x, y).
    "grad_stats": pa.schema(
        [
            pa.field("step", pa.int32(), nullable=False),  # optimizer steps taken before the probe
            pa.field("alpha", pa.float64(), nullable=False),  # α trained with from this step on
            pa.field("alpha_hat", pa.float64(), nullable=False),  # α̂* of this probe
            pa.field("ci_low", pa.float64(), nullable=False),  # 95% bootstrap interval over prompts
            pa.field("ci_high", pa.float64(), nullable=False),
            pa.field("numerator", pa.float64(), nullable=False),  # N = E⟨g_e − G, g_e − g_t⟩
            pa.field("denominator", pa.float64(), nullable=False),  # D = E‖g_t − g_e‖²
            pa.field("empty_error", pa.float64()),  # B = E‖g_e − G‖² (MSE(α) = B − 2αN + α²D)
            pa.field("trace_var_t", pa.float64()),  # measured tr Var_r[g_t]
            pa.field("bias_t", pa.float64(), nullable=False),  # ‖E g_t − Ĝ‖
            pa.field("bias_e", pa.float64(), nullable=False),  # ‖E g_e − Ĝ‖
            pa.field("mse_trace", pa.float64(), nullable=False),  # MSE(1)
            pa.field("mse_empty", pa.float64(), nullable=False),  # MSE(0)
            pa.field("mse_alpha", pa.float64(), nullable=False),  # MSE(alpha)
            pa.field("alpha_grid", pa.list_(pa.float64())),  # the MSE(α) curve and its 95% intervals
            pa.field("mse_grid", pa.list_(pa.float64())),
            pa.field("mse_grid_low", pa.list_(pa.float64())),
            pa.field("mse_grid_high", pa.list_(pa.float64())),
            pa.field("ess_posterior", pa.list_(pa.float64())),  # per prompt: ESS of the posterior weights
            pa.field("ess_marginal", pa.list_(pa.float64())),  # per prompt: ESS of Ĝ's weights
            pa.field("ess_min", pa.float64()),
            pa.field("low_ess_prompts", pa.int32()),  # prompts below train.probe.min_ess
            pa.field("proposal", pa.string()),  # log q(r|x): stored | recomputed | mixed
            pa.field("nucleus_fallback", pa.int32()),  # answers outside every trace's top-p nucleus
            pa.field("n_prompts", pa.int32(), nullable=False),
            pa.field("traces_per_prompt", pa.int32(), nullable=False),
            pa.field("dim", pa.int64(), nullable=False),  # gradient dimensions (after projection)
            pa.field("params", pa.string(), nullable=False),  # head | lora | all
            pa.field("seconds", pa.float64(), nullable=False),
        ]
    ),
    "eval_generations": pa.schema(
        [
            *_GENERATION_FIELDS,
            pa.field("model_label", pa.string(), nullable=False),
            pa.field("score", pa.float64(), nullable=False),
            pa.field("checks", pa.string(), nullable=False),
        ]
    ),
    "eval_results": pa.schema(
        [
            pa.field("model_label", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("mode", pa.string(), nullable=False),
            pa.field("metric", pa.string(), nullable=False),
            pa.field("value", pa.float64(), nullable=False),
            pa.field("ci_low", pa.float64()),
            pa.field("ci_high", pa.float64()),
            pa.field("n", pa.int64(), nullable=False),
            # The evaluated model's training round: 0 the base model, k a checkpoint trained on round-k
            # data (tasks/policy.py), null a checkpoint trained elsewhere (or a version from before).
            added_later(pa.field("round", pa.int32())),
        ]
    ),
    # The α study (flows/study.py): the reference and one row per α and mode, seeds pooled.
    "study_results": pa.schema(
        [
            pa.field("alpha", pa.string(), nullable=False),  # "0", "0.25", ..., "auto", or "reference"
            pa.field("mode", pa.string(), nullable=False),
            pa.field("seeds", pa.int32(), nullable=False),
            pa.field("n", pa.int64(), nullable=False),  # eval prompts
            pa.field("score", pa.float64(), nullable=False),  # mean per-prompt score, seeds pooled
            pa.field("score_low", pa.float64(), nullable=False),
            pa.field("score_high", pa.float64(), nullable=False),
            pa.field("alpha_final", pa.float64()),  # α of the last step, mean over seeds (auto: α̂*)
            pa.field("diff_ref", pa.float64()),  # paired, vs the reference
            pa.field("diff_ref_low", pa.float64()),
            pa.field("diff_ref_high", pa.float64()),
            pa.field("best_baseline", pa.string()),  # the better of α = 0 and α = 1 in this mode
            pa.field("diff_best", pa.float64()),  # paired, vs that baseline
            pa.field("diff_best_low", pa.float64()),
            pa.field("diff_best_high", pa.float64()),
            pa.field("mde_ref", pa.float64()),  # minimum detectable difference vs the reference
            pa.field("seed_sd", pa.float64()),  # SD of the per-seed mean scores
            pa.field("pairs_per_step", pa.float64()),
            pa.field("tokens_per_step", pa.float64()),
        ]
    ),
    "rejects": pa.schema(
        [
            pa.field("stage", pa.string(), nullable=False),
            pa.field("row_key", pa.string(), nullable=False),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("payload", pa.string(), nullable=False),  # JSON of the offending row
        ]
    ),
}

KINDS: tuple[str, ...] = tuple(SCHEMAS)


class SchemaError(ValueError):
    """A table does not match its kind's schema."""


def schema_for(kind: str) -> pa.Schema:
    """The Arrow schema of a dataset kind."""
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise SchemaError(f"unknown dataset kind '{kind}'; known kinds: {', '.join(KINDS)}") from None


def conform(kind: str, table: pa.Table) -> pa.Table:
    """Select and cast ``table``'s columns to the kind's schema, naming what is missing or mistyped."""
    schema = schema_for(kind)
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SchemaError(f"{kind}: missing column(s) {', '.join(missing)}")
    columns = []
    for field in schema:
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            raise SchemaError(f"{kind}: column '{field.name}' has {column.null_count} null value(s)")
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(f"{kind}: column '{field.name}' cannot be read as {field.type}: {exc}") from exc
    return pa.Table.from_arrays(columns, schema=schema)


def schema_fingerprint(schema: pa.Schema) -> str:
    """Short stable hash of a schema's field names and types."""
    text = ";".join(f"{f.name}:{f.type}:{f.nullable}" for f in schema)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
