"""Security: secrets stay out of every output, remote code runs only when asked, SQL cannot reach secrets.

1. Secrets (HF token, the generation and judge ``api_key_env`` keys, Prefect auth, cloud keys) are planted
   in the environment with unique values; a run through prompts, generation over HTTP (the key really
   sent), judge scoring over HTTP, pairing, reference log-probs, training and evaluation must not write
   any of them to a log record, stdout/stderr, a Prefect artifact, a Parquet file, the catalog (stored
   configs), a checkpoint or any other file in the workspace, nor to the CLI's outputs. A server echoing
   the key in an error body must not get it into the error message either.
2. ``trust_remote_code`` is off unless set: a model folder carrying its own code (``auto_map``) is loaded
   with the library's classes and its code never runs, in training/reference loading, tokenizers, the
   generation child and the vLLM engine arguments; set explicitly, it is passed on.
3. ``bvpo sql`` cannot read the environment, DuckDB secrets or the network (the rest of the SQL guards is
   in tests/test_storage_sql.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import sys
import threading
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import pipeline.evaluation.engine as eval_engine
import pipeline.generation.worker as worker
import tasks.stages as stages
from flows.cli import app
from pipeline.config import PipelineConfig, RewardModelOptions, load_config
from storage import DatasetStore, QueryError, run_readonly_query
from tests.reliability_helpers import (
    ARTIFACTS,
    install_fake_child_process,
    pipeline_config,
    quiet_prefect,
    write_prompt_file,
)
from tests.tiny_checkpoint import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SECRET_VARIABLES = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "BVPO_TEST_GEN_KEY",  # generation.api_key_env
    "BVPO_TEST_JUDGE_KEY",  # the judge's api_key_env
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "AWS_SECRET_ACCESS_KEY",
)

pytestmark = pytest.mark.timeout(120)


# --- a fake OpenAI-compatible server (completions for generation, chat for the judge) ---------------------


class FakeOpenAI(BaseHTTPRequestHandler):
    """Answers /v1/models, /v1/completions and /v1/chat/completions; records the Authorization headers."""

    seen: ClassVar[list[str]] = []
    echo_401 = False
    answers = itertools.count()

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: Any) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _text(self, payload: dict[str, Any]) -> str:
        return "let me think" if payload.get("stop") else f"The answer is {next(self.answers) % 3 + 1}."

    def do_GET(self) -> None:
        # A served folder named like the tiny model (the served-model check compares the last component).
        self._send(200, {"data": [{"id": "fake-model", "root": "/srv/model"}]})

    def do_POST(self) -> None:
        auth = self.headers.get("Authorization", "")
        self.seen.append(auth)
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.echo_401:  # a misconfigured proxy that quotes the credentials it refused
            self._send(401, f'{{"error": "invalid credentials: {auth}"}}')
        elif self.path.endswith("/chat/completions"):
            self._send(200, {"choices": [{"index": 0, "message": {"content": "Fine. Rating: [[7]]"}}]})
        else:
            self._send(200, {"choices": [self._choice(payload, i) for i in range(payload["n"])]})

    def _choice(self, payload: dict[str, Any], index: int) -> dict[str, Any]:
        """A vLLM-like choice in the tiny model's ids (a trace closes itself; an answer ends with EOS)."""
        from tests.tiny_checkpoint import EOS_ID, char_ids

        stop = (payload.get("stop") or [None])[0]
        text = self._text(payload) + ("\n" + stop if stop else "")
        ids = char_ids(text) + ([] if stop else [EOS_ID])
        return {"index": index, "text": text, "finish_reason": "stop", "stop_reason": stop, "token_ids": ids}


@pytest.fixture
def server() -> Iterator[str]:
    FakeOpenAI.seen = []
    FakeOpenAI.echo_401 = False
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A unique secret value in each secret-holding environment variable."""
    values = {name: f"SECRET-{name}-{secrets.token_hex(12)}" for name in SECRET_VARIABLES}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _http_config(tmp_path: Path, tiny: Path, url: str, **sections: dict[str, Any]) -> PipelineConfig:
    judge = {"base_url": url, "model": "fake-model", "api_key_env": "BVPO_TEST_JUDGE_KEY", "max_retries": 0}
    return pipeline_config(
        tmp_path / "ws",
        tiny,
        write_prompt_file(tmp_path / "prompts.jsonl", 10),
        generation={
            "engine": "openai",
            "base_url": url,
            "api_key_env": "BVPO_TEST_GEN_KEY",
            "max_retries": 0,
            "concurrency": 2,
        },
        scoring={"scorers": [{"name": "verifiable"}, {"name": "judge", "weight": 0.5, "options": judge}]},
        **sections,
    )


def _found_in(text: str, values: dict[str, str]) -> list[str]:
    return [name for name, value in values.items() if value in text]


def _workspace_text(workspace: Path) -> dict[str, str]:
    """Every file under the workspace as text: Parquet files decoded to JSON rows, others as raw bytes."""
    out = {}
    for path in sorted(p for p in workspace.rglob("*") if p.is_file()):
        raw = path.read_bytes().decode("latin-1")
        if path.suffix == ".parquet":
            raw += json.dumps(pq.read_table(path).to_pylist(), default=str)
        out[str(path.relative_to(workspace))] = raw
    return out


def test_planted_secrets_never_reach_logs_artifacts_datasets_configs_or_cli_output(
    tmp_path: Path,
    tiny: Path,
    server: str,
    planted: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    install_fake_child_process(monkeypatch)  # evaluation's engine; generation goes over HTTP
    config = _http_config(tmp_path, tiny, server)
    logger = logging.getLogger("bvpo.security-test")
    with caplog.at_level(logging.DEBUG), quiet_prefect(logger):
        prompts = stages.prompts_task.fn(config)
        generations = stages.generate_task.fn(config, prompts)
        scores = stages.score_task.fn(config, prompts, generations)
        trace, empty = stages.pair_task.fn(config, generations, scores)
        ref = stages.reference_logps_task.fn(config, trace, empty)
        trained = stages.train_task.fn(config, trace, empty, ref)
        stages.evaluate_task.fn(config, prompts, trained.checkpoint, trained.metrics)
        artifacts = list(ARTIFACTS)
    # The keys were really used (so a leak would have had something to leak) ...
    bearer = {f"Bearer {planted['BVPO_TEST_GEN_KEY']}", f"Bearer {planted['BVPO_TEST_JUDGE_KEY']}"}
    assert set(FakeOpenAI.seen) == bearer
    assert generations.row_count > 0 and scores.row_count > 0 and trace.row_count + empty.row_count > 0
    # ... and went nowhere else.
    runner = CliRunner()
    cli = [
        runner.invoke(app, ["sql", "-w", str(config.workspace), "select * from datasets"]),
        runner.invoke(app, ["datasets", "-w", str(config.workspace)]),
        runner.invoke(app, ["lineage", "eval_results", "-w", str(config.workspace)]),
    ]
    assert all(r.exit_code == 0 for r in cli), [r.output for r in cli]
    assert "BVPO_TEST_JUDGE_KEY" in cli[0].stdout  # stored configs name the variable, never its value
    captured = capfd.readouterr()
    outputs = {
        "log records": "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records),
        "stdout/stderr": captured.out + captured.err,
        "artifacts": json.dumps(artifacts, default=str),
        "cli": "\n".join(r.stdout + r.stderr for r in cli),
        "catalog rows": json.dumps(
            DatasetStore(config.workspace).catalog.snapshot().to_pylist(), default=str
        ),
        "flow parameters": config.model_dump_json(),
        **_workspace_text(config.workspace),
    }
    assert len(outputs) > 20 and any(name.endswith(".parquet") for name in outputs)
    leaks = {where: found for where, text in outputs.items() if (found := _found_in(text, planted))}
    assert leaks == {}


def test_an_api_key_echoed_by_the_endpoint_is_redacted_from_errors(
    tmp_path: Path, tiny: Path, server: str, planted: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.generation.openai_engine import EndpointError
    from pipeline.scoring.openai_chat import ChatEndpointError

    config = _http_config(tmp_path, tiny, server)
    FakeOpenAI.echo_401 = True
    with caplog.at_level(logging.DEBUG), quiet_prefect(logging.getLogger("bvpo.security-test")):
        prompts = stages.prompts_task.fn(config)
        with pytest.raises(EndpointError) as generation:
            stages.generate_task.fn(config, prompts)
        store = DatasetStore(config.workspace)
        rows = [
            {"generation_id": f"g{i}", "prompt_id": p["prompt_id"], "mode": "trace", "answer": "1"}
            for i, p in enumerate(store.read_rows(prompts))
        ]
        from pipeline.scoring.stage import score_generations

        with pytest.raises(ChatEndpointError) as judge:
            score_generations(rows, {p["prompt_id"]: p for p in store.read_rows(prompts)}, config.scoring)
    messages = {"generation": str(generation.value), "judge": str(judge.value)}
    assert messages["generation"].endswith('answered HTTP 401: {"error": "invalid credentials: Bearer ***"}')
    assert messages["judge"].endswith('answered HTTP 401: {"error": "invalid credentials: Bearer ***"}')
    assert FakeOpenAI.seen[0] == f"Bearer {planted['BVPO_TEST_GEN_KEY']}"  # the real key was sent
    assert _found_in(json.dumps(messages) + caplog.text, planted) == []


# --- trust_remote_code ---------------------------------------------------------------------------------


@pytest.fixture
def code_carrying_model(tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A copy of the tiny model whose config and tokenizer point (auto_map) at code that leaves a marker."""
    import shutil

    import transformers.dynamic_module_utils as dynamic

    modules = tmp_path / "hf-modules"
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(modules))  # the copied code lands here
    monkeypatch.syspath_prepend(str(modules))
    folder, marker = tmp_path / "remote-code-model", tmp_path / "remote-code-ran"
    shutil.copytree(tiny, folder)
    for name, key, value in (
        ("config.json", "AutoConfig", "custom.CustomConfig"),
        ("config.json", "AutoModelForCausalLM", "custom.CustomModel"),
        ("tokenizer_config.json", "AutoTokenizer", ["custom.CustomTokenizer", None]),
    ):
        data = json.loads((folder / name).read_text())
        data.setdefault("auto_map", {})[key] = value
        (folder / name).write_text(json.dumps(data))
    (folder / "custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('the repository code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class CustomConfig(LlamaConfig): pass\n"
        "class CustomModel(LlamaForCausalLM): config_class = CustomConfig\n"
        "class CustomTokenizer(PreTrainedTokenizerFast): pass\n"
    )
    return folder, marker


def test_trust_remote_code_is_off_by_default_everywhere() -> None:
    assert PipelineConfig().model.trust_remote_code is False
    assert RewardModelOptions(model="m").trust_remote_code is False
    for name in ("default.yaml", "tiny.yaml"):
        assert load_config(ROOT / "configs" / name).model.trust_remote_code is False


def test_a_model_folder_carrying_code_is_loaded_without_running_it(
    tmp_path: Path, code_carrying_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.generation.stage import load_tokenizer
    from pipeline.training.modeling import load_model_and_tokenizer

    folder, marker = code_carrying_model
    config = pipeline_config(tmp_path / "ws", folder, write_prompt_file(tmp_path / "p.jsonl", 4))
    model, tokenizer = load_model_and_tokenizer(str(folder), config.model.trust_remote_code)
    assert (type(model).__name__, type(load_tokenizer(str(folder))).__name__) == (
        "LlamaForCausalLM",
        type(tokenizer).__name__,
    )
    with quiet_prefect():  # the stage path: reference log-probs load the model the same way
        empty = [DatasetStore(config.workspace).put(k, _empty(k), config={}, parents=[]) for k in _PAIRS]
        assert stages.reference_logps_task.fn(config, *empty).row_count == 0
    assert not marker.exists()
    # The folder's code is real: asked for explicitly, it runs.
    model, _ = load_model_and_tokenizer(str(folder), trust_remote_code=True)
    assert type(model).__name__ == "CustomModel" and marker.exists()


_PAIRS = ("pairs_trace", "pairs_empty")


def _empty(kind: str) -> Any:
    from storage import schema_for

    return schema_for(kind).empty_table()


@pytest.mark.parametrize("explicit", [False, True])
def test_the_flag_reaches_the_generation_and_evaluation_engines_only_as_set(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch, explicit: bool
) -> None:
    seen: list[tuple[str, bool]] = []
    fake = install_fake_child_process  # the real in-process replacements, wrapped to record the flag
    fake(monkeypatch)
    for module, name in ((worker, "run_shards_in_child"), (eval_engine, "generate_for_models")):
        original = getattr(module, name)

        def record(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            seen.append((_name, kwargs["trust_remote_code"]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, record)
    overrides = {"model": {"trust_remote_code": True}} if explicit else {}
    config = pipeline_config(tmp_path / "ws", tiny, write_prompt_file(tmp_path / "p.jsonl", 8), **overrides)
    with quiet_prefect():
        prompts = stages.prompts_task.fn(config)
        stages.generate_task.fn(config, prompts)
        stages.evaluate_task.fn(config, prompts, str(tiny), prompts)
    assert seen == [
        ("run_shards_in_child", explicit),
        ("generate_for_models", explicit),  # the reference and the checkpoint, one engine
    ]


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.usefixtures("engine_env_cleared")
def test_the_vllm_engine_gets_the_flag_as_set(monkeypatch: pytest.MonkeyPatch, explicit: bool) -> None:
    from pipeline.config import GenerationConfig
    from pipeline.generation.engine import open_vllm_engine

    created: list[dict[str, Any]] = []

    class FakeLLM:
        def __init__(self, **kwargs: Any) -> None:
            created.append(kwargs)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    with open_vllm_engine("some/model", GenerationConfig(), trust_remote_code=explicit):
        pass
    assert created[0]["trust_remote_code"] is explicit


def test_the_cli_accepts_the_flag_only_when_written_out(tmp_path: Path) -> None:
    assert load_config(None, ["model.trust_remote_code=true"]).model.trust_remote_code is True
    assert load_config(None, []).model.trust_remote_code is False
    result = CliRunner().invoke(app, ["run", "--set", "model.trust_remote_code=maybe"])
    assert result.exit_code == 1 and "model.trust_remote_code" in result.stderr


# --- SQL cannot reach secrets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("select getenv('HF_TOKEN')", "getenv does not exist"),
        ("select * from duckdb_secrets()", "Permission Error"),
        ("select * from read_text('https://example.com/token')", "Permission Error"),
        ("select * from read_parquet('s3://bucket/x.parquet')", "Permission Error"),
        ("select * from read_text('/proc/self/environ')", "Permission Error"),
    ],
)
def test_sql_cannot_read_the_environment_secrets_or_the_network(
    tmp_path: Path, planted: dict[str, str], query: str, error: str
) -> None:
    import pyarrow as pa

    store = DatasetStore(tmp_path / "ws")
    rows = {"stage": ["s"], "row_key": ["k"], "reason": ["r"], "payload": ["{}"]}
    store.put("rejects", pa.table(rows), config={}, parents=[])
    with pytest.raises(QueryError) as info:
        run_readonly_query(store.catalog, store.lake, query)
    assert error in str(info.value)
    assert _found_in(str(info.value), planted) == []
