"""End to end: the whole flow on a tiny configuration, through real vLLM, Prefect and DuckDB."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.config import load_config
from storage import DatasetRef, DatasetStore
from storage.runs import CatalogView

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]


def _stage_rejects(store: DatasetStore, output: DatasetRef) -> list[dict]:
    """The rejects a stage registered next to ``output``: same parents, config ``{"for": kind, ...}``."""
    view = CatalogView(store)
    made = view.get(output.qualified)
    assert made is not None
    found = [
        e
        for e in view.entries
        if e.kind == "rejects" and e.parents == made.parents and e.config == {"for": made.kind, **made.config}
    ]
    assert len(found) <= 1, found
    return store.read_rows(found[0].ref) if found else []


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def tiny_run(prefect_api, tmp_path_factory):
    from flows.pipeline import bvpo_pipeline

    workspace = tmp_path_factory.mktemp("workspace")
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"workspace={workspace}"])
    return config, bvpo_pipeline(config)


def test_every_dataset_is_registered_with_expected_rows(tiny_run) -> None:
    config, out = tiny_run
    store = DatasetStore(config.workspace)
    prompts = store.read_rows(out.data.prompts)
    assert len(prompts) == config.prompts.num_prompts
    train_prompts = [p for p in prompts if p["split"] == "train"]
    eval_prompts = [p for p in prompts if p["split"] == "eval"]
    n = config.generation.samples_per_prompt
    assert out.data.generations.row_count == len(train_prompts) * 2 * n
    gens = store.read_rows(out.data.generations)
    assert {g["mode"] for g in gens} == {"trace", "empty"}
    assert all(g["trace"] for g in gens if g["mode"] == "trace")
    assert all(g["trace"] is None for g in gens if g["mode"] == "empty")
    # Every generation is scored exactly once or recorded as rejected by the score stage, never both.
    scored = [s["generation_id"] for s in store.read_rows(out.data.scores)]
    rejected = [r["row_key"] for r in _stage_rejects(store, out.data.scores)]
    assert len(scored) == len(set(scored)) == out.data.scores.row_count
    assert set(scored).isdisjoint(rejected) and len(rejected) == len(set(rejected))
    assert sorted(scored + rejected) == sorted(g["generation_id"] for g in gens)
    assert 0 < out.data.pairs_trace.row_count <= len(train_prompts)
    assert 0 < out.data.pairs_empty.row_count <= len(train_prompts)
    assert out.data.ref_logps.row_count == out.data.pairs_trace.row_count + out.data.pairs_empty.row_count
    assert out.train.metrics.row_count == config.train.max_steps
    eval_rows = store.read_rows(out.eval_results)
    labels = ("reference", "trained", "dpo_trace", "dpo_empty")  # BVPO and the α=1 / α=0 baselines
    assert {(r["model_label"], r["mode"]) for r in eval_rows if r["metric"] == "score"} == {
        (label, mode) for label in labels for mode in ("trace", "empty")
    }
    assert all(r["n"] == len(eval_prompts) for r in eval_rows if r["metric"] == "score")
    listed = {d["kind"] for d in store.catalog.list_datasets()}
    assert {
        "prompts",
        "generations",
        "scores",
        "pairs_trace",
        "pairs_empty",
        "ref_logps",
        "train_metrics",
        "eval_generations",
        "eval_results",
    } <= listed


def test_reference_bvpo_and_both_baselines_are_compared_with_intervals(tiny_run) -> None:
    config, out = tiny_run
    store = DatasetStore(config.workspace)
    assert set(out.baselines) == {"dpo_trace", "dpo_empty"}
    for name, alpha in (("dpo_trace", 1.0), ("dpo_empty", 0.0)):
        baseline = out.baselines[name]
        assert baseline.checkpoint != out.train.checkpoint
        assert store.catalog.parents_of(baseline.metrics)[1]["train"]["alpha"] == name
        metrics = store.read_rows(baseline.metrics)
        assert len(metrics) == config.train.max_steps
        # A baseline uses one mode only: α=1 never computes L_e, α=0 never computes L_t.
        unused = "loss_e" if alpha == 1.0 else "loss_t"
        assert all(m[unused] is None for m in metrics)
    rows = store.read_rows(out.eval_results)
    bounded = {"score", "win_rate_vs_reference", "lc_win_rate_vs_reference"}
    for row in rows:
        assert row["n"] > 0, row
        if row["metric"] == "mde_vs_reference":  # a detectable difference: no interval of its own
            assert 0.0 <= row["value"] <= 2.0, row
            continue
        assert row["ci_low"] <= row["ci_high"], row
        if row["metric"] in bounded:
            assert all(0.0 <= row[k] <= 1.0 for k in ("value", "ci_low", "ci_high")), row
        elif row["metric"] == "score_diff_vs_reference":  # paired difference of two scores in [0, 1]
            assert all(-1.0 <= row[k] <= 1.0 for k in ("value", "ci_low", "ci_high")), row
        else:
            assert row["value"] >= 0.0 and row["ci_low"] >= 0.0, row
    win_rates = {(r["model_label"], r["mode"]) for r in rows if r["metric"] == "win_rate_vs_reference"}
    assert win_rates == {
        (m, mode) for m in ("trained", "dpo_trace", "dpo_empty") for mode in ("trace", "empty")
    }
    report = store.workspace / "reports" / f"{out.eval_results.name}-{out.eval_results.version}.md"
    text = report.read_text()
    assert all(label in text for label in ("reference", "trained", "dpo_trace", "dpo_empty"))
    assert report.with_suffix(".png").stat().st_size > 0


def test_bvpo_loss_is_finite_and_weights_changed(tiny_run) -> None:
    config, out = tiny_run
    metrics = DatasetStore(config.workspace).read_rows(out.train.metrics)
    assert all(
        math.isfinite(m["loss"]) and math.isfinite(m["loss_t"]) and math.isfinite(m["loss_e"])
        for m in metrics
    )
    # At step 1 the policy is the reference: the loss is close to log 2.
    assert abs(metrics[0]["loss"] - math.log(2)) < 0.05
    from pipeline.models import resolve_model_path

    base = load_file(str(Path(resolve_model_path(config.model)) / "model.safetensors"))
    trained = load_file(str(Path(out.train.checkpoint) / "model.safetensors"))
    changed = [k for k in base if k in trained and not torch.equal(base[k].float(), trained[k].float())]
    assert changed, "no parameter changed during training"
    assert out.train.weight_delta_l2 and out.train.weight_delta_l2 > 0


def test_sql_cli_reads_the_catalog_after_a_run(tiny_run) -> None:
    from flows.cli import app

    config, out = tiny_run
    result = CliRunner().invoke(app, ["sql", "-w", str(config.workspace), "select count(*) from generations"])
    assert result.exit_code == 0, result.output
    assert str(out.data.generations.row_count) in result.output
    refused = CliRunner().invoke(app, ["sql", "-w", str(config.workspace), "delete from datasets"])
    assert refused.exit_code == 1 and "read-only" in refused.output


def test_rerun_with_same_inputs_reuses_every_dataset(tiny_run) -> None:
    from flows.pipeline import bvpo_pipeline

    config, out = tiny_run
    before = DatasetStore(config.workspace).catalog.list_datasets()
    again = bvpo_pipeline(config)
    after = DatasetStore(config.workspace).catalog.list_datasets()
    assert [d["version"] for d in after] == [d["version"] for d in before]
    assert again.data.generations == out.data.generations
    assert again.train.checkpoint == out.train.checkpoint
