"""How Prefect runs the stage tasks: which failures are retried, time limits, and the GPU concurrency tag.

Retries are for failures that can go away on their own (a connection refused while an inference server
restarts, a busy catalog, an I/O hiccup); a bad config, a missing file or a bug fails at once instead of
being repeated. Every stage is content-addressed, so a retried task reuses what was already registered.
"""

from __future__ import annotations

import errno
import urllib.error
from typing import Any

import httpx
from prefect.task_engine import TaskRunTimeoutError

from pipeline.reporting.stage_timing import set_root_flow_run_lookup
from storage import CatalogError

GPU_TAG = "gpu"
"""Tag of the tasks that hold an accelerator; ``bvpo serve`` puts a concurrency limit on it."""

HOUR = 3600
RETRY_DELAYS_S = [10, 60]

_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EBUSY,
        errno.EINTR,
        errno.EIO,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ESTALE,
    }
)
_NEVER_RETRY = (TaskRunTimeoutError, MemoryError, KeyboardInterrupt, SystemExit)


def _transient_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _is_transient_one(exc: BaseException) -> bool:
    marked = getattr(exc, "transient", None)
    if isinstance(marked, bool):  # an exception may say so itself
        return marked
    if isinstance(exc, urllib.error.HTTPError):
        return _transient_status(exc.code)
    if isinstance(exc, httpx.HTTPStatusError):
        return _transient_status(exc.response.status_code)
    if isinstance(exc, ConnectionError | TimeoutError | urllib.error.URLError | httpx.TransportError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    if isinstance(exc, CatalogError):
        return "busy" in str(exc) or "locked" in str(exc)
    # An OpenAI-compatible endpoint (judge, HTTP engine) that kept failing after its own retries.
    return type(exc).__name__ == "ChatEndpointError" and "failed after" in str(exc)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) may succeed when the task runs again."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _NEVER_RETRY):
            return False
        if _is_transient_one(current):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task run only when its failure is transient."""
    data = state.data
    exc = data if isinstance(data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": len(RETRY_DELAYS_S),
    "retry_delay_seconds": RETRY_DELAYS_S,
    "retry_condition_fn": retry_if_transient,
}
"""``@task`` arguments: up to two retries, after 10 s and 60 s, for transient failures only."""


def root_flow_run_id() -> str | None:
    """The root flow run of the current Prefect run (a subflow's parent pipeline), None outside a run."""
    try:
        from prefect.runtime import flow_run

        root = flow_run.root_flow_run_id
    except Exception:  # outside Prefect, or an older Prefect
        return None
    return str(root) if root else None


# The stage-timing records of subflows also reach the root run's file (pipeline/reporting/stage_timing.py).
set_root_flow_run_lookup(root_flow_run_id)
