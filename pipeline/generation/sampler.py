"""Sample n responses per prompt in both reasoning modes and parse them into generation rows.

Reasoning on is two passes: (1) sample the trace after the open tag, stopping at the close tag or at the
trace budget; (2) close the trace and sample the answer. Reasoning off is one pass after an empty block.
Both modes' first passes share one batched ``complete`` call, and all answers of pass 2 share another, so
the engine sees every request of a shard at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from pipeline.config import GenerationConfig
from pipeline.generation.engine import Completion, SamplingSpec
from pipeline.generation.limits import count_tokens
from pipeline.generation.reasoning import MODES, Mode, TraceFormat


class Engine(Protocol):
    @property
    def tokenizer(self) -> Any: ...

    def complete(self, prompts: list[str], specs: list[SamplingSpec]) -> list[list[Completion]]: ...


def generation_id(prompt_id: str, mode: str, sample_index: int) -> str:
    return f"{prompt_id}-{mode}-{sample_index}"


def generate_responses(
    engine: Engine,
    prompts: Sequence[dict[str, Any]],
    config: GenerationConfig,
    model_label: str,
    *,
    samples_per_prompt: int | None = None,
    temperature: float | None = None,
    shard_index: int | None = None,
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """Rows of the ``generations`` schema for every prompt (keys ``prompt_id``, ``prompt``) and mode.

    ``shard_index`` and ``seed`` (the engine seed the shard was sampled with) are recorded on each row.
    """
    fmt = TraceFormat(config.reasoning)
    n = samples_per_prompt or config.samples_per_prompt
    temp = config.temperature if temperature is None else temperature
    tokenizer = engine.tokenizer

    def spec(max_tokens: int, count: int, stop: tuple[str, ...] = ()) -> SamplingSpec:
        return SamplingSpec(n=count, temperature=temp, top_p=config.top_p, max_tokens=max_tokens, stop=stop)

    keys = [(p["prompt_id"], mode) for p in prompts for mode in MODES]
    texts = [fmt.render_prompt(tokenizer, p["prompt"], mode) for p in prompts for mode in MODES]
    rendered = dict(zip(keys, texts, strict=True))
    prompt_tokens = dict(zip(keys, count_tokens(tokenizer, texts), strict=True))
    first_inputs: list[str] = []
    first_specs: list[SamplingSpec] = []
    for p in prompts:
        for mode in MODES:
            first_inputs.append(rendered[(p["prompt_id"], mode)] + fmt.response_prefix(mode))
            if mode == "trace":
                first_specs.append(spec(config.max_trace_tokens, n, (config.reasoning.close_tag,)))
            else:
                first_specs.append(spec(config.max_answer_tokens, n))
    first = engine.complete(first_inputs, first_specs) if first_inputs else []

    # Second pass: one answer per sampled trace.
    traces: list[tuple[dict[str, Any], int, Completion]] = []
    answer_inputs: list[str] = []
    for index, p in enumerate(prompts):
        for sample_index, completion in enumerate(first[2 * index]):
            traces.append((p, sample_index, completion))
            answer_inputs.append(rendered[(p["prompt_id"], "trace")] + fmt.close_trace(completion.text))
    answer_specs = [spec(config.max_answer_tokens, 1)] * len(answer_inputs)
    answers = engine.complete(answer_inputs, answer_specs) if answer_inputs else []

    common = {
        "model": model_label,
        "reasoning_control": fmt.config.control,
        "open_tag": fmt.config.open_tag,
        "close_tag": fmt.config.close_tag,
        "engine": str(getattr(engine, "name", type(engine).__name__)),
        "shard_index": shard_index,
        "seed": seed,
    }

    def row(p: dict[str, Any], mode: Mode, index: int, trace: Completion | None, answer: Completion) -> dict:
        key = (p["prompt_id"], mode)
        return _row(fmt, p, mode, index, rendered[key], prompt_tokens[key], trace, answer) | common

    rows = [
        row(p, "trace", i, trace, answer) for (p, i, trace), (answer,) in zip(traces, answers, strict=True)
    ]
    for index, p in enumerate(prompts):
        rows.extend(row(p, "empty", i, None, answer) for i, answer in enumerate(first[2 * index + 1]))
    return rows


def _row(
    fmt: TraceFormat,
    prompt: dict[str, Any],
    mode: str,
    sample_index: int,
    prompt_text: str,
    prompt_tokens: int,
    trace: Completion | None,
    answer: Completion,
) -> dict[str, Any]:
    answer_text = answer.text.strip()
    error = fmt.check_answer(answer_text)
    if trace is None:
        block = fmt.response_prefix("empty")
        trace_closed, budget_forced, trace_finish = False, False, None
    else:
        block = fmt.close_trace(trace.text)
        trace_closed = trace.stop_reason == fmt.config.close_tag
        budget_forced = trace.finish_reason == "length"
        trace_finish = "close_tag" if trace_closed else ("budget" if budget_forced else "eos")
    return {
        "generation_id": generation_id(prompt["prompt_id"], mode, sample_index),
        "prompt_id": prompt["prompt_id"],
        "mode": mode,
        "sample_index": sample_index,
        "prompt_text": prompt_text,
        "response_text": block + answer_text,
        "trace": None if trace is None else trace.text.strip(),
        "answer": answer_text,
        "prompt_tokens": prompt_tokens,
        "trace_tokens": 0 if trace is None else trace.token_count,
        "answer_tokens": answer.token_count,
        "trace_finish_reason": trace_finish,
        "finish_reason": answer.finish_reason,
        "trace_closed": trace_closed,
        "budget_forced": budget_forced,
        "parse_ok": error is None,
        "parse_error": error,
    }
