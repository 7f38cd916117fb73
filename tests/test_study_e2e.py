"""The α study end to end on configs/tiny.yaml: 2 α values × 2 seeds, through real vLLM and Prefect.

One data refresh and one reference pass for all four arms; the arms train with matched budgets; the
reference and the four checkpoints are evaluated on the same prompts through one vLLM engine start;
``study_results`` and the report are registered and written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from storage import DatasetStore

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]  # 36 min measured on 2 shared, saturated cores

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from prefect.testing.utilities import prefect_test_harness

    from flows.study import study

    workspace = tmp_path_factory.mktemp("study-workspace")
    # Both arms need pairs of their mode, and with tiny.yaml's 12 train prompts a 135M model's 4 short answers
    # per prompt could all tie in trace mode on an AVX2-only CPU (0 trace pairs): more prompts, answer room
    # and chosen answers cut at the limit allowed (15 train prompts after the study's resplit) gave 5 trace
    # + 4 empty pairs there from 120 generations.
    settings = ["prompts.num_prompts=24", "generation.max_answer_tokens=64", "pairing.allow_cut_chosen=true"]
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"workspace={workspace}", *settings])
    with prefect_test_harness(server_startup_timeout=120):
        out = study(config, alphas=["0", "1"], seeds=[0, 1], eval_prompts=6)
    return config, out


def test_the_study_registers_its_results_and_report(study_run) -> None:  # type: ignore[no-untyped-def]
    config, out = study_run
    store = DatasetStore(config.workspace)
    rows = store.read_rows(out.study_results)
    assert {(r["alpha"], r["mode"]) for r in rows} == {
        (a, m) for a in ("reference", "0", "1") for m in ("trace", "empty")
    }
    prompts = store.read_rows(out.data.prompts)
    n_eval = sum(p["split"] == "eval" for p in prompts)
    assert n_eval >= 1 and all(r["n"] == n_eval for r in rows)
    arms = [r for r in rows if r["alpha"] != "reference"]
    assert all(r["seeds"] == 2 for r in arms)
    # Matched budgets: both baselines draw 2 · batch_size pairs per step from their one mode.
    assert {r["pairs_per_step"] for r in arms} == {2.0 * config.train.batch_size}
    for r in arms:
        assert r["score_low"] <= r["score"] <= r["score_high"]
        assert r["diff_ref_low"] <= r["diff_ref"] <= r["diff_ref_high"]
        assert r["mde_ref"] >= 0
    text = Path(out.report).read_text()
    assert "# α study" in text and "Minimum detectable difference" in text
    assert Path(out.chart).read_bytes()[:4] == b"\x89PNG"


def test_one_data_refresh_four_arms_one_engine_for_the_evaluation(study_run) -> None:  # type: ignore[no-untyped-def]
    config, out = study_run
    store = DatasetStore(config.workspace)
    trained = {a.label: a.train for a in out.arms}
    assert sorted(trained) == ["alpha=0/seed=0", "alpha=0/seed=1", "alpha=1/seed=0", "alpha=1/seed=1"]
    assert len({t.metrics.name for t in trained.values()}) == 4  # four separate runs ...
    for label, train in trained.items():  # ... on the same data and reference pass
        parents, _ = store.catalog.parents_of(train.metrics)
        assert out.data.ref_logps.qualified in parents, (label, parents)
        metrics = store.read_rows(train.metrics)
        assert {m["alpha"] for m in metrics} == {float(label.split("/")[0].removeprefix("alpha="))}
    results = store.read_rows(out.eval_results)
    labels = {r["model_label"] for r in results}
    assert labels == {"reference", *trained}
    timings = [
        json.loads(line)
        for path in (config.workspace / "timings").glob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
    evaluation = {t["flow_run_id"]: t for t in timings if t["stage"] == "evaluation"}
    assert [t["engine_starts"] for t in evaluation.values()] == [1]  # five models, one engine start
