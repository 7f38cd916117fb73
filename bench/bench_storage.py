"""Benchmark: writing a 1M-row `generations` dataset, then a grouped query, DuckDB vs pandas.

Builds a synthetic table with the `generations` schema (storage/schemas.py), times ``DatasetStore.put``
(schema check, zstd Parquet parts, publish, catalog registration) and reports rows/s. Then it runs

    select prompt_id, mode, count(*), avg(answer_tokens) from generations group by all

through the catalog (``run_readonly_arrow``: catalog snapshot, in-memory DuckDB, Parquet scan of the
registered files) and the same group-by in pandas on the same data, in the same run: pandas on a DataFrame
already in memory, and pandas including reading the three columns from the same Parquet files. pyarrow's
``Table.group_by`` is shown too. Each query is timed ``--repeats`` times; the best and median are printed.

    .venv/bin/python bench/bench_storage.py            # 1,000,000 rows
    .venv/bin/python bench/bench_storage.py --rows 200000 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from storage import DatasetStore, run_readonly_arrow, schema_for

QUERY = (
    "select prompt_id, mode, count(*) as n, avg(answer_tokens) as avg_answer_tokens "
    "from generations group by all"
)


def _vocabulary(rng: np.random.Generator, size: int = 20_000) -> pa.Array:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return pa.array(["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(size)])


def _random_text(rng: np.random.Generator, vocabulary: pa.Array, rows: int, words: int) -> pa.ChunkedArray:
    """``rows`` distinct texts of ``words`` random words each (so Parquet cannot just dedupe them)."""
    chunks = []
    for start in range(0, rows, 100_000):
        count = min(100_000, rows - start)
        flat = vocabulary.take(pa.array(rng.integers(0, len(vocabulary), count * words)))
        offsets = pa.array(np.arange(0, count * words + 1, words, dtype=np.int32))
        chunks.append(pc.binary_join(pa.ListArray.from_arrays(offsets, flat), " "))
    return pa.chunked_array(chunks, pa.string())


def synthetic_generations(rows: int, prompts: int = 10_000, seed: int = 0) -> pa.Table:
    """A ``generations`` table: ``prompts`` prompts × 2 modes × samples; every response is distinct text."""
    rng = np.random.default_rng(seed)
    vocabulary = _vocabulary(rng)
    index = np.arange(rows)
    prompt = pa.array(index // 2 % prompts)
    trace_mode = pa.array(index % 2 == 0)
    trace_tokens = rng.integers(20, 512, rows).astype(np.int32)
    columns: dict[str, Any] = {
        "generation_id": pa.array([f"g{i:08d}" for i in range(rows)]),
        "prompt_id": pa.array([f"p{i:06d}" for i in range(prompts)]).take(prompt),
        "mode": pc.if_else(trace_mode, "trace", "empty"),
        "sample_index": pa.array(index // (2 * prompts), pa.int32()),
        "model": pa.array(["HuggingFaceTB/SmolLM2-135M-Instruct"] * rows),
        "prompt_text": _random_text(rng, vocabulary, prompts, 25).take(prompt),
        "response_text": _random_text(rng, vocabulary, rows, 60),
        "trace": pc.if_else(
            trace_mode, _random_text(rng, vocabulary, rows, 40), pa.scalar(None, pa.string())
        ),
        "answer": _random_text(rng, vocabulary, rows, 10),
        "trace_tokens": pc.if_else(trace_mode, pa.array(trace_tokens), pa.scalar(0, pa.int32())),
        "answer_tokens": pa.array(rng.integers(5, 256, rows).astype(np.int32)),
        "trace_finish_reason": pc.if_else(trace_mode, "stop", pa.scalar(None, pa.string())),
        "finish_reason": pa.array(np.where(rng.random(rows) < 0.95, "stop", "length")),
        "trace_closed": trace_mode,
        "budget_forced": pa.array(np.zeros(rows, dtype=bool)),
        "parse_ok": pa.array(np.ones(rows, dtype=bool)),
        "parse_error": pa.nulls(rows, pa.string()),
        "reasoning_control": pa.array(["native"] * rows),
    }
    schema = schema_for("generations")
    return pa.table([columns.get(f.name, pa.nulls(rows, f.type)) for f in schema], schema=schema)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def _canonical(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame[["prompt_id", "mode", "n", "avg_answer_tokens"]].sort_values(["prompt_id", "mode"])
    return frame.reset_index(drop=True).astype({"n": "int64", "avg_answer_tokens": "float64"})


def duckdb_query(store: DatasetStore) -> pd.DataFrame:
    return run_readonly_arrow(store.catalog, store.lake, QUERY).to_pandas()


def pandas_group(frame: pd.DataFrame) -> pd.DataFrame:
    grouped = frame.groupby(["prompt_id", "mode"], sort=False)["answer_tokens"]
    return grouped.agg(n="count", avg_answer_tokens="mean").reset_index()


def arrow_group(table: pa.Table) -> pd.DataFrame:
    aggregated = table.group_by(["prompt_id", "mode"]).aggregate(
        [("answer_tokens", "count"), ("answer_tokens", "mean")]
    )
    names = {"answer_tokens_count": "n", "answer_tokens_mean": "avg_answer_tokens"}
    return aggregated.rename_columns([names.get(n, n) for n in aggregated.column_names]).to_pandas()


def same_result(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    keys = ["prompt_id", "mode", "n"]
    return (
        len(a) == len(b)
        and a[keys].equals(b[keys])
        and bool(np.allclose(a["avg_answer_tokens"], b["avg_answer_tokens"]))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workspace", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bvpo-bench-storage-") as tmp:
        workspace = args.workspace or Path(tmp)
        start = time.perf_counter()
        table = synthetic_generations(args.rows)
        print(
            f"synthetic generations: {table.num_rows:,} rows, {table.nbytes / 2**20:,.0f} MiB in Arrow "
            f"(built in {time.perf_counter() - start:.1f} s)"
        )

        store = DatasetStore(workspace)
        start = time.perf_counter()
        ref = store.put("generations", table, config={"bench": args.rows}, parents=[])
        put_s = time.perf_counter() - start
        on_disk = sum(p.stat().st_size for p in Path(ref.path).glob("part-*.parquet"))
        print(
            f"DatasetStore.put: {put_s:.2f} s = {table.num_rows / put_s:,.0f} rows/s "
            f"({on_disk / 2**20:,.0f} MiB zstd Parquet, {len(list(Path(ref.path).glob('part-*')))} parts)"
        )

        columns = ["prompt_id", "mode", "answer_tokens"]
        in_memory = table.select(columns)
        frame = in_memory.to_pandas()
        candidates: list[tuple[str, Callable[[], pd.DataFrame]]] = [
            ("DuckDB via the catalog view (reads Parquet)", lambda: duckdb_query(store)),
            (
                "pandas incl. reading the 3 columns from Parquet",
                lambda: pandas_group(pd.read_parquet(ref.path, columns=columns)),
            ),
            ("pandas on a DataFrame already in memory", lambda: pandas_group(frame)),
            ("pyarrow Table.group_by on a table in memory", lambda: arrow_group(in_memory)),
        ]
        results = [(label, *timed(fn, args.repeats)) for label, fn in candidates]
        reference = _canonical(results[0][2])
        print(f"\ngrouped query ({len(reference):,} groups; best / median of {args.repeats} runs):")
        for label, times, result in results:
            flag = "" if same_result(_canonical(result), reference) else "   RESULT DIFFERS"
            print(f"  {label:<48} {min(times):7.3f} s / {statistics.median(times):7.3f} s{flag}")


if __name__ == "__main__":
    main()
