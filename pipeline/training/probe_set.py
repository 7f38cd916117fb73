"""The gradient probe's prompts, from stored token ids (docs/method.md §Probe estimator).

For each chosen ``D_t`` pair: the answers ``y⁺``, ``y⁻`` exactly as sampled (the answer ids of the pair's two
generations, EOS only where the model emitted it), the first ``M`` reasoning-on generations of the prompt (by
sample index, so the choice does not depend on which answers they led to) with their trace blocks, which of
each block's tokens were sampled (prefilled open tags and forced close tags were not), the sampler's stored
``log q(r | x)`` when the engine gave processed log-probs, and the temperature / top-p they were sampled with;
and the reasoning-off prompt and empty block. Nothing is tokenized here (``pipeline/training/encoding.py``).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import ProbeConfig
from pipeline.generation.segments import Segment
from pipeline.training.encoding import TokenFormatError, generation_parts


class ProbeDataError(ValueError):
    """The data cannot form a probe set (too few stored traces, no reasoning-off generation, ...)."""


@dataclass(frozen=True)
class ProbeExample:
    """One probe prompt: the D_t pair's answers and M stored trace blocks of the prompt, as token ids."""

    prompt_id: str
    trace_prompt_ids: list[int]  # chat-rendered prompt of reasoning-on mode
    trace_blocks: list[list[int]]  # M trace blocks (prefilled open tag, sampled trace, forced close)
    empty_prompt_ids: list[int]  # chat-rendered prompt of reasoning-off mode
    empty_block: list[int]  # the empty trace block (may be empty for native templates)
    chosen_ids: list[int]  # y⁺ (+ EOS where emitted)
    rejected_ids: list[int]  # y⁻
    # Per block token: sampled by the model (True) or prefilled / forced by the pipeline (False).
    block_sampled: list[list[bool]] | None = None  # None: all sampled
    trace_logq: list[float | None] | None = None  # stored log q(r_j | x) (None: recompute)
    temperature: float = 1.0  # the sampler q that drew the traces and answers
    top_p: float = 1.0

    def sequences(self) -> list[tuple[list[int], list[int], list[int]]]:
        """``(prompt, block, answer)`` triples: trace j with chosen (2j) and rejected (2j+1), then empty."""
        out = []
        for block in self.trace_blocks:
            out.append((self.trace_prompt_ids, block, self.chosen_ids))
            out.append((self.trace_prompt_ids, block, self.rejected_ids))
        out.append((self.empty_prompt_ids, self.empty_block, self.chosen_ids))
        out.append((self.empty_prompt_ids, self.empty_block, self.rejected_ids))
        return out

    def sampled_masks(self) -> list[tuple[list[bool], list[bool]]]:
        """Per sequence of :meth:`sequences`: which block and which answer tokens the sampler drew."""
        blocks = self.block_sampled or [[True] * len(b) for b in self.trace_blocks]
        out = []
        for block, mask in zip(self.trace_blocks, blocks, strict=True):
            for answer in (self.chosen_ids, self.rejected_ids):
                out.append((list(mask), [True] * len(answer)))
                assert len(mask) == len(block)
        for answer in (self.chosen_ids, self.rejected_ids):
            out.append(([False] * len(self.empty_block), [True] * len(answer)))
        return out


def stored_trace_logq(row: Mapping[str, Any], block_len: int) -> float | None:
    """``log q(r | x)`` of a generation's trace: the engine's processed log-probs summed over the sampled
    trace tokens of the block (prefilled and forced tokens have q = 1); None when the engine gave none."""
    processed = row.get("sampler_processed_logprobs")
    if processed is None:
        return None
    total = 0.0
    for segment, value in zip(row["response_segments"][:block_len], processed[:block_len], strict=True):
        if Segment(segment) == Segment.TRACE:
            if value is None or math.isnan(value):
                return None
            total += float(value)
    return total


def _sampler(rows: Sequence[Mapping[str, Any]]) -> tuple[float, float]:
    """The rows' (temperature, top_p); rows without them count as temperature 1 without top-p."""
    settings = {
        (float(r.get("temperature") if r.get("temperature") is not None else 1.0),
         float(r.get("top_p") if r.get("top_p") is not None else 1.0))
        for r in rows
    }  # fmt: skip
    if len(settings) != 1:
        raise ProbeDataError(f"the probe's generations were sampled with different settings: {settings}")
    return settings.pop()


def build_probe_examples(
    pairs_trace: Sequence[dict[str, Any]],
    generations: Sequence[dict[str, Any]],
    settings: ProbeConfig,
    max_length: int,
) -> list[ProbeExample]:
    """Choose ``settings.prompts`` D_t prompts and take their answers and stored traces from the token ids.

    A prompt qualifies when its pair's two generations are stored, it has a reasoning-off generation and at
    least ``settings.traces`` reasoning-on generations whose blocks fit ``max_length`` with either answer;
    the first ``settings.traces`` of them (by sample index) are used. Qualifying prompts are taken in a
    seeded order.

    Raises:
        ProbeDataError: when no prompt qualifies, or the rows have no token ids.
    """
    by_id = {row["generation_id"]: row for row in generations if row.get("generation_id") is not None}
    by_prompt: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in generations:
        by_prompt[(row["prompt_id"], row["mode"])].append(row)
    candidates: list[ProbeExample] = []
    most = 0
    try:
        for pair in sorted(pairs_trace, key=lambda p: p["pair_id"]):
            pid = pair["prompt_id"]
            chosen_row = by_id.get(pair.get("chosen_generation_id"))
            rejected_row = by_id.get(pair.get("rejected_generation_id"))
            empties = sorted(by_prompt.get((pid, "empty"), []), key=lambda r: r["sample_index"])
            if chosen_row is None or rejected_row is None or not empties:
                continue
            chosen = generation_parts(chosen_row).answer_ids
            rejected = generation_parts(rejected_row).answer_ids
            empty = generation_parts(empties[0])
            traces = sorted(by_prompt.get((pid, "trace"), []), key=lambda r: r["sample_index"])
            used: list[tuple[dict[str, Any], list[int]]] = []
            prompt_ids: list[int] | None = None
            for row in traces:
                parts = generation_parts(row)
                prompt_ids = prompt_ids or parts.prompt_ids
                fits = len(parts.prompt_ids) + len(parts.block_ids) + max(len(chosen), len(rejected))
                if parts.prompt_ids == prompt_ids and fits <= max_length:
                    used.append((row, parts.block_ids))
            most = max(most, len(used))
            if len(used) < settings.traces or prompt_ids is None:
                continue
            used = used[: settings.traces]
            temperature, top_p = _sampler([r for r, _ in used] + [chosen_row, rejected_row])
            candidates.append(
                ProbeExample(
                    prompt_id=pid,
                    trace_prompt_ids=prompt_ids,
                    trace_blocks=[block for _, block in used],
                    empty_prompt_ids=empty.prompt_ids,
                    empty_block=empty.block_ids,
                    chosen_ids=chosen,
                    rejected_ids=rejected,
                    block_sampled=[
                        [Segment(s) == Segment.TRACE for s in row["response_segments"][: len(block)]]
                        for row, block in used
                    ],
                    trace_logq=[stored_trace_logq(row, len(block)) for row, block in used],
                    temperature=temperature,
                    top_p=top_p,
                )
            )
    except TokenFormatError as err:
        raise ProbeDataError(f"the gradient probe reads stored token ids: {err}") from err
    if not candidates:
        raise ProbeDataError(
            f"no D_t prompt has {settings.traces} stored reasoning-on traces that fit max_length "
            f"{max_length}, its pair's generations and a reasoning-off generation (at most {most} usable "
            "traces per prompt): lower train.probe.traces or raise generation.samples_per_prompt"
        )

    def order(example: ProbeExample) -> str:
        return hashlib.sha256(f"{settings.seed}:{example.prompt_id}".encode()).hexdigest()

    return sorted(candidates, key=order)[: settings.prompts]
