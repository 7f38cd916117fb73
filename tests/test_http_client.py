"""The shared OpenAI-compatible HTTP client (pipeline/http_client.py): retries, Retry-After, redaction."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from pipeline import http_client
from pipeline.generation.openai_engine import OpenAICompletionsEngine
from pipeline.http_client import MAX_BACKOFF_S, EndpointError, JsonClient, api_key_from_env
from pipeline.scoring.openai_chat import ChatEndpointError, OpenAIChatClient


def _replies(*responses: httpx.Response | Exception) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport answering each request with the next of ``responses`` (an exception is raised)."""
    queue, seen = list(responses), []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        reply = queue.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    return httpx.MockTransport(handle), seen


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waited: list[float] = []
    monkeypatch.setattr(http_client.time, "sleep", waited.append)
    return waited


def _client(transport: httpx.MockTransport, **kwargs: object) -> JsonClient:
    return JsonClient("http://endpoint/v1/", transport=transport, backoff_s=0.5, **kwargs)  # type: ignore[arg-type]


def test_transient_failures_are_retried_with_backoff_and_retry_after(sleeps: list[float]) -> None:
    transport, seen = _replies(
        httpx.ConnectError("refused"),
        httpx.Response(503, text="busy"),
        httpx.Response(429, headers={"Retry-After": "2.5"}, text="slow down"),
        httpx.Response(200, json={"ok": 1}),
    )
    client = _client(transport, max_retries=3)
    assert client.request("POST", "/completions", {"a": 1}) == {"ok": 1}
    assert sleeps == [0.5, 1.0, 2.5]  # backoff 0.5·2^attempt, then the server's Retry-After
    assert client.retries == 3
    assert [str(r.url) for r in seen] == ["http://endpoint/v1/completions"] * 4


def test_waits_are_capped_and_none_follows_the_last_attempt(sleeps: list[float]) -> None:
    transport, _ = _replies(
        httpx.Response(503, headers={"Retry-After": "999"}), httpx.Response(503, headers={"Retry-After": "x"})
    )
    with pytest.raises(EndpointError, match=r"failed after 2 attempt\(s\): HTTP 503") as failure:
        _client(transport, max_retries=1).request("GET", "/models")
    assert sleeps == [MAX_BACKOFF_S]  # an unparsable Retry-After on the last attempt: no wait at all
    assert failure.value.transient is True


def test_a_client_error_fails_at_once_and_is_not_transient(sleeps: list[float]) -> None:
    transport, seen = _replies(httpx.Response(400, text="bad request"), httpx.Response(200, json={}))
    with pytest.raises(EndpointError, match="answered HTTP 400: bad request") as failure:
        _client(transport, max_retries=3).request("POST", "/completions", {})
    assert len(seen) == 1 and sleeps == [] and failure.value.transient is False
    transport, _ = _replies(httpx.Response(200, text="<html>"))
    with pytest.raises(EndpointError, match="non-JSON"):
        _client(transport).request("GET", "/models")


def test_the_api_key_is_sent_and_redacted_from_errors(sleeps: list[float]) -> None:
    key = "sk-http-client-test-7f3a9c"
    transport, seen = _replies(httpx.Response(401, text=f"invalid credentials: Bearer {key}"))
    with pytest.raises(EndpointError) as failure:
        _client(transport, api_key=key).request("GET", "/models")
    assert seen[0].headers["Authorization"] == f"Bearer {key}"
    assert key not in str(failure.value) and "Bearer ***" in str(failure.value)


def test_api_key_lookup_names_the_setting_and_raises_the_callers_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BVPO_TEST_HTTP_KEY", raising=False)
    assert api_key_from_env(None, "x.api_key_env") is None
    with pytest.raises(ChatEndpointError, match=r"BVPO_TEST_HTTP_KEY \(judge api_key_env\) is not set"):
        api_key_from_env("BVPO_TEST_HTTP_KEY", "judge api_key_env", ChatEndpointError)
    monkeypatch.setenv("BVPO_TEST_HTTP_KEY", "sk-from-env")
    assert api_key_from_env("BVPO_TEST_HTTP_KEY", "x.api_key_env") == "sk-from-env"


def _judge(transport: httpx.MockTransport) -> object:
    client = OpenAIChatClient(
        "http://endpoint/v1", "judge", max_retries=1, progress=False, transport=transport
    )
    return client.complete([{"role": "user", "content": "rate this"}])


def _generation_engine(transport: httpx.MockTransport) -> object:
    return OpenAICompletionsEngine("http://endpoint/v1", None, max_retries=1, transport=transport).model


@pytest.mark.parametrize("call", [_judge, _generation_engine], ids=["judge", "generation"])
def test_both_endpoints_retry_through_the_shared_client_and_fail_transient_for_prefect(
    call: Callable[[httpx.MockTransport], object], sleeps: list[float]
) -> None:
    """An endpoint that stays down fails the stage with an error Prefect's retry condition retries."""
    from tasks.orchestration import is_transient

    transport, seen = _replies(httpx.Response(502), httpx.Response(503))
    with pytest.raises(EndpointError, match=r"failed after 2 attempt") as failure:
        call(transport)
    assert len(seen) == 2 and len(sleeps) == 1
    assert is_transient(failure.value)
    assert not is_transient(EndpointError("answered HTTP 400", transient=False))
