"""Benchmark: pairing scored generations in DuckDB SQL (``build_pairs``) vs a pandas group-by, same run.

Synthetic data: prompts × 2 modes × ``--samples`` generations with ~330 bytes of text each, discrete scores
(ties), 2% NaN scores, 1% missing scores and 10% malformed answers. Both implementations start from the
same Arrow tables (what ``DatasetStore.read`` returns) and produce D_t, D_e with texts, a drop code per
left-out prompt/mode and per-mode stats; the pandas time includes its Arrow → pandas conversion. The
results are checked to be the same pairs before the timings are printed.

    .venv/bin/python bench/bench_pairing.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import PairingConfig
from pipeline.pairing import build_pairs

KEYS = ["prompt_id", "mode"]


def synthetic(rows: int, samples: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """``rows`` generations (rounded down to whole groups) and their scores."""
    rng = np.random.default_rng(seed)
    groups = rows // samples
    n = groups * samples
    group = np.repeat(np.arange(groups), samples)
    prompt_id = pc.binary_join_element_wise("p", pa.array(group // 2).cast(pa.string()), "")
    mode = np.where(group % 2 == 0, "trace", "empty")
    sample = np.tile(np.arange(samples), groups)
    generation_id = pc.binary_join_element_wise(
        prompt_id, pa.array(mode), pa.array(sample).cast(pa.string()), "-"
    )
    answer = pc.binary_join_element_wise(
        "The answer is ",
        pa.array(rng.integers(0, 12, n)).cast(pa.string()),
        " because of the steps above.",
        "",
    )
    pad = "x" * 90
    generations = pa.table(
        {
            "generation_id": generation_id,
            "prompt_id": prompt_id,
            "mode": mode,
            "prompt_text": pc.binary_join_element_wise("<|user|>Question ", prompt_id, pad, ""),
            "response_text": pc.binary_join_element_wise("<think>", pad, pad, "</think>", answer, ""),
            "answer": answer,
            "answer_tokens": pa.array(rng.integers(1, 60, n), pa.int32()),
            "parse_ok": rng.random(n) >= 0.10,
        }
    )
    score = rng.choice(np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]), n)
    score = np.where(rng.random(n) < 0.5, score, rng.random(n))
    score[rng.random(n) < 0.02] = np.nan
    keep = rng.random(n) >= 0.01
    scores = pa.table({"generation_id": generation_id.filter(pa.array(keep)), "score": score[keep]})
    return generations, scores


def pandas_pairs(generations: pa.Table, scores: pa.Table, config: PairingConfig) -> dict[str, Any]:
    """The same policy as :func:`pipeline.pairing.build_pairs`, with pandas group-bys."""
    gens = generations.to_pandas()
    df = gens[["generation_id", *KEYS, "parse_ok", "answer_tokens"]].merge(
        scores.to_pandas(), on="generation_id", how="left"
    )
    usable = np.isfinite(df["score"].to_numpy(dtype=float, na_value=np.nan))
    df["malformed"] = ~df["parse_ok"]
    df["unscored"] = df["score"].isna() & ~df["generation_id"].isin(
        scores.column("generation_id").to_pandas()
    )
    df["nonfinite"] = ~usable & ~df["unscored"]
    df["may_choose"] = usable & df["parse_ok"]
    df["may_reject"] = usable & (df["parse_ok"] | (not config.rejected_must_parse))
    counts = df.groupby(KEYS, sort=False).agg(
        n_generations=("generation_id", "size"),
        n_malformed=("malformed", "sum"),
        n_nonfinite=("nonfinite", "sum"),
        n_unscored=("unscored", "sum"),
        n_wellformed=("may_choose", "sum"),
        num_candidates=("may_reject", "sum"),
    )
    best = (
        df[df["may_choose"]]
        .sort_values(["score", "generation_id"], ascending=[False, True])
        .drop_duplicates(KEYS)
        .set_index(KEYS)[["generation_id", "score"]]
        .rename(columns={"generation_id": "chosen_generation_id", "score": "chosen_score"})
    )
    worst = (
        df[df["may_reject"]]
        .sort_values(["score", "generation_id"], ascending=[True, True])
        .drop_duplicates(KEYS)
        .set_index(KEYS)[["generation_id", "score"]]
        .rename(columns={"generation_id": "rejected_generation_id", "score": "rejected_score"})
    )
    out = counts.join(best).join(worst).reset_index()
    out["margin"] = out["chosen_score"] - out["rejected_score"]
    text = gens.set_index("generation_id")[["prompt_text", "response_text", "answer", "answer_tokens"]]
    chosen = text.reindex(out["chosen_generation_id"]).reset_index(drop=True)
    rejected = text.reindex(out["rejected_generation_id"]).reset_index(drop=True)
    out["prompt_text"] = chosen["prompt_text"]
    out["chosen_response"], out["chosen_answer"] = chosen["response_text"], chosen["answer"]
    out["rejected_response"], out["rejected_answer"] = rejected["response_text"], rejected["answer"]
    length = "answer_tokens" if config.length_unit == "tokens" else None
    c_len = chosen[length].astype(float) if length else chosen["answer"].str.len().astype(float)
    r_len = rejected[length].astype(float) if length else rejected["answer"].str.len().astype(float)
    out["length_ratio"] = (c_len / r_len).where(r_len > 0)
    ratio = config.max_length_ratio
    out["drop_code"] = np.select(
        [
            (out["n_wellformed"] == 0) | (out["num_candidates"] < 2),
            out["margin"] == 0,
            out["margin"] < config.min_margin,
            out["chosen_answer"] == out["rejected_answer"],
            (c_len > ratio * r_len) if ratio is not None else np.zeros(len(out), bool),
        ],
        ["too_few", "tie", "low_margin", "identical", "length_ratio"],
        default="",
    )
    out["pair_id"] = out["prompt_id"] + "-" + out["mode"]
    kept = out[out["drop_code"] == ""].sort_values("prompt_id")
    dropped = out.loc[out["drop_code"] != "", ["pair_id", "drop_code"]].to_dict("records")
    stats = out.assign(kept=out["drop_code"] == "").groupby("mode")["kept"].sum().to_dict()
    return {
        "trace": kept[kept["mode"] == "trace"],
        "empty": kept[kept["mode"] == "empty"],
        "dropped": dropped,
        "stats": stats,
    }


def agree(duck: Any, other: dict[str, Any]) -> bool:
    """Same kept pairs (ids, margins) in both modes and the same drop code for every left-out group."""
    columns = ["pair_id", "chosen_generation_id", "rejected_generation_id", "margin"]
    for mode, table in (("trace", duck.pairs_trace), ("empty", duck.pairs_empty)):
        mine = sorted(zip(*(table[c].to_pylist() for c in columns), strict=True))
        theirs = sorted(zip(*(other[mode][c].tolist() for c in columns), strict=True))
        if mine != theirs:
            return False
    dropped = {
        r["row_key"]: json.loads(r["payload"])["drop_code"]
        for r in duck.rejects
        if "drop_code" in r["payload"]
    }
    return dropped == {r["pair_id"]: r["drop_code"] for r in other["dropped"]}


def best_of(fn: Any, repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000, help="scored generations")
    parser.add_argument("--samples", type=int, default=8, help="generations per prompt and mode")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = PairingConfig(min_margin=0.1, max_length_ratio=3.0)
    generations, scores = synthetic(args.rows, args.samples, args.seed)
    print(
        f"duckdb {duckdb.__version__}, pandas {pd.__version__}, pyarrow {pa.__version__}, "
        f"{os.cpu_count()} CPUs; "
        f"{generations.num_rows:,} generations ({generations.nbytes / 2**20:.0f} MiB), "
        f"{generations.num_rows // args.samples:,} prompt/mode groups, policy {config.model_dump()}"
    )
    t_duck, duck = best_of(lambda: build_pairs(generations, scores, config), args.repeats)
    t_pandas, pandas_result = best_of(lambda: pandas_pairs(generations, scores, config), args.repeats)

    if not agree(duck, pandas_result):
        raise SystemExit("DuckDB and pandas disagree: the benchmark would compare different work")
    pairs = duck.pairs_trace.num_rows + duck.pairs_empty.num_rows
    print(
        f"pairs: {pairs:,} (D_t {duck.pairs_trace.num_rows:,}, D_e {duck.pairs_empty.num_rows:,}), "
        "the same in both"
    )
    print(f"DuckDB SQL (build_pairs):   {t_duck:7.2f} s")
    print(f"pandas group-by:            {t_pandas:7.2f} s")
    print(f"ratio pandas / DuckDB:      {t_pandas / t_duck:7.2f}x")


if __name__ == "__main__":
    main()
