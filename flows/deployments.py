"""Deployments of the four flows and the α study, the eval-after-train trigger, the GPU concurrency
limit, and serving.

``bvpo serve`` registers the deployments below on a Prefect API and executes their runs in this process
(a ``Runner``); ``bvpo deploy --work-pool NAME`` registers the same deployments on a work pool instead, so
workers on a cluster (e.g. one per GPU node) execute them.

Eval after train: the ``evaluate`` deployment carries a deployment trigger (a Prefect automation) that
fires on ``prefect.flow-run.Completed`` events of runs of the ``train_bvpo`` deployment. Its parameters
are Jinja templates rendered by the server from the completed run: the run's own ``config`` and its id,
from which ``evaluate`` reads the checkpoint the run recorded (artifact ``bvpo-checkpoint``).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from prefect.client.schemas.objects import StateType
from prefect.events import DeploymentEventTrigger
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.flows import EntrypointType
from prefect.schedules import Cron
from pydantic import BaseModel, Field, field_validator, model_validator

from flows.incremental import NEW_PAIRS_EVENT
from flows.pipeline import bvpo_pipeline, data_refresh, evaluate, train_bvpo
from flows.study import study
from pipeline.config import PipelineConfig
from tasks.orchestration import GPU_TAG

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DATA_REFRESH = "data-refresh"
TRAIN = "train-bvpo"
EVALUATE = "evaluate"
PIPELINE = "bvpo-pipeline"
STUDY = "study"
PROJECT_TAG = "bvpo"
CRASH_AUTOMATION = "bvpo: mark flow runs without heartbeat as crashed"


class ServeOptions(BaseModel):
    """How ``bvpo serve`` / ``bvpo deploy`` register the deployments."""

    refresh_cron: str | None = Field(
        "0 3 * * *", description="Cron schedule of data_refresh (None: no schedule, runs on demand only)."
    )
    timezone: str = Field("UTC", description="Time zone of the cron schedule.")
    gpu_slots: int = Field(
        1, ge=0, description="Tasks tagged 'gpu' that may run at once, over all flows (0: no limit)."
    )
    reset_gpu_slots: bool = Field(
        False, description="Recreate the 'gpu' limit with every slot free (after a crash, nothing running)."
    )
    eval_after_train: bool = Field(
        True, description="Evaluate each checkpoint when its training run completes."
    )
    heartbeat_seconds: int | None = Field(
        30,
        ge=30,
        description="Flow-run heartbeats (Prefect allows >= 30 s); runs silent for 3 beats are marked "
        "Crashed (None: off).",
    )
    limit: int | None = Field(None, ge=1, description="Flow runs this process executes at once (None: any).")
    train_min_new_pairs: int | None = Field(
        None,
        ge=1,
        description="Train when a data-refresh run registered at least this many new pairs per mode "
        "(sets refresh.train_min_new_pairs of the deployments' config; None: the config's value).",
    )

    @field_validator("refresh_cron")
    @classmethod
    def _no_schedule(cls, value: str | None) -> str | None:
        return None if value is None or value.strip().lower() in ("", "none", "off") else value

    @model_validator(mode="after")
    def _valid_schedule(self) -> ServeOptions:
        from prefect.client.schemas.schedules import CronSchedule

        if self.refresh_cron is not None:  # raises on a malformed expression or an unknown time zone
            CronSchedule(cron=self.refresh_cron, timezone=self.timezone)
        return self


def eval_after_train_trigger() -> DeploymentEventTrigger:
    """Trigger of the ``evaluate`` deployment: a completed run of the ``train_bvpo`` deployment.

    Subflow runs of ``train_bvpo`` inside ``bvpo_pipeline`` have no deployment, so they do not match (that
    flow evaluates inline).
    """
    return DeploymentEventTrigger(
        name="evaluate after train_bvpo",
        description="Evaluate the checkpoint of every completed train_bvpo deployment run.",
        expect={"prefect.flow-run.Completed"},
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related=[
            {"prefect.resource.role": "flow", "prefect.resource.name": "train_bvpo"},
            {"prefect.resource.role": "deployment", "prefect.resource.name": TRAIN},
        ],
        for_each={"prefect.resource.id"},
        posture=Posture.Reactive,
        threshold=1,
        parameters={
            "config": _triggering_run_config(),
            "train_run_id": {"__prefect_kind": "jinja", "template": "{{ flow_run.id }}"},
        },
    )


def _triggering_run_config() -> dict[str, Any]:
    """A trigger parameter: the config of the flow run whose event fired it, as JSON (not a string)."""
    return {
        "__prefect_kind": "json",
        "value": {"__prefect_kind": "jinja", "template": "{{ flow_run.parameters.config | tojson }}"},
    }


def train_after_refresh_trigger() -> DeploymentEventTrigger:
    """Trigger of the ``train-bvpo`` deployment: a data-refresh run announced enough new pairs.

    The refresh itself decides (``refresh.train_min_new_pairs``, flows/incremental.py) and emits the event
    only from a deployment's own run, so the data_refresh subflow of a training never starts another one.
    The training gets the refresh's config; its own data_refresh subflow reuses every dataset.
    """
    return DeploymentEventTrigger(
        name="train after data-refresh",
        description="Train after a data-refresh run with enough new pairs (refresh.train_min_new_pairs).",
        expect={NEW_PAIRS_EVENT},
        match={"prefect.resource.id": "prefect.flow-run.*"},
        for_each={"prefect.resource.id"},
        posture=Posture.Reactive,
        threshold=1,
        parameters={"config": _triggering_run_config()},
    )


def crashed_run_automation(heartbeat_seconds: int) -> AutomationCore:
    """Mark a flow run of this project Crashed when its process stops sending heartbeats.

    A run whose serving process died (killed, machine lost) otherwise stays Running for ever in the UI.
    """
    return AutomationCore(
        name=CRASH_AUTOMATION,
        description=f"No heartbeat for {3 * heartbeat_seconds} s from a running flow run "
        f"tagged '{PROJECT_TAG}'.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={
                "prefect.resource.role": "tag",
                "prefect.resource.id": f"prefect.tag.{PROJECT_TAG}",
            },
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=3 * heartbeat_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message="The process running this flow stopped sending heartbeats (killed or lost).",
            )
        ],
    )


def build_deployments(config: PipelineConfig, options: ServeOptions) -> list[RunnerDeployment]:
    """The five deployments (four flows and the α study), with ``config`` as their forms' defaults."""
    config = config.model_copy(update={"workspace": config.workspace.resolve()})
    if options.train_min_new_pairs is not None:
        refresh = config.refresh.model_copy(update={"train_min_new_pairs": options.train_min_new_pairs})
        config = config.model_copy(update={"refresh": refresh})
    params: dict[str, Any] = {"config": config.model_dump(mode="json")}
    common: dict[str, Any] = {
        "parameters": params,
        "tags": [PROJECT_TAG],
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }
    schedules = [Cron(options.refresh_cron, timezone=options.timezone)] if options.refresh_cron else []
    triggers = [eval_after_train_trigger()] if options.eval_after_train else []
    train_triggers = [train_after_refresh_trigger()] if config.refresh.train_min_new_pairs else []
    return [
        data_refresh.to_deployment(
            DATA_REFRESH,
            schedules=schedules,
            description="prompts → generate → score → pair → reference log-probs (reuses what exists).",
            **common,
        ),
        train_bvpo.to_deployment(
            TRAIN,
            triggers=train_triggers,
            description="BVPO training; resolves its datasets through data_refresh. Runs after a refresh "
            "with enough new pairs (refresh.train_min_new_pairs).",
            **common,
        ),
        evaluate.to_deployment(
            EVALUATE,
            triggers=triggers,
            description="Reference vs trained checkpoint (default: the latest). Runs after each training.",
            **common,
        ),
        bvpo_pipeline.to_deployment(
            PIPELINE, description="The whole job: data refresh, training, evaluation.", **common
        ),
        study.to_deployment(
            STUDY,
            description="α grid × seeds on one data refresh, evaluated together: paired intervals, MDE.",
            **common,
        ),
    ]


async def configure_api(options: ServeOptions) -> None:
    """Create (or update) the GPU concurrency limit and the crashed-run automation on the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        if options.gpu_slots <= 0 or options.reset_gpu_slots:
            # Deleting also revokes the slots' leases (`prefect concurrency-limit reset` in Prefect 3.6
            # revokes them without releasing their slots, which leaves the limit stuck).
            with contextlib.suppress(ObjectNotFound):
                await client.delete_concurrency_limit_by_tag(GPU_TAG)
        if options.gpu_slots > 0:
            await client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=options.gpu_slots)
        wanted = crashed_run_automation(options.heartbeat_seconds) if options.heartbeat_seconds else None
        existing = await client.read_automations_by_name(CRASH_AUTOMATION)
        # Keep an identical automation: recreating it would forget the runs it is watching (a restart of
        # `bvpo serve` after a crash must still see the dead run go silent).
        if wanted is not None and len(existing) == 1 and _same_automation(existing[0], wanted):
            return
        for automation in existing:
            await client.delete_automation(automation.id)
        if wanted is not None:
            await client.create_automation(wanted)


def _same_automation(found: AutomationCore, wanted: AutomationCore) -> bool:
    return (found.trigger, found.actions, found.enabled) == (wanted.trigger, wanted.actions, wanted.enabled)


def ui_url() -> str | None:
    """The Prefect UI address of the API this process talks to."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    url = PREFECT_UI_URL.value()
    if url:
        return str(url)
    api = PREFECT_API_URL.value()
    return str(api).removesuffix("/").removesuffix("/api") if api else None


def serve_deployments(config: PipelineConfig, options: ServeOptions) -> None:
    """Register the deployments and execute their runs here until interrupted."""
    from prefect import serve

    deployments = build_deployments(config, options)
    asyncio.run(configure_api(options))
    url = ui_url()
    print(f"Prefect UI: {url}  (deployments: {url}/deployments)", flush=True)
    serve(*deployments, limit=options.limit, heartbeat_seconds=options.heartbeat_seconds)


def deploy_to_work_pool(
    config: PipelineConfig, options: ServeOptions, work_pool: str, job_variables: dict[str, Any] | None = None
) -> list[str]:
    """Register the deployments on ``work_pool`` (workers there run them); returns their ids."""
    ids = []
    asyncio.run(configure_api(options))
    for deployment in build_deployments(config, options):
        if job_variables:
            deployment.job_variables = dict(job_variables)
        ids.append(str(deployment.apply(work_pool_name=work_pool)))
    return ids
