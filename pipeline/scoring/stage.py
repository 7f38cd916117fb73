"""The scoring stage: score each generation's final answer (never the trace) with the configured scorers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from pipeline.scoring.verifiable import VerifiableScorer

SCORERS = {"verifiable": VerifiableScorer}


@dataclass(frozen=True)
class ScoringResult:
    rows: list[dict[str, Any]]
    rejects: list[dict[str, Any]]


def make_scorer(name: str) -> VerifiableScorer:
    try:
        return SCORERS[name]()
    except KeyError:
        raise ValueError(f"unknown scorer '{name}'; available: {', '.join(sorted(SCORERS))}") from None


def score_generations(
    generations: Sequence[dict[str, Any]], prompts: dict[str, dict[str, Any]], scorer_names: Sequence[str]
) -> ScoringResult:
    """Rows of the ``scores`` schema (mean over scorers) and rejects for rows that could not be scored."""
    scorers = [make_scorer(name) for name in scorer_names]
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for gen in tqdm(generations, desc="scoring", unit="answer"):
        prompt = prompts.get(gen["prompt_id"])
        if prompt is None:
            rejects.append(_reject(gen, "generation refers to an unknown prompt_id"))
            continue
        constraints = json.loads(prompt["constraints"] or "[]")
        results = [
            s.score(prompt["task_type"], prompt["reference_answer"], constraints, gen["answer"])
            for s in scorers
        ]
        errors = [f"{s.name}: {r.error}" for s, r in zip(scorers, results, strict=True) if r.error]
        if errors:
            rejects.append(_reject(gen, "; ".join(errors)))
            continue
        checks = {
            f"{s.name}.{k}": v for s, r in zip(scorers, results, strict=True) for k, v in r.checks.items()
        }
        rows.append(
            {
                "generation_id": gen["generation_id"],
                "prompt_id": gen["prompt_id"],
                "mode": gen["mode"],
                "scorer": "+".join(scorer_names),
                "score": sum(r.score for r in results) / len(results),
                "checks": json.dumps(checks, sort_keys=True),
            }
        )
    return ScoringResult(rows=rows, rejects=rejects)


def _reject(gen: dict[str, Any], reason: str) -> dict[str, Any]:
    payload = json.dumps({"prompt_id": gen["prompt_id"], "answer": gen["answer"][:500]}, ensure_ascii=False)
    return {"stage": "score", "row_key": gen["generation_id"], "reason": reason, "payload": payload}
