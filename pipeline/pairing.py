"""Pairing: best vs worst final answer per prompt and mode, in DuckDB SQL (DESIGN.md §2, 'pair').

Mode ``trace`` gives D_t = {(x, r⁺, y⁺, r⁻, y⁻)}; mode ``empty`` gives D_e = {(x, y'⁺, y'⁻)}. Ties and pairs
whose score margin is below the threshold are dropped and reported with a reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import PairingConfig

_PAIR_SQL = """
WITH usable AS (
    SELECT g.generation_id, g.prompt_id, g.mode, g.prompt_text, g.response_text, g.answer, s.score
    FROM generations AS g JOIN scores AS s USING (generation_id)
    WHERE g.parse_ok
),
ranked AS (
    SELECT *,
        row_number() OVER (PARTITION BY prompt_id, mode ORDER BY score DESC, generation_id) AS best_rank,
        row_number() OVER (PARTITION BY prompt_id, mode ORDER BY score ASC, generation_id) AS worst_rank,
        count(*) OVER (PARTITION BY prompt_id, mode) AS usable_count
    FROM usable
),
candidates AS (
    SELECT c.prompt_id, c.mode, c.prompt_text, c.usable_count,
        c.generation_id AS chosen_generation_id, c.response_text AS chosen_response,
        c.answer AS chosen_answer, c.score AS chosen_score,
        r.generation_id AS rejected_generation_id, r.response_text AS rejected_response,
        r.answer AS rejected_answer, r.score AS rejected_score,
        c.score - r.score AS margin
    FROM ranked AS c JOIN ranked AS r
        ON c.prompt_id = r.prompt_id AND c.mode = r.mode AND c.best_rank = 1 AND r.worst_rank = 1
)
SELECT *, prompt_id || '-' || mode AS pair_id,
    CASE
        WHEN usable_count < 2 THEN 'fewer than 2 parseable answers'
        WHEN margin = 0 THEN 'tie: every answer scored ' || round(chosen_score, 4)
        WHEN margin < $min_margin THEN 'margin ' || round(margin, 4) || ' below min_margin ' || $min_margin
        WHEN chosen_answer = rejected_answer THEN 'chosen and rejected answers are identical'
    END AS drop_reason
FROM candidates
ORDER BY prompt_id, mode
"""


@dataclass(frozen=True)
class PairingResult:
    pairs_trace: pa.Table
    pairs_empty: pa.Table
    rejects: list[dict[str, Any]]


def build_pairs(generations: pa.Table, scores: pa.Table, config: PairingConfig) -> PairingResult:
    """Pair generations by score; return D_t, D_e and the reasons for every prompt/mode left out."""
    conn = duckdb.connect()
    try:
        conn.register("generations", generations)
        conn.register("scores", scores)
        result = conn.sql(_PAIR_SQL, params={"min_margin": config.min_margin}).to_arrow_table()
        missing = conn.execute(
            "SELECT prompt_id, mode, count(*) AS n FROM generations WHERE NOT parse_ok GROUP BY ALL"
        ).fetchall()
    finally:
        conn.close()
    dropped = result.filter(pc.invert(pc.is_null(result["drop_reason"]))).to_pylist()
    kept = result.filter(pc.is_null(result["drop_reason"]))
    rejects = [
        {
            "stage": "pair",
            "row_key": f"{r['prompt_id']}-{r['mode']}",
            "reason": r["drop_reason"],
            "payload": json.dumps({"chosen_score": r["chosen_score"], "rejected_score": r["rejected_score"]}),
        }
        for r in dropped
    ]
    rejects += [
        {
            "stage": "pair",
            "row_key": f"{prompt_id}-{mode}",
            "reason": f"{n} unparseable generation(s) left out",
            "payload": "{}",
        }
        for prompt_id, mode, n in missing
    ]
    return PairingResult(
        pairs_trace=kept.filter(pc.equal(kept["mode"], "trace")),
        pairs_empty=kept.filter(pc.equal(kept["mode"], "empty")),
        rejects=rejects,
    )
