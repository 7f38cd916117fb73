"""A real Prefect stack for end-to-end tests: `bvpo server` (basic auth on) and `bvpo serve` as processes.

Shared by tests/test_orchestration_e2e.py and tests/test_incremental_refresh_e2e.py: the processes, the
client pointed at them, and the waits on deployments, flow runs and artifacts. Each process runs in its own
session; :meth:`Stack.stop` ends both and reports any process of the stack still alive afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

from pipeline.config import PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
BVPO = str(Path(sys.executable).with_name("bvpo"))
AUTH = "bvpo:e2e-secret"
RUN_TIMEOUT_S = 1500  # generous: these machines' cores are shared
TINY = ROOT / "configs" / "tiny.yaml"

FAST_SCHEDULER = {
    # The server's scheduler looks for deployments to schedule every 2 s (default 60 s) and keeps one
    # future run per schedule (defaults: 3 to 100 within an hour), so a schedule's next run exists
    # seconds after the schedule is (re)activated and never more than one waits.
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Signal the process group of a process this module started (each runs in its own session)."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


class Stack:
    """A Prefect server (`bvpo server`, basic auth on) and a `bvpo serve` process, both on localhost.

    Args:
        tmp: Folder of the workspace, the Prefect home and the logs.
        overrides: ``--set`` overrides of ``configs/tiny.yaml`` (the workspace is added).
        env: Extra environment of both processes (e.g. :data:`FAST_SCHEDULER`).
    """

    def __init__(self, tmp: Path, overrides: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workspace = tmp / "workspace"
        self.overrides = [f"workspace={self.workspace}", *overrides]
        self.serve_log = tmp / "serve.log"
        self.home = tmp / "prefect-home"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_API_AUTH_STRING": AUTH,
            "PREFECT_API_AUTH_STRING": AUTH,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            **(env or {}),
        }
        self.env.pop("PREFECT_API_URL", None)
        self.server: subprocess.Popen[bytes] | None = None
        self.serving: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> PipelineConfig:
        """The config `bvpo serve` serves (every deployment's default parameter)."""
        return load_config(TINY, self.overrides)

    @contextlib.contextmanager
    def api(self) -> Iterator[None]:
        """Point this process's Prefect client (and flows run here) at the stack's API.

        On exit, while the stack's server still runs, the log and event workers that flows run here started
        against it are drained: left holding items for a server that is then stopped, they would stall the
        next ``prefect_test_harness`` (it drains every events worker on exit) and fail its tests.
        """
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: f"{self.url}/api", PREFECT_API_AUTH_STRING: AUTH}):
            try:
                yield
            finally:
                _drain_prefect_workers()

    def start_server(self) -> None:
        with (self.tmp / "server.log").open("ab") as log:
            self.server = subprocess.Popen(
                [BVPO, "server", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.server.poll() is None, (self.tmp / "server.log").read_text()
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the Prefect server did not become healthy")

    def start_serve(self, *options: str) -> None:
        sets = [item for s in self.overrides for item in ("-s", s)]
        with self.serve_log.open("ab") as log:
            self.serving = subprocess.Popen(
                [BVPO, "serve", "-c", str(TINY), *sets, *options],
                cwd=ROOT,
                env={**self.env, "PREFECT_API_URL": f"{self.url}/api"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill_serve(self) -> None:
        """What a crash does: the serving process and every flow-run process under it die at once."""
        stop_process(self.serving, signal.SIGKILL)

    def stop(self, grace_s: float = 30.0) -> list[str]:
        """Stop serving, then the server; returns the stack's processes still alive after ``grace_s``
        (killed then), as ``pid command`` lines: an empty list when nothing was left behind."""
        stop_process(self.serving)
        stop_process(self.server)
        deadline = time.monotonic() + grace_s
        left = self.processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = self.processes()
        for line in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        return left

    def processes(self) -> list[str]:
        """Live processes started by this stack (found by the PREFECT_HOME in their environment)."""
        marker = f"PREFECT_HOME={self.home}".encode()
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if marker not in (proc / "environ").read_bytes().split(b"\0"):
                    continue
                if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # a zombie: already exited
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # exited meanwhile, or not ours to read
                continue
            found.append(f"{proc.name} {command.strip()}")
        return found


def _drain_prefect_workers() -> None:
    """Deliver what this process's Prefect log and event workers still hold, then stop them."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result: Any = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


def api_client() -> Any:
    """A synchronous Prefect client (of the API this process points at, see :meth:`Stack.api`)."""
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def wait_for_deployments(client: Any, stack: Stack, timeout_s: float = 180) -> None:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert stack.serving is not None and stack.serving.poll() is None, stack.serve_log.read_text()
        try:
            client.read_deployment_by_name("bvpo_pipeline/bvpo-pipeline")
            return
        except ObjectNotFound:
            time.sleep(1)
    raise TimeoutError("bvpo serve did not register its deployments")


def create_run(client: Any, deployment: str, parameters: dict[str, Any] | None = None) -> Any:
    """Create a flow run of a deployment the way the UI's Run button does."""
    found = client.read_deployment_by_name(deployment)
    return client.create_flow_run_from_deployment(found.id, parameters=parameters or {})


def runs_of(client: Any, deployment_id: UUID) -> list[Any]:
    """Every flow run of a deployment, in creation order."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )
    return sorted(runs, key=lambda r: r.created)


def wait_final(client: Any, run_id: UUID, stack: Stack, timeout_s: float = RUN_TIMEOUT_S) -> Any:
    """Wait for a flow run's final state; it must be Completed (the serve log's tail says why not)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            assert run.state.is_completed(), f"{run.name}: {run.state}\n{stack.serve_log.read_text()[-6000:]}"
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} did not finish in {timeout_s} s")


def artifact(client: Any, run_id: UUID, key: str) -> Any:
    """The data of a flow run's artifact ``key`` (a table artifact's is its rows as JSON)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    (found,) = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
        )
    )
    return found.data


def table_artifact(client: Any, run_id: UUID, key: str) -> list[dict[str, Any]]:
    """The rows of a flow run's table artifact ``key``."""
    data = artifact(client, run_id, key)
    return json.loads(data) if isinstance(data, str) else list(data)
