"""Prefect server and deployments: `bvpo server`, `bvpo serve`, `bvpo deploy`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Annotated, Any

import typer

from flows.cli.app import ConfigOpt, DebugOpt, SetOpt, app, console, err, fail, pipeline_config

DEFAULT_SERVER_HOST = "127.0.0.1"
DEFAULT_SERVER_PORT = 4200


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 for every interface).")] = (
        DEFAULT_SERVER_HOST
    ),
    port: Annotated[
        int, typer.Option(help="Port of the API and the UI.", min=1, max=65535)
    ] = DEFAULT_SERVER_PORT,
    debug: DebugOpt = False,
) -> None:
    """Start a local Prefect server (API and UI): `prefect server start` with this project's defaults.

    Its database lives under PREFECT_HOME (~/.prefect). Set PREFECT_SERVER_API_AUTH_STRING=user:password
    to require basic auth (clients then set PREFECT_API_AUTH_STRING to the same value).

    Example:
      bvpo server                   # UI at http://127.0.0.1:4200
    """
    os.environ.update(_server_env(host, port))
    console.print(f"Prefect UI: http://{host}:{port}   API: http://{host}:{port}/api")
    console.print(f"Point clients at it: export PREFECT_API_URL=http://{host}:{port}/api")
    sys.stdout.flush()
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    try:
        os.execv(sys.executable, command)
    except OSError as exc:
        fail(exc, debug)


def _server_env(host: str, port: int) -> dict[str, str]:
    """Environment of `prefect server start`: the UI must call the API on this port, not the default 4200."""
    browser_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return {
        "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL", f"http://{browser_host}:{port}/api"),
    }


@app.command()
def serve(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    cron: Annotated[
        str, typer.Option(help="Cron schedule of the data_refresh deployment; 'none' for no schedule.")
    ] = "0 3 * * *",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule (IANA name).")] = "UTC",
    gpu_slots: Annotated[
        int, typer.Option(help="Tasks tagged 'gpu' that may run at once over all flows (0: no limit).")
    ] = 1,
    reset_gpu_slots: Annotated[
        bool,
        typer.Option(
            help="Free every 'gpu' slot first (after a crash killed runs holding them; their leases would "
            "otherwise lapse in about a minute). Only when no other flow is running GPU tasks."
        ),
    ] = False,
    eval_after_train: Annotated[
        bool, typer.Option(help="Start an evaluate run when a train_bvpo deployment run completes.")
    ] = True,
    heartbeat: Annotated[
        int,
        typer.Option(
            help="Seconds (>= 30) between flow-run heartbeats; silent runs become Crashed (0: off)."
        ),
    ] = 30,
    limit: Annotated[int | None, typer.Option(help="Flow runs executed at once (default: no limit).")] = None,
    train_after_pairs: Annotated[
        int | None,
        typer.Option(
            help="Start train-bvpo when a data-refresh run registered at least N new pairs per mode "
            "(refresh.train_min_new_pairs; default: the config's value)."
        ),
    ] = None,
    port: Annotated[
        int, typer.Option(help="Port of the local Prefect server started when PREFECT_API_URL is unset.")
    ] = DEFAULT_SERVER_PORT,
    debug: DebugOpt = False,
) -> None:
    """Register and serve the deployments data-refresh, train-bvpo, evaluate and bvpo-pipeline.

    Runs triggered from the Prefect UI (or its schedule, or the eval-after-train trigger) execute in this
    process. Without PREFECT_API_URL a local Prefect server is started first (UI on 127.0.0.1:PORT).
    The config given here is the default parameter of every deployment's form.

    Examples:
      bvpo serve --config configs/default.yaml
      PREFECT_API_URL=http://127.0.0.1:4200/api bvpo serve --cron "0 */6 * * *" --gpu-slots 2
    """
    try:
        cfg = pipeline_config(config, set_)
        options = _serve_options(cron, timezone, gpu_slots, eval_after_train, heartbeat, limit)
        options.reset_gpu_slots = reset_gpu_slots
        options.train_min_new_pairs = train_after_pairs
    except Exception as exc:
        fail(exc, debug)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    local = None
    try:
        if not os.environ.get("PREFECT_API_URL"):
            local = _start_local_server(DEFAULT_SERVER_HOST, port)
        from flows.deployments import serve_deployments

        serve_deployments(cfg, options)
    except Exception as exc:
        fail(exc, debug)
    finally:
        if local is not None:
            local.terminate()
            local.wait(timeout=30)


@app.command()
def deploy(
    work_pool: Annotated[
        str, typer.Option("--work-pool", "-p", help="Work pool whose workers run the flows.")
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    cron: Annotated[str, typer.Option(help="Cron schedule of data_refresh; 'none' for none.")] = "0 3 * * *",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule.")] = "UTC",
    gpu_slots: Annotated[
        int, typer.Option(help="Tasks tagged 'gpu' at once over all flows (0: no limit).")
    ] = 1,
    eval_after_train: Annotated[bool, typer.Option(help="Evaluate after each train_bvpo run.")] = True,
    job_variable: Annotated[
        list[str] | None, typer.Option("--job-variable", "-j", help="KEY=VALUE job variable (YAML value).")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Register the four deployments on a work pool, for workers on a cluster (needs PREFECT_API_URL).

    Start workers where the GPUs are, e.g. `prefect worker start --pool gpu --type process`, from an
    environment with this project installed.

    Example:
      bvpo deploy --work-pool gpu --config configs/default.yaml
    """
    import yaml

    try:
        if not os.environ.get("PREFECT_API_URL"):
            raise ValueError("set PREFECT_API_URL to the Prefect server the workers poll")
        cfg = pipeline_config(config, set_)
        options = _serve_options(cron, timezone, gpu_slots, eval_after_train, 30, None)
        variables: dict[str, Any] = {}
        for item in job_variable or []:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"job variable '{item}' must look like KEY=VALUE")
            variables[key] = yaml.safe_load(raw)
        from flows.deployments import deploy_to_work_pool

        ids = deploy_to_work_pool(cfg, options, work_pool, variables or None)
    except Exception as exc:
        fail(exc, debug)
        return
    console.print(f"Registered {len(ids)} deployments on work pool '{work_pool}'.")


def _serve_options(
    cron: str, timezone: str, gpu_slots: int, eval_after_train: bool, heartbeat: int, limit: int | None
) -> Any:
    from flows.deployments import ServeOptions

    return ServeOptions(
        refresh_cron=cron,
        timezone=timezone,
        gpu_slots=gpu_slots,
        eval_after_train=eval_after_train,
        heartbeat_seconds=heartbeat or None,
        limit=limit,
    )


def _start_local_server(host: str, port: int, timeout_s: float = 120.0) -> subprocess.Popen[bytes]:
    """Start `prefect server start` in the background and point this process at it."""
    import httpx

    url = f"http://{host}:{port}/api"
    env = {**os.environ, **_server_env(host, port)}
    err.print(f"PREFECT_API_URL is not set: starting a local Prefect server at {url}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)], env=env
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the Prefect server exited with code {proc.returncode} (is port {port} free?)"
            )
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                os.environ["PREFECT_API_URL"] = url
                # Prefect read its settings when it was imported (validating the options did that):
                # reread them, or the client would start a temporary server of its own instead.
                from prefect.context import refresh_global_settings_context

                refresh_global_settings_context()
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"the Prefect server did not answer at {url} within {timeout_s:.0f} s")
