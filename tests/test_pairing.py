"""SQL pairing: hand-built score tables, and equality with a plain Python reference on random rows."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pytest

from pipeline.config import PairingConfig
from pipeline.pairing import DROP_CODES, PairingResult, build_pairs
from storage.schemas import conform, schema_for

NAN = float("nan")


def _gen(
    gid: str,
    pid: str,
    mode: str,
    answer: str,
    ok: bool = True,
    tokens: int | None = None,
    finish: str = "stop",
) -> dict[str, Any]:
    response = f"<think>..</think>{answer}"
    return {
        "generation_id": gid,
        "prompt_id": pid,
        "mode": mode,
        "prompt_text": f"P {pid}",
        "response_text": response,
        "answer": answer,
        "answer_tokens": len(answer.split()) if tokens is None else tokens,
        "parse_ok": ok,
        "finish_reason": finish,
        "prompt_token_ids": [ord(c) for c in f"P {pid}"],
        "response_token_ids": [ord(c) for c in response],
        "response_segments": [3] * len(response),
        "eos_emitted": finish == "stop",
    }


def _pair(
    gens: list[dict[str, Any]], scores: dict[str, float | None], **config: Any
) -> tuple[PairingResult, dict[str, str]]:
    rows = [{"generation_id": k, "score": v} for k, v in scores.items() if v is not None]
    score_table = pa.Table.from_pylist(
        rows, schema=pa.schema([("generation_id", pa.string()), ("score", pa.float64())])
    )
    result = build_pairs(pa.Table.from_pylist(gens), score_table, PairingConfig(**config))
    return result, {r["row_key"]: r["reason"] for r in result.rejects}


def _ids(table: pa.Table) -> list[tuple[str, str, str]]:
    return [(p["pair_id"], p["chosen_generation_id"], p["rejected_generation_id"]) for p in table.to_pylist()]


def test_best_vs_worst_per_prompt_and_mode_with_ties_and_margins_dropped() -> None:
    gens = [
        _gen("a-t-0", "a", "trace", "x"),
        _gen("a-t-1", "a", "trace", "y"),
        _gen("a-t-2", "a", "trace", "z"),
        _gen("a-e-0", "a", "empty", "x"),
        _gen("a-e-1", "a", "empty", "y"),
        _gen("b-t-0", "b", "trace", "x"),
        _gen("b-t-1", "b", "trace", "y"),
        _gen("c-e-0", "c", "empty", "x"),
        _gen("c-e-1", "c", "empty", "y", ok=False),
    ]
    scores = {
        "a-t-0": 0.5,
        "a-t-1": 1.0,
        "a-t-2": 0.0,
        "a-e-0": 0.6,
        "a-e-1": 0.55,
        "b-t-0": 0.3,
        "b-t-1": 0.3,
        "c-e-0": 1.0,
        "c-e-1": 0.0,
    }
    result, reasons = _pair(gens, scores, min_margin=0.1)
    assert _ids(result.pairs_trace) == [("a-trace", "a-t-1", "a-t-2")]
    trace = result.pairs_trace.to_pylist()[0]
    assert (trace["margin"], trace["chosen_score"], trace["rejected_score"]) == (1.0, 1.0, 0.0)
    assert (trace["num_candidates"], trace["prompt_text"], trace["chosen_answer"]) == (3, "P a", "y")
    assert result.pairs_empty.num_rows == 0
    assert "below min_margin" in reasons["a-empty"]
    assert reasons["b-trace"].startswith("tie")
    assert reasons["c-empty"].startswith("fewer than 2 usable answers (2 generated: 1 malformed")
    conform("pairs_trace", result.pairs_trace)
    conform("pairs_empty", result.pairs_empty)


def test_ties_break_on_the_smaller_generation_id() -> None:
    gens = [_gen(f"t-{i}", "t", "trace", f"answer {i}") for i in range(5)]
    scores = {"t-0": 0.2, "t-1": 0.9, "t-2": 0.2, "t-3": 0.9, "t-4": 0.5}
    result, _ = _pair(gens, scores)
    assert _ids(result.pairs_trace) == [("t-trace", "t-1", "t-0")]
    # All equal: one tie, whatever the number of answers.
    result, reasons = _pair(gens, dict.fromkeys(scores, 0.7))
    assert result.pairs_trace.num_rows == 0
    assert reasons == {"t-trace": "tie: best and worst usable answers both scored 0.7"}


def test_single_samples_and_empty_inputs() -> None:
    gens = [_gen("s-0", "s", "trace", "one"), _gen("s-1", "s", "empty", "one")]
    result, reasons = _pair(gens, {"s-0": 1.0, "s-1": 0.0})
    assert result.pairs_trace.num_rows == result.pairs_empty.num_rows == 0
    assert set(reasons) == {"s-trace", "s-empty"}
    assert all(r.startswith("fewer than 2 usable answers (1 generated") for r in reasons.values())
    empty = build_pairs(
        schema_for("generations").empty_table(), schema_for("scores").empty_table(), PairingConfig()
    )
    assert empty.pairs_trace.num_rows == 0 and empty.rejects == []
    assert [(s["mode"], s["prompts"], s["pairs"]) for s in empty.stats] == [("trace", 0, 0), ("empty", 0, 0)]


def test_nan_inf_and_missing_scores_are_unusable_and_reported() -> None:
    gens = [
        _gen("n-0", "n", "trace", "a"),
        _gen("n-1", "n", "trace", "b"),
        _gen("n-2", "n", "trace", "c"),
        _gen("n-3", "n", "trace", "d"),
        _gen("m-0", "m", "empty", "a"),
        _gen("m-1", "m", "empty", "b"),
        _gen("m-2", "m", "empty", "c"),
    ]
    # NaN would sort above every number in DuckDB and win "best"; inf would make the margin infinite.
    scores = {"n-0": NAN, "n-1": 0.9, "n-2": 0.1, "n-3": float("inf"), "m-0": NAN, "m-1": 0.5, "m-2": None}
    result, reasons = _pair(gens, scores)
    assert _ids(result.pairs_trace) == [("n-trace", "n-1", "n-2")]
    assert result.pairs_trace["margin"].to_pylist() == [pytest.approx(0.8)]
    assert result.pairs_empty.num_rows == 0
    assert reasons["m-empty"] == (
        "fewer than 2 usable answers (3 generated: 0 malformed, 1 with a non-finite score, 1 unscored)"
    )
    assert reasons["n-0"] == reasons["m-0"] == "score is nan: not usable for pairing"
    assert reasons["n-3"] == "score is inf: not usable for pairing"
    stats = {s["mode"]: s for s in result.stats}
    assert (stats["trace"]["nonfinite_scores"], stats["empty"]["nonfinite_scores"]) == (2, 1)
    assert stats["empty"]["unscored"] == 1 and stats["empty"]["dropped_too_few"] == 1


def test_identical_answers_are_dropped() -> None:
    gens = [
        _gen("i-0", "i", "trace", "Paris", tokens=1),
        _gen("i-1", "i", "trace", "Lyon", tokens=1),
        _gen("i-2", "i", "trace", "Paris", tokens=1),
    ]
    # A noisy judge scored the same text twice, differently: best and worst are the same answer.
    result, reasons = _pair(gens, {"i-0": 0.9, "i-1": 0.5, "i-2": 0.2})
    assert result.pairs_trace.num_rows == 0
    assert reasons == {"i-trace": "chosen and rejected answers are identical"}
    assert json.loads(result.rejects[0]["payload"])["drop_code"] == "identical"


def test_length_balance_rule_in_tokens_and_chars() -> None:
    gens = [
        _gen("l-0", "l", "trace", "long " * 30, tokens=30),
        _gen("l-1", "l", "trace", "short " * 10, tokens=10),
        _gen("k-0", "k", "trace", "long " * 15, tokens=15),
        _gen("k-1", "k", "trace", "short " * 10, tokens=10),
    ]
    scores = {"l-0": 1.0, "l-1": 0.0, "k-0": 1.0, "k-1": 0.0}
    kept, _ = _pair(gens, scores)
    assert kept.pairs_trace["length_ratio"].to_pylist() == [1.5, 3.0]
    result, reasons = _pair(gens, scores, max_length_ratio=2.0)
    assert _ids(result.pairs_trace) == [("k-trace", "k-0", "k-1")]
    assert reasons["l-trace"] == "chosen answer is 3 times as long as the rejected one (max_length_ratio 2)"
    by_chars, _ = _pair(gens, scores, max_length_ratio=1.2, length_unit="chars")
    assert by_chars.pairs_trace.num_rows == 0  # k: 75 / 60 chars = 1.25; l: 150 / 60 = 2.5
    by_chars, _ = _pair(gens, scores, max_length_ratio=1.3, length_unit="chars")
    assert _ids(by_chars.pairs_trace) == [("k-trace", "k-0", "k-1")]


def test_malformed_answers_may_be_rejected_but_never_chosen() -> None:
    gens = [
        _gen("w-0", "w", "empty", "good"),
        _gen("w-1", "w", "empty", "fair"),
        _gen("w-2", "w", "empty", "<think>", ok=False),
        _gen("v-0", "v", "empty", "ok"),
        _gen("v-1", "v", "empty", "</think> best?", ok=False),
    ]
    scores = {"w-0": 0.9, "w-1": 0.5, "w-2": 0.0, "v-0": 0.4, "v-1": 1.0}
    strict, reasons = _pair(gens, scores)
    assert _ids(strict.pairs_empty) == [("w-empty", "w-0", "w-1")]
    assert reasons["v-empty"].startswith("fewer than 2 usable answers")
    loose, reasons = _pair(gens, scores, rejected_must_parse=False)
    assert _ids(loose.pairs_empty) == [("w-empty", "w-0", "w-2")]
    # The malformed answer scored best: the only well-formed one is also the worst usable one.
    assert reasons["v-empty"] == "tie: best and worst usable answers both scored 0.4"
    _, reasons = _pair(gens[2:3] + gens[4:], scores, rejected_must_parse=False)
    assert reasons["v-empty"].startswith("fewer than 2 usable answers")
    bad = [_gen("x-0", "x", "trace", "<think>", ok=False), _gen("x-1", "x", "trace", "</think>", ok=False)]
    _, reasons = _pair(bad, {"x-0": 0.1, "x-1": 0.9}, rejected_must_parse=False)
    assert reasons["x-trace"].startswith("no well-formed answer to choose")


def test_stats_table_counts_every_reason_and_the_margin_distribution() -> None:
    gens = [_gen(f"p{p}-{i}", f"p{p}", "trace", f"answer {p} {i}") for p in range(4) for i in range(2)]
    gens += [_gen("q-0", "q", "empty", "x"), _gen("q-1", "q", "empty", "y")]
    scores = {"p0-0": 1.0, "p0-1": 0.0, "p1-0": 0.8, "p1-1": 0.3, "p2-0": 0.5, "p2-1": 0.5}
    scores |= {"p3-0": 0.5, "p3-1": 0.45, "q-0": 0.6, "q-1": 0.3}
    result, _ = _pair(gens, scores)
    trace, empty = result.stats
    assert trace == {
        "mode": "trace",
        "prompts": 4,
        "pairs": 2,
        "dropped_too_few": 0,
        "dropped_tie": 1,
        "dropped_low_margin": 1,
        "dropped_identical": 0,
        "dropped_length_ratio": 0,
        "cut_answers": 0,
        "generations": 8,
        "malformed": 0,
        "nonfinite_scores": 0,
        "unscored": 0,
        "margin_min": 0.5,
        "margin_p25": 0.625,
        "margin_median": 0.75,
        "margin_p75": 0.875,
        "margin_max": 1.0,
        "margin_mean": 0.75,
    }
    assert (empty["mode"], empty["pairs"], empty["margin_median"]) == ("empty", 1, pytest.approx(0.3))
    assert {f"dropped_{code}" for code in DROP_CODES} <= set(trace)


def test_missing_columns_are_named() -> None:
    gens = pa.Table.from_pylist([{"generation_id": "a", "prompt_id": "p", "mode": "trace"}])
    scores = pa.Table.from_pylist([{"generation_id": "a", "score": 1.0}])
    with pytest.raises(ValueError, match="answer_tokens"):
        build_pairs(gens, scores, PairingConfig())


# ---- equality with a straightforward Python reference on random rows ----


def reference_pairs(
    gens: list[dict[str, Any]], scores: dict[str, float], config: PairingConfig
) -> dict[str, dict[str, Any]]:
    """Per pair_id: the drop code (None when kept), chosen and rejected ids, scores, margin, length ratio."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for g in gens:
        groups[(g["prompt_id"], g["mode"])].append(g)

    def length(g: dict[str, Any]) -> float:
        return float(g["answer_tokens"] if config.length_unit == "tokens" else len(g["answer"]))

    out = {}
    for (prompt_id, mode), rows in groups.items():
        usable = [
            g for g in rows if g["generation_id"] in scores and math.isfinite(scores[g["generation_id"]])
        ]
        may_choose = [g for g in usable if g["parse_ok"]]
        may_reject = [g for g in usable if g["parse_ok"] or not config.rejected_must_parse]
        entry: dict[str, Any] = {"num_candidates": len(may_reject)}
        if not may_choose or len(may_reject) < 2:
            entry["code"] = "too_few"
            out[f"{prompt_id}-{mode}"] = entry
            continue
        chosen = min(may_choose, key=lambda g: (-scores[g["generation_id"]], g["generation_id"]))
        rejected = min(may_reject, key=lambda g: (scores[g["generation_id"]], g["generation_id"]))
        margin = scores[chosen["generation_id"]] - scores[rejected["generation_id"]]
        ratio = length(chosen) / length(rejected) if length(rejected) > 0 else None
        if margin == 0:
            code = "tie"
        elif margin < config.min_margin:
            code = "low_margin"
        elif chosen["answer"] == rejected["answer"]:
            code = "identical"
        elif config.max_length_ratio is not None and length(chosen) > config.max_length_ratio * length(
            rejected
        ):
            code = "length_ratio"
        else:
            code = None
        entry |= {
            "code": code,
            "chosen_generation_id": chosen["generation_id"],
            "rejected_generation_id": rejected["generation_id"],
            "chosen_score": scores[chosen["generation_id"]],
            "rejected_score": scores[rejected["generation_id"]],
            "margin": margin,
            "length_ratio": ratio,
        }
        out[f"{prompt_id}-{mode}"] = entry
    return out


def random_rows(n: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """``n`` generations over ~n/5 prompts: discrete scores (ties), NaN/inf, missing scores, bad parses."""
    rng = random.Random(seed)
    answers = ["4", "four", "5", "The answer is 4.", "", "x" * 40, "a b c"]
    levels = [0.0, 0.25, 0.5, 0.75, 1.0, 1 / 3, 2 / 3, 0.05, 0.95]
    gens, scores = [], {}
    for i in range(n):
        gid = f"g{rng.randrange(10**9):09d}-{i}"  # random order, unique
        answer = rng.choice(answers)
        gens.append(
            _gen(
                gid, f"p{rng.randrange(n // 5)}", rng.choice(["trace", "empty"]), answer, rng.random() < 0.85
            )
        )
        gens[-1]["answer_tokens"] = rng.randrange(0, 40)
        draw = rng.random()
        if draw < 0.03:
            scores[gid] = NAN
        elif draw < 0.04:
            scores[gid] = rng.choice([float("inf"), float("-inf")])
        elif draw < 0.97:
            scores[gid] = rng.choice(levels) if rng.random() < 0.7 else rng.random()
        # else: no score row (rejected by the scoring stage)
    return gens, scores


@pytest.mark.parametrize(
    "config",
    [
        PairingConfig(),
        PairingConfig(min_margin=0.0),
        PairingConfig(min_margin=0.3, max_length_ratio=1.5),
        PairingConfig(max_length_ratio=2.0, length_unit="chars", rejected_must_parse=False),
    ],
    ids=["default", "no-margin", "length-tokens", "length-chars-loose"],
)
def test_sql_equals_python_reference_on_10000_random_rows(config: PairingConfig) -> None:
    gens, scores = random_rows(10_000, seed=7)
    score_table = pa.Table.from_pylist(
        [{"generation_id": k, "score": v} for k, v in scores.items()],
        schema=pa.schema([("generation_id", pa.string()), ("score", pa.float64())]),
    )
    result = build_pairs(pa.Table.from_pylist(gens), score_table, config)
    expected = reference_pairs(gens, scores, config)

    kept = {p["pair_id"]: p for p in result.pairs_trace.to_pylist() + result.pairs_empty.to_pylist()}
    assert set(kept) == {k for k, e in expected.items() if e["code"] is None}
    fields = ["chosen_generation_id", "rejected_generation_id", "chosen_score", "rejected_score", "margin"]
    for pair_id, pair in kept.items():
        want = expected[pair_id]
        assert [pair[f] for f in fields] == [want[f] for f in fields], pair_id
        assert (
            pair["length_ratio"] == want["length_ratio"] and pair["num_candidates"] == want["num_candidates"]
        )
        assert pair["mode"] in pair_id and pair["chosen_response"].endswith(pair["chosen_answer"])

    dropped = {
        r["row_key"]: json.loads(r["payload"])["drop_code"]
        for r in result.rejects
        if r["row_key"] in expected
    }
    assert dropped == {k: e["code"] for k, e in expected.items() if e["code"] is not None}
    nonfinite = {gid for gid, s in scores.items() if not math.isfinite(s)}
    assert {r["row_key"] for r in result.rejects} - set(expected) == nonfinite
    # Every reason occurs in the data, and the stats agree with the reference.
    codes = [e["code"] for e in expected.values()]
    assert {c for c in codes if c} >= {"too_few", "tie", "low_margin", "identical"} - (
        {"low_margin"} if config.min_margin == 0 else set()
    )
    total = {key: sum(s[key] for s in result.stats) for key in result.stats[0] if key.startswith("dropped_")}
    assert total == {f"dropped_{code}": codes.count(code) for code in DROP_CODES}
    assert sum(s["pairs"] for s in result.stats) == codes.count(None)
    assert sum(s["generations"] for s in result.stats) == len(gens)


def test_pairs_carry_the_sampled_token_ids() -> None:
    gens = [_gen("a-t-0", "a", "trace", "x"), _gen("a-t-1", "a", "trace", "y")]
    result, _ = _pair(gens, {"a-t-0": 1.0, "a-t-1": 0.0})
    (pair,) = result.pairs_trace.to_pylist()
    assert pair["prompt_token_ids"] == gens[0]["prompt_token_ids"]
    assert pair["chosen_token_ids"] == gens[0]["response_token_ids"]
    assert pair["rejected_token_ids"] == gens[1]["response_token_ids"]


def test_a_cut_answer_is_not_chosen_and_is_recorded_unless_allowed() -> None:
    gens = [
        _gen("a-t-0", "a", "trace", "best but cut", finish="length"),
        _gen("a-t-1", "a", "trace", "good"),
        _gen("a-t-2", "a", "trace", "bad"),
        _gen("b-t-0", "b", "trace", "only cut", finish="length"),
        _gen("b-t-1", "b", "trace", "worse", finish="length"),
    ]
    scores = {"a-t-0": 1.0, "a-t-1": 0.6, "a-t-2": 0.0, "b-t-0": 1.0, "b-t-1": 0.0}
    result, reasons = _pair(gens, scores)
    assert _ids(result.pairs_trace) == [("a-trace", "a-t-1", "a-t-2")]  # the cut answer may not win
    assert "not eligible as chosen" in reasons["a-t-0"] and "max_answer_tokens" in reasons["a-t-0"]
    assert "cut at max_answer_tokens" in reasons["b-trace"]  # no uncut answer left to choose
    assert "a-t-1" not in reasons and "a-t-2" not in reasons
    allowed, reasons = _pair(gens, scores, allow_cut_chosen=True)
    assert _ids(allowed.pairs_trace) == [("a-trace", "a-t-0", "a-t-2"), ("b-trace", "b-t-0", "b-t-1")]
    assert not reasons


def test_generations_without_token_ids_get_a_clear_message() -> None:
    from pipeline.training.encoding import TokenFormatError

    old = [{k: v for k, v in _gen("a-t-0", "a", "trace", "x").items() if "token_ids" not in k}]
    with pytest.raises(TokenFormatError, match="older version of this pipeline"):
        _pair(old, {"a-t-0": 1.0})
