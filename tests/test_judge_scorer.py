"""LLM judge: prompt building, rating parsing, the engine adapter, and the HTTP client against a local stub.

The stub is a tiny OpenAI-compatible server (``http.server`` on 127.0.0.1, in a thread) returning canned
chat completions: a test double for the external judge endpoint. No model runs here.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.config import JudgeOptions, ScoringConfig
from pipeline.generation.engine import Completion, SamplingSpec
from pipeline.scoring.base import ScoreInput
from pipeline.scoring.judge import (
    DEFAULT_RUBRIC,
    EngineChatClient,
    JudgeScorer,
    build_judge_messages,
    judgement_result,
    parse_rating,
    strip_reasoning,
)
from pipeline.scoring.openai_chat import ChatEndpointError, OpenAIChatClient, api_key_from_env
from pipeline.scoring.stage import score_generations
from tests.generation_fakes import WordTokenizer

PARSED = [
    ("The answer is correct and concise.\nRating: [[7]]", 7.0),
    ("Rating: [[ 8 ]]", 8.0),
    ("[[10]]", 10.0),
    ("Rating: [[1]]", 1.0),
    ("Rating: [[7]]\n(Repeating: Rating: [[7]])", 7.0),
    ("Rating: [[7.5]]", 7.5),
    ("Good answer. Rating: 7", 7.0),
    ("**Score:** 6/10", 6.0),
    ("I give it a score of 9 out of 10.", 9.0),
    ('{"rating": 5, "reason": "partly right"}', 5.0),
    ("Overall rating is 4.", 4.0),
    ("Solid work: 7/10.", 7.0),
    ("8", 8.0),
    ("**8**", 8.0),
    ("3 + 4 = 7 is shown, but the rating: [[3]]", 3.0),
    ("<think>maybe Rating: [[2]]</think>The answer is fine. Rating: [[9]]", 9.0),
    ("the judge's trace, prefilled open tag...</think>\nRating: [[6]]", 6.0),
]

UNPARSED = [
    ("", "empty judgement"),
    ("   \n", "empty judgement"),
    ("<think>still thinking. Rating: [[3]]", "empty judgement"),
    ("Rating: [[7]] ... on reflection Rating: [[8]]", "ambiguous"),
    ("Helpfulness score: 6. Overall score: 7.", "ambiguous"),
    ("Rating: [[0]]", "outside"),
    ("Rating: [[11]]", "outside"),
    ("Score: 4/5", "scale other than 10"),
    ("The answer 4 is right but has 3 typos.", "no rating found"),
    ('End with "Rating: [[N]]".', "no rating found"),
    ("I cannot judge this.", "no rating found"),
]


@pytest.mark.parametrize(("text", "rating"), PARSED)
def test_ratings_are_parsed(text: str, rating: float) -> None:
    parsed = parse_rating(text)
    assert (parsed.rating, parsed.reason) == (rating, None)


@pytest.mark.parametrize(("text", "reason"), UNPARSED)
def test_unclear_judgements_are_not_guessed(text: str, reason: str) -> None:
    parsed = parse_rating(text)
    assert parsed.rating is None and parsed.reason is not None and reason in parsed.reason


def test_strip_reasoning() -> None:
    assert strip_reasoning("<think>a</think>b<THINK>c</THINK>d").split() == ["b", "d"]
    assert strip_reasoning("open <think> never closed") == ""
    assert strip_reasoning("tail</think> verdict") == " verdict"


def test_judgement_results_normalize_or_become_rejects() -> None:
    assert judgement_result("Rating: [[10]]").score == 1.0
    assert judgement_result("Rating: [[1]]").score == 0.0
    assert judgement_result("Rating: [[4]]").score == pytest.approx(1 / 3)
    raw = judgement_result("Rating: [[4]]", normalize=False)
    assert (raw.score, raw.checks, raw.details["rating"]) == (4.0, {"rating_parsed": True}, 4.0)
    bad = judgement_result("no idea " * 1000)
    assert math.isnan(bad.score) and bad.checks == {"rating_parsed": False}
    assert bad.error is not None and bad.error.startswith("unparseable judgement (no rating found)")
    assert bad.details["judgement"].startswith("no idea") and len(bad.details["judgement"]) == 4000


def test_judge_messages_hold_prompt_and_answer_literally() -> None:
    system, user = build_judge_messages("Explain {answer} braces {}", "Use {question} and }{ here")
    assert system["role"] == "system" and user["role"] == "user"
    assert "[User request]\nExplain {answer} braces {}\n" in user["content"]
    assert "[Assistant's answer]\nUse {question} and }{ here\n" in user["content"]
    assert user["content"].rstrip().endswith('"Rating: [[N]]", where N is an integer from 1 to 10.')
    custom = build_judge_messages("Q", "A", rubric="Q={question} A={answer} Rating: [[N]]")
    assert custom[1]["content"] == "Q=Q A=A Rating: [[N]]"
    with pytest.raises(ValueError, match="answer"):
        build_judge_messages("Q", "A", rubric="only {question}")
    with pytest.raises(ValidationError, match="placeholders"):
        JudgeOptions(model="m", rubric="no placeholders")
    assert "{question}" in DEFAULT_RUBRIC and "{answer}" in DEFAULT_RUBRIC


@dataclass
class FakeEngine:
    """Implements the generation ``Engine`` protocol with canned texts."""

    texts: list[str]
    seen: list[tuple[list[str], list[SamplingSpec]]] = field(default_factory=list)

    @property
    def tokenizer(self) -> Any:
        class Template(WordTokenizer):
            def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
                assert kwargs == {"tokenize": False, "add_generation_prompt": True}
                return "|".join(f"{m['role']}:{m['content'][:12]}" for m in messages) + "|assistant:"

        return Template()

    def complete(self, prompts: list[list[int]], specs: list[SamplingSpec]) -> list[list[Completion]]:
        self.seen.append(([self.tokenizer.decode(p) for p in prompts], specs))
        return [
            [Completion(text=t, token_ids=(1, 2, 3), finish_reason="stop", stop_reason=None)]
            for t in self.texts
        ]


def test_judge_through_a_generation_engine() -> None:
    engine = FakeEngine(["Fine. Rating: [[8]]", "Hmm."])
    scorer = JudgeScorer(EngineChatClient(engine, max_tokens=64))
    results = scorer.score_batch([ScoreInput(prompt="Q1", answer="A1"), ScoreInput(prompt="Q2", answer="A2")])
    assert results[0].score == pytest.approx(7 / 9) and results[0].error is None
    assert results[1].error is not None and results[1].details == {"judgement": "Hmm."}
    prompts, specs = engine.seen[0]
    assert prompts[0].startswith("system:You are an i|user:Rate the ass") and prompts[0].endswith(
        "|assistant:"
    )
    assert specs == [SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=64)] * 2


# ---- the HTTP client against a local stub of an OpenAI-compatible server ----


class StubState:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.fail_first = 0
        self.status = 200
        self.lock = threading.Lock()


def _handler(state: StubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(body)
                state.auth.append(self.headers.get("Authorization"))
                failing = state.fail_first > 0
                state.fail_first -= 1
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": "not found"})
            if failing:
                return self._send(503, {"error": "busy"})
            if state.status != 200:
                return self._send(state.status, {"error": {"message": "bad request"}})
            answer = body["messages"][-1]["content"].split("[Assistant's answer]\n")[1].split("\n")[0]
            verdicts = {"4": "Correct. Rating: [[9]]", "5": "Wrong. Rating: [[2]]"}
            text = verdicts.get(answer, "I am not sure what to think.")
            self._send(
                200,
                {
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                },
            )

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture
def stub() -> Iterator[tuple[str, StubState]]:
    state = StubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _client(base_url: str, **kwargs: Any) -> OpenAIChatClient:
    return OpenAIChatClient(base_url, "judge-model", backoff_s=0.01, progress=False, **kwargs)


def _conversation(answer: str) -> list[dict[str, str]]:
    return build_judge_messages("What is two plus two?", answer)


def test_http_client_sends_chat_requests_in_order(stub: tuple[str, StubState]) -> None:
    base_url, state = stub
    answers = ["4", "5", "7", "4", "5", "4"]
    client = _client(base_url, api_key="sk-test", concurrency=3, max_tokens=77)
    texts = client.chat([_conversation(a) for a in answers])
    client.close()
    assert [parse_rating(t).rating for t in texts] == [9.0, 2.0, None, 9.0, 2.0, 9.0]
    assert len(state.requests) == 6 and set(state.auth) == {"Bearer sk-test"}
    request = state.requests[0]
    assert (request["model"], request["max_tokens"], request["temperature"], request["n"]) == (
        "judge-model",
        77,
        0.0,
        1,
    )
    assert [m["role"] for m in request["messages"]] == ["system", "user"]


def test_http_client_retries_busy_servers_then_gives_up(stub: tuple[str, StubState]) -> None:
    base_url, state = stub
    state.fail_first = 2
    assert _client(base_url, max_retries=2).chat([_conversation("4")]) == ["Correct. Rating: [[9]]"]
    assert len(state.requests) == 3 and state.auth == [None] * 3
    state.fail_first = 5
    with pytest.raises(ChatEndpointError, match="503"):
        _client(base_url, max_retries=1).chat([_conversation("4")])
    state.fail_first, state.status = 0, 400
    with pytest.raises(ChatEndpointError, match="HTTP 400"):
        _client(base_url, max_retries=3).chat([_conversation("4")])
    with pytest.raises(ChatEndpointError, match="404"):
        _client(base_url.removesuffix("/v1") + "/nope").chat([_conversation("4")])


def test_http_client_reports_an_unreachable_endpoint() -> None:
    with pytest.raises(ChatEndpointError, match="ConnectError"):
        _client("http://127.0.0.1:9/v1", max_retries=1, timeout_s=2).chat([_conversation("4")])


def test_api_key_comes_from_the_named_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BVPO_TEST_JUDGE_KEY", "sk-env")
    assert api_key_from_env("BVPO_TEST_JUDGE_KEY") == "sk-env"
    assert api_key_from_env(None) is None
    monkeypatch.delenv("BVPO_TEST_JUDGE_KEY")
    with pytest.raises(ChatEndpointError, match="BVPO_TEST_JUDGE_KEY"):
        api_key_from_env("BVPO_TEST_JUDGE_KEY")


def test_judge_in_the_scoring_stage(stub: tuple[str, StubState], monkeypatch: pytest.MonkeyPatch) -> None:
    base_url, state = stub
    monkeypatch.setenv("BVPO_TEST_JUDGE_KEY", "sk-stage")
    config = ScoringConfig(
        scorers=[
            {"name": "verifiable", "weight": 0.5},
            {
                "name": "judge",
                "weight": 0.5,
                "options": {
                    "base_url": base_url,
                    "model": "judge-model",
                    "api_key_env": "BVPO_TEST_JUDGE_KEY",
                },
            },
        ]
    )
    prompt = {"prompt_id": "p", "prompt": "What is two plus two?", "task_type": "math"}
    prompt |= {"reference_answer": "4", "constraints": "[]"}
    gens = [
        {"generation_id": g, "prompt_id": "p", "mode": "trace", "answer": a, "trace": "secret trace"}
        for g, a in [("g1", "4"), ("g2", "5"), ("g3", "7")]
    ]
    result = score_generations(gens, {"p": prompt}, config)
    assert [r["generation_id"] for r in result.rows] == ["g1", "g2"]
    first = result.rows[0]
    assert json.loads(first["components"]) == {"verifiable": 1.0, "judge": pytest.approx(8 / 9)}
    assert first["score"] == pytest.approx(0.5 + 0.5 * 8 / 9)
    assert json.loads(first["checks"]) == {"verifiable.answer_correct": True, "judge.rating_parsed": True}
    assert json.loads(first["details"])["judge"] == {"rating": 9.0, "judgement": "Correct. Rating: [[9]]"}
    (reject,) = result.rejects
    assert reject["row_key"] == "g3" and reject["reason"] == "judge: unparseable judgement (no rating found)"
    assert json.loads(reject["payload"])["details"]["judge"]["judgement"] == "I am not sure what to think."
    assert set(state.auth) == {"Bearer sk-stage"}
    assert all("secret trace" not in json.dumps(r) for r in state.requests)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[Sequence[list[dict[str, str]]]] = []

    def chat(self, conversations: Sequence[list[dict[str, str]]]) -> list[str]:
        self.calls.append(conversations)
        return ["Rating: [[5]]"] * len(conversations)


def test_judge_scorer_with_any_chat_client() -> None:
    client = _Recorder()
    results = JudgeScorer(client, normalize=False).score_batch([ScoreInput(prompt="Q", answer="A")] * 3)
    assert [r.score for r in results] == [5.0] * 3 and len(client.calls) == 1
    assert JudgeScorer(client).score_batch([]) == [] and len(client.calls) == 1
