"""Token-length checks: a prompt is generated for only if the whole response fits the context window.

A reasoning-on response needs the rendered prompt and prefilled open tag, up to ``max_trace_tokens`` of
trace, the forced close tag, and up to ``max_answer_tokens`` of answer, all within ``max_model_len``. Prompts
that cannot fit are rejected with a reason before any engine starts (vLLM would fail the whole batch).
Each prompt is rendered and tokenized here once per mode; the ids travel with the prompt (key
``PROMPT_IDS_KEY``) so the sampler feeds exactly these ids and never renders again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pipeline.config import GenerationConfig
from pipeline.generation.reasoning import MODES, TraceFormat

PROMPT_IDS_KEY = "prompt_token_ids"
"""Key of a prompt dict holding ``{mode: rendered prompt ids}`` once the length check has tokenized it."""


def rendered_prompt_ids(tokenizer: Any, prompt: str, config: GenerationConfig) -> dict[str, list[int]]:
    """The rendered prompt ids of each mode (docs/method.md §Token-exact sequences)."""
    fmt = TraceFormat(config.reasoning)
    return {mode: fmt.prompt_ids(tokenizer, prompt, mode) for mode in MODES}


def prompt_token_needs(tokenizer: Any, prompts: Sequence[str], config: GenerationConfig) -> list[int]:
    """Tokens each prompt needs before any sampled token: the longer mode, forced close tag included."""
    return [_need(tokenizer, rendered_prompt_ids(tokenizer, p, config), config) for p in prompts]


def _need(tokenizer: Any, ids: dict[str, list[int]], config: GenerationConfig) -> int:
    fmt = TraceFormat(config.reasoning)
    trace = len(ids["trace"]) + len(fmt.prefix_ids(tokenizer, "trace")) + len(fmt.forced_close_ids(tokenizer))
    return max(trace, len(ids["empty"]) + len(fmt.prefix_ids(tokenizer, "empty")))


def check_prompt_lengths(
    tokenizer: Any, prompts: Sequence[dict[str, Any]], config: GenerationConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(kept prompts, rejects)``: a prompt is kept when its tokens and both budgets fit the model."""
    rendered = [rendered_prompt_ids(tokenizer, p["prompt"], config) for p in prompts]
    needs = [_need(tokenizer, ids, config) for ids in rendered]
    budgets = config.max_trace_tokens + config.max_answer_tokens
    kept: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for prompt, need, ids in zip(prompts, needs, rendered, strict=True):
        if need + budgets <= config.max_model_len:
            kept.append({**prompt, PROMPT_IDS_KEY: ids})
            continue
        reason = (
            f"prompt too long: {need} prompt tokens + max_trace_tokens {config.max_trace_tokens} + "
            f"max_answer_tokens {config.max_answer_tokens} = {need + budgets} > max_model_len "
            f"{config.max_model_len}"
        )
        payload = json.dumps(
            {"prompt_id": prompt["prompt_id"], "prompt": prompt["prompt"][:2000], "prompt_tokens": need},
            ensure_ascii=False,
        )
        rejects.append(
            {"stage": "generate", "row_key": prompt["prompt_id"], "reason": reason, "payload": payload}
        )
    return kept, rejects


def training_length_warning(
    tokenizer: Any, prompts: Sequence[dict[str, Any]], config: GenerationConfig, train_max_length: int
) -> str | None:
    """Why some pairs of these (kept) prompts may not fit ``train.max_length``, with the numbers, or None.

    A response of the longer mode can take the prompt's tokens, the prefilled and forced tags and both
    budgets; pairs longer than ``train.max_length`` are rejected by the reference pass (or have their prompt
    cut, with ``train.truncation: truncate_prompt_left``), never silently cut.
    """
    budgets = config.max_trace_tokens + config.max_answer_tokens
    needs = [_need(tokenizer, p[PROMPT_IDS_KEY], config) for p in prompts if PROMPT_IDS_KEY in p]
    over = [n for n in needs if n + budgets > train_max_length]
    if not over:
        return None
    return (
        f"{len(over)} of {len(needs)} prompts can produce sequences longer than train.max_length "
        f"{train_max_length}: up to {max(over)} prompt and tag tokens + max_trace_tokens "
        f"{config.max_trace_tokens} + max_answer_tokens {config.max_answer_tokens} = {max(over) + budgets}; "
        "such pairs will be rejected at the reference pass (train.truncation) — raise train.max_length to "
        f"{max(over) + budgets} (generation.max_model_len is {config.max_model_len}) or lower the budgets"
    )
