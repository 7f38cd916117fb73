"""The evaluation stage (``docs/method.md`` §Evaluation): held-out prompts, both reasoning modes, every
model through one engine, the same scorers, then ``eval_results`` with paired intervals and the MDE.

Two layers, so the heavy part can run anywhere (a child process, another machine):

- :func:`generate_eval_rows` takes plain arguments (the config, prompt rows, models) and returns scored
  rows per model: generation through one vLLM engine (:mod:`pipeline.evaluation.engine`) and scoring.
- :func:`run_evaluation` does the bookkeeping: every model's ``eval_generations`` version is looked up
  first (a model evaluated before with the same settings is not generated again), only the missing ones
  are generated, each is registered (its rejects first), and ``eval_results`` summarizes them all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.config import PipelineConfig
from pipeline.evaluation import engine as eval_engine
from pipeline.reporting.stage_timing import note_engine_start
from storage import DatasetRef, DatasetStore, schema_for

REFERENCE_LABEL = "reference"
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalTarget:
    """One model to evaluate: its label in the results, the folder to load, the name recorded for it, the
    datasets it comes from (a trained model's ``train_metrics``) and its training round (0: the base
    model; None: unknown), recorded in every ``eval_results`` row of the model."""

    label: str
    path: str
    identity: str
    parents: tuple[DatasetRef, ...] = field(default_factory=tuple)
    round: int | None = None


@dataclass(frozen=True)
class EvalOutcome:
    """Scored ``eval_generations`` rows of one model and the rows scoring rejected."""

    rows: list[dict[str, Any]]
    rejects: list[dict[str, Any]]


def eval_prompts(rows: Sequence[dict[str, Any]], name: str = "prompts") -> list[dict[str, Any]]:
    """The eval-split prompts; an error naming the dataset when there are none."""
    found = [r for r in rows if r["split"] == "eval"]
    if not found:
        raise ValueError(f"{name} has no eval-split prompts (prompts.eval_fraction is too small)")
    return found


def generate_eval_rows(
    config: PipelineConfig,
    prompts: Sequence[dict[str, Any]],
    targets: Sequence[EvalTarget],
    *,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, EvalOutcome]:
    """Generate on ``prompts`` (eval split) with every target through one engine and score the answers.

    Plain, picklable arguments and results: the rows of each label, ready for ``eval_generations``.
    """
    from pipeline.scoring.stage import score_generations

    by_id = {p["prompt_id"]: p for p in prompts}
    generated = eval_engine.generate_for_models(  # looked up here, so tests can replace the engine
        [eval_engine.EngineModel(t.label, t.path, t.identity) for t in targets],
        prompts,
        config.generation,
        trust_remote_code=config.model.trust_remote_code,
        samples_per_prompt=config.eval.samples_per_prompt,
        temperature=config.eval.temperature,
        on_event=on_event,
    )
    out: dict[str, EvalOutcome] = {}
    for target in targets:
        rows = generated[target.label]
        scored = score_generations(rows, by_id, config.scoring.scorers)
        scores = {s["generation_id"]: s for s in scored.rows}
        kept = [
            {
                **row,
                "model_label": target.label,
                "score": scores[row["generation_id"]]["score"],
                "checks": scores[row["generation_id"]]["checks"],
            }
            for row in rows
            if row["generation_id"] in scores
        ]
        out[target.label] = EvalOutcome(kept, scored.rejects)
    return out


def generation_settings(config: PipelineConfig, target: EvalTarget) -> dict[str, Any]:
    """What an ``eval_generations`` version is keyed by (with its parents: the prompts and the target's)."""
    return {
        "label": target.label,
        "model": target.identity,
        "eval": config.eval.model_dump(mode="json"),
        "generation": config.generation.model_dump(mode="json"),
        "scoring": config.scoring.model_dump(mode="json"),
    }


def table(kind: str, rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows as a table of ``kind``'s schema (missing keys are null)."""
    schema = schema_for(kind)
    if not rows:
        return schema.empty_table()
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def register(
    store: DatasetStore,
    kind: str,
    rows: Sequence[dict[str, Any]],
    rejects: Sequence[dict[str, Any]],
    *,
    config: dict[str, Any],
    parents: list[DatasetRef],
    flow_run_id: str | None,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> DatasetRef:
    """Register the rejects (if any), then the dataset: it is never visible without its rejects."""
    if rejects:
        ref = store.put(
            "rejects",
            table("rejects", rejects),
            config={"for": kind, **config},
            parents=parents,
            flow_run_id=flow_run_id,
        )
        logger.warning(
            '%s: %d row(s) rejected, see `bvpo sql "select * from %s"`', kind, len(rejects), ref.name
        )
    ref = store.put(kind, table(kind, rows), config=config, parents=parents, flow_run_id=flow_run_id)
    logger.info("%s: registered %s (%d rows)", kind, ref.name, ref.row_count)
    return ref


def run_evaluation(
    config: PipelineConfig,
    prompts: DatasetRef,
    targets: Sequence[EvalTarget],
    *,
    flow_run_id: str | None = None,
    logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    generate: Callable[..., dict[str, EvalOutcome]] = generate_eval_rows,
) -> tuple[DatasetRef, dict[str, DatasetRef]]:
    """Evaluate ``targets`` (the reference among them, labelled ``reference``) on the eval split.

    Returns the ``eval_results`` version and each label's ``eval_generations`` version. ``generate``
    replaces :func:`generate_eval_rows` (e.g. to run it in a child process).
    """
    log = logger or _LOG
    labels = [t.label for t in targets]
    if REFERENCE_LABEL not in labels:
        raise ValueError(f"an evaluation needs the '{REFERENCE_LABEL}' model, got {labels}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}")
    store = DatasetStore(config.workspace)
    rows = eval_prompts(store.read_rows(prompts), prompts.name)
    by_id = {p["prompt_id"]: p for p in rows}
    keys = {t.label: (generation_settings(config, t), [prompts, *t.parents]) for t in targets}
    refs: dict[str, DatasetRef] = {}
    for target in targets:
        found = store.lookup("eval_generations", *keys[target.label])
        if found is not None:
            log.info(
                "eval_generations: reusing %s for %s (same model and settings)", found.name, target.label
            )
            refs[target.label] = found
    missing = [t for t in targets if t.label not in refs]
    if missing:

        def on_event(event: dict[str, Any]) -> None:
            if event.get("event") == "engine_ready":
                note_engine_start()  # the run's stage-timing table (pipeline/reporting/stage_timing.py)
            if event.get("event") in ("engine_ready", "weights_loaded", "model_done"):
                log.info(
                    "evaluate: %s %s after %.1f s", event["event"], event.get("label", ""), event["seconds"]
                )

        outcomes = generate(config, rows, missing, on_event=on_event)
        for target in missing:
            outcome = outcomes[target.label]
            settings, parents = keys[target.label]
            refs[target.label] = register(
                store, "eval_generations", outcome.rows, outcome.rejects,
                config=settings, parents=parents, flow_run_id=flow_run_id, logger=log,
            )  # fmt: skip
    ordered = [refs[label] for label in labels]
    eval_settings = config.eval.model_dump(mode="json")
    found = store.lookup("eval_results", eval_settings, ordered)
    if found is not None:
        return found, refs
    all_rows = [row for ref in ordered for row in store.read_rows(ref)]
    rounds = {t.label: t.round for t in targets}
    results = [{**r, "round": rounds[r["model_label"]]} for r in summarize_rows(config, all_rows, by_id, log)]
    ref = register(
        store, "eval_results", results, [],
        config=eval_settings, parents=ordered, flow_run_id=flow_run_id, logger=log,
    )  # fmt: skip
    return ref, refs


def summarize_rows(
    config: PipelineConfig,
    rows: Sequence[dict[str, Any]],
    prompts: dict[str, dict[str, Any]],
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> list[dict[str, Any]]:
    """``eval_results`` rows of scored eval generations (with the pairwise judge when one is configured)."""
    from pipeline.evaluation.metrics import summarize

    judgements = pairwise_judgements(config, rows, prompts, logger) if config.eval.pairwise_judge else None
    return summarize(
        rows,
        reference_label=REFERENCE_LABEL,
        bootstrap_samples=config.eval.bootstrap_samples,
        seed=config.eval.seed,
        judgements=judgements,
    )


def pairwise_judgements(
    config: PipelineConfig,
    rows: Sequence[dict[str, Any]],
    prompts: dict[str, dict[str, Any]],
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> dict[tuple[str, str], list[Any]]:
    """Both-order verdicts of the configured pairwise judge, per (model label, mode), vs the reference."""
    from pipeline.evaluation.pairwise_judge import items_against_reference, judge_against_reference
    from pipeline.scoring.openai_chat import OpenAIChatClient

    assert config.eval.pairwise_judge is not None
    texts = {pid: p["prompt"] for pid, p in prompts.items()}
    client = OpenAIChatClient.from_options(config.eval.pairwise_judge)
    out: dict[tuple[str, str], list[Any]] = {}
    try:
        for label in sorted({r["model_label"] for r in rows} - {REFERENCE_LABEL}):
            for mode in ("trace", "empty"):
                items = items_against_reference(list(rows), texts, label, mode, REFERENCE_LABEL)
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
