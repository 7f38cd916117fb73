"""Orchestration without a server: task policies, deployments, the eval-after-train trigger, CLI checks."""

from __future__ import annotations

import copy
import errno
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from flows.deployments import (
    DATA_REFRESH,
    EVALUATE,
    PIPELINE,
    STUDY,
    TRAIN,
    ServeOptions,
    build_deployments,
    crashed_run_automation,
    eval_after_train_trigger,
)
from pipeline.config import PipelineConfig
from storage import CatalogError, DatasetStore, schema_for
from tasks.orchestration import GPU_TAG, is_transient, retry_if_transient

ROOT = Path(__file__).resolve().parents[1]


# --- task policies -----------------------------------------------------------------------------------


def test_gpu_bound_tasks_carry_the_gpu_tag_and_others_do_not() -> None:
    from tasks import stages

    gpu = {"generate_task", "reference_logps_task", "train_task", "evaluate_task"}
    for name in ("prompts_task", "score_task", "pair_task", "training_plot_task", *gpu):
        task = getattr(stages, name)
        assert (GPU_TAG in task.tags) == (name in gpu), name


def test_stage_tasks_retry_only_transient_failures_and_have_timeouts() -> None:
    from tasks import stages

    for name in ("prompts_task", "generate_task", "score_task", "pair_task", "reference_logps_task"):
        task = getattr(stages, name)
        assert task.retries == 2 and task.retry_condition_fn is retry_if_transient, name
    assert stages.train_task.retry_condition_fn is retry_if_transient
    assert stages.training_plot_task.retries == 0
    for name in ("prompts_task", "generate_task", "pair_task", "reference_logps_task", "train_task"):
        assert getattr(stages, name).timeout_seconds, name
    # Scoring calls math-verify, whose own timeouts use SIGALRM: a Prefect alarm there would be cancelled.
    assert stages.score_task.timeout_seconds is None
    assert stages.evaluate_task.timeout_seconds is None


def _chained() -> RuntimeError:
    try:
        try:
            raise ConnectionRefusedError("engine not up yet")
        except ConnectionRefusedError as inner:
            raise RuntimeError("generation failed") from inner
    except RuntimeError as outer:
        return outer


def test_transient_failures_are_told_apart_from_permanent_ones() -> None:
    from prefect.task_engine import TaskRunTimeoutError

    request = httpx.Request("POST", "http://127.0.0.1:8000/v1/completions")
    transient = [
        ConnectionResetError("reset"),
        TimeoutError("read timed out"),
        OSError(errno.EIO, "I/O error"),
        httpx.ConnectError("refused", request=request),
        httpx.HTTPStatusError("503", request=request, response=httpx.Response(503, request=request)),
        CatalogError("catalog /w/catalog.duckdb is busy: lock timeout"),
        _chained(),
    ]
    permanent = [
        ValueError("no usable prompts"),
        FileNotFoundError(errno.ENOENT, "no checkpoint"),
        KeyError("prompt"),
        httpx.HTTPStatusError("400", request=request, response=httpx.Response(400, request=request)),
        CatalogError("no registered dataset matches 'x'"),
        TaskRunTimeoutError("Scope timed out after 60 second(s)."),
        MemoryError(),
    ]
    assert all(is_transient(exc) for exc in transient), [e for e in transient if not is_transient(e)]
    assert not any(is_transient(exc) for exc in permanent), [e for e in permanent if is_transient(e)]
    marked = ValueError("rate limited")
    marked.transient = True  # type: ignore[attr-defined]
    assert is_transient(marked)


def test_retry_condition_reads_the_exception_of_the_failed_state() -> None:
    from prefect.states import Failed

    assert retry_if_transient(None, None, Failed(data=ConnectionRefusedError()))
    assert not retry_if_transient(None, None, Failed(data=ValueError("bad config")))


# --- deployments and triggers ------------------------------------------------------------------------


@pytest.fixture()
def config(tmp_path: Path) -> PipelineConfig:
    return PipelineConfig(workspace=tmp_path / "ws")


def test_five_deployments_with_typed_forms_schedule_and_tags(config: PipelineConfig) -> None:
    deployments = {d.name: d for d in build_deployments(config, ServeOptions(refresh_cron="0 */6 * * *"))}
    assert set(deployments) == {DATA_REFRESH, TRAIN, EVALUATE, PIPELINE, STUDY}
    assert {d.entrypoint for d in deployments.values()} == {
        "flows.pipeline.data_refresh",
        "flows.pipeline.train_bvpo",
        "flows.pipeline.evaluate",
        "flows.pipeline.bvpo_pipeline",
        "flows.study.study",
    }
    study_schema = deployments[STUDY]._parameter_openapi_schema.model_dump()
    assert {"alphas", "seeds", "eval_prompts", "target_mde", "planning_sd"} <= set(study_schema["properties"])
    (schedule,) = deployments[DATA_REFRESH].schedules
    assert schedule.schedule.cron == "0 */6 * * *"
    assert all(not deployments[n].schedules for n in (TRAIN, EVALUATE, PIPELINE))
    for deployment in deployments.values():
        assert deployment.tags == ["bvpo"]
        # The form's defaults: the served config, with an absolute workspace.
        assert deployment.parameters["config"]["workspace"] == str(config.workspace.resolve())
        schema = deployment._parameter_openapi_schema.model_dump()
        assert "config" in schema["properties"]
        assert {"TrainConfig", "GenerationConfig", "PromptsConfig"} <= set(schema["definitions"])
    evaluate_schema = deployments[EVALUATE]._parameter_openapi_schema.model_dump()
    assert {"checkpoint", "train_metrics", "train_run_id"} <= set(evaluate_schema["properties"])
    assert len(deployments[EVALUATE].triggers) == 1
    assert all(not deployments[n].triggers for n in (DATA_REFRESH, TRAIN, PIPELINE))


def test_options_turn_schedule_and_trigger_off(config: PipelineConfig) -> None:
    deployments = {
        d.name: d
        for d in build_deployments(config, ServeOptions(refresh_cron="none", eval_after_train=False))
    }
    assert not deployments[DATA_REFRESH].schedules and not deployments[EVALUATE].triggers


@pytest.mark.parametrize("options", [{"refresh_cron": "61 * * * *"}, {"timezone": "Mars/Olympus"}])
def test_bad_schedules_are_refused(options: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        ServeOptions(**options)


def _state_event(flow: str, deployment: str | None) -> object:
    from prefect.server.events.schemas.events import ReceivedEvent

    related = [
        {"prefect.resource.id": f"prefect.flow.{uuid.uuid4()}", "prefect.resource.role": "flow"}
        | {"prefect.resource.name": flow},
        {"prefect.resource.id": "prefect.tag.bvpo", "prefect.resource.role": "tag"},
    ]
    if deployment:
        related.append(
            {
                "prefect.resource.id": f"prefect.deployment.{uuid.uuid4()}",
                "prefect.resource.role": "deployment",
                "prefect.resource.name": deployment,
            }
        )
    return ReceivedEvent(
        occurred=datetime.now(UTC),
        event="prefect.flow-run.Completed",
        resource={"prefect.resource.id": f"prefect.flow-run.{uuid.uuid4()}", "prefect.resource.name": "x"},
        related=related,
        id=uuid.uuid4(),
    )


def _server_trigger() -> object:
    from prefect.server.events.schemas.automations import EventTrigger

    trigger = eval_after_train_trigger()
    trigger.set_deployment_id(uuid.uuid4())
    return EventTrigger.model_validate(trigger.as_automation().trigger.model_dump(mode="json"))


def test_eval_trigger_fires_on_train_deployment_runs_only() -> None:
    trigger = _server_trigger()
    assert trigger.covers(_state_event("train_bvpo", TRAIN))
    assert not trigger.covers(_state_event("train_bvpo", None))  # subflow of bvpo_pipeline: evaluated inline
    assert not trigger.covers(_state_event("data_refresh", DATA_REFRESH))
    assert not trigger.covers(_state_event("evaluate", EVALUATE))


def test_eval_trigger_passes_the_train_runs_config_and_id() -> None:
    from prefect.server.schemas.core import FlowRun
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    config = PipelineConfig(workspace=Path("/data/ws")).model_dump(mode="json")
    run = FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), parameters={"config": config})
    trigger = eval_after_train_trigger()
    assert trigger.parameters is not None
    rendered = hydrate(
        copy.deepcopy(trigger.parameters),
        HydrationContext(render_jinja=True, jinja_context={"flow_run": run}, raise_on_error=True),
    )
    assert rendered == {"config": config, "train_run_id": str(run.id)}
    PipelineConfig.model_validate(rendered["config"])


def test_crashed_run_automation_watches_heartbeats_of_project_runs() -> None:
    automation = crashed_run_automation(30)
    assert automation.trigger.posture == "Proactive"
    assert automation.trigger.within.total_seconds() == 90
    assert automation.actions[0].state == "CRASHED"


# --- evaluate: which checkpoint ----------------------------------------------------------------------


def _register(store: DatasetStore, kind: str, parents: list, tag: str = "") -> object:
    return store.put(kind, schema_for(kind).empty_table(), config={"t": tag}, parents=parents)


def test_evaluate_finds_its_checkpoint_in_the_catalog(config: PipelineConfig, tmp_path: Path) -> None:
    from flows.pipeline import checkpoint_dir, resolve_eval_target

    with pytest.raises(ValueError, match="no checkpoint was trained"):
        resolve_eval_target(config)
    store = DatasetStore(config.workspace)
    prompts = _register(store, "prompts", [])
    first = _register(store, "train_metrics", [prompts], "a")
    second = _register(store, "train_metrics", [prompts], "b")
    for ref in (first, second):
        checkpoint_dir(config, ref).mkdir(parents=True)
        (checkpoint_dir(config, ref) / "config.json").write_text("{}")

    latest = resolve_eval_target(config)
    assert latest.train_metrics == second and latest.prompts == prompts
    assert latest.checkpoint == str(checkpoint_dir(config, second))
    assert resolve_eval_target(config, train_metrics=first.name).train_metrics == first
    assert resolve_eval_target(config, checkpoint=str(checkpoint_dir(config, first))).train_metrics == first

    external = tmp_path / "external"
    external.mkdir()
    (external / "config.json").write_text("{}")
    target = resolve_eval_target(config, checkpoint=str(external))
    assert target.train_metrics is None and target.prompts is None
    with pytest.raises(FileNotFoundError):
        resolve_eval_target(config, checkpoint=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not train_metrics"):
        resolve_eval_target(config, train_metrics=prompts.name)


# --- CLI ---------------------------------------------------------------------------------------------


def test_serve_refuses_a_bad_cron_before_starting_anything() -> None:
    from flows.cli import app

    result = CliRunner().invoke(app, ["serve", "--config", str(ROOT / "configs/tiny.yaml"), "--cron", "nope"])
    assert result.exit_code == 1
    assert "cron" in result.output.lower()


def test_deploy_needs_an_api_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = CliRunner().invoke(app, ["deploy", "--work-pool", "gpu"])
    assert result.exit_code == 1 and "PREFECT_API_URL" in result.output


def test_server_and_serve_are_documented_commands() -> None:
    from flows.cli import app

    for command in ("server", "serve", "deploy"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output


# --- docker-compose ----------------------------------------------------------------------------------


def test_compose_file_protects_the_api_and_keeps_postgres_private() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "bvpo-serve", "vllm"} <= set(services)
    assert "ports" not in services["postgres"]
    server_env = services["prefect-server"]["environment"]
    assert "PREFECT_SERVER_API_AUTH_STRING" in server_env
    assert "postgres" in server_env["PREFECT_API_DATABASE_CONNECTION_URL"]
    serve = services["bvpo-serve"]
    assert "bvpo serve" in " ".join(serve["command"])
    assert serve["environment"]["PREFECT_API_AUTH_STRING"] == server_env["PREFECT_SERVER_API_AUTH_STRING"]
    assert any(v.endswith(":/app/workspace") for v in serve["volumes"])
    assert services["vllm"]["profiles"] == ["gpu"]


def test_compose_config_validates_when_a_compose_client_is_installed() -> None:
    import shutil
    import subprocess

    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        command = [docker, "compose"]
    elif shutil.which("docker-compose"):
        command = [str(shutil.which("docker-compose"))]
    else:
        pytest.skip("no Docker Compose client installed")
    for extra in ([], ["-f", "docker-compose.yml", "-f", "docker/compose.gpu.yml", "--profile", "gpu"]):
        result = subprocess.run([*command, *extra, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_local_server_ui_calls_the_api_on_its_own_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli.server import _server_env

    monkeypatch.delenv("PREFECT_UI_API_URL", raising=False)
    assert _server_env("127.0.0.1", 4300)["PREFECT_UI_API_URL"] == "http://127.0.0.1:4300/api"
    assert _server_env("0.0.0.0", 4300)["PREFECT_UI_API_URL"] == "http://127.0.0.1:4300/api"
    monkeypatch.setenv("PREFECT_UI_API_URL", "https://prefect.example.org/api")
    assert _server_env("0.0.0.0", 4300)["PREFECT_UI_API_URL"] == "https://prefect.example.org/api"
