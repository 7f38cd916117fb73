"""Preference pairs in and out: `bvpo export pairs` (TRL's format) and `bvpo import pairs`.

The run is a tiny random Llama (tests/tiny_checkpoint.py) whose D_t and D_e were registered as pairing
registers them (prompts in the lineage, token ids as the sampler gives them: a rejected answer cut before
its end-of-sequence token), then the real reference and train stages (``task.fn``). The round trip
exports it, imports it into a new workspace through the CLI and trains there: pairs, reference log-probs
and losses must equal the originals. Bad input: every case is a reject with its reason or a clear error,
and an error registers nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import tasks.stages as stages
from flows.cli import app
from pipeline.config import PipelineConfig
from pipeline.generation.reasoning import TraceFormat
from pipeline.interop.catalog_pairs import PairImportError, import_pairs
from pipeline.interop.formats import PairFormatError
from pipeline.interop.import_pairs import PairSource
from storage import DatasetRef, DatasetStore, schema_for
from tests.reliability_helpers import catalog_rows, lake_tree, quiet_prefect
from tests.tiny_checkpoint import save_tiny_checkpoint

pytestmark = pytest.mark.timeout(300)

QUESTIONS = ["What is 2 + 2?", "Name a color.", "Say hi in lowercase.", "What is 3 times 3?"]
PAIR_COLUMNS = [f.name for f in schema_for("pairs_trace")]
IMPORTED_ID_COLUMNS = {"chosen_generation_id", "rejected_generation_id", "num_candidates", "length_ratio"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny))


@pytest.fixture(autouse=True)
def _without_prefect_api() -> Any:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet_prefect():
            yield
    finally:
        torch.set_num_threads(threads)


def _config(workspace: Path, tiny: Path) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "workspace": str(workspace),
            "model": {"name_or_path": str(tiny)},
            "train": {
                "max_steps": 2, "batch_size": 2, "max_length": 256, "bf16": False, "checkpoint_every": 0,
                "learning_rate": 1e-3, "warmup_steps": 0, "seed": 0,
            },
        }
    )  # fmt: skip


def _write_config(config: PipelineConfig, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def _sampled_pair(tokenizer: Any, fmt: TraceFormat, prompt_id: str, question: str, mode: str, i: int):
    """A pair as pairing stores it: text decoded from the ids, ids as sampled (a cut rejected answer)."""
    from pipeline.training.encoding import encode_text, render_prompt_ids, response_prefix_ids

    eos = tokenizer.eos_token_id
    prefix = response_prefix_ids(tokenizer, mode, fmt.config)
    trace = f"I think step {i}. " if mode == "trace" else ""
    block = f"{trace}\n{fmt.config.close_tag}\n\n" if mode == "trace" else ""
    chosen_ids = prefix + encode_text(tokenizer, f"{block}Answer {i} is right.") + [eos]
    rejected_ids = prefix + encode_text(tokenizer, f"{block} wrong {i}, cut")  # no EOS: cut at the limit
    prompt_ids = render_prompt_ids(tokenizer, question, mode, fmt.config)

    def text(ids: list[int]) -> str:
        return tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=False)

    return {
        "pair_id": f"{prompt_id}-{mode}", "prompt_id": prompt_id, "mode": mode,
        "prompt_text": text(prompt_ids), "chosen_response": text(chosen_ids),
        "rejected_response": text(rejected_ids), "chosen_answer": f"Answer {i} is right.",
        "rejected_answer": f"wrong {i}, cut", "chosen_score": 1.0, "rejected_score": 0.25, "margin": 0.75,
        "chosen_generation_id": f"{prompt_id}-{mode}-0", "rejected_generation_id": f"{prompt_id}-{mode}-1",
        "num_candidates": 4, "length_ratio": 1.2, "prompt_token_ids": prompt_ids,
        "chosen_token_ids": chosen_ids, "rejected_token_ids": rejected_ids,
    }  # fmt: skip


def _table(kind: str, rows: list[dict[str, Any]]) -> pa.Table:
    schema = schema_for(kind)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _original_run(workspace: Path, tiny: Path, tokenizer: Any) -> dict[str, Any]:
    """Prompts and both pairs datasets as a run registers them, then the real reference and train stages."""
    config = _config(workspace, tiny)
    store = DatasetStore(workspace)
    fmt = TraceFormat(config.generation.reasoning)
    prompts = [
        {"prompt_id": f"p{i}", "prompt": q, "split": "train", "task_type": "instruction",
         "reference_answer": None, "constraints": "[]", "source": "test", "source_key": f"test[{i}]"}
        for i, q in enumerate(QUESTIONS)
    ]  # fmt: skip
    prompts_ref = store.put("prompts", _table("prompts", prompts), config={"t": 1}, parents=[])
    refs: dict[str, Any] = {"prompts": prompts_ref}
    for mode in ("trace", "empty"):
        rows = [
            _sampled_pair(tokenizer, fmt, p["prompt_id"], p["prompt"], mode, i) for i, p in enumerate(prompts)
        ]
        kind = f"pairs_{mode}"
        refs[kind] = store.put(kind, _table(kind, rows), config={"pairing": 1}, parents=[prompts_ref])
    refs["ref_logps"] = stages.reference_logps_task.fn(config, refs["pairs_trace"], refs["pairs_empty"])
    refs["train"] = stages.train_task.fn(config, refs["pairs_trace"], refs["pairs_empty"], refs["ref_logps"])
    return refs


def _rows(store: DatasetStore, ref: DatasetRef) -> dict[str, dict[str, Any]]:
    return {r["pair_id"]: r for r in store.read_rows(ref)}


def _invoke(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_round_trip_export_import_train_gives_the_same_pairs_reference_and_losses(
    tmp_path: Path, tiny: Path, tokenizer: Any
) -> None:
    original = _original_run(tmp_path / "ws1", tiny, tokenizer)
    store1 = DatasetStore(tmp_path / "ws1")
    cfg1 = _write_config(_config(tmp_path / "ws1", tiny), tmp_path / "ws1.yaml")
    out = tmp_path / "exported"
    _invoke("export", "pairs", original["train"].metrics.name, "-o", str(out), "-c", str(cfg1))
    exported = pq.read_table(out / "pairs_trace.parquet").to_pylist()
    assert exported[0]["prompt"] == [{"role": "user", "content": QUESTIONS[0]}]
    assert exported[0]["chosen"][0]["content"].startswith("<think>\nI think step 0.")
    empty = pq.read_table(out / "pairs_empty.parquet").to_pylist()
    assert empty[0]["chosen"][0]["content"].startswith("<think>\n\n</think>\n\n")

    cfg2 = _config(tmp_path / "ws2", tiny)
    cfg2_file = _write_config(cfg2, tmp_path / "ws2.yaml")
    _invoke(
        "import", "pairs", "-c", str(cfg2_file),
        "--trace-source", str(out / "pairs_trace.parquet"),
        "--empty-source", str(out / "pairs_empty.parquet"),
    )  # fmt: skip
    store2 = DatasetStore(tmp_path / "ws2")
    imported = {kind: store2.catalog.resolve(kind) for kind in ("pairs_trace", "pairs_empty")}
    for kind, ref in imported.items():
        before, after = _rows(store1, original[kind]), _rows(store2, ref)
        assert sorted(after) == sorted(before)
        for pair_id, row in before.items():
            for column in set(PAIR_COLUMNS) - IMPORTED_ID_COLUMNS:
                assert after[pair_id][column] == row[column], (kind, pair_id, column)
        _, settings = store2.catalog.parents_of(ref)
        assert settings["imported_from"] == [
            f"{out / 'pairs_trace.parquet'} (trace)",
            f"{out / 'pairs_empty.parquet'} (empty)",
        ]

    ref2 = stages.reference_logps_task.fn(cfg2, imported["pairs_trace"], imported["pairs_empty"])
    logps1 = {(r["pair_id"], r["mode"]): r for r in store1.read_rows(original["ref_logps"])}
    logps2 = {(r["pair_id"], r["mode"]): r for r in store2.read_rows(ref2)}
    assert sorted(logps2) == sorted(logps1) and len(logps1) == 2 * len(QUESTIONS)
    for key, row in logps1.items():
        for column in ("ref_chosen_logp", "ref_rejected_logp", "chosen_tokens", "rejected_tokens"):
            assert logps2[key][column] == row[column], (key, column)
    train2 = stages.train_task.fn(cfg2, imported["pairs_trace"], imported["pairs_empty"], ref2)
    losses1 = [m["loss"] for m in store1.read_rows(original["train"].metrics)]
    losses2 = [m["loss"] for m in store2.read_rows(train2.metrics)]
    assert losses2 == pytest.approx(losses1, rel=1e-6) and len(losses2) == 2


@pytest.mark.parametrize(("file_format", "layout"), [("jsonl", "standard"), ("hf", "conversational")])
def test_round_trip_without_token_ids_re_encodes_the_same_text(
    tmp_path: Path, tiny: Path, tokenizer: Any, file_format: str, layout: str
) -> None:
    """Without the id columns the text is encoded as generation would feed it; responses then end with EOS."""
    store1 = DatasetStore(tmp_path / "ws1")
    config = _config(tmp_path / "ws1", tiny)
    fmt = TraceFormat(config.generation.reasoning)
    originals = {}
    for mode in ("trace", "empty"):
        rows = [_sampled_pair(tokenizer, fmt, f"p{i}", q, mode, i) for i, q in enumerate(QUESTIONS)]
        originals[mode] = {r["pair_id"]: r for r in rows}
        store1.put(f"pairs_{mode}", _table(f"pairs_{mode}", rows), config={"x": 1}, parents=[])
    cfg1 = _write_config(config, tmp_path / "ws1.yaml")
    out = tmp_path / "out"
    _invoke(
        "export", "pairs", "-o", str(out), "-f", file_format, "--layout", layout, "--no-token-ids",
        "-c", str(cfg1),
    )  # fmt: skip
    suffix = ".jsonl" if file_format == "jsonl" else ""
    cfg2 = _config(tmp_path / "ws2", tiny)
    for mode in ("trace", "empty"):
        _invoke(
            "import",
            "pairs",
            str(out / f"pairs_{mode}{suffix}"),
            "-w",
            str(tmp_path / "ws2"),
            "-c",
            str(cfg1),
        )
    store2 = DatasetStore(cfg2.workspace)
    for mode in ("trace", "empty"):
        for pair_id, row in _rows(store2, store2.catalog.resolve(f"pairs_{mode}")).items():
            before = originals[mode][pair_id]
            for column in ("prompt_text", "chosen_response", "rejected_response", "prompt_token_ids"):
                assert row[column] == before[column], (mode, pair_id, column)
            assert row["chosen_token_ids"] == before["chosen_token_ids"]
            assert row["rejected_token_ids"] == [*before["rejected_token_ids"], tokenizer.eos_token_id]


# --- bad input --------------------------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(prompt: str, chosen: Any, rejected: Any, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def _snapshot(workspace: Path) -> tuple[list[tuple[str, str, int]], list[str]]:
    return catalog_rows(workspace), lake_tree(workspace)


def _rejects(store: DatasetStore) -> dict[str, str]:
    ref = store.catalog.resolve("rejects")
    return {r["row_key"]: r["reason"] for r in store.read_rows(ref)}


def test_bad_rows_are_rejected_with_reasons_and_the_good_ones_registered(
    tmp_path: Path, tiny: Path, tokenizer: Any
) -> None:
    think = "<think>\nworking it out\n</think>\n\n"
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]
    chat = ([{"role": "user", "content": "Chat?"}], [{"role": "assistant", "content": "Fine."}])
    rows = [
        _row("Good one?", think + "Yes.", think + "No.", mode="trace"),
        _row("Same?", think + "Same.", think + "Same.", mode="trace"),
        _row("Reasoning off?", think + "Yes.", "No.", mode="empty"),
        _row("Number?", 42, "No.", mode="empty"),
        _row("Parts?", parts, "No.", mode="empty"),
        _row("Huge?", "x" * 200_000, "No.", mode="empty"),
        _row(*chat, "Bad.", mode="empty"),
        _row("Odd mode?", "A.", "B.", mode="sideways"),
        _row("Unclosed?", "<think>\nhmm A.", think + "B.", mode="trace"),
        _row("Plain D_t?", "A.", think + "B.", mode="trace"),
        _row("Reasoning field?", {"role": "assistant", "content": "Yes.", "reasoning_content": "because"},
             {"role": "assistant", "content": "No.", "reasoning_content": "guess"}, mode="trace"),
    ]  # fmt: skip
    source = _jsonl(tmp_path / "pairs.jsonl", rows)
    store = DatasetStore(tmp_path / "ws")
    refs, result = import_pairs(
        store, _config(tmp_path / "ws", tiny), [PairSource(str(source))], tokenizer=tokenizer
    )
    reasons = _rejects(store)
    key = "pairs.jsonl:{}".format
    assert reasons[key(2)] == "chosen equals rejected"
    assert (
        reasons[key(3)] == "chosen: reasoning trace (think tags with text) in a D_e (reasoning-off) response"
    )
    assert reasons[key(4)] == "chosen: content is not a string (got int)"
    assert reasons[key(5)] == "chosen: content is not a string (got list)"
    assert reasons[key(6)] == "chosen: 200000 characters, over max_response_chars=100000"
    assert reasons[key(8)] == "mode: 'sideways' is not 'trace' or 'empty'"
    assert reasons[key(9)] == "chosen: <think> block is never closed with </think>"
    assert reasons[key(10)] == "chosen: no reasoning block in a D_t (reasoning-on) response"
    assert len(reasons) == 8
    trace = {r["prompt_text"]: r for r in store.read_rows(refs["trace"])}
    empty = store.read_rows(refs["empty"])
    assert len(trace) == 2 and len(empty) == 1
    field = next(r for r in trace.values() if "Reasoning field?" in r["prompt_text"])
    assert field["chosen_response"] == "<think>\nbecause\n</think>\n\nYes."
    assert empty[0]["chosen_response"] == "<think>\n\n</think>\n\nFine."
    assert empty[0]["prompt_text"] == TraceFormat(_config(tmp_path, tiny).generation.reasoning).render_prompt(
        tokenizer, "Chat?", "empty"
    )
    assert empty[0]["chosen_token_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(empty[0]["chosen_token_ids"][:-1]) == empty[0]["chosen_response"]
    assert result.kept == 3


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "Q?", "chosen": "A."}], "missing column(s) rejected (columns seen: chosen, prompt)"),
        (
            [
                _row("Q1?", "<think>\nr\n</think>\n\nA.", "<think>\nr\n</think>\n\nB."),
                _row("Q2?", "A.", "B."),
            ],
            "mixed modes without a mode column (1 row(s) with a reasoning trace, 1 without)",
        ),
    ],
)
def test_source_level_errors_register_nothing(
    tmp_path: Path, tiny: Path, tokenizer: Any, rows: list[dict[str, Any]], message: str
) -> None:
    source = _jsonl(tmp_path / "bad.jsonl", rows)
    workspace = tmp_path / "ws"
    before = _snapshot(workspace)
    with pytest.raises(PairFormatError) as info:
        import_pairs(
            DatasetStore(workspace), _config(workspace, tiny), [PairSource(str(source))], tokenizer=tokenizer
        )
    assert message in str(info.value)
    assert _snapshot(workspace) == before


def test_a_bad_second_source_leaves_nothing_of_the_first(tmp_path: Path, tiny: Path, tokenizer: Any) -> None:
    good = _jsonl(tmp_path / "good.jsonl", [_row("Q?", "A.", "B.")])
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "Q?"}])
    workspace = tmp_path / "ws"
    before = _snapshot(workspace)
    sources = [PairSource(str(good), "empty"), PairSource(str(bad), "trace")]
    with pytest.raises(PairFormatError, match="missing column"):
        import_pairs(DatasetStore(workspace), _config(workspace, tiny), sources, tokenizer=tokenizer)
    assert _snapshot(workspace) == before


def test_only_bad_rows_is_an_error_naming_them(tmp_path: Path, tiny: Path, tokenizer: Any) -> None:
    source = _jsonl(tmp_path / "bad.jsonl", [_row("Q?", "Same.", "Same.")])
    workspace = tmp_path / "ws"
    before = _snapshot(workspace)
    with pytest.raises(PairImportError, match=r"bad.jsonl:1: chosen equals rejected"):
        import_pairs(
            DatasetStore(workspace), _config(workspace, tiny), [PairSource(str(source))], tokenizer=tokenizer
        )
    assert _snapshot(workspace) == before


def test_token_ids_that_do_not_decode_to_the_text_are_rejected(
    tmp_path: Path, tiny: Path, tokenizer: Any
) -> None:
    fmt = TraceFormat(_config(tmp_path, tiny).generation.reasoning)
    pair = _sampled_pair(tokenizer, fmt, "p0", QUESTIONS[0], "empty", 0)
    good = {"prompt": QUESTIONS[0], "chosen": pair["chosen_response"], "rejected": pair["rejected_response"]}
    ids = {c: pair[c] for c in ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids")}
    edited = {**ids, "chosen_token_ids": list(reversed(ids["chosen_token_ids"]))}
    source = _jsonl(tmp_path / "ids.jsonl", [{**good, **ids}, {**good, **edited, "prompt_id": "other"}])
    store = DatasetStore(tmp_path / "ws")
    refs, _ = import_pairs(
        store, _config(tmp_path / "ws", tiny), [PairSource(str(source), "empty")], tokenizer=tokenizer
    )
    (kept,) = store.read_rows(refs["empty"])
    assert (
        kept["chosen_token_ids"] == pair["chosen_token_ids"]
        and kept["rejected_token_ids"] == pair["rejected_token_ids"]
    )
    assert _rejects(store)["ids.jsonl:2"].startswith(
        "stored chosen token ids do not decode to the stored chosen text"
    )


def test_exported_records_are_what_trl_reads(tmp_path: Path, tiny: Path, tokenizer: Any) -> None:
    """TRL's own helpers see the conversational layout and render it with the model's chat template."""
    data_utils = pytest.importorskip("trl.data_utils")
    from pipeline.interop.export_pairs import trl_records

    fmt = TraceFormat(_config(tmp_path, tiny).generation.reasoning)
    pair = _sampled_pair(tokenizer, fmt, "p0", QUESTIONS[0], "trace", 0)
    (record,) = trl_records([pair], "trace", fmt, "conversational", lambda p: QUESTIONS[0])
    assert data_utils.is_conversational(record)
    rendered = data_utils.maybe_apply_chat_template(
        {k: record[k] for k in ("prompt", "chosen", "rejected")}, tokenizer
    )
    assert rendered["prompt"] == pair["prompt_text"]
    assert rendered["chosen"].startswith(pair["chosen_response"])


@pytest.mark.parametrize("control", ["prefill", "native"])
def test_d_e_responses_keep_or_drop_the_empty_block_as_the_template_does(control: str) -> None:
    """A native template writes D_e's empty block into the prompt; prefill control keeps it in the response.

    Exported messages always carry the block, and importing them gives back the stored response exactly.
    """
    from pipeline.config import ReasoningConfig
    from pipeline.interop.formats import inline_content, parse_row, response_text

    fmt = TraceFormat(ReasoningConfig(control=control))  # type: ignore[arg-type]
    stored = (fmt.empty_block if control == "prefill" else "") + "Four.\n"
    message = inline_content(fmt, "empty", stored)
    assert message == fmt.empty_block + "Four.\n"
    record = {"prompt": "2 + 2?", "chosen": message, "rejected": "Five.", "mode": "empty"}
    pair = parse_row("k", record, fmt, max_prompt_chars=100, max_response_chars=100)
    assert response_text(fmt, "empty", pair.chosen) == stored
    assert (
        response_text(fmt, "empty", pair.rejected)
        == (fmt.empty_block if control == "prefill" else "") + "Five."
    )
    respelled = parse_row(
        "k", {**record, "chosen": "<think></think>Four."}, fmt, max_prompt_chars=100, max_response_chars=100
    )
    assert response_text(fmt, "empty", respelled.chosen) == fmt.response_prefix("empty") + "Four."
