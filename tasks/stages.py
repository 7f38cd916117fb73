"""Prefect tasks: each wraps one pipeline stage, reads its inputs from the store and registers its output.

Every task is content-addressed through :mod:`storage`: when the catalog already holds the output for the
same inputs and config, the task returns it without recomputing (a rerun after a crash resumes there).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from pipeline.config import PipelineConfig
from pipeline.models import model_identity, resolve_model_path
from storage import DatasetRef, DatasetStore, schema_for, version_key
from storage.lineage import generations_for
from tasks.orchestration import GPU_TAG, HOUR, TRANSIENT_RETRIES


class EvalModel(BaseModel):
    """A model evaluated next to the reference and the trained checkpoint (e.g. the α=1 / α=0 baselines)."""

    label: str
    checkpoint: str
    parent: DatasetRef  # its train_metrics dataset


class TrainOutput(BaseModel):
    metrics: DatasetRef
    checkpoint: str
    weight_delta_l2: float | None = None
    grad_stats: DatasetRef | None = None  # gradient-probe rows (alpha: auto or train.probe.enabled)


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return str(run_id) if run_id else None


def _store(config: PipelineConfig) -> DatasetStore:
    return DatasetStore(config.workspace)


def _table(kind: str, rows: list[dict[str, Any]]) -> pa.Table:
    schema = schema_for(kind)
    if not rows:
        return schema.empty_table()
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _materialize(
    store: DatasetStore,
    kind: str,
    config: dict[str, Any],
    parents: list[DatasetRef],
    compute: Callable[[], tuple[pa.Table, list[dict[str, Any]]]],
) -> DatasetRef:
    """Return the registered dataset for these inputs, computing and registering it if absent.

    Rejected rows are registered first (as a ``rejects`` dataset of the same inputs), so the main dataset is
    only ever visible together with the record of what it left out.
    """
    logger = get_run_logger()
    found = store.lookup(kind, config, parents)
    if found is not None:
        logger.info("%s: reusing %s (%d rows, same inputs and config)", kind, found.name, found.row_count)
        return found
    table, rejects = compute()
    if rejects:
        ref = store.put(
            "rejects",
            _table("rejects", rejects),
            config={"for": kind, **config},
            parents=parents,
            flow_run_id=_flow_run_id(),
        )
        logger.warning(
            '%s: %d row(s) rejected, see `bvpo sql "select * from %s"`', kind, len(rejects), ref.name
        )
    ref = store.put(kind, table, config=config, parents=parents, flow_run_id=_flow_run_id())
    logger.info("%s: registered %s (%d rows)", kind, ref.name, ref.row_count)
    return ref


@task(name="prompts", cache_policy=NO_CACHE, timeout_seconds=HOUR, **TRANSIENT_RETRIES)
def prompts_task(config: PipelineConfig) -> DatasetRef:
    from pipeline.prompts.source import load_prompts

    def compute() -> tuple[pa.Table, list[dict[str, Any]]]:
        result = load_prompts(config.prompts)
        if not result.rows:
            first = [f"{r['row_key']}: {r['reason']}" for r in result.rejects[:5]]
            reasons = "; ".join(first) or "the source is empty"
            raise ValueError(f"no usable prompts in '{config.prompts.source}': {reasons}")
        return _table("prompts", result.rows), result.rejects

    return _materialize(_store(config), "prompts", config.prompts.model_dump(mode="json"), [], compute)


def _generation_config(config: PipelineConfig) -> dict[str, Any]:
    return {"model": model_identity(config.model), "generation": config.generation.fingerprint()}


@task(name="generate", cache_policy=NO_CACHE, tags=[GPU_TAG], timeout_seconds=12 * HOUR, **TRANSIENT_RETRIES)
def generate_task(config: PipelineConfig, prompts: DatasetRef) -> DatasetRef:
    from pipeline.generation.shards import ShardStore
    from pipeline.generation.stage import describe_event, run_generate_stage
    from pipeline.generation.stats import generation_stats

    store = _store(config)
    logger = get_run_logger()
    settings = _generation_config(config)
    # Finished shards persist here, keyed by the version they will form: a rerun resumes from them.
    key = version_key("generations", settings, [prompts])
    staging = ShardStore(store.workspace / "staging" / "generations" / key)
    run: dict[str, Any] = {}

    def on_event(event: dict[str, Any]) -> None:
        logger.info("generate: %s", describe_event(event))

    def compute() -> tuple[pa.Table, list[dict[str, Any]]]:
        rows = [r for r in store.read_rows(prompts) if r["split"] == "train"]
        if not rows:
            raise ValueError(f"{prompts.name} has no train-split prompts to generate for")
        result = run_generate_stage(
            resolve_model_path(config.model),
            rows,
            config.generation,
            model_label=model_identity(config.model),
            staging_dir=staging.root,
            trust_remote_code=config.model.trust_remote_code,
            on_event=on_event,
        )
        if not result.rows:
            reasons = "; ".join(sorted({r["reason"] for r in result.rejects})[:3])
            raise ValueError(f"no prompt of {prompts.name} can be generated for: {reasons}")
        logger.info("generate: %s", result.summary())
        run.update(tokens_per_s=result.tokens_per_second, wall_s=result.wall_seconds)
        return _table("generations", result.rows), result.rejects

    ref = _materialize(store, "generations", settings, [prompts], compute)
    staging.remove()
    speed = f"{run['tokens_per_s']:.0f} tokens/s" if run.get("tokens_per_s") else "reused, not regenerated"
    create_table_artifact(
        key="generation-stats",
        table=generation_stats(store.read_rows(ref)),
        description=f"{ref.name}: lengths, finish reasons and parse failures per mode ({speed}).",
    )
    return ref


@task(name="score", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)  # no timeout: math-verify uses SIGALRM
def score_task(config: PipelineConfig, prompts: DatasetRef, generations: DatasetRef) -> DatasetRef:
    from pipeline.scoring.stage import score_generations

    store = _store(config)

    def compute() -> tuple[pa.Table, list[dict[str, Any]]]:
        by_id = {p["prompt_id"]: p for p in store.read_rows(prompts)}
        result = score_generations(store.read_rows(generations), by_id, config.scoring)
        return _table("scores", result.rows), result.rejects

    return _materialize(
        store, "scores", config.scoring.model_dump(mode="json"), [prompts, generations], compute
    )


@task(name="pair", cache_policy=NO_CACHE, timeout_seconds=HOUR, **TRANSIENT_RETRIES)
def pair_task(
    config: PipelineConfig, generations: DatasetRef, scores: DatasetRef
) -> tuple[DatasetRef, DatasetRef]:
    from pipeline.pairing import build_pairs

    store = _store(config)
    parents = [generations, scores]
    settings = config.pairing.model_dump(mode="json")
    cached = [store.lookup(kind, settings, parents) for kind in ("pairs_trace", "pairs_empty")]
    if cached[0] is not None and cached[1] is not None:
        return cached[0], cached[1]
    result = build_pairs(store.read(generations), store.read(scores), config.pairing)
    logger = get_run_logger()
    for row in result.stats:
        dropped = {k.removeprefix("dropped_"): v for k, v in row.items() if k.startswith("dropped_") and v}
        logger.info(
            "pairs %s: %d of %d prompts; dropped %s", row["mode"], row["pairs"], row["prompts"], dropped
        )
    create_table_artifact(
        key="pairing-stats",
        table=[
            {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()} for row in result.stats
        ],
        description=f"Pairs per mode, drops by reason, unusable answers, margins. Policy: {settings}",
    )
    trace = _materialize(
        store, "pairs_trace", settings, parents, lambda: (result.pairs_trace, result.rejects)
    )
    empty = _materialize(store, "pairs_empty", settings, parents, lambda: (result.pairs_empty, []))
    return trace, empty


@task(
    name="reference-logps",
    cache_policy=NO_CACHE,
    tags=[GPU_TAG],
    timeout_seconds=12 * HOUR,
    **TRANSIENT_RETRIES,
)
def reference_logps_task(
    config: PipelineConfig, pairs_trace: DatasetRef, pairs_empty: DatasetRef
) -> DatasetRef:
    from pipeline.training.reference import compute_reference_logps

    store = _store(config)
    settings = {
        "ref_model": model_identity(config.model),
        "max_length": config.train.max_length,
        "bf16": config.train.bf16,
    }

    def compute() -> tuple[pa.Table, list[dict[str, Any]]]:
        rows = compute_reference_logps(
            resolve_model_path(config.model),
            {"trace": store.read_rows(pairs_trace), "empty": store.read_rows(pairs_empty)},
            model_label=model_identity(config.model),
            max_length=config.train.max_length,
            bf16=config.train.bf16,
            trust_remote_code=config.model.trust_remote_code,
        )
        return _table("ref_logps", rows), []

    return _materialize(store, "ref_logps", settings, [pairs_trace, pairs_empty], compute)


@task(
    name="train-bvpo", cache_policy=NO_CACHE, tags=[GPU_TAG], timeout_seconds=72 * HOUR, **TRANSIENT_RETRIES
)
def train_task(
    config: PipelineConfig, pairs_trace: DatasetRef, pairs_empty: DatasetRef, ref_logps: DatasetRef
) -> TrainOutput:
    from pipeline.training.run import train_bvpo

    store = _store(config)
    logger = get_run_logger()
    parents = [pairs_trace, pairs_empty, ref_logps]
    trackers = {"report_to", "mlflow_tracking_uri"}  # where metrics are reported is not what is trained
    settings = {
        "model": model_identity(config.model),
        "train": config.train.model_dump(mode="json", exclude=trackers),
    }
    checkpoint = store.workspace / "checkpoints" / version_key("train_metrics", settings, parents)
    delta: dict[str, float] = {}
    probe = config.train.probe_active  # gradient probe: reads the stored traces, writes grad_stats

    def compute() -> tuple[pa.Table, list[dict[str, Any]]]:
        _require_pairs(config, pairs_trace, pairs_empty)  # before the model is loaded

        def log_step(row: dict[str, Any]) -> None:
            logger.info(
                "step %d alpha %.3f loss %.4f (L_t %s, L_e %s) grad_norm %.3f %.0f tokens/s",
                row["step"],
                row["alpha"],
                row["loss"],
                _fmt(row["loss_t"]),
                _fmt(row["loss_e"]),
                row["grad_norm"],
                row["tokens_per_s"],
            )

        result = train_bvpo(
            resolve_model_path(config.model),
            store.read_rows(pairs_trace),
            store.read_rows(pairs_empty),
            store.read_rows(ref_logps),
            config.train,
            checkpoint,
            trust_remote_code=config.model.trust_remote_code,
            on_step=log_step,
            generations=store.read_rows(generations_for(store, pairs_trace)) if probe else None,
        )
        delta["value"] = result.weight_delta_l2
        if probe:  # registered before train_metrics, so train_metrics is never visible without it
            store.put(
                "grad_stats",
                _table("grad_stats", result.grad_stats),
                config=settings,
                parents=parents,
                flow_run_id=_flow_run_id(),
            )
        if result.resumed_from_step:
            logger.info("resumed training from step %d", result.resumed_from_step)
        rows = [{**m, "checkpoint": str(checkpoint)} for m in result.metrics]
        return _table("train_metrics", rows), []

    metrics = _materialize(store, "train_metrics", settings, parents, compute)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{metrics.name} is registered but its checkpoint {checkpoint} is missing")
    grad_stats = store.lookup("grad_stats", settings, parents) if probe else None
    return TrainOutput(
        metrics=metrics,
        checkpoint=str(checkpoint),
        weight_delta_l2=delta.get("value"),
        grad_stats=grad_stats,
    )


@task(name="plot-grad-stats", cache_policy=NO_CACHE, timeout_seconds=600)
def grad_stats_plot_task(config: PipelineConfig, grad_stats: DatasetRef, metrics: DatasetRef) -> Path:
    """PNG of α̂* over steps and the trace-induced variance of g_t vs g_c, under ``<workspace>/reports/``."""
    from pipeline.training.grad_plots import plot_grad_stats

    store = _store(config)
    path = store.workspace / "reports" / f"{grad_stats.name}-{grad_stats.version}.png"
    return plot_grad_stats(store.read_rows(grad_stats), path, metrics=store.read_rows(metrics))


def _require_pairs(config: PipelineConfig, pairs_trace: DatasetRef, pairs_empty: DatasetRef) -> None:
    """Fail, naming the empty dataset, when α needs pairs of a mode that pairing left empty."""
    from pipeline.training.trainer import TrainingDataError

    alpha = config.train.alpha_value
    needs = (
        (pairs_trace, alpha > 0, "trace pairs (D_t)"),
        (pairs_empty, alpha < 1, "empty-trace pairs (D_e)"),
    )
    for ref, used, what in needs:
        if used and ref.row_count == 0:
            raise TrainingDataError(
                f"train.alpha={config.train.alpha} needs {what}, but {ref.name} has no rows "
                "(why: bvpo sql \"select * from rejects where stage = 'pair'\")"
            )


@task(name="plot-training", cache_policy=NO_CACHE, timeout_seconds=600)
def training_plot_task(config: PipelineConfig, metrics: DatasetRef) -> Path:
    """PNG of the training curves under ``<workspace>/reports/``."""
    from pipeline.training.plots import plot_training_curves

    store = _store(config)
    path = store.workspace / "reports" / f"{metrics.name}-{metrics.version}.png"
    return plot_training_curves(store.read_rows(metrics), path)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@task(name="evaluate", cache_policy=NO_CACHE, tags=[GPU_TAG], **TRANSIENT_RETRIES)  # no timeout: see score
def evaluate_task(
    config: PipelineConfig,
    prompts: DatasetRef,
    checkpoint: str,
    parent: DatasetRef,
    baselines: list[EvalModel] | None = None,
) -> DatasetRef:
    """Generate on the eval split with the reference, the trained model and any baselines; score; summarize.

    Every model is generated with the same recorded sampling settings (``eval`` and ``generation``
    sections), so its ``eval_generations`` version is reused whenever the same model is evaluated again.
    """
    from pipeline.evaluation.metrics import summarize
    from pipeline.generation.worker import run_generation
    from pipeline.scoring.stage import score_generations

    store = _store(config)
    eval_settings = config.eval.model_dump(mode="json")
    eval_prompts = [r for r in store.read_rows(prompts) if r["split"] == "eval"]
    if not eval_prompts:
        raise ValueError(f"{prompts.name} has no eval-split prompts (prompts.eval_fraction is too small)")
    by_id = {p["prompt_id"]: p for p in eval_prompts}

    def eval_generations(
        label: str, model_path: str, identity: str, extra_parents: list[DatasetRef]
    ) -> DatasetRef:
        def compute() -> tuple[pa.Table, list[dict[str, Any]]]:
            rows = run_generation(
                model_path,
                eval_prompts,
                config.generation,
                model_label=identity,
                trust_remote_code=config.model.trust_remote_code,
                samples_per_prompt=config.eval.samples_per_prompt,
                temperature=config.eval.temperature,
            )
            scored = score_generations(rows, by_id, config.scoring.scorers)
            scores = {s["generation_id"]: s for s in scored.rows}
            kept = []
            for row in rows:
                if row["generation_id"] in scores:
                    score = scores[row["generation_id"]]
                    kept.append(
                        {**row, "model_label": label, "score": score["score"], "checks": score["checks"]}
                    )
            return _table("eval_generations", kept), scored.rejects

        settings = {
            "label": label,
            "model": identity,
            "eval": eval_settings,
            "generation": config.generation.model_dump(mode="json"),
            "scoring": config.scoring.model_dump(mode="json"),
        }
        return _materialize(store, "eval_generations", settings, [prompts, *extra_parents], compute)

    reference = eval_generations(
        "reference", resolve_model_path(config.model), model_identity(config.model), []
    )
    trained = eval_generations("trained", checkpoint, checkpoint, [parent])
    others = [eval_generations(b.label, b.checkpoint, b.checkpoint, [b.parent]) for b in baselines or []]

    def compute_results() -> tuple[pa.Table, list[dict[str, Any]]]:
        rows = [row for ref in (reference, trained, *others) for row in store.read_rows(ref)]
        results = summarize(
            rows,
            reference_label="reference",
            bootstrap_samples=config.eval.bootstrap_samples,
            seed=config.eval.seed,
            judgements=_pairwise_judgements(config, rows, by_id) if config.eval.pairwise_judge else None,
        )
        return _table("eval_results", results), []

    return _materialize(store, "eval_results", eval_settings, [reference, trained, *others], compute_results)


def _pairwise_judgements(
    config: PipelineConfig, rows: list[dict[str, Any]], prompts: dict[str, dict[str, Any]]
) -> dict[tuple[str, str], list[Any]]:
    """Both-order verdicts of the configured pairwise judge, per (model label, mode), vs the reference."""
    from pipeline.evaluation.pairwise_judge import items_against_reference, judge_against_reference
    from pipeline.scoring.openai_chat import OpenAIChatClient

    assert config.eval.pairwise_judge is not None
    logger = get_run_logger()
    texts = {pid: p["prompt"] for pid, p in prompts.items()}
    client = OpenAIChatClient.from_options(config.eval.pairwise_judge)
    out: dict[tuple[str, str], list[Any]] = {}
    try:
        for label in sorted({r["model_label"] for r in rows} - {"reference"}):
            for mode in ("trace", "empty"):
                items = items_against_reference(rows, texts, label, mode, "reference")
                result = judge_against_reference(client, items)
                if result.unreadable:
                    logger.warning(
                        "pairwise judge: %d of %d verdicts for %s (%s) were unreadable and count as ties",
                        result.unreadable, 2 * len(items), label, mode,
                    )  # fmt: skip
                out[(label, mode)] = result.judgements
    finally:
        client.close()
    return out


@task(name="eval-report", cache_policy=NO_CACHE, timeout_seconds=600)
def eval_report_task(config: PipelineConfig, results: DatasetRef) -> tuple[Path, Path]:
    """The comparison report of an ``eval_results`` version: Markdown + PNG in ``<workspace>/reports/``."""
    from pipeline.evaluation.report import write_comparison_report

    store = _store(config)
    return write_comparison_report(
        store.read_rows(results), store.workspace / "reports" / f"{results.name}-{results.version}"
    )


def read_rows(config: PipelineConfig, ref: DatasetRef) -> list[dict[str, Any]]:
    """Rows of a registered dataset (for summaries and artifacts in flows)."""
    return _store(config).read_rows(ref)


def workspace_paths(config: PipelineConfig) -> dict[str, Path]:
    store = _store(config)
    return {"workspace": store.workspace, "lake": store.lake, "catalog": store.catalog.path}
