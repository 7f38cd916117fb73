"""The HTTP engine against a stub OpenAI-compatible server (``http.server`` in a thread, on 127.0.0.1).

The stub answers ``/v1/models`` and ``/v1/completions`` with canned text and can be told to fail the next
requests (429, 5xx, 400, slow answers), so the retry, backoff and timeout paths run without a model.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import GenerationConfig
from pipeline.generation.engine import SamplingSpec
from pipeline.generation.openai_engine import EndpointError, OpenAICompletionsEngine
from pipeline.generation.stage import run_generate_stage
from tests.generation_fakes import WordTokenizer


class Stub:
    def __init__(self) -> None:
        self.faults: list[
            str
        ] = []  # consumed one per completion request: "429", "503", "400", "slow", "short"
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.token_ids = True
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay_s = 0.0
        self.hold_first = 0  # > 0: the first N requests wait (up to 5 s) until N are in flight together
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def next_fault(self) -> str | None:
        with self.lock:
            return self.faults.pop(0) if self.faults else None


def _choices(stub: Stub, body: dict[str, Any]) -> list[dict[str, Any]]:
    prompt = body["prompt"]  # token ids, as vLLM's server takes them
    out = []
    for index in range(body["n"]):
        if body.get("stop"):  # a trace closed by the model: the stop string is in the output
            text, finish, stop = f"step {index} of thinking\n{body['stop'][0]}", "stop", body["stop"][0]
        else:
            text, finish, stop = f"answer {index} to {len(prompt)} words", "length", None
        choice: dict[str, Any] = {"index": index, "text": text, "finish_reason": finish, "stop_reason": stop}
        if stub.token_ids:
            choice["token_ids"] = WordTokenizer().encode(text)
            choice["logprobs"] = {"token_logprobs": [-0.25] * len(choice["token_ids"])}
        out.append(choice)
    return out[::-1]  # servers may list choices in any order


def _handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "served-model"}]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with stub.lock:
                stub.requests.append(body)
                stub.headers.append(dict(self.headers))
                stub.in_flight += 1
                stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                stub.changed.notify_all()
                if len(stub.requests) <= stub.hold_first:
                    stub.changed.wait_for(lambda: stub.in_flight >= stub.hold_first, timeout=5.0)
            try:
                time.sleep(stub.delay_s)
                fault = stub.next_fault()
                if fault == "slow":
                    time.sleep(1.0)
            finally:
                # Out of flight before the reply is written: once the client has read it, it may send its
                # next request at once, which must not be counted together with this finished one.
                with stub.lock:
                    stub.in_flight -= 1
            if fault in ("429", "503", "400"):
                self._send(int(fault), {"error": f"fault {fault}"}, retry_after="0")
            elif fault == "short":
                self._send(200, {"choices": _choices(stub, body)[:1]})
            else:
                self._send(200, {"choices": _choices(stub, body)})

        def _send(self, status: int, payload: dict[str, Any], retry_after: str | None = None) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

    return Handler


@pytest.fixture
def stub() -> Iterator[tuple[Stub, str]]:
    state = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def engine(url: str, **kwargs: Any) -> OpenAICompletionsEngine:
    settings: dict[str, Any] = {"backoff_s": 0.01, "progress": False, "max_retries": 3} | kwargs
    return OpenAICompletionsEngine(url, WordTokenizer(), **settings)


TRACE = SamplingSpec(n=3, temperature=0.7, top_p=0.9, max_tokens=16, stop=("</think>",))
ANSWER = SamplingSpec(n=1, temperature=0.0, top_p=0.9, max_tokens=8)


def test_completions_come_back_in_order_with_counts_and_stop_reasons(stub: tuple[Stub, str]) -> None:
    state, url = stub
    tok = WordTokenizer()
    one, two = tok.encode("p one"), tok.encode("p two three")
    with engine(url) as http:
        out = http.complete([one, two], [TRACE, ANSWER])
    assert [c.text for c in out[0]] == [f"step {i} of thinking\n</think>" for i in range(3)]
    assert all(
        c.stop_reason == "</think>" and c.finish_reason == "stop" and c.token_count == 5 for c in out[0]
    )
    assert [c.token_ids for c in out[0]] == [tuple(tok.encode(c.text)) for c in out[0]]
    assert all(c.logprobs == (-0.25,) * 5 for c in out[0])
    (answer,) = out[1]
    assert (answer.text, answer.finish_reason, answer.stop_reason) == ("answer 0 to 3 words", "length", None)
    trace_request = next(r for r in state.requests if r["prompt"] == one)
    assert trace_request == {
        "model": "served-model",  # asked from /v1/models
        "prompt": one,  # token ids, not text
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 16,
        "return_token_ids": True,
        "logprobs": 0,
        "include_stop_str_in_output": True,
        "stop": ["</think>"],
    }
    answer_request = next(r for r in state.requests if r["prompt"] == two)
    assert answer_request["top_p"] == 1.0 and "stop" not in answer_request  # greedy: top_p unused


def test_a_server_that_returns_no_token_ids_is_refused(stub: tuple[Stub, str]) -> None:
    state, url = stub
    state.token_ids = False
    with engine(url, model="m") as http, pytest.raises(EndpointError, match="no token ids"):
        http.complete([[1]], [ANSWER])


def test_429_and_5xx_are_retried_with_backoff(stub: tuple[Stub, str]) -> None:
    state, url = stub
    state.faults = ["429", "503"]
    with engine(url, model="m") as http:
        (out,) = http.complete([[1]], [ANSWER])
        assert http.retries == 2
    assert out[0].text.startswith("answer") and len(state.requests) == 3


def test_a_timed_out_request_is_retried(stub: tuple[Stub, str]) -> None:
    state, url = stub
    state.faults = ["slow"]
    with engine(url, model="m", timeout_s=0.3) as http:
        (out,) = http.complete([[1]], [ANSWER])
        assert http.retries == 1
    assert out[0].text.startswith("answer")


def test_retries_run_out(stub: tuple[Stub, str]) -> None:
    state, url = stub
    state.faults = ["503"] * 3
    with engine(url, model="m", max_retries=2) as http, pytest.raises(EndpointError, match="after 3 attempt"):
        http.complete([[1]], [ANSWER])
    assert len(state.requests) == 3


def test_client_errors_are_not_retried(stub: tuple[Stub, str]) -> None:
    state, url = stub
    state.faults = ["400"]
    with engine(url, model="m") as http, pytest.raises(EndpointError, match="HTTP 400"):
        http.complete([[1]], [ANSWER])
    assert len(state.requests) == 1


def test_a_wrong_number_of_choices_is_an_error(stub: tuple[Stub, str]) -> None:
    state, url = stub
    state.faults = ["short"]
    with engine(url, model="m") as http, pytest.raises(EndpointError, match="1 choice"):
        http.complete([[1]], [TRACE])


def test_unreachable_endpoint_fails_after_retries() -> None:
    with engine("http://127.0.0.1:9/v1", model="m", max_retries=1) as http, pytest.raises(EndpointError):
        http.complete([[1]], [ANSWER])


def test_concurrency_is_bounded(stub: tuple[Stub, str]) -> None:
    state, url = stub
    # The first 3 requests hold until all 3 are in flight, so a client bounded at 3 reaches exactly 3
    # however loaded the machine is; slow answers let an unbounded client pile up more than 3.
    state.hold_first, state.delay_s = 3, 0.05
    with engine(url, model="m", concurrency=3, timeout_s=30.0) as http:
        out = http.complete([[i] for i in range(12)], [ANSWER] * 12)
    assert len(out) == 12 and state.max_in_flight == 3


def test_api_key_comes_from_the_named_environment_variable(
    stub: tuple[Stub, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state, url = stub
    monkeypatch.setenv("GEN_KEY", "sekret")
    cfg = GenerationConfig(engine="openai", base_url=url, api_key_env="GEN_KEY", served_model="m")
    with OpenAICompletionsEngine.from_config(cfg, WordTokenizer()) as http:
        http.complete([[1]], [ANSWER])
    assert state.headers[0].get("Authorization") == "Bearer sekret"
    monkeypatch.delenv("GEN_KEY")
    with pytest.raises(EndpointError, match="GEN_KEY"):
        OpenAICompletionsEngine.from_config(cfg, WordTokenizer())


def test_the_stage_runs_both_modes_over_http(stub: tuple[Stub, str], tmp_path: Path) -> None:
    state, url = stub
    cfg = GenerationConfig(
        engine="openai", base_url=url, samples_per_prompt=2, shard_size=1, max_trace_tokens=16, concurrency=4
    )
    prompts = [
        {"prompt_id": "a", "prompt": "first question"},
        {"prompt_id": "b", "prompt": "second question"},
    ]
    result = run_generate_stage(
        "served-model", prompts, cfg, model_label="m", staging_dir=tmp_path, tokenizer=WordTokenizer()
    )
    assert len(result.rows) == 2 * 2 * 2 and result.shards_generated == 2
    assert {(r["engine"], r["seed"]) for r in result.rows} == {("openai", None)}
    assert sorted({r["shard_index"] for r in result.rows}) == [0, 1]
    trace = [r for r in result.rows if r["mode"] == "trace"]
    assert all(r["trace_closed"] and r["trace"].startswith("step") and r["trace_tokens"] == 5 for r in trace)
    assert all(r["trace"] is None and r["answer"] for r in result.rows if r["mode"] == "empty")
    assert {r["model"] for r in state.requests} == {"served-model"}


def test_the_stage_refuses_a_server_serving_another_model(stub: tuple[Stub, str], tmp_path: Path) -> None:
    from pipeline.preflight import ServedModelError

    _, url = stub
    cfg = GenerationConfig(engine="openai", base_url=url, samples_per_prompt=2, max_trace_tokens=16)
    prompts = [{"prompt_id": "a", "prompt": "first question"}]
    expected = "serves served-model, but model.name_or_path is 'Qwen/Qwen3-8B'"
    with pytest.raises(ServedModelError, match=re.escape(expected)):
        run_generate_stage(
            "Qwen/Qwen3-8B", prompts, cfg, model_label="m", staging_dir=tmp_path, tokenizer=WordTokenizer()
        )
    assert not list(tmp_path.rglob("*.parquet"))  # refused before any shard was sampled
