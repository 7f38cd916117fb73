"""Summaries of generation rows per reasoning mode: lengths, finish reasons, parse failures."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from pipeline.generation.reasoning import MODES


def _quantile(values: list[int], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def generation_stats(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode: counts, token length quantiles, finish reasons, trace endings, parse failures."""
    out: list[dict[str, Any]] = []
    for mode in MODES:
        subset = [r for r in rows if r["mode"] == mode]
        if not subset:
            continue
        trace = [int(r["trace_tokens"]) for r in subset]
        answer = [int(r["answer_tokens"]) for r in subset]
        finish = Counter(str(r["finish_reason"]) for r in subset)
        endings = Counter(str(r["trace_finish_reason"]) for r in subset if r["trace_finish_reason"])
        out.append(
            {
                "mode": mode,
                "rows": len(subset),
                "prompts": len({r["prompt_id"] for r in subset}),
                "parse_failures": sum(not r["parse_ok"] for r in subset),
                "trace_tokens_mean": round(sum(trace) / len(trace), 2),
                "trace_tokens_p90": round(_quantile(trace, 0.9), 2),
                "trace_tokens_max": max(trace),
                "answer_tokens_mean": round(sum(answer) / len(answer), 2),
                "answer_tokens_p90": round(_quantile(answer, 0.9), 2),
                "answer_tokens_max": max(answer),
                "answer_finish_stop": finish.get("stop", 0),
                "answer_finish_length": finish.get("length", 0),
                "trace_closed_by_model": endings.get("close_tag", 0),
                "trace_budget_forced": endings.get("budget", 0),
                "trace_ended_eos": endings.get("eos", 0),
            }
        )
    return out
