"""Per-token segment codes of a stored response (docs/method.md §Token-exact sequences).

Every token after the prompt is one of: prefilled by the pipeline (the open tag, or the whole empty block),
sampled as part of the trace, forced by the pipeline (the close tag after a trace the budget stopped),
sampled as part of the answer, or the end-of-sequence token the model emitted. Only sampled tokens (trace,
answer, EOS) carry a sampler log-prob.
"""

from __future__ import annotations

from enum import IntEnum


class Segment(IntEnum):
    PREFILLED = 0
    TRACE = 1
    FORCED = 2
    ANSWER = 3
    EOS = 4


SAMPLED = frozenset({Segment.TRACE, Segment.ANSWER, Segment.EOS})
"""Segments whose tokens the model sampled."""

BLOCK = frozenset({Segment.PREFILLED, Segment.TRACE, Segment.FORCED})
"""Segments of the trace block (everything before the answer)."""

SEGMENT_NAMES = {s.value: s.name.lower() for s in Segment}
