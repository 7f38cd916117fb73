"""Sample n responses per prompt in both reasoning modes, in token ids end to end.

docs/method.md §Token-exact sequences. Each prompt is rendered and tokenized once per mode
(:meth:`TraceFormat.prompt_ids`). Reasoning on is two passes: (1) sample the trace after the prompt and the
prefilled open tag, stopping at the close tag or at the trace budget; (2) sample the answer after exactly the
ids so far: prompt + open tag + the sampled trace ids + only the ids actually forced (the close tag, when the
budget stopped the trace, or when the model ended the sequence inside it: with ``reasoning.close_on_eos``
that EOS is dropped and the tag forced, as at the budget). Reasoning off is one pass after the prefilled
empty block (or, with native control, after a prompt whose template wrote it). Nothing the model wrote is
edited: a row stores the prompt ids, the response ids (everything after the prompt), a segment code per
response token, whether the model emitted end-of-sequence, and the engine's log-prob of every sampled token;
its text columns are decoded from those ids. Both modes' first passes share one batched ``complete`` call,
and all answers of pass 2 another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.config import GenerationConfig
from pipeline.generation.engine import Completion, SamplingSpec
from pipeline.generation.limits import PROMPT_IDS_KEY
from pipeline.generation.reasoning import MODES, Mode, TraceFormat
from pipeline.generation.segments import Segment


class Engine(Protocol):
    @property
    def tokenizer(self) -> Any: ...

    def complete(self, prompts: list[list[int]], specs: list[SamplingSpec]) -> list[list[Completion]]: ...


def generation_id(prompt_id: str, mode: str, sample_index: int) -> str:
    return f"{prompt_id}-{mode}-{sample_index}"


@dataclass(frozen=True)
class FixedIds:
    """The ids the pipeline itself writes, per mode (computed once per shard)."""

    prefix: dict[str, list[int]]
    forced_close: list[int]

    @classmethod
    def of(cls, fmt: TraceFormat, tokenizer: Any) -> FixedIds:
        return cls({m: fmt.prefix_ids(tokenizer, m) for m in MODES}, fmt.forced_close_ids(tokenizer))


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
    fixed = FixedIds.of(fmt, tokenizer)

    def spec(max_tokens: int, count: int, stop: tuple[str, ...] = ()) -> SamplingSpec:
        return SamplingSpec(n=count, temperature=temp, top_p=config.top_p, max_tokens=max_tokens, stop=stop)

    prompt_ids = {(p["prompt_id"], m): _prompt_ids(fmt, tokenizer, p, m) for p in prompts for m in MODES}
    first_inputs: list[list[int]] = []
    first_specs: list[SamplingSpec] = []
    for p in prompts:
        for mode in MODES:
            first_inputs.append(prompt_ids[(p["prompt_id"], mode)] + fixed.prefix[mode])
            if mode == "trace":
                first_specs.append(spec(config.max_trace_tokens, n, (config.reasoning.close_tag,)))
            else:
                first_specs.append(spec(config.max_answer_tokens, n))
    first = engine.complete(first_inputs, first_specs) if first_inputs else []

    # Second pass: one answer per trace that did not end the sequence.
    traces: list[tuple[dict[str, Any], int, Completion]] = []
    answer_inputs: list[list[int]] = []
    for index, p in enumerate(prompts):
        for sample_index, completion in enumerate(first[2 * index]):
            traces.append((p, sample_index, completion))
            if gets_answer(completion, fmt):
                answer_inputs.append(
                    prompt_ids[(p["prompt_id"], "trace")]
                    + fixed.prefix["trace"]
                    + kept_trace_ids(completion, fmt)
                    + forced_ids(completion, fmt, fixed)
                )
    answer_specs = [spec(config.max_answer_tokens, 1)] * len(answer_inputs)
    answers = iter(engine.complete(answer_inputs, answer_specs) if answer_inputs else [])

    common = {
        "model": model_label,
        "reasoning_control": fmt.config.control,
        "open_tag": fmt.config.open_tag,
        "close_tag": fmt.config.close_tag,
        "engine": str(getattr(engine, "name", type(engine).__name__)),
        "shard_index": shard_index,
        "seed": seed,
        "temperature": temp,
        "top_p": config.top_p if temp > 0 else 1.0,
        "logprobs_mode": config.logprobs_mode,
    }
    processed = config.logprobs_mode == "processed"
    rows = []
    for p, i, trace in traces:
        answer = next(answers)[0] if gets_answer(trace, fmt) else None
        ids = prompt_ids[(p["prompt_id"], "trace")]
        rows.append(_row(fmt, tokenizer, fixed, p, "trace", i, ids, trace, answer, processed) | common)
    for index, p in enumerate(prompts):
        ids = prompt_ids[(p["prompt_id"], "empty")]
        for i, answer in enumerate(first[2 * index + 1]):
            rows.append(_row(fmt, tokenizer, fixed, p, "empty", i, ids, None, answer, processed) | common)
    return rows


def _prompt_ids(fmt: TraceFormat, tokenizer: Any, prompt: dict[str, Any], mode: Mode) -> list[int]:
    """The ids the length check rendered for ``prompt`` (rendered here only when it did not run)."""
    rendered = prompt.get(PROMPT_IDS_KEY)
    if rendered is not None:
        return list(rendered[mode])
    return fmt.prompt_ids(tokenizer, prompt["prompt"], mode)


def trace_finish(trace: Completion, fmt: TraceFormat) -> str:
    """How a trace ended: 'close_tag' (closed by the model), 'budget', or 'eos' (the model ended it)."""
    if trace.stop_reason == fmt.config.close_tag:
        return "close_tag"
    if trace.finish_reason == "length":
        return "budget"
    return "eos"


def closes_on_eos(trace: Completion, fmt: TraceFormat) -> bool:
    """The model ended the sequence inside the trace and ``reasoning.close_on_eos`` closes it."""
    return fmt.config.close_on_eos and trace_finish(trace, fmt) == "eos"


def gets_answer(trace: Completion, fmt: TraceFormat) -> bool:
    """An answer is sampled after this trace (every trace but one the model ended, unless it is closed)."""
    return trace_finish(trace, fmt) != "eos" or closes_on_eos(trace, fmt)


def kept_trace_ids(trace: Completion, fmt: TraceFormat) -> list[int]:
    """The sampled trace ids that stay in the sequence: all, but the EOS of a trace closed on it."""
    ids = list(trace.token_ids)
    return ids[:-1] if closes_on_eos(trace, fmt) and ids else ids


def forced_ids(trace: Completion, fmt: TraceFormat, fixed: FixedIds) -> list[int]:
    """Ids the pipeline forces after a trace: the close tag when the budget stopped it or it is closed on
    its EOS (``reasoning.close_on_eos``), else none."""
    forced = trace_finish(trace, fmt) == "budget" or closes_on_eos(trace, fmt)
    return list(fixed.forced_close) if forced else []


def _emitted_eos(completion: Completion) -> bool:
    """The completion ended because the model sampled an end-of-sequence (or stop) token."""
    ended = completion.finish_reason == "stop" and completion.stop_reason is None
    return ended and bool(completion.token_ids)


def _sampled(completion: Completion) -> list[float | None]:
    if completion.logprobs is None:
        return [None] * len(completion.token_ids)
    return [None if math.isnan(v) else v for v in completion.logprobs]


def _row(
    fmt: TraceFormat,
    tokenizer: Any,
    fixed: FixedIds,
    prompt: dict[str, Any],
    mode: Mode,
    sample_index: int,
    prompt_ids: list[int],
    trace: Completion | None,
    answer: Completion | None,
    processed: bool = False,
) -> dict[str, Any]:
    prefix = fixed.prefix[mode]
    response: list[int] = list(prefix)
    segments: list[int] = [Segment.PREFILLED] * len(prefix)
    logps: list[float | None] = [None] * len(prefix)
    trace_finish_reason = trace_closed = budget_forced = None
    if trace is not None:
        trace_finish_reason = trace_finish(trace, fmt)
        trace_closed, budget_forced = trace_finish_reason == "close_tag", trace_finish_reason == "budget"
        kept = kept_trace_ids(trace, fmt)
        response += kept
        segments += [Segment.TRACE] * len(kept)
        logps += _sampled(trace)[: len(kept)]
        if trace_finish_reason == "eos" and not closes_on_eos(trace, fmt):
            segments[-1] = Segment.EOS
        forced = forced_ids(trace, fmt, fixed)
        response += forced
        segments += [Segment.FORCED] * len(forced)
        logps += [None] * len(forced)
    answer_ids: list[int] = []
    eos = trace is not None and trace_finish_reason == "eos" and not closes_on_eos(trace, fmt)
    if answer is not None:
        answer_ids = list(answer.token_ids)
        eos = _emitted_eos(answer)
        response += answer_ids
        segments += [Segment.ANSWER] * len(answer_ids)
        logps += _sampled(answer)
        if eos:
            segments[-1] = Segment.EOS
            answer_ids = answer_ids[:-1]
    text_ids = [t for t, s in zip(response, segments, strict=True) if s != Segment.EOS]
    answer_text = decode(tokenizer, answer_ids).strip()
    if answer is None:
        error: str | None = "the trace ended the sequence (end-of-sequence before the close tag): no answer"
    else:
        error = fmt.check_answer(answer_text)
    trace_ids = [t for t, s in zip(response, segments, strict=True) if s == Segment.TRACE]
    return {
        "generation_id": generation_id(prompt["prompt_id"], mode, sample_index),
        "prompt_id": prompt["prompt_id"],
        "mode": mode,
        "sample_index": sample_index,
        "prompt_text": decode(tokenizer, prompt_ids),
        "response_text": decode(tokenizer, text_ids),
        "trace": None if trace is None else _trace_text(decode(tokenizer, trace_ids), fmt),
        "answer": answer_text,
        "prompt_tokens": len(prompt_ids),
        "trace_tokens": 0 if trace is None else len(kept_trace_ids(trace, fmt)),  # as stored: no dropped EOS
        "answer_tokens": 0 if answer is None else len(answer.token_ids),
        "trace_finish_reason": trace_finish_reason,
        "finish_reason": answer.finish_reason if answer is not None else "stop",
        "trace_closed": bool(trace_closed),
        "budget_forced": bool(budget_forced),
        "parse_ok": error is None,
        "parse_error": error,
        "prompt_token_ids": list(prompt_ids),
        "response_token_ids": response,
        "response_segments": [int(s) for s in segments],
        "eos_emitted": eos,
        "sampler_logprobs": None if processed else logps,
        # The processed distribution puts probability 1 on each prefilled / forced token (log 1 = 0).
        "sampler_processed_logprobs": [0.0 if v is None else v for v in logps] if processed else None,
    }


def _trace_text(text: str, fmt: TraceFormat) -> str:
    """The trace for reading and SQL: the sampled text without the close tag the model wrote, stripped."""
    text = text.rstrip()
    if text.endswith(fmt.config.close_tag):
        text = text[: -len(fmt.config.close_tag)]
    return text.strip()


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of ``ids`` exactly (special tokens kept, no cleanup of spaces)."""
    return str(tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False))
