"""A small client for OpenAI-compatible ``/chat/completions`` endpoints (vLLM's server, hosted APIs).

Used by the judge scorer. Requests run a few at a time with a progress bar; connection errors, 429 and
5xx answers are retried with exponential backoff. A request that still fails raises
:class:`ChatEndpointError`, so a dead endpoint fails the stage instead of storing a dataset of rejects.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from tqdm.auto import tqdm

from pipeline.config import ChatEndpointOptions
from pipeline.redact import redact, remember

Message = dict[str, str]


class ChatEndpointError(RuntimeError):
    """The chat endpoint could not be reached or answered with an error."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))  # an API key echoed by the server never reaches a log


def api_key_from_env(name: str | None) -> str | None:
    """The API key held by environment variable ``name`` (None: no key); a named but unset variable fails."""
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise ChatEndpointError(f"environment variable {name} (judge api_key_env) is not set")
    return remember(value)


class OpenAIChatClient:
    """Sends one chat completion request per conversation and returns the message texts in order."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 512,
        timeout_s: float = 120.0,
        max_retries: int = 2,
        concurrency: int = 4,
        backoff_s: float = 0.5,
        progress: bool = True,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.backoff_s = backoff_s
        self.progress = progress
        headers = {"Authorization": f"Bearer {remember(api_key)}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=timeout_s)

    @classmethod
    def from_options(cls, options: ChatEndpointOptions) -> OpenAIChatClient:
        """A client for the judge configuration (the key is read from ``options.api_key_env``)."""
        return cls(
            options.base_url,
            options.model,
            api_key=api_key_from_env(options.api_key_env),
            temperature=options.temperature,
            max_tokens=options.max_tokens,
            timeout_s=options.timeout_s,
            max_retries=options.max_retries,
            concurrency=options.concurrency,
        )

    def chat(self, conversations: Sequence[list[Message]]) -> list[str]:
        """The assistant text for each conversation, in order."""
        results: list[str] = [""] * len(conversations)
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            with tqdm(
                total=len(conversations), desc="judge", unit="request", disable=not self.progress
            ) as bar:
                futures = [pool.submit(self.complete, list(c)) for c in conversations]
                for index, future in enumerate(futures):
                    results[index] = future.result()
                    bar.update(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failure, queued requests are not sent
        return results

    def complete(self, messages: list[Message]) -> str:
        """One chat completion (retried on transient failures)."""
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "n": 1,
        }
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._http.post(self.url, json=payload)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if response.status_code >= 400:
                raise ChatEndpointError(
                    f"{self.url} answered HTTP {response.status_code}: {response.text[:300]}"
                )
            return _message_text(response, self.url)
        raise ChatEndpointError(f"{self.url} failed after {self.max_retries + 1} attempt(s): {problem}")

    def close(self) -> None:
        self._http.close()


def _message_text(response: httpx.Response, url: str) -> str:
    try:
        body = response.json()
        message = body["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ChatEndpointError(f"{url} answered without a chat completion: {response.text[:300]}") from exc
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""
