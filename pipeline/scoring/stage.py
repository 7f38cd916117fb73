"""The scoring stage: score each generation's final answer (never the trace) with the configured scorers.

The stored ``score`` is the weighted sum of the components (``ScoringConfig.scorers``); each component's
own score is kept in the ``components`` column, every check in ``checks`` and extra facts (raw reward,
judge rating and text) in ``details``, all JSON objects keyed by component name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import ScoringConfig
from pipeline.scoring.base import ScoreInput, Scorer, ScoreResult


@dataclass(frozen=True)
class ScoringResult:
    rows: list[dict[str, Any]]
    rejects: list[dict[str, Any]]


def _verifiable(spec: Any) -> Scorer:
    from pipeline.scoring.verifiable import VerifiableScorer

    return VerifiableScorer(timeout_seconds=spec.options.timeout_seconds)


def _reward_model(spec: Any) -> Scorer:
    from pipeline.scoring.reward_model import RewardModelScorer

    return RewardModelScorer(spec.options)


def _judge(spec: Any) -> Scorer:
    from pipeline.scoring.judge import JudgeScorer
    from pipeline.scoring.openai_chat import OpenAIChatClient

    options = spec.options
    return JudgeScorer(
        OpenAIChatClient.from_options(options), rubric=options.rubric, normalize=options.normalize
    )


SCORERS: dict[str, Callable[[Any], Scorer]] = {
    "verifiable": _verifiable,
    "reward_model": _reward_model,
    "judge": _judge,
}
"""Scorer name -> factory taking its :data:`~pipeline.config.ScorerSpec`."""


def scorer_specs(scorers: ScoringConfig | Sequence[Any]) -> list[Any]:
    """Validated scorer specs from a config, a list of specs, or bare scorer names."""
    if isinstance(scorers, ScoringConfig):
        return list(scorers.scorers)
    return list(ScoringConfig(scorers=list(scorers)).scorers)


def make_scorer(spec: Any) -> Scorer:
    """The scorer a spec (or a bare name) describes."""
    if isinstance(spec, str):
        spec = scorer_specs([spec])[0]
    try:
        factory = SCORERS[spec.name]
    except KeyError:
        raise ValueError(f"unknown scorer '{spec.name}'; available: {', '.join(sorted(SCORERS))}") from None
    return factory(spec)


def score_label(specs: Sequence[Any]) -> str:
    """The ``scorer`` column: component names joined by '+', with weights other than 1."""
    return "+".join(s.key if s.weight == 1 else f"{s.weight:g}*{s.key}" for s in specs)


def score_generations(
    generations: Sequence[dict[str, Any]],
    prompts: dict[str, dict[str, Any]],
    scorers: ScoringConfig | Sequence[Any],
) -> ScoringResult:
    """Rows of the ``scores`` schema and rejects for rows that could not be scored.

    ``scorers``: a :class:`ScoringConfig`, its ``scorers`` list, or bare names (weight 1). Each scorer runs
    once over all answers (batched, with a progress bar); a row any component fails on becomes a reject.
    """
    specs = scorer_specs(scorers)
    rejects: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    items: list[ScoreInput] = []
    for gen in generations:
        prompt = prompts.get(gen["prompt_id"])
        if prompt is None:
            rejects.append(_reject(gen, "generation refers to an unknown prompt_id"))
            continue
        kept.append(gen)
        items.append(
            ScoreInput(
                prompt=prompt["prompt"],
                answer=gen["answer"],
                task_type=prompt["task_type"],
                reference_answer=prompt.get("reference_answer"),
                constraints=tuple(json.loads(prompt.get("constraints") or "[]")),
            )
        )
    per_scorer = [_run(spec, items) for spec in specs] if items else []
    label = score_label(specs)
    rows: list[dict[str, Any]] = []
    for index, gen in enumerate(kept):
        results = [results[index] for results in per_scorer]
        errors = [f"{s.key}: {r.error}" for s, r in zip(specs, results, strict=True) if r.error]
        details = {s.key: r.details for s, r in zip(specs, results, strict=True) if r.details}
        if errors:
            rejects.append(_reject(gen, "; ".join(errors), details))
            continue
        rows.append(
            {
                "generation_id": gen["generation_id"],
                "prompt_id": gen["prompt_id"],
                "mode": gen["mode"],
                "scorer": label,
                "score": math.fsum(s.weight * r.score for s, r in zip(specs, results, strict=True)),
                "checks": _dumps(
                    {
                        f"{s.key}.{k}": v
                        for s, r in zip(specs, results, strict=True)
                        for k, v in r.checks.items()
                    }
                ),
                "components": _dumps({s.key: r.score for s, r in zip(specs, results, strict=True)}),
                "details": _dumps(details),
            }
        )
    return ScoringResult(rows=rows, rejects=rejects)


def _run(spec: Any, items: list[ScoreInput]) -> list[ScoreResult]:
    scorer = make_scorer(spec)
    try:
        results = scorer.score_batch(items)
    finally:
        close = getattr(scorer, "close", None)
        if callable(close):
            close()
    if len(results) != len(items):
        raise RuntimeError(
            f"scorer '{spec.key}' returned {len(results)} result(s) for {len(items)} answer(s)"
        )
    return results


def _json_safe(value: Any) -> Any:
    """JSON-ready copy: non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_json_safe(value), sort_keys=True, ensure_ascii=False, allow_nan=False)


def _reject(gen: dict[str, Any], reason: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"prompt_id": gen["prompt_id"], "answer": gen["answer"][:500]}
    if details:
        payload["details"] = details
    return {"stage": "score", "row_key": gen["generation_id"], "reason": reason, "payload": _dumps(payload)}
