"""Generation without a model: rows and parsing, token-length rejects, shards and resume, stats, events."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from pipeline.config import GenerationConfig, PipelineConfig, ReasoningConfig
from pipeline.generation.engine import Completion, SamplingSpec
from pipeline.generation.limits import check_prompt_lengths, prompt_token_needs
from pipeline.generation.sampler import generate_responses
from pipeline.generation.segments import Segment
from pipeline.generation.shards import ShardStore, plan_shards
from pipeline.generation.stage import parse_rejects, run_generate_stage
from pipeline.generation.stats import generation_stats
from pipeline.generation.worker import EVENT_PREFIX, ChildOutput
from storage.schemas import conform
from tests.generation_fakes import EngineCrash, ScriptedEngine, WordTokenizer

PROMPTS = [{"prompt_id": f"p{i}", "prompt": f"What is {i} plus {i}?"} for i in range(7)]


def config(**overrides: object) -> GenerationConfig:
    settings: dict[str, object] = {
        "samples_per_prompt": 2,
        "max_trace_tokens": 8,
        "max_answer_tokens": 8,
        "max_model_len": 64,
    }
    return GenerationConfig.model_validate(settings | overrides)


def test_both_modes_make_rows_with_trace_and_empty_trace() -> None:
    rows = generate_responses(ScriptedEngine(), PROMPTS[:2], config(), "m", shard_index=3, seed=7)
    assert len(rows) == 2 * 2 * 2
    trace = [r for r in rows if r["mode"] == "trace"]
    empty = [r for r in rows if r["mode"] == "empty"]
    assert len(trace) == len(empty) == 4
    tok = WordTokenizer()
    for r in trace:
        assert r["trace"] and r["trace_closed"] and not r["budget_forced"]
        assert r["trace_finish_reason"] == "close_tag"
        # The model wrote the close tag and the blank line itself: nothing was edited or re-wrapped.
        assert r["response_text"] == f"<think>\n{r['trace']}\n</think>\n\n{r['answer']}"
        assert r["trace_tokens"] == 4  # three words and the close tag
        assert Segment.FORCED not in r["response_segments"]
    for r in empty:
        assert r["trace"] is None and r["trace_tokens"] == 0 and r["trace_finish_reason"] is None
        assert r["response_text"] == f"<think>\n\n</think>\n\n{r['answer']}"
    for r in rows:
        assert r["parse_ok"] and r["parse_error"] is None
        assert (r["shard_index"], r["seed"], r["engine"], r["model"]) == (3, 7, "fake", "m")
        assert (r["open_tag"], r["close_tag"], r["reasoning_control"]) == ("<think>", "</think>", "prefill")
        assert r["prompt_tokens"] == len(r["prompt_text"].split()) == len(r["prompt_token_ids"])
        assert r["generation_id"] == f"{r['prompt_id']}-{r['mode']}-{r['sample_index']}"
        # Text columns are decoded from the ids; EOS is stored once, as the last token, where emitted.
        assert tok.decode(r["prompt_token_ids"]) == r["prompt_text"]
        assert tok.decode(r["response_token_ids"]) == r["response_text"] + "<eos>"
        assert r["eos_emitted"] and r["response_segments"][-1] == Segment.EOS
        assert r["response_segments"].count(Segment.EOS) == 1
        sampled = [lp for lp, s in zip(r["sampler_logprobs"], r["response_segments"], strict=True) if s != 0]
        assert sampled == [-0.5] * len(sampled)
        pairs = zip(r["sampler_logprobs"], r["response_segments"], strict=True)
        assert all(lp is None for lp, s in pairs if s == 0)
    assert conform("generations", pa.Table.from_pylist(rows)).num_rows == len(rows)


def test_one_batched_call_per_pass_with_the_trace_budget_and_stop_tag() -> None:
    engine = ScriptedEngine()
    rows = generate_responses(engine, PROMPTS[:3], config(), "m")
    (first_prompts, first_specs), (answer_prompts, answer_specs) = engine.calls
    assert len(first_prompts) == 6 and len(answer_prompts) == 3 * 2
    assert first_specs[0] == SamplingSpec(n=2, temperature=0.8, top_p=0.95, max_tokens=8, stop=("</think>",))
    assert first_specs[1].stop == () and first_specs[1].n == 2
    text = engine.text
    assert text(first_prompts[0]).endswith("<think>\n")
    assert text(first_prompts[1]).endswith("<think>\n\n</think>\n\n")
    assert all(s.n == 1 and s.max_tokens == 8 for s in answer_specs)
    assert all(text(p).endswith("</think>") for p in answer_prompts)  # exactly the ids the model sampled
    # The answer pass continues from the trace's exact ids, and the stored row is prompt + those ids.
    trace_rows = [r for r in rows if r["mode"] == "trace"]
    for row, fed in zip(trace_rows, answer_prompts, strict=True):
        answer_len = row["answer_tokens"]
        assert row["prompt_token_ids"] + row["response_token_ids"][:-answer_len] == fed


def test_budget_forced_trace_is_closed_and_still_answered() -> None:
    rows = generate_responses(ScriptedEngine(trace_words=50), PROMPTS[:1], config(), "m")
    trace = [r for r in rows if r["mode"] == "trace"]
    assert all(r["budget_forced"] and not r["trace_closed"] for r in trace)
    assert all(r["trace_finish_reason"] == "budget" and r["trace_tokens"] == 8 for r in trace)
    assert all(r["answer"] and "</think>\n\n" in r["response_text"] for r in trace)
    forced = WordTokenizer().encode("\n</think>\n\n")
    for r in trace:
        ids, segs = r["response_token_ids"], r["response_segments"]
        assert [t for t, s in zip(ids, segs, strict=True) if s == Segment.FORCED] == forced
        assert segs.count(Segment.TRACE) == 8


class _ScriptedAnswers(ScriptedEngine):
    def __init__(self, answers: list[str], trace_end: tuple[str, str | None]) -> None:
        super().__init__()
        self.answers = answers
        self.trace_end = trace_end

    def complete(self, prompts: list[list[int]], specs: list[SamplingSpec]) -> list[list[Completion]]:
        self.calls.append((prompts, specs))
        if specs[0].stop:
            finish, stop = self.trace_end
            text = "hmm\n</think>" if stop else "hmm"
            return [[self.completion(text, finish, stop) for _ in range(s.n)] for s in specs]
        texts = iter(self.answers)
        return [[self.completion(next(texts), "length", None) for _ in range(s.n)] for s in specs]


def test_unparseable_answers_are_kept_flagged_and_listed_as_rejects() -> None:
    engine = _ScriptedAnswers(["  ", "x </think> y"], trace_end=("stop", "</think>"))
    rows = generate_responses(engine, PROMPTS[:1], config(samples_per_prompt=2), "m")
    trace = [r for r in rows if r["mode"] == "trace"]
    assert [r["parse_error"] for r in trace] == ["empty answer", "answer contains reasoning tags"]
    assert all(r["trace_finish_reason"] == "close_tag" and not r["budget_forced"] for r in trace)
    assert not any(r["eos_emitted"] for r in trace)  # cut answers end without EOS
    rejects = parse_rejects(rows)
    assert {r["row_key"] for r in rejects} == {r["generation_id"] for r in rows if not r["parse_ok"]}
    assert all(r["stage"] == "generate" and json.loads(r["payload"])["prompt_id"] == "p0" for r in rejects)


def test_a_trace_that_ends_the_sequence_is_closed_and_answered_without_its_eos() -> None:
    engine = _ScriptedAnswers(["4", "5"], trace_end=("stop", None))
    rows = generate_responses(engine, PROMPTS[:1], config(samples_per_prompt=2), "m")
    tok = engine.tokenizer
    forced = tok("\n</think>\n\n", add_special_tokens=False)["input_ids"]
    trace = [r for r in rows if r["mode"] == "trace"]
    answer_prompts = engine.calls[1][0]
    for r, fed in zip(trace, answer_prompts, strict=True):
        assert r["trace_finish_reason"] == "eos" and not r["budget_forced"] and r["parse_ok"]
        response, segments = r["response_token_ids"], r["response_segments"]
        assert tok.eos_token_id not in response[: segments.index(Segment.ANSWER)]  # the trace's EOS: dropped
        trace_ids = [t for t, s in zip(response, segments, strict=True) if s == Segment.TRACE]
        assert trace_ids == tok("hmm", add_special_tokens=False)["input_ids"] and r["trace_tokens"] == 1
        assert [t for t, s in zip(response, segments, strict=True) if s == Segment.FORCED] == forced
        # The answer was sampled after exactly the stored ids: prompt + open tag + trace + forced close.
        assert fed == r["prompt_token_ids"] + response[: segments.index(Segment.ANSWER)]
        assert len(r["sampler_logprobs"]) == len(response)
    assert [r["answer"] for r in trace] == ["4", "5"]


def test_a_trace_that_ends_the_sequence_gets_no_answer_without_close_on_eos() -> None:
    engine = _ScriptedAnswers(["unused"] * 2, trace_end=("stop", None))
    cfg = config(samples_per_prompt=2, reasoning=ReasoningConfig(close_on_eos=False))
    rows = generate_responses(engine, PROMPTS[:1], cfg, "m")
    trace = [r for r in rows if r["mode"] == "trace"]
    for r in trace:
        assert r["trace_finish_reason"] == "eos" and not r["parse_ok"] and r["answer"] == ""
        assert "no answer" in r["parse_error"] and r["eos_emitted"]
        assert r["response_segments"][-1] == Segment.EOS and Segment.ANSWER not in r["response_segments"]


def test_native_control_leaves_the_empty_block_to_the_template() -> None:
    cfg = config(reasoning=ReasoningConfig(control="native"))
    engine = ScriptedEngine()
    rows = generate_responses(engine, PROMPTS[:1], cfg, "m")
    first_prompts = engine.calls[0][0]
    assert engine.text(first_prompts[1]).endswith("<think>\n\n</think>\n\n")  # written by the template
    empty = [r for r in rows if r["mode"] == "empty"]
    assert all(
        r["response_text"].strip() == r["answer"] and r["reasoning_control"] == "native" for r in empty
    )


def test_prompts_that_cannot_fit_the_context_window_are_rejected_with_a_reason() -> None:
    tokenizer = WordTokenizer()
    cfg = config()
    need = prompt_token_needs(tokenizer, ["short one"], cfg)[0]
    room = cfg.max_model_len - cfg.max_trace_tokens - cfg.max_answer_tokens
    fits = " ".join(["w"] * (room - need + 2))  # exactly at the limit
    assert prompt_token_needs(tokenizer, [fits], cfg)[0] + 16 == cfg.max_model_len
    prompts = [
        {"prompt_id": "fits", "prompt": fits},
        {"prompt_id": "long", "prompt": fits + " w"},
    ]
    kept, rejects = check_prompt_lengths(tokenizer, prompts, cfg)
    assert [p["prompt_id"] for p in kept] == ["fits"]
    (reject,) = rejects
    assert reject["stage"] == "generate" and reject["row_key"] == "long"
    assert "prompt too long" in reject["reason"] and "> max_model_len 64" in reject["reason"]
    assert json.loads(reject["payload"])["prompt_tokens"] == cfg.max_model_len - 16 + 1


def test_token_need_counts_the_longer_mode_and_the_closing_tag() -> None:
    tokenizer = WordTokenizer()
    # trace: "<|user|> hi <|end|> <|assistant|> " + "<think>\n" + forced "\n", "</think>\n\n" = 7 tokens;
    # empty: the same prompt + "<think>\n\n", "</think>\n\n" = 6 tokens; with a longer close tag:
    cfg = config(reasoning=ReasoningConfig(close_tag="</think> </reasoning>"))
    assert prompt_token_needs(tokenizer, ["hi"], config()) == [7]
    assert prompt_token_needs(tokenizer, ["hi"], cfg) == [8]


def test_shard_plan_sizes_and_seeds() -> None:
    shards = plan_shards(PROMPTS, shard_size=3, seed=10)
    assert [len(s.prompts) for s in shards] == [3, 3, 1]
    assert [s.seed for s in shards] == [10, 11, 12]
    assert [p for s in shards for p in s.prompt_ids] == [p["prompt_id"] for p in PROMPTS]
    assert plan_shards([], 3, 0) == []
    with pytest.raises(ValueError):
        plan_shards(PROMPTS, 0, 0)


def test_a_shard_file_counts_only_when_it_matches_its_plan(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "stage")
    (shard,) = plan_shards(PROMPTS[:2], shard_size=2, seed=0)
    rows = generate_responses(ScriptedEngine(), shard.prompts, config(), "m", shard_index=0, seed=0)
    assert store.finished(shard, 4) is None  # absent
    store.write(0, rows)
    assert store.finished(shard, 4) == rows
    assert [p.name for p in store.root.iterdir()] == ["shard-00000.parquet"]  # no temporary file left
    assert store.finished(shard, 6) is None  # other row count
    (other,) = plan_shards(PROMPTS[2:4], shard_size=2, seed=0)
    assert store.finished(other, 4) is None  # other prompts
    store.write(0, rows[:-1])
    assert store.finished(shard, 4) is None  # truncated
    store.path(0).write_bytes(b"not parquet")
    assert store.finished(shard, 4) is None  # corrupted
    store.remove()
    assert not store.root.exists()


def test_a_crashed_run_resumes_with_only_the_missing_shards(tmp_path: Path) -> None:
    cfg = config(shard_size=2, seed=100)
    staging = tmp_path / "staging"
    with pytest.raises(EngineCrash):
        run_generate_stage(
            "unused",
            PROMPTS,
            cfg,
            model_label="m",
            staging_dir=staging,
            engine=ScriptedEngine(crash_in_shard=2),
        )
    assert sorted(p.name for p in staging.iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]

    events: list[dict] = []
    resumed_engine = ScriptedEngine()
    resumed = run_generate_stage(
        "unused",
        PROMPTS,
        cfg,
        model_label="m",
        staging_dir=staging,
        engine=resumed_engine,
        on_event=events.append,
    )
    assert resumed_engine.seeds == [102, 103]  # only shards 2 and 3, each with seed + index
    assert [e["index"] for e in events if e["event"] == "shard_done"] == [2, 3]
    assert (resumed.shards_total, resumed.shards_reused, resumed.shards_generated) == (4, 2, 2)

    whole = run_generate_stage(
        "unused", PROMPTS, cfg, model_label="m", staging_dir=tmp_path / "fresh", engine=ScriptedEngine()
    )
    assert len(resumed.rows) == len(whole.rows) == 7 * 2 * 2
    ids = [r["generation_id"] for r in resumed.rows]
    assert len(set(ids)) == len(ids)
    assert resumed.rows == whole.rows  # same seeds, same samples
    assert {r["seed"] - r["shard_index"] for r in resumed.rows} == {100}


def test_stage_rejects_long_prompts_before_sharding(tmp_path: Path) -> None:
    cfg = config(shard_size=2)
    prompts = [*PROMPTS[:3], {"prompt_id": "huge", "prompt": "word " * 100}]
    result = run_generate_stage(
        "unused", prompts, cfg, model_label="m", staging_dir=tmp_path, engine=ScriptedEngine()
    )
    assert {r["prompt_id"] for r in result.rows} == {"p0", "p1", "p2"}
    assert result.shards_total == 2
    length = [r for r in result.rejects if r["row_key"] == "huge"]
    assert len(length) == 1 and "prompt too long" in length[0]["reason"]
    assert len(result.rejects) == 1  # every answer parsed


def test_stats_per_mode() -> None:
    rows = generate_responses(ScriptedEngine(trace_words=50), PROMPTS[:3], config(), "m")
    stats = {s["mode"]: s for s in generation_stats(rows)}
    assert stats["trace"]["rows"] == stats["empty"]["rows"] == 6
    assert stats["trace"]["trace_budget_forced"] == 6 and stats["trace"]["trace_tokens_max"] == 8
    assert stats["empty"]["trace_tokens_mean"] == 0 and stats["empty"]["trace_budget_forced"] == 0
    assert stats["trace"]["answer_finish_stop"] == 6 and stats["trace"]["parse_failures"] == 0
    assert generation_stats([]) == []


def test_child_output_parses_events_split_across_chunks_and_keeps_the_rest() -> None:
    echo = io.StringIO()
    output = ChildOutput(echo)
    stream = (
        "loading\r 10%|#\r 50%|#####"
        f"\n{EVENT_PREFIX}{json.dumps({'event': 'shard_done', 'index': 0})}\n"
        "\r100%|##########|\nWARNING something\n"
        f"{EVENT_PREFIX}{{not json}}\n"
    ).encode()
    events = []
    for start in range(0, len(stream), 7):
        events.extend(output.feed(stream[start : start + 7]))
    assert events == [{"event": "shard_done", "index": 0}]
    assert EVENT_PREFIX not in echo.getvalue() and "WARNING something\n" in echo.getvalue()
    assert output.tail_text().splitlines() == [" 50%|#####", "100%|##########|", "WARNING something"]


def test_child_output_decodes_utf8_split_inside_a_character() -> None:
    output = ChildOutput(None)
    data = "é ok\n".encode()
    output.feed(data[:1])
    output.feed(data[1:])
    assert output.tail_text() == "é ok"


def test_generation_config_engine_settings_and_fingerprint() -> None:
    cfg = GenerationConfig(engine="openai", concurrency=8, base_url="http://h:1/v1", served_model="q")
    fingerprint = cfg.fingerprint()
    assert fingerprint["engine"] == "openai" and fingerprint["served_model"] == "q"
    assert not {"base_url", "concurrency", "request_timeout_s", "max_retries", "api_key_env"} & set(
        fingerprint
    )
    assert (
        cfg.fingerprint() == GenerationConfig(engine="openai", served_model="q", max_retries=9).fingerprint()
    )
    assert (
        cfg.fingerprint() != GenerationConfig(engine="openai", served_model="q", shard_size=3).fingerprint()
    )
    with pytest.raises(ValidationError):
        GenerationConfig(engine="tgi")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        GenerationConfig(shard_size=0)
    assert PipelineConfig().generation.engine == "vllm"


@pytest.mark.parametrize(
    ("settings", "single"),
    [({}, True), ({"tensor_parallel_size": 2}, False), ({"cpu_single_process": False}, False)],
)
@pytest.mark.usefixtures("engine_env_cleared")
def test_a_one_rank_cpu_engine_runs_in_the_generation_process(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, object], single: bool
) -> None:
    import sys
    import types

    import pipeline.generation.engine as engine_module
    from pipeline.generation.engine import open_vllm_engine

    monkeypatch.setattr(engine_module, "on_gpu", lambda: False)
    created: list[dict[str, object]] = []
    seen_env: list[str | None] = []

    class RecordingLLM:
        def __init__(self, **kwargs: object) -> None:
            created.append(kwargs)
            seen_env.append(os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"))

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=RecordingLLM))
    with open_vllm_engine("some/model", GenerationConfig(**settings), trust_remote_code=False):  # type: ignore[arg-type]
        pass
    assert (created[0].get("distributed_executor_backend") == "uni") is single
    assert (seen_env[0] == "0") is single
    # Both layouts sample the same ids (the scheduler is paused while requests are queued): not versioned.
    assert GenerationConfig(cpu_single_process=False).fingerprint() == GenerationConfig().fingerprint()


def test_cpu_thread_binding_uses_every_core_by_default() -> None:
    from pipeline.generation.engine import cpu_thread_env

    assert cpu_thread_env("all", 1, {0, 1}) == {
        "VLLM_CPU_OMP_THREADS_BIND": "0,1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    assert cpu_thread_env("all", 2, {0, 1, 2, 3, 4})["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    assert cpu_thread_env("all", 4, {0, 1}) == {}  # fewer cores than ranks: vLLM decides
    assert cpu_thread_env("auto", 1) == {}
    assert cpu_thread_env("0-3", 1)["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"
    with pytest.raises(ValidationError):
        GenerationConfig(cpu_omp_bind="every core")


class _FakeLLM:
    """Records how :class:`VLLMEngine` drives ``vllm.LLM`` (no vLLM needed)."""

    def __init__(self, pause_fails: bool = False) -> None:
        self.calls: list[str] = []
        self.pause_fails = pause_fails
        self.llm_engine = type("E", (), {"engine_core": type("C", (), {"call_utility": self._utility})()})()

    def _utility(self, method: str, *args: object) -> None:
        self.calls.append(method)
        if self.pause_fails and method == "pause_scheduler":
            raise RuntimeError("no such utility")

    def _outputs(self, prompts: list[str]) -> list[object]:
        done = type(
            "O",
            (),
            {
                "text": "x",
                "token_ids": [1, 2],
                "finish_reason": "stop",
                "stop_reason": None,
                "logprobs": None,
            },
        )
        return [type("R", (), {"outputs": [done()]})() for _ in prompts]

    def enqueue(self, prompts: list[str], params: object, use_tqdm: bool) -> None:
        self.calls.append("enqueue")
        self.pending = prompts

    def wait_for_completion(self, use_tqdm: bool) -> list[object]:
        self.calls.append("wait")
        return self._outputs(self.pending)

    def generate(self, prompts: list[str], params: object, use_tqdm: bool) -> list[object]:
        self.calls.append("generate")
        return self._outputs(prompts)


def test_vllm_engine_queues_every_request_before_the_first_step() -> None:
    pytest.importorskip("vllm")
    from pipeline.generation.engine import VLLMEngine

    llm = _FakeLLM()
    out = VLLMEngine(llm).complete([[5], [6, 7]], [SamplingSpec(1, 0.5, 0.9, 4)] * 2)
    assert llm.calls == ["pause_scheduler", "enqueue", "resume_scheduler", "wait"]
    assert [[c.token_count for c in o] for o in out] == [[2], [2]]
    old = _FakeLLM(pause_fails=True)
    VLLMEngine(old).complete([[5]], [SamplingSpec(1, 0.5, 0.9, 4)])
    assert old.calls == ["pause_scheduler", "generate"]
