"""One JSON-over-HTTP client for OpenAI-compatible endpoints (a served vLLM, an LLM judge, hosted APIs).

Used by the HTTP generation engine (:mod:`pipeline.generation.openai_engine`, ``/completions``) and the
judge's chat client (:mod:`pipeline.scoring.openai_chat`, ``/chat/completions``). What they share:

- retries: timeouts, connection errors, HTTP 429 and 5xx are retried with exponential backoff (capped at
  :data:`MAX_BACKOFF_S`), honouring a ``Retry-After`` header; other 4xx answers fail at once;
- errors: :class:`EndpointError` (or a subclass the caller names) with the API key redacted, even when the
  server echoes it back; an error raised after every retry failed is marked ``transient`` so an orchestrator
  may retry the whole task later;
- API keys: read from a named environment variable, never from the config file.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Self

import httpx

from pipeline.redact import redact, remember

MAX_BACKOFF_S = 30.0
"""Longest wait between two attempts, whatever the backoff or ``Retry-After`` says."""


class EndpointError(RuntimeError):
    """An endpoint could not be reached or answered with an error (message redacted).

    ``transient``: True when every retry failed on a timeout, a connection error, 429 or 5xx (the endpoint may
    recover); False for an answer that will not change (4xx, a malformed body); None when not about a request.
    """

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(redact(message))  # an API key echoed by the server never reaches a log
        self.transient = transient


def api_key_from_env(
    name: str | None, setting: str, error: type[EndpointError] = EndpointError
) -> str | None:
    """The key held by environment variable ``name`` (None: no key); a named but unset variable fails.

    Args:
        name: the variable's name, from the config (e.g. ``generation.api_key_env``).
        setting: the config key that named it, for the error message.
        error: the exception class to raise.
    """
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise error(f"environment variable {name} ({setting}) is not set")
    return remember(value)


class JsonClient:
    """JSON requests to ``base_url`` with retries; thread-safe (engines send requests from a pool).

    Args:
        base_url: endpoint root, e.g. ``http://127.0.0.1:8000/v1``.
        api_key: sent as ``Authorization: Bearer``; remembered so that it is redacted from every error.
        timeout_s: per-request timeout.
        max_retries: attempts after the first one for transient failures.
        backoff_s: wait before the first retry; doubled for each further one.
        max_connections: connection pool size (None: httpx's default).
        transport: an httpx transport (tests).
        error: the exception class raised (a subclass of :class:`EndpointError`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 2,
        backoff_s: float = 1.0,
        max_connections: int | None = None,
        transport: httpx.BaseTransport | None = None,
        error: type[EndpointError] = EndpointError,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.error = error
        self.retries = 0  # retried attempts so far (for logs and tests)
        self._lock = threading.Lock()
        headers = {"Authorization": f"Bearer {remember(api_key)}"} if api_key else {}
        limits = (
            httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
            if max_connections
            else httpx.Limits()
        )
        self._http = httpx.Client(headers=headers, timeout=timeout_s, limits=limits, transport=transport)

    def request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        """One call to ``base_url + path``, retried on transient failures; the decoded JSON body."""
        url = self.base_url + path
        problem = ""
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, url, json=payload)
            except httpx.TransportError as exc:  # timeouts and connection errors
                problem = f"{type(exc).__name__}: {exc}"
                self._wait(attempt, None)
                continue
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                self._wait(attempt, response.headers.get("retry-after"))
                continue
            if response.status_code >= 400:
                raise self.error(
                    f"{url} answered HTTP {response.status_code}: {response.text[:300]}", transient=False
                )
            try:
                return response.json()
            except ValueError as exc:
                raise self.error(
                    f"{url} answered with non-JSON: {response.text[:300]}", transient=False
                ) from exc
        raise self.error(f"{url} failed after {self.max_retries + 1} attempt(s): {problem}", transient=True)

    def close(self) -> None:
        self._http.close()

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        """Back off before the next attempt (none after the last one)."""
        if attempt >= self.max_retries:
            return
        with self._lock:
            self.retries += 1
        delay = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)
        if retry_after is not None:
            with contextlib.suppress(ValueError):
                delay = min(max(float(retry_after), 0.0), MAX_BACKOFF_S)
        time.sleep(delay)


class EndpointClient:
    """Base of the clients that send many requests to one endpoint, ``concurrency`` at a time.

    Holds the connection settings and the shared :class:`JsonClient`; subclasses set their defaults as class
    attributes and add the endpoint's own payloads. Usable as a context manager (closes the connections).

    Args:
        base_url: endpoint root, e.g. ``http://127.0.0.1:8000/v1``.
        api_key: sent as ``Authorization: Bearer`` (redacted from every error).
        concurrency: requests in flight at once (also the connection pool size).
        timeout_s, max_retries, backoff_s: see :class:`JsonClient`.
        progress: show a progress bar while requests run.
        transport: an httpx transport (tests).
    """

    concurrency: int = 4
    timeout_s: float = 120.0
    max_retries: int = 2
    backoff_s: float = 0.5
    error: type[EndpointError] = EndpointError

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        concurrency: int | None = None,
        timeout_s: float | None = None,
        max_retries: int | None = None,
        backoff_s: float | None = None,
        progress: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        cls = type(self)
        self.concurrency = cls.concurrency if concurrency is None else concurrency
        self.progress = progress
        self._http = JsonClient(
            base_url,
            api_key=api_key,
            timeout_s=cls.timeout_s if timeout_s is None else timeout_s,
            max_retries=cls.max_retries if max_retries is None else max_retries,
            backoff_s=cls.backoff_s if backoff_s is None else backoff_s,
            max_connections=self.concurrency,
            transport=transport,
            error=cls.error,
        )
        self.base_url = self._http.base_url

    @property
    def retries(self) -> int:
        """Retried attempts so far (for logs and tests)."""
        return self._http.retries

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        """One call to ``base_url + path``, retried on transient failures; the decoded JSON body."""
        return self._http.request(method, path, payload)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
