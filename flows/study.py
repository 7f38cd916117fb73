"""The ``study`` flow: does BVPO beat plain DPO on this data? (``docs/method.md`` §Statistics)

One data refresh and one reference pass shared by every arm; arms over an α grid × seeds, every one
trained with the same pairs and tokens per step (``train.budget: matched``) for the same steps; every
arm's checkpoint and the reference evaluated on the same eval set in both modes through one engine; then
``study_results`` (paired intervals against the reference and the better of α = 0 and α = 1, seed
spread, minimum detectable difference) and a report (Markdown + PNG: score against α, α̂* marked).

The eval set is sized for its job: with the built-in prompts, the study adds eval prompts until the
planned minimum detectable difference is ``target_mde`` (for a per-prompt difference SD of
``planning_sd``), keeping the train prompts of the config.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from flows.pipeline import DataRefreshOutput, data_refresh
from pipeline.config import PipelineConfig
from pipeline.evaluation.paired import prompts_needed
from pipeline.evaluation.study import Arm, arms_of
from storage import DatasetRef
from tasks.stages import EvalModel, TrainOutput, train_task
from tasks.study import evaluate_arms_task, study_results_task

DEFAULT_ALPHAS = ["0", "0.25", "0.5", "0.75", "1", "auto"]
DEFAULT_SEEDS = [0, 1]


class StudyArmOutput(BaseModel):
    alpha: str
    seed: int
    label: str
    train: TrainOutput


class StudyOutput(BaseModel):
    data: DataRefreshOutput
    arms: list[StudyArmOutput]
    eval_results: DatasetRef
    study_results: DatasetRef
    report: str
    chart: str
    eval_prompts_planned: int | None = None


def size_eval_set(
    config: PipelineConfig, eval_prompts: int | None, target_mde: float, planning_sd: float
) -> tuple[PipelineConfig, int | None]:
    """``config`` with the built-in prompt set grown to about ``eval_prompts`` eval prompts (default: what
    ``target_mde`` needs at ``planning_sd``), the train prompts kept; other sources are left as they are.

    Returns the config and the planned eval prompts (None: not resized). The split is by hash, so the eval
    count lands near the plan, not on it; the report gives the real one.
    """
    if config.prompts.source != "builtin":
        return config, None
    planned = eval_prompts if eval_prompts is not None else prompts_needed(target_mde, planning_sd)
    if planned < 1:
        raise ValueError(f"eval_prompts must be at least 1, got {planned}")
    train = round(config.prompts.num_prompts * (1 - config.prompts.eval_fraction))
    total = train + planned
    prompts = config.prompts.model_copy(update={"num_prompts": total, "eval_fraction": planned / total})
    return config.model_copy(update={"prompts": prompts}), planned


def arm_config(config: PipelineConfig, arm: Arm) -> PipelineConfig:
    """``config`` training with the arm's α and seed; every other setting shared by all arms."""
    alpha: float | str = arm.alpha if arm.alpha == "auto" else float(arm.alpha)
    train = config.train.model_copy(update={"alpha": alpha, "seed": arm.seed})
    return config.model_copy(update={"train": train})


@flow(name="study", log_prints=True)
def study(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008
    alphas: list[str] = DEFAULT_ALPHAS,
    seeds: list[int] = DEFAULT_SEEDS,
    eval_prompts: int | None = None,
    target_mde: float = 0.1,
    planning_sd: float = 0.5,
) -> StudyOutput:
    """An α study: arms over an α grid × seeds on shared data, evaluated together, with paired intervals.

    Args:
        config: The pipeline configuration; every arm uses its train section, with its own α and seed.
        alphas: The α grid: numbers in [0, 1] and/or 'auto' (the gradient probe's α̂*).
        seeds: Training seeds of every α (sampling order of the pairs).
        eval_prompts: Eval prompts to build (built-in prompts only). Empty: sized from target_mde.
        target_mde: The smallest score difference the eval set should resolve (95% level, 80% power).
        planning_sd: The SD of per-prompt score differences assumed when sizing (0.5: the most a
            difference of two scores in [0, 1] that agree on half the prompts can have).
    """
    arms = arms_of(alphas, seeds)
    sized, planned = size_eval_set(config, eval_prompts, target_mde, planning_sd)
    if planned is not None:
        why = "as asked" if eval_prompts is not None else f"for an MDE of {target_mde} at SD {planning_sd}"
        print(f"study: about {planned} eval prompts ({why})")
    data = data_refresh(sized)
    trained: list[StudyArmOutput] = []
    for arm in arms:
        out = train_task.with_options(name=f"train-{arm.label}")(
            arm_config(sized, arm), data.pairs_trace, data.pairs_empty, data.ref_logps
        )
        trained.append(StudyArmOutput(alpha=arm.alpha, seed=arm.seed, label=arm.label, train=out))
        print(f"study: trained {arm.label} -> {out.metrics.name}")
    models = [
        EvalModel(label=t.label, checkpoint=t.train.checkpoint, parent=t.train.metrics) for t in trained
    ]
    results, generations = evaluate_arms_task(sized, data.prompts, models)
    pairs = [(Arm(t.alpha, t.seed), t.train.metrics) for t in trained]
    ref, markdown, chart = study_results_task(sized, pairs, generations, sized.eval.bootstrap_samples)
    create_markdown_artifact(key="study-report", markdown=Path(markdown).read_text(encoding="utf-8"))
    print(f"study: {ref.name} ({ref.row_count} rows), report {markdown}")
    return StudyOutput(
        data=data,
        arms=trained,
        eval_results=results,
        study_results=ref,
        report=str(markdown),
        chart=str(chart),
        eval_prompts_planned=planned,
    )
