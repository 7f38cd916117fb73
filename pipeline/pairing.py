"""Pairing: best vs worst final answer per prompt and mode, in DuckDB SQL (docs/method.md §Pipeline stages).

Mode ``trace`` gives D_t = {(x, r⁺, y⁺, r⁻, y⁻)}; mode ``empty`` gives D_e = {(x, y'⁺, y'⁻)}. Per prompt and
mode, an answer is usable when its score is finite (NaN, ±inf and missing scores are not, and are reported).
Chosen is the best usable well-formed (``parse_ok``) answer; rejected is the worst usable answer, well-formed
too unless ``rejected_must_parse`` is off. Equal scores are broken by the smaller ``generation_id``. A pair
is dropped, for the first reason that applies, when there are fewer than 2 usable answers (``too_few``),
best and worst score the same (``tie``), the margin is below ``min_margin`` (``low_margin``), both answers
have the same text (``identical``) or the chosen answer is more than ``max_length_ratio`` times longer than
the rejected one (``length_ratio``). Every drop is returned as a reject, and a stats table (per mode: pairs,
drops by reason, unusable answers, margin distribution) is returned for display.

An answer cut at ``max_answer_tokens`` (``finish_reason = 'length'``) may be rejected but not chosen unless
``allow_cut_chosen``: each cut answer that scored above the chosen one (or would have been the only choice) is
a reject with that reason. A pair carries the token ids of its prompt and of both responses, exactly as
sampled (docs/method.md §Token-exact sequences).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.config import PairingConfig
from pipeline.training.encoding import require_token_columns

DROP_CODES = ("too_few", "tie", "low_margin", "identical", "length_ratio")
"""Reasons a prompt/mode yields no pair, in the order they are tested."""

_LENGTH_SQL = {"tokens": "CAST({t}.answer_tokens AS DOUBLE)", "chars": "CAST(length({t}.answer) AS DOUBLE)"}

_GROUPS_SQL = """
CREATE TEMP TABLE pair_groups AS
WITH candidates AS (
    SELECT g.generation_id, g.prompt_id, g.mode, g.parse_ok, s.score,
        s.score IS NULL AS unscored,
        s.score IS NOT NULL AND NOT isfinite(s.score) AS nonfinite,
        coalesce(isfinite(s.score), false) AS usable,
        coalesce(isfinite(s.score), false) AND g.parse_ok AS wellformed,
        coalesce(isfinite(s.score), false) AND g.parse_ok
            AND (g.finish_reason <> 'length' OR $allow_cut_chosen) AS may_choose,
        coalesce(isfinite(s.score), false) AND g.parse_ok
            AND g.finish_reason = 'length' AND NOT $allow_cut_chosen AS cut_wellformed,
        coalesce(isfinite(s.score), false) AND (g.parse_ok OR NOT $rejected_must_parse) AS may_reject
    FROM generations AS g LEFT JOIN (SELECT generation_id, score FROM scores) AS s USING (generation_id)
)
SELECT prompt_id, mode,
    count(*) AS n_generations,
    count(*) FILTER (WHERE NOT parse_ok) AS n_malformed,
    count(*) FILTER (WHERE nonfinite) AS n_nonfinite,
    count(*) FILTER (WHERE unscored) AS n_unscored,
    count(*) FILTER (WHERE may_choose) AS n_wellformed,
    count(*) FILTER (WHERE cut_wellformed) AS n_cut,
    count(*) FILTER (WHERE may_reject) AS num_candidates,
    arg_min(generation_id, (-score, generation_id)) FILTER (WHERE may_choose) AS chosen_generation_id,
    max(score) FILTER (WHERE may_choose) AS chosen_score,
    arg_min(generation_id, (score, generation_id)) FILTER (WHERE may_reject) AS rejected_generation_id,
    min(score) FILTER (WHERE may_reject) AS rejected_score
FROM candidates
GROUP BY prompt_id, mode
"""

_DECIDED_SQL = """
CREATE TEMP TABLE pair_decisions AS
WITH joined AS (
    SELECT p.*, p.chosen_score - p.rejected_score AS margin,
        c.prompt_text, c.response_text AS chosen_response, c.answer AS chosen_answer,
        r.response_text AS rejected_response, r.answer AS rejected_answer,
        c.prompt_token_ids, c.response_token_ids AS chosen_token_ids,
        r.response_token_ids AS rejected_token_ids,
        {chosen_len} AS chosen_len, {rejected_len} AS rejected_len
    FROM pair_groups AS p
    LEFT JOIN generations AS c ON c.generation_id = p.chosen_generation_id
    LEFT JOIN generations AS r ON r.generation_id = p.rejected_generation_id
)
SELECT *, prompt_id || '-' || mode AS pair_id,
    CASE WHEN rejected_len > 0 THEN chosen_len / rejected_len END AS length_ratio,
    CASE
        WHEN n_wellformed = 0 OR num_candidates < 2 THEN 'too_few'
        WHEN margin = 0 THEN 'tie'
        WHEN margin < $min_margin THEN 'low_margin'
        WHEN chosen_answer = rejected_answer THEN 'identical'
        WHEN CAST($max_length_ratio AS DOUBLE) IS NOT NULL
            AND chosen_len > CAST($max_length_ratio AS DOUBLE) * rejected_len THEN 'length_ratio'
    END AS drop_code
FROM joined
"""

_REASON_SQL = """
CASE drop_code
    WHEN 'too_few' THEN
        CASE WHEN n_wellformed = 0 AND n_cut > 0 AND num_candidates >= 2
            THEN 'no well-formed answer to choose: every one was cut at max_answer_tokens'
        WHEN n_wellformed = 0 AND num_candidates >= 2 THEN 'no well-formed answer to choose'
        ELSE 'fewer than 2 usable answers' END
        || printf(' (%d generated: %d malformed, %d with a non-finite score, %d unscored)',
            n_generations, n_malformed, n_nonfinite, n_unscored)
    WHEN 'tie' THEN printf('tie: best and worst usable answers both scored %.4g', chosen_score)
    WHEN 'low_margin' THEN printf('margin %.4g below min_margin %.4g', margin, $min_margin)
    WHEN 'identical' THEN 'chosen and rejected answers are identical'
    WHEN 'length_ratio' THEN printf('chosen answer is %.3g times as long as the rejected one '
        || '(max_length_ratio %.4g)', length_ratio, CAST($max_length_ratio AS DOUBLE))
END
"""

_PAIRS_SQL = """
SELECT pair_id, prompt_id, mode, prompt_text, chosen_response, rejected_response, chosen_answer,
    rejected_answer, chosen_score, rejected_score, margin, chosen_generation_id, rejected_generation_id,
    CAST(num_candidates AS INTEGER) AS num_candidates, length_ratio,
    prompt_token_ids, chosen_token_ids, rejected_token_ids
FROM pair_decisions
WHERE drop_code IS NULL AND mode = $mode
ORDER BY prompt_id
"""

_DROPPED_SQL = f"""
SELECT pair_id AS row_key, {_REASON_SQL} AS reason,
    to_json(struct_pack(drop_code, chosen_generation_id, rejected_generation_id, chosen_score,
        rejected_score, margin, length_ratio, num_candidates)) AS payload
FROM pair_decisions
WHERE drop_code IS NOT NULL
ORDER BY prompt_id, mode
"""

_UNUSABLE_SQL = """
SELECT g.generation_id AS row_key,
    'score is ' || CAST(s.score AS VARCHAR) || ': not usable for pairing' AS reason,
    to_json(struct_pack(g.prompt_id, g.mode, score := CAST(s.score AS VARCHAR))) AS payload
FROM generations AS g JOIN scores AS s USING (generation_id)
WHERE NOT isfinite(s.score)
ORDER BY g.generation_id
"""

_CUT_SQL = """
SELECT g.generation_id AS row_key,
    printf('answer cut at max_answer_tokens (%d tokens, finish_reason length): not eligible as chosen '
        || '(pairing.allow_cut_chosen)', g.answer_tokens) AS reason,
    to_json(struct_pack(g.prompt_id, g.mode, s.score, chosen_score := d.chosen_score)) AS payload
FROM generations AS g JOIN scores AS s USING (generation_id)
JOIN pair_decisions AS d ON d.prompt_id = g.prompt_id AND d.mode = g.mode
WHERE NOT $allow_cut_chosen AND g.finish_reason = 'length' AND g.parse_ok AND isfinite(s.score)
    AND (d.chosen_score IS NULL OR s.score > d.chosen_score)
ORDER BY g.generation_id
"""

_STATS_SQL = """
WITH modes AS (SELECT * FROM (VALUES ('trace'), ('empty')) AS m(mode) UNION SELECT mode FROM pair_decisions)
SELECT m.mode,
    count(d.pair_id) AS prompts,
    count(d.pair_id) FILTER (WHERE d.drop_code IS NULL) AS pairs,
    count(d.pair_id) FILTER (WHERE d.drop_code = 'too_few') AS dropped_too_few,
    count(d.pair_id) FILTER (WHERE d.drop_code = 'tie') AS dropped_tie,
    count(d.pair_id) FILTER (WHERE d.drop_code = 'low_margin') AS dropped_low_margin,
    count(d.pair_id) FILTER (WHERE d.drop_code = 'identical') AS dropped_identical,
    count(d.pair_id) FILTER (WHERE d.drop_code = 'length_ratio') AS dropped_length_ratio,
    coalesce(sum(d.n_cut), 0)::BIGINT AS cut_answers,
    coalesce(sum(d.n_generations), 0)::BIGINT AS generations,
    coalesce(sum(d.n_malformed), 0)::BIGINT AS malformed,
    coalesce(sum(d.n_nonfinite), 0)::BIGINT AS nonfinite_scores,
    coalesce(sum(d.n_unscored), 0)::BIGINT AS unscored,
    min(d.margin) FILTER (WHERE d.drop_code IS NULL) AS margin_min,
    quantile_cont(d.margin, 0.25) FILTER (WHERE d.drop_code IS NULL) AS margin_p25,
    quantile_cont(d.margin, 0.5) FILTER (WHERE d.drop_code IS NULL) AS margin_median,
    quantile_cont(d.margin, 0.75) FILTER (WHERE d.drop_code IS NULL) AS margin_p75,
    max(d.margin) FILTER (WHERE d.drop_code IS NULL) AS margin_max,
    avg(d.margin) FILTER (WHERE d.drop_code IS NULL) AS margin_mean
FROM modes AS m LEFT JOIN pair_decisions AS d USING (mode)
GROUP BY m.mode
ORDER BY m.mode = 'empty', m.mode = 'trace' DESC, m.mode
"""


@dataclass(frozen=True)
class PairingResult:
    pairs_trace: pa.Table
    """D_t: one row per kept (prompt, 'trace') pair."""
    pairs_empty: pa.Table
    """D_e: one row per kept (prompt, 'empty') pair."""
    rejects: list[dict[str, Any]]
    """Every prompt/mode left out (row_key ``<prompt_id>-<mode>``) and every non-finite score."""
    stats: list[dict[str, Any]]
    """One row per mode: prompts, pairs, drops by reason, unusable answers, margin distribution."""


def build_pairs(generations: pa.Table, scores: pa.Table, config: PairingConfig) -> PairingResult:
    """Pair generations by score; return D_t, D_e, the reasons for every prompt/mode left out and stats.

    ``generations`` needs ``generation_id``, ``prompt_id``, ``mode``, ``prompt_text``, ``response_text``,
    ``answer``, ``parse_ok``, ``answer_tokens``, ``finish_reason`` and the token ids ``prompt_token_ids``,
    ``response_token_ids``; ``scores`` needs ``generation_id`` and ``score``.
    """
    needed = {"generation_id", "prompt_id", "mode", "prompt_text", "response_text", "answer", "parse_ok"}
    needed |= {"answer_tokens", "finish_reason"}
    for name, table, columns in (
        ("generations", generations, needed),
        ("scores", scores, {"generation_id", "score"}),
    ):
        missing = sorted(columns - set(table.column_names))
        if missing:
            raise ValueError(f"pairing: {name} lacks column(s) {', '.join(missing)}")
    require_token_columns(generations.column_names, "the generations dataset", kind="generations")
    length = _LENGTH_SQL[config.length_unit]
    decided_sql = _DECIDED_SQL.format(chosen_len=length.format(t="c"), rejected_len=length.format(t="r"))
    ratio = None if config.max_length_ratio is None else float(config.max_length_ratio)
    conn = duckdb.connect()
    try:
        conn.register("generations", generations)
        conn.register("scores", scores)
        cut = {"allow_cut_chosen": config.allow_cut_chosen}
        conn.execute(_GROUPS_SQL, {"rejected_must_parse": config.rejected_must_parse} | cut)
        params = {"min_margin": float(config.min_margin), "max_length_ratio": ratio}
        conn.execute(decided_sql, params)
        trace, empty = (
            conn.sql(_PAIRS_SQL, params={"mode": mode}).to_arrow_table() for mode in ("trace", "empty")
        )
        dropped = conn.sql(_DROPPED_SQL, params=params).to_arrow_table()
        unusable = conn.sql(_UNUSABLE_SQL).to_arrow_table()
        cut_rows = conn.sql(_CUT_SQL, params=cut).to_arrow_table()
        stats = conn.sql(_STATS_SQL).to_arrow_table().to_pylist()
    finally:
        conn.close()
    rejects = [
        {"stage": "pair", **row} for row in pa.concat_tables([dropped, unusable, cut_rows]).to_pylist()
    ]
    return PairingResult(
        pairs_trace=_non_null(trace), pairs_empty=_non_null(empty), rejects=rejects, stats=stats
    )


def _non_null(table: pa.Table) -> pa.Table:
    """Kept pairs always have both answers; assert it rather than store a broken pair."""
    for name in ("chosen_generation_id", "rejected_generation_id", "chosen_answer", "rejected_answer"):
        if table[name].null_count:
            raise RuntimeError(f"pairing produced a pair without {name}: are generation ids unique?")
    return table
