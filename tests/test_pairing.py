from __future__ import annotations

import pyarrow as pa

from pipeline.config import PairingConfig
from pipeline.pairing import build_pairs


def _gen(gid: str, pid: str, mode: str, answer: str, ok: bool = True) -> dict[str, object]:
    return {
        "generation_id": gid,
        "prompt_id": pid,
        "mode": mode,
        "prompt_text": f"P {pid}",
        "response_text": f"<think>..</think>{answer}",
        "answer": answer,
        "parse_ok": ok,
    }


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
    score_table = pa.Table.from_pylist([{"generation_id": k, "score": v} for k, v in scores.items()])
    result = build_pairs(pa.Table.from_pylist(gens), score_table, PairingConfig(min_margin=0.1))
    trace = result.pairs_trace.to_pylist()
    assert [(p["pair_id"], p["chosen_generation_id"], p["rejected_generation_id"]) for p in trace] == [
        ("a-trace", "a-t-1", "a-t-2")
    ]
    assert trace[0]["margin"] == 1.0
    assert result.pairs_empty.num_rows == 0
    reasons = {r["row_key"]: r["reason"] for r in result.rejects}
    assert "below min_margin" in reasons["a-empty"]
    assert reasons["b-trace"].startswith("tie")
    assert "unparseable" in reasons["c-empty"] or "fewer than 2" in reasons["c-empty"]
