"""The scoring stage: scorer config, weighted components, rejects, and backward compatibility."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest
from pydantic import ValidationError

from pipeline.config import PipelineConfig, ScoringConfig, load_config
from pipeline.scoring import stage
from pipeline.scoring.base import ScoreInput, ScoreResult
from pipeline.scoring.stage import score_generations, score_label, scorer_specs

PROMPTS = {
    "m": {"prompt_id": "m", "prompt": "What is 3 + 4?", "task_type": "math", "reference_answer": "7"}
    | {"constraints": "[]"},
    "i": {"prompt_id": "i", "prompt": "Describe rain.", "task_type": "instruction", "reference_answer": None}
    | {"constraints": json.dumps([{"type": "max_words", "value": 3}, {"type": "all_lowercase"}])},
}


def _gen(gid: str, pid: str, answer: str) -> dict[str, object]:
    return {"generation_id": gid, "prompt_id": pid, "mode": "empty", "answer": answer}


def test_bare_names_keep_working_and_old_rows_are_unchanged() -> None:
    assert ScoringConfig(scorers=["verifiable"]) == ScoringConfig()
    gens = [_gen("a", "m", "7"), _gen("b", "i", "Soft grey Rain"), _gen("c", "zzz", "7")]
    result = score_generations(gens, PROMPTS, ["verifiable"])
    rows = {r["generation_id"]: r for r in result.rows}
    assert rows["a"]["score"] == 1.0 and rows["b"]["score"] == 0.5
    assert rows["a"]["scorer"] == "verifiable"
    assert json.loads(rows["b"]["checks"]) == {
        "verifiable.max_words": True,
        "verifiable.all_lowercase": False,
    }
    assert json.loads(rows["b"]["components"]) == {"verifiable": 0.5}
    assert rows["a"]["details"] == "{}"
    assert [(r["row_key"], r["reason"]) for r in result.rejects] == [
        ("c", "generation refers to an unknown prompt_id")
    ]


def test_config_forms_and_validation() -> None:
    config = ScoringConfig.model_validate(
        {
            "scorers": [
                {"name": "verifiable", "weight": 0.5, "options": {"timeout_seconds": 2}},
                {"name": "reward_model", "weight": 0.5, "label": "rm", "options": {"model": "/m"}},
                {"name": "judge", "weight": 0.25, "options": {"model": "judge"}},
            ]
        }
    )
    assert [s.key for s in config.scorers] == ["verifiable", "rm", "judge"]
    assert score_label(config.scorers) == "0.5*verifiable+0.5*rm+0.25*judge"
    assert scorer_specs(config) == scorer_specs(config.scorers) == config.scorers
    with pytest.raises(ValidationError, match="unique"):
        ScoringConfig(scorers=["verifiable", "verifiable"])
    with pytest.raises(ValidationError):
        ScoringConfig(scorers=["bleu"])
    with pytest.raises(ValidationError):
        ScoringConfig(scorers=[{"name": "reward_model"}])  # the model path is required
    with pytest.raises(ValidationError):
        ScoringConfig(scorers=[{"name": "verifiable", "weight": 0}])
    with pytest.raises(ValidationError):
        ScoringConfig(scorers=[{"name": "verifiable", "options": {"model": "x"}}])  # unknown option
    overridden = load_config(None, ["scoring.scorers=[verifiable, {name: judge, options: {model: j}}]"])
    assert [s.name for s in overridden.scoring.scorers] == ["verifiable", "judge"]
    assert isinstance(PipelineConfig().scoring.scorers[0].options.timeout_seconds, int)


class _Fixed:
    """A scorer with canned results (registered under a test name)."""

    name = "fixed"

    def __init__(self, results: list[ScoreResult]) -> None:
        self.results = results
        self.seen: list[ScoreInput] = []
        self.closed = False

    def score_batch(self, items: Sequence[ScoreInput]) -> list[ScoreResult]:
        self.seen.extend(items)
        return self.results[: len(items)]

    def close(self) -> None:
        self.closed = True


def test_non_finite_components_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    fixed = _Fixed(
        [
            ScoreResult(math.nan, {"ok": True}, details={"raw": math.nan}),
            ScoreResult(0.25, {"ok": True}),
            ScoreResult(0.0, {}, error="boom", details={"text": "why"}),
        ]
    )
    monkeypatch.setitem(stage.SCORERS, "judge", lambda spec: fixed)
    specs = ["verifiable", {"name": "judge", "weight": 2.0, "options": {"model": "j"}}]
    gens = [_gen("a", "m", "7"), _gen("b", "m", "8"), _gen("c", "m", "7")]
    result = score_generations(gens, PROMPTS, specs)
    rows = {r["generation_id"]: r for r in result.rows}
    assert math.isnan(rows["a"]["score"])  # kept: pairing reports NaN scores and leaves them out
    assert json.loads(rows["a"]["components"]) == {"verifiable": 1.0, "judge": None}
    assert json.loads(rows["a"]["details"]) == {"judge": {"raw": None}}
    assert rows["b"]["score"] == 0.5 and rows["b"]["scorer"] == "verifiable+2*judge"
    (reject,) = result.rejects
    assert (reject["row_key"], reject["reason"]) == ("c", "judge: boom")
    assert json.loads(reject["payload"]) == {
        "prompt_id": "m",
        "answer": "7",
        "details": {"judge": {"text": "why"}},
    }
    assert fixed.closed
    assert [i.prompt for i in fixed.seen] == ["What is 3 + 4?"] * 3


def test_no_generations_load_no_scorer(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(spec: object) -> None:
        raise AssertionError("a scorer was built for nothing")

    monkeypatch.setitem(stage.SCORERS, "judge", explode)
    result = score_generations([], PROMPTS, [{"name": "judge", "options": {"model": "j"}}])
    assert result.rows == [] and result.rejects == []
