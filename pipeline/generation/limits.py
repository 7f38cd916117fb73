"""Token-length checks: a prompt is generated for only if the whole response fits the context window.

A reasoning-on response needs the rendered prompt and prefilled open tag, up to ``max_trace_tokens`` of
trace, the closing tag, and up to ``max_answer_tokens`` of answer, all within ``max_model_len``. Prompts
that cannot fit are rejected with a reason before any engine starts (vLLM would fail the whole batch).
Tokens are counted as the engine counts a text prompt (special tokens added).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pipeline.config import GenerationConfig
from pipeline.generation.reasoning import MODES, TraceFormat


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Token count of each text, as the engine tokenizes a text prompt."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(list(texts))["input_ids"]]


def prompt_token_needs(tokenizer: Any, prompts: Sequence[str], config: GenerationConfig) -> list[int]:
    """Tokens each prompt needs before any sampled token: the longer mode, closing tag included."""
    fmt = TraceFormat(config.reasoning)
    needs = [0] * len(prompts)
    for mode in MODES:
        texts = [fmt.render_prompt(tokenizer, p, mode) + fmt.response_prefix(mode) for p in prompts]
        counts = count_tokens(tokenizer, texts)
        if mode == "trace":
            closing = count_tokens(tokenizer, [f"\n{config.reasoning.close_tag}\n\n"])[0]
            counts = [c + closing for c in counts]
        needs = [max(a, b) for a, b in zip(needs, counts, strict=True)]
    return needs


def check_prompt_lengths(
    tokenizer: Any, prompts: Sequence[dict[str, Any]], config: GenerationConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(kept prompts, rejects)``: a prompt is kept when its tokens and both budgets fit the model."""
    needs = prompt_token_needs(tokenizer, [p["prompt"] for p in prompts], config)
    budgets = config.max_trace_tokens + config.max_answer_tokens
    kept: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for prompt, need in zip(prompts, needs, strict=True):
        if need + budgets <= config.max_model_len:
            kept.append(prompt)
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
