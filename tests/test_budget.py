"""Matched budgets: every α trains on the same pairs and tokens per step, checked from ``train_metrics``."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import TrainConfig
from pipeline.training.sampling import pairs_per_mode
from pipeline.training.sequences import TokenizedPair
from pipeline.training.trainer import BVPOTrainer, RefPair
from storage import DatasetStore, schema_for
from storage.query import run_readonly_query
from tests.tiny_lm import VOCAB, tiny_model


def _fixed_length_pairs(n: int, seed: int, prefix: str) -> list[RefPair]:
    """Pairs whose prompt, chosen and rejected lengths are the same in both modes (no length noise)."""
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(k)]

    return [
        RefPair(TokenizedPair(f"{prefix}{i}", ids(3), ids(4), ids(4), False), -10.0, -11.0) for i in range(n)
    ]


def _config(alpha: float, budget: str) -> TrainConfig:
    return TrainConfig.model_validate(
        {"alpha": alpha, "budget": budget, "batch_size": 2, "grad_accum_steps": 2, "max_steps": 3,
         "bf16": False, "warmup_steps": 0, "checkpoint_every": 0}
    )  # fmt: skip


def _register_and_query(tmp_path: Path, budget: str) -> dict[float, list[tuple[int, int, int, int, int]]]:
    """Train α = 0, 0.5, 1; register each run's train_metrics; read pairs and tokens per step back by SQL."""
    store = DatasetStore(tmp_path / budget)
    data_t, data_e = _fixed_length_pairs(6, 1, "t"), _fixed_length_pairs(6, 2, "e")
    schema = schema_for("train_metrics")
    for alpha in (0.0, 0.5, 1.0):
        trainer = BVPOTrainer(copy.deepcopy(tiny_model()), data_t, data_e, _config(alpha, budget), pad_id=0)
        rows = [{**m, "checkpoint": "-"} for m in trainer.train()]
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
        store.put("train_metrics", table, config={"alpha": alpha, "budget": budget}, parents=[])
    files = str(Path(store.lake) / "train_metrics" / "*" / "part-*.parquet")
    _, result = run_readonly_query(
        store.catalog,
        store.lake,
        "select alpha, step, pairs_t, pairs_e, tokens_t, tokens_e, tokens from "
        f"read_parquet('{files}') order by alpha, step",
    )
    out: dict[float, list[tuple[int, int, int, int, int]]] = {}
    for alpha, _step, pairs_t, pairs_e, tokens_t, tokens_e, tokens in result:
        out.setdefault(alpha, []).append((pairs_t, pairs_e, tokens_t, tokens_e, tokens))
    return out


def test_matched_budget_gives_every_alpha_the_same_pairs_and_tokens_per_step(tmp_path: Path) -> None:
    steps = _register_and_query(tmp_path, "matched")
    assert sorted(steps) == [0.0, 0.5, 1.0]
    # 2 · batch_size pairs per micro-batch × 2 micro-batches = 8 pairs per step, whatever α is.
    for alpha, rows in steps.items():
        assert len(rows) == 3, alpha
        for pairs_t, pairs_e, tokens_t, tokens_e, tokens in rows:
            assert pairs_t + pairs_e == 8, alpha
            assert tokens_t + tokens_e == tokens
    assert steps[1.0][0][:2] == (8, 0)
    assert steps[0.0][0][:2] == (0, 8)
    assert steps[0.5][0][:2] == (4, 4)
    # Every pair here has the same lengths, so tokens per step are equal too (real data: up to length noise).
    totals = {alpha: {row[4] for row in rows} for alpha, rows in steps.items()}
    assert totals[0.0] == totals[0.5] == totals[1.0] and len(totals[0.5]) == 1


def test_per_mode_budget_keeps_the_old_behaviour(tmp_path: Path) -> None:
    steps = _register_and_query(tmp_path, "per_mode")
    assert steps[1.0][0][:2] == (4, 0)
    assert steps[0.0][0][:2] == (0, 4)
    assert steps[0.5][0][:2] == (4, 4)  # BVPO sees twice a baseline's pairs
    assert steps[0.5][0][4] == 2 * steps[1.0][0][4]


@pytest.mark.parametrize(
    "alpha,budget,expected",
    [(1.0, "matched", (6, 0)), (0.0, "matched", (0, 6)), (0.25, "matched", (3, 3)),
     ("auto", "matched", (3, 3)), (1.0, "per_mode", (3, 0)), (0.7, "per_mode", (3, 3))],
)  # fmt: skip
def test_pairs_per_mode(alpha: float | str, budget: str, expected: tuple[int, int]) -> None:
    assert pairs_per_mode(alpha, 3, budget) == expected


def test_unknown_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="budget"):
        pairs_per_mode(0.5, 2, "twice")


def test_the_run_report_states_the_budget() -> None:
    from pipeline.reporting.run_markdown import _budget_lines

    rows = [{"pairs_t": 4, "pairs_e": 4, "tokens_t": 90, "tokens_e": 60}, {"pairs_t": 4, "pairs_e": 4,
            "tokens_t": 110, "tokens_e": 40}]  # fmt: skip
    (_, line) = _budget_lines(rows, "matched")
    assert "4 D_t + 4 D_e pairs, 100 + 50 tokens" in line and "matched" in line
    assert _budget_lines([{"pairs_t": None}], "matched") == []
