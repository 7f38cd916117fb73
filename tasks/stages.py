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
from pipeline.isolation import isolated, run_isolated
from pipeline.models import model_identity, resolve_model_path
from pipeline.reporting.stage_timing import note_engine_start, timed_stage
from storage import DatasetRef, DatasetStore, schema_for, version_key
from storage.lineage import ancestors_of_kind
from tasks.orchestration import GPU_TAG, HOUR, TRANSIENT_RETRIES
from tasks.policy import model_round, policy_model, reference_model, round_tag


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
    with timed_stage(store.workspace, _flow_run_id(), kind) as timing:  # the run's stage-timing table
        found = store.lookup(kind, config, parents)
        if found is not None:
            logger.info("%s: reusing %s (%d rows, same inputs and config)", kind, found.name, found.row_count)
            timing.reused, timing.rows = True, found.row_count
            return found
        table, rejects = compute()
        timing.produced(kind, table)
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
    """The sampling model (generation.policy) and the settings that decide the samples (+ the round)."""
    model = model_identity(policy_model(config))
    return {"model": model, "generation": config.generation.fingerprint()} | round_tag(config)


@task(name="generate", cache_policy=NO_CACHE, tags=[GPU_TAG], timeout_seconds=12 * HOUR, **TRANSIENT_RETRIES)
def generate_task(config: PipelineConfig, prompts: DatasetRef, since: DatasetRef | None = None) -> DatasetRef:
    """Generate for the train split of ``prompts``; with ``since`` (an earlier prompts version), only for
    the prompts it does not hold (an incremental refresh)."""
    from pipeline.generation.shards import ShardStore
    from pipeline.generation.stage import describe_event, run_generate_stage
    from pipeline.generation.stats import generation_stats

    store = _store(config)
    logger = get_run_logger()
    settings = _generation_config(config)
    if since is not None:
        settings["new_since"] = since.qualified
    sampler = policy_model(config)
    # Finished shards persist here, keyed by the version they will form: a rerun resumes from them.
    key = version_key("generations", settings, [prompts])
    staging = ShardStore(store.workspace / "staging" / "generations" / key)
    run: dict[str, Any] = {}

    def on_event(event: dict[str, Any]) -> None:
        logger.info("generate: %s", describe_event(event))
        if event.get("event") == "engine_ready":
            note_engine_start()

    def compute() -> tuple[pa.Table, list[dict[str, Any]]]:
        known = {r["prompt_id"] for r in store.read_rows(since)} if since is not None else set()
        rows = [r for r in store.read_rows(prompts) if r["split"] == "train" and r["prompt_id"] not in known]
        if not rows:
            new = f" not in {since.name}" if since is not None else ""
            raise ValueError(f"{prompts.name} has no train-split prompts{new} to generate for")
        logger.info("generate: %d train prompt(s) of %s%s", len(rows), prompts.name, _since(since))
        result = run_generate_stage(
            resolve_model_path(sampler),
            rows,
            config.generation,
            model_label=model_identity(sampler),
            staging_dir=staging.root,
            trust_remote_code=sampler.trust_remote_code,
            on_event=on_event,
            train_max_length=config.train.max_length,
        )
        for warning in result.warnings:
            logger.warning("generate: %s", warning)
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


def _since(since: DatasetRef | None) -> str:
    return f" (new since {since.name})" if since is not None else ""


@task(name="score", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)  # no timeout: math-verify uses SIGALRM
def score_task(config: PipelineConfig, prompts: DatasetRef, generations: DatasetRef) -> DatasetRef:
    from pipeline.scoring.stage import score_generations

    store = _store(config)

    def compute() -> tuple[pa.Table, list[dict[str, Any]]]:
        by_id = {p["prompt_id"]: p for p in store.read_rows(prompts)}
        # In a child process: a reward model's weights leave with it (pipeline/isolation.py).
        result = run_isolated(score_generations, store.read_rows(generations), by_id, config.scoring)
        return _table("scores", result.rows), result.rejects

    settings = config.scoring.model_dump(mode="json") | round_tag(config)
    return _materialize(store, "scores", settings, [prompts, generations], compute)


@task(name="pair", cache_policy=NO_CACHE, timeout_seconds=HOUR, **TRANSIENT_RETRIES)
def pair_task(
    config: PipelineConfig, generations: DatasetRef, scores: DatasetRef
) -> tuple[DatasetRef, DatasetRef]:
    from pipeline.pairing import build_pairs

    store = _store(config)
    parents = [generations, scores]
    settings = config.pairing.model_dump(mode="json") | round_tag(config)
    cached = [store.lookup(kind, settings, parents) for kind in ("pairs_trace", "pairs_empty")]
    if cached[0] is not None and cached[1] is not None:
        return cached[0], cached[1]
    result = build_pairs(store.read(generations), store.read(scores), config.pairing)
    pairing_stats_artifact(result.stats, settings)
    trace = _materialize(
        store, "pairs_trace", settings, parents, lambda: (result.pairs_trace, result.rejects)
    )
    empty = _materialize(store, "pairs_empty", settings, parents, lambda: (result.pairs_empty, []))
    return trace, empty


def pairing_stats_artifact(stats: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """Log pairs and drops per mode and publish them as the ``pairing-stats`` table artifact."""
    logger = get_run_logger()
    for row in stats:
        dropped = {k.removeprefix("dropped_"): v for k, v in row.items() if k.startswith("dropped_") and v}
        logger.info(
            "pairs %s: %d of %d prompts; dropped %s", row["mode"], row["pairs"], row["prompts"], dropped
        )
    create_table_artifact(
        key="pairing-stats",
        table=[{k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()} for row in stats],
        description=f"Pairs per mode, drops by reason, unusable answers, margins. Policy: {settings}",
    )


@task(
    name="reference-logps",
    cache_policy=NO_CACHE,
    tags=[GPU_TAG],
    timeout_seconds=12 * HOUR,
    **TRANSIENT_RETRIES,
)
def reference_logps_task(
    config: PipelineConfig,
    pairs_trace: DatasetRef,
    pairs_empty: DatasetRef,
    previous: list[DatasetRef] | None = None,
) -> DatasetRef:
    """Reference log-probs of D_t and D_e. ``previous``: the D_t and D_e these grew from (an incremental
    refresh); when their reference log-probs with the same settings exist, only the new pairs are scored."""
    from pipeline.generation.precision import resolve_vllm_dtype
    from pipeline.pair_union import union_by_key
    from pipeline.training.precision import resolve_bf16
    from pipeline.training.reference import compute_reference_logps

    store = _store(config)
    train = config.train
    reference = reference_model(config)
    bf16 = resolve_bf16(train.bf16)  # the precision actually used ('auto' depends on the machine)
    settings = {
        "ref_model": model_identity(reference),
        "max_length": train.max_length,
        "bf16": bf16,
        "truncation": train.truncation,
        "append_eos": train.append_eos,
    } | round_tag(config)

    def compute() -> tuple[pa.Table, list[dict[str, Any]]]:
        earlier = store.lookup("ref_logps", settings, previous) if previous else None
        pairs = {"trace": store.read_rows(pairs_trace), "empty": store.read_rows(pairs_empty)}
        if earlier is not None and previous:
            done = {r["pair_id"] for ref in previous for r in store.read(ref).select(["pair_id"]).to_pylist()}
            pairs = {mode: [p for p in rows if p["pair_id"] not in done] for mode, rows in pairs.items()}
            get_run_logger().info(
                "reference-logps: %d new pair(s); %s holds the other %d",
                sum(map(len, pairs.values())),
                earlier.name,
                earlier.row_count,
            )
            if not any(pairs.values()):
                return store.read(earlier), []
        result = run_isolated(  # in a child process: the model's memory leaves with it
            compute_reference_logps,
            resolve_model_path(reference),
            pairs,
            model_label=model_identity(reference),
            max_length=train.max_length,
            bf16=bf16,
            truncation=train.truncation,
            append_eos=train.append_eos,
            # Grown incrementally: the new pairs were sampled in the nearest generations dataset.
            generations=_sampled_generations(store, pairs_trace, nearest=earlier is not None),
            sampler_dtype=resolve_vllm_dtype(config.generation.dtype),
            trust_remote_code=reference.trust_remote_code,
        )
        if result.agreement:  # registered before ref_logps (like rejects): a crash leaves no gap
            _register_agreement(config, store, settings, [pairs_trace, pairs_empty], result.agreement)
        table = _table("ref_logps", result.rows)
        if earlier is not None:
            table = union_by_key(store.read(earlier), table, "pair_id", "ref_logps")
        return table, result.rejects

    return _materialize(store, "ref_logps", settings, [pairs_trace, pairs_empty], compute)


def _sampled_generations(
    store: DatasetStore, pairs: DatasetRef, nearest: bool = False
) -> dict[str, dict[str, Any]] | None:
    """Generation rows by id, when the pairs were sampled here (imported pairs have none); ``nearest``:
    only those of the nearest generations dataset (pairs grown incrementally have one per refresh)."""
    try:
        found = ancestors_of_kind(store, pairs, "generations")
    except ValueError:
        return None
    found = found[:1] if nearest else found
    columns = ["generation_id", "response_segments", "sampler_logprobs"]
    out: dict[str, dict[str, Any]] = {}
    for generations in found:
        table = store.read(generations)
        if "sampler_logprobs" not in table.column_names:
            return None
        out.update({r["generation_id"]: r for r in table.select(columns).to_pylist()})
    return out


def _register_agreement(
    config: PipelineConfig,
    store: DatasetStore,
    settings: dict[str, Any],
    parents: list[DatasetRef],
    rows: list[dict[str, Any]],
) -> None:
    """Register the sampler/trainer agreement summary, show it as an artifact and warn on drift."""
    from pipeline.training.reference import agreement_warnings

    logger = get_run_logger()
    found = store.put(
        "logp_agreement",
        _table("logp_agreement", rows),
        config={"for": "ref_logps", **settings},
        parents=parents,
        flow_run_id=_flow_run_id(),
    )
    create_table_artifact(
        key="logp-agreement",
        table=[{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
        description=f"Sampler vs reference log-probs per sampled token ({found.name}); "
        "see docs/method.md §Token-exact sequences.",
    )
    for warning in agreement_warnings(rows, config.train.agreement_warn_mean_abs):
        logger.warning(warning)


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
    # train.reference is recorded by ref_logps (a parent): its settings name the reference model.
    start = policy_model(config)  # on-policy rounds start from the sampling checkpoint
    settings = {
        "model": model_identity(start),
        "train": config.train.model_dump(mode="json", exclude=trackers | {"reference"}),
    } | round_tag(config)
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

        result = run_isolated(  # in a child process: model and optimizer memory leave with it
            train_bvpo,
            resolve_model_path(start),
            store.read_rows(pairs_trace),
            store.read_rows(pairs_empty),
            store.read_rows(ref_logps),
            config.train,
            checkpoint,
            trust_remote_code=start.trust_remote_code,
            callbacks={"on_step": log_step},
            generations=_generation_rows(store, pairs_trace) if probe else None,
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


def _generation_rows(store: DatasetStore, pairs: DatasetRef) -> list[dict[str, Any]]:
    """Every generation row behind ``pairs`` (several datasets when it grew incrementally)."""
    return [row for ref in ancestors_of_kind(store, pairs, "generations") for row in store.read_rows(ref)]


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
    """Evaluate the reference, the trained model and any baselines on the eval split (one vLLM engine).

    The stage itself is :func:`pipeline.evaluation.stage.run_evaluation`; models evaluated before with the
    same settings reuse their ``eval_generations`` version.
    """
    from pipeline.evaluation.stage import EvalTarget, generate_eval_rows, run_evaluation

    store = _store(config)
    targets = [
        EvalTarget("reference", resolve_model_path(config.model), model_identity(config.model), round=0),
        EvalTarget("trained", checkpoint, checkpoint, (parent,), model_round(store, parent)),
        *[
            EvalTarget(b.label, b.checkpoint, b.checkpoint, (b.parent,), model_round(store, b.parent))
            for b in baselines or []
        ],
    ]
    # Engine and scorers in a child process: their memory leaves with it (pipeline/isolation.py).
    generate = isolated(generate_eval_rows, callbacks=("on_event",))
    with timed_stage(store.workspace, _flow_run_id(), "evaluation"):  # the stage-timing table
        results, _ = run_evaluation(
            config, prompts, targets, flow_run_id=_flow_run_id(), logger=get_run_logger(), generate=generate
        )
    return results


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
