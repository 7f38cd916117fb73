"""A small client for OpenAI-compatible ``/chat/completions`` endpoints (vLLM's server, hosted APIs).

Used by the judge scorer. Requests run a few at a time with a progress bar, through the shared
:class:`pipeline.http_client.JsonClient` (retries, backoff, ``Retry-After``, redacted errors). A request that
still fails raises :class:`ChatEndpointError`, so a dead endpoint fails the stage instead of storing a dataset
of rejects.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm.auto import tqdm

from pipeline import http_client
from pipeline.config import ChatEndpointOptions

Message = dict[str, str]


class ChatEndpointError(http_client.EndpointError):
    """The chat endpoint could not be reached or answered with an error."""


def api_key_from_env(name: str | None) -> str | None:
    """The API key held by environment variable ``name`` (None: no key); a named but unset variable fails."""
    return http_client.api_key_from_env(name, "judge api_key_env", ChatEndpointError)


class OpenAIChatClient(http_client.EndpointClient):
    """Sends one chat completion request per conversation and returns the message texts in order."""

    error = ChatEndpointError

    def __init__(
        self, base_url: str, model: str, *, temperature: float = 0.0, max_tokens: int = 512, **connection: Any
    ) -> None:
        """``connection``: ``api_key``, ``concurrency``, ``timeout_s``, ``max_retries``, ``backoff_s``,
        ``progress``, ``transport`` (:class:`~pipeline.http_client.EndpointClient`)."""
        super().__init__(base_url, **connection)
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.url = self.base_url + "/chat/completions"

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
        return _message_text(self._request("POST", "/chat/completions", payload), self.url)


def _message_text(body: Any, url: str) -> str:
    """The assistant message of a chat completion body ("" when it has no text content)."""
    try:
        message = body["choices"][0]["message"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ChatEndpointError(
            f"{url} answered without a chat completion: {str(body)[:300]}", transient=False
        ) from exc
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""
