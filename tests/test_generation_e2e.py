"""Generation through real vLLM on the embedded SmolLM2-135M (CPU): three engine starts in all.

1. The in-process engine (in its child process) is interrupted after two of three shards; the finished
   shards stay on disk and the engine processes are gone.
2. The rerun generates only the missing shards (one engine for both); its copy of a shard equals the one
   the interrupted run wrote (same seed, same samples); both modes and the tiny trace budget are checked on
   the rows.
3. vLLM's own OpenAI-compatible server on localhost, through the HTTP engine and the same stage code.

Token exactness (docs/method.md §Token-exact sequences): both engines log every token-id prompt and the ids
vLLM returned (``BVPO_ENGINE_LOG``); for every row, the sequence the trainer scores (stored ids → pairs →
encoding → batch) must be exactly a logged prompt plus vLLM's output, the only ids not from vLLM being the
prefilled tags and the forced close tag.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest

from pipeline.config import GenerationConfig, PairingConfig
from pipeline.generation.engine_log import ENV_VAR, read_log
from pipeline.generation.reasoning import TraceFormat
from pipeline.generation.segments import Segment
from pipeline.generation.shards import ShardStore
from pipeline.generation.stage import GenerateStageResult, run_generate_stage
from pipeline.model_assets import embedded_checkpoint
from pipeline.pairing import build_pairs
from pipeline.prompts.builtin import build_builtin_prompts
from pipeline.training.encoding import fit_length, pair_tokens
from pipeline.training.sequences import pairs_batch
from storage.schemas import conform

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

TRACE_BUDGET = 6
CONFIG = GenerationConfig(
    samples_per_prompt=2,
    temperature=0.8,
    max_trace_tokens=TRACE_BUDGET,
    max_answer_tokens=24,
    shard_size=2,
    seed=11,
)
PROMPTS = [{"prompt_id": r.prompt_id, "prompt": r.prompt} for r in build_builtin_prompts(6, seed=3)]
TOO_LONG = {"prompt_id": "too-long", "prompt": "Please summarize: " + "lorem ipsum dolor " * 400}


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def checkpoint() -> str:
    return str(embedded_checkpoint())


@pytest.fixture(scope="module")
def resumed(checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run 1 interrupted after 2 shards; shard 1 set aside; run 2 resumes (shards 1 and 2)."""
    staging = tmp_path_factory.mktemp("staging")
    engine_log = tmp_path_factory.mktemp("engine-log") / "io.jsonl"
    os.environ[ENV_VAR] = str(engine_log)  # the engine's child process inherits it
    seen: list[dict[str, Any]] = []

    def interrupt_after_two_shards(event: dict[str, Any]) -> None:
        seen.append(event)
        if sum(e["event"] == "shard_done" for e in seen) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_generate_stage(
            checkpoint,
            [*PROMPTS, TOO_LONG],
            CONFIG,
            model_label="embedded",
            staging_dir=staging,
            on_event=interrupt_after_two_shards,
        )
    files_after_interrupt = sorted(p.name for p in staging.iterdir())
    child_pid = next(e["pid"] for e in seen if e["event"] == "engine_ready")
    first_shard_1 = ShardStore(staging).read(1)
    ShardStore(staging).path(1).unlink()

    events: list[dict[str, Any]] = []
    result = run_generate_stage(
        checkpoint,
        [*PROMPTS, TOO_LONG],
        CONFIG,
        model_label="embedded",
        staging_dir=staging,
        on_event=events.append,
    )
    del os.environ[ENV_VAR]
    return {
        "engine_log": str(engine_log),
        "files_after_interrupt": files_after_interrupt,
        "child_pid": child_pid,
        "first_shard_1": first_shard_1,
        "events": events,
        "result": result,
    }


def test_an_interrupted_run_keeps_finished_shards_and_ends_its_engine(resumed: dict[str, Any]) -> None:
    assert resumed["files_after_interrupt"] == ["shard-00000.parquet", "shard-00001.parquet"]
    with pytest.raises(ProcessLookupError):
        os.killpg(resumed["child_pid"], 0)  # the child's whole session (engine core included) is gone


def test_the_rerun_generates_only_missing_shards_without_duplicates(resumed: dict[str, Any]) -> None:
    result: GenerateStageResult = resumed["result"]
    assert [e["index"] for e in resumed["events"] if e["event"] == "shard_done"] == [1, 2]
    assert (result.shards_total, result.shards_reused, result.shards_generated) == (3, 1, 2)
    assert len(result.rows) == len(PROMPTS) * 2 * CONFIG.samples_per_prompt
    ids = [r["generation_id"] for r in result.rows]
    assert len(set(ids)) == len(ids)
    assert {r["prompt_id"] for r in result.rows} == {p["prompt_id"] for p in PROMPTS}
    assert {(r["shard_index"], r["seed"]) for r in result.rows} == {(i, CONFIG.seed + i) for i in range(3)}


def test_same_seed_gives_the_same_samples_on_a_fresh_engine(resumed: dict[str, Any]) -> None:
    again = [r for r in resumed["result"].rows if r["shard_index"] == 1]

    def texts(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return sorted((r["generation_id"], r["response_text"]) for r in rows)

    assert texts(again) == texts(resumed["first_shard_1"])


def test_too_long_prompt_is_rejected_by_token_count(resumed: dict[str, Any]) -> None:
    (reject,) = [r for r in resumed["result"].rejects if r["row_key"] == "too-long"]
    assert reject["stage"] == "generate" and "> max_model_len 1024" in reject["reason"]


def check_rows(rows: list[dict[str, Any]], engine: str) -> None:
    """Both modes' structure, and the tiny trace budget closing traces that still get answers."""
    trace = [r for r in rows if r["mode"] == "trace"]
    empty = [r for r in rows if r["mode"] == "empty"]
    assert len(trace) == len(empty) == len(rows) // 2
    for r in rows:
        assert r["engine"] == engine and r["prompt_text"].endswith("assistant\n")
        assert r["prompt_tokens"] > 10
        assert r["answer_tokens"] >= 1, r  # a trace the model ended with EOS is closed and answered too
        assert r["finish_reason"] in ("stop", "length")
    for r in empty:
        assert r["trace"] is None and r["trace_tokens"] == 0
        assert r["response_text"].startswith("<think>\n\n</think>\n\n")
    for r in trace:
        assert (0 if r["trace_finish_reason"] == "eos" else 1) <= r["trace_tokens"] <= TRACE_BUDGET
        assert r["response_text"].startswith("<think>\n") and "</think>" in r["response_text"]
        assert not r["eos_emitted"] or r["response_segments"][-1] == Segment.EOS
        assert r["trace_finish_reason"] in ("close_tag", "budget", "eos")
        assert r["budget_forced"] == (r["trace_finish_reason"] == "budget")
    forced = [r for r in trace if r["budget_forced"]]
    assert forced, "a 6-token budget should stop most traces"
    assert all(r["trace_tokens"] == TRACE_BUDGET and not r["trace_closed"] for r in forced)
    answered = [r for r in forced if r["parse_ok"]]
    assert len(answered) >= len(forced) // 2 and all(r["answer"].strip() for r in answered)


def test_both_modes_and_the_trace_budget_in_process(resumed: dict[str, Any]) -> None:
    check_rows(resumed["result"].rows, "vllm")


def check_token_exact(rows: list[dict[str, Any]], log_path: str, tokenizer: Any) -> None:
    """Every row, and every trained sequence, is a logged vLLM prompt + vLLM's output (see module doc)."""
    log = read_log(log_path)
    forced = TraceFormat(CONFIG.reasoning).forced_close_ids(tokenizer)

    def produced(full: list[int]) -> tuple[list[int], list[int]] | None:
        """The logged (prompt, output) whose concatenation is ``full``."""
        for prompt, outputs in log.items():
            if len(prompt) < len(full) and list(prompt) == full[: len(prompt)]:
                for out in outputs:
                    if list(prompt) + out == full:
                        return list(prompt), out
        return None

    full_of: dict[str, list[int]] = {}
    for r in rows:
        full = r["prompt_token_ids"] + r["response_token_ids"]
        last = produced(full)
        assert last is not None, f"{r['generation_id']}: stored ids are not a logged prompt + vLLM output"
        if r["mode"] == "trace" and (r["trace_finish_reason"] != "eos" or CONFIG.reasoning.close_on_eos):
            fed = last[0]  # the answer pass was fed prompt + open tag + vLLM's trace ids + forced ids
            # (a trace closed on its EOS: vLLM's trace ids but that EOS, then the forced close tag)
            drop = 1 if r["trace_finish_reason"] == "eos" else 0
            first = [
                (list(p), out)
                for p, outs in log.items()
                for out in outs
                if list(p) == r["prompt_token_ids"] + fed[len(r["prompt_token_ids"]) : len(p)]
                and fed[: len(p) + len(out) - drop] == list(p) + out[: len(out) - drop]
                and fed[len(p) + len(out) - drop :] in ([], forced)
            ]
            assert first, f"{r['generation_id']}: the answer pass was not fed vLLM's own trace ids"
        full_of[r["generation_id"]] = full
    # The trainer's side: pairs (SQL) -> stored ids -> encoding -> the batch the model is run on.
    gens = conform("generations", pa.Table.from_pylist(rows))
    scores = pa.Table.from_pylist(
        [{"generation_id": r["generation_id"], "score": float(i % 5)} for i, r in enumerate(rows)]
    )
    result = build_pairs(
        gens, scores, PairingConfig(min_margin=0.0, allow_cut_chosen=True, rejected_must_parse=False)
    )
    pairs = result.pairs_trace.to_pylist() + result.pairs_empty.to_pylist()
    assert pairs
    for pair in pairs:
        tokens, reason = fit_length(pair_tokens(pair), 4096)
        assert tokens is not None, reason
        batch = pairs_batch([tokens], pad_id=-1)
        for row, side in enumerate(("chosen_generation_id", "rejected_generation_id")):
            scored = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
            assert scored == full_of[pair[side]]


AGREEMENT_BOUND = 0.1
"""Mean |reference − sampler| log-prob per sampled token, engine and reference pass both in bf16 (the
defaults): the default ``train.agreement_warn_mean_abs``. Measured on 12 builtin prompts x 4 samples
(docs/method.md §Token-exact sequences): 0.032 (reasoning off) and 0.044 (on) nats; with both in fp32, 4e-6.
A template or tokenizer mismatch shifts token boundaries and costs nats on the tokens it touches."""


def test_reference_pass_agrees_with_the_sampler_per_token(resumed: dict[str, Any], checkpoint: str) -> None:
    from pipeline.training.reference import compute_reference_logps

    rows = resumed["result"].rows
    gens = conform("generations", pa.Table.from_pylist(rows))
    scores = pa.Table.from_pylist(
        [{"generation_id": r["generation_id"], "score": float(i % 5)} for i, r in enumerate(rows)]
    )
    pairs = build_pairs(gens, scores, PairingConfig(min_margin=0.0, allow_cut_chosen=True))
    result = compute_reference_logps(
        checkpoint,
        {"trace": pairs.pairs_trace.to_pylist(), "empty": pairs.pairs_empty.to_pylist()},
        model_label="embedded",
        max_length=1024,
        bf16=True,
        generations={r["generation_id"]: r for r in rows},
        sampler_dtype=CONFIG.dtype,
    )
    overall = {r["mode"]: r for r in result.agreement if r["segment"] == "all"}
    assert set(overall) == {"trace", "empty"} and not result.rejects
    for row in overall.values():
        assert row["tokens"] > 20
        assert row["mean_abs_delta"] <= AGREEMENT_BOUND, row


def test_the_trainer_scores_exactly_the_ids_vllm_produced_in_process(
    resumed: dict[str, Any], checkpoint: str
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    check_token_exact(resumed["result"].rows, resumed["engine_log"], tokenizer)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served(checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's OpenAI-compatible server on the embedded model; yields its base URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        checkpoint,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "1024",
        "--enforce-eager",
        "--seed",
        "0",
    ]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_LOGGING_LEVEL="WARNING")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not start in 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_http_engine_against_vllms_openai_server(
    served: str, checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    config = CONFIG.model_copy(update={"engine": "openai", "base_url": served, "concurrency": 8})
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "io.jsonl"))
    result = run_generate_stage(checkpoint, PROMPTS[:4], config, model_label="embedded", staging_dir=tmp_path)
    check_token_exact(result.rows, str(tmp_path / "io.jsonl"), AutoTokenizer.from_pretrained(checkpoint))
    assert (result.shards_total, result.shards_generated) == (2, 2)
    assert len(result.rows) == 4 * 2 * CONFIG.samples_per_prompt
    assert {(r["seed"], r["engine"]) for r in result.rows} == {(None, "openai")}
    check_rows(result.rows, "openai")
    shutil.rmtree(tmp_path, ignore_errors=True)
