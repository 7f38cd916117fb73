"""Token-exact sequences: the encoding module and the reference pass on stored ids (tiny real model).

docs/method.md §Token-exact sequences. The reference pass must score the stored ids (not re-tokenized text),
reject pairs that do not fit or whose ids disagree with their text (with a reason, the rest kept), and
compare the reference model's per-token log-probs with the sampler's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import PipelineConfig, ReasoningConfig
from pipeline.generation.segments import Segment
from pipeline.training.encoding import (
    TokenFormatError,
    TokenizedPair,
    fit_length,
    generation_parts,
    pair_tokens,
    render_prompt_ids,
    require_token_columns,
    sampled_logprobs,
)
from pipeline.training.reference import agreement_warnings, compute_reference_logps
from tests.reliability_helpers import pair_with_token_ids
from tests.tiny_checkpoint import EOS_ID, char_ids, save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def _pair(i: int, mode: str = "trace", answer: str = "It is 4.") -> dict[str, Any]:
    block = "<think>\nok\n</think>\n\n" if mode == "trace" else "<think>\n\n</think>\n\n"
    return pair_with_token_ids(
        {
            "pair_id": f"q{i}-{mode}",
            "prompt_text": f"<|user|>What is {i} + {i}?\n<|assistant|>",
            "chosen_response": f"{block}{answer}",
            "rejected_response": f"{block}It is {i}{i}, I think.",
            "chosen_generation_id": f"q{i}-{mode}-0",
            "rejected_generation_id": f"q{i}-{mode}-1",
        }
    )


def test_pair_tokens_are_the_stored_ids_and_eos_is_appended_only_on_request() -> None:
    pair = _pair(0) | {"chosen_token_ids": [7, 8], "rejected_token_ids": [9, EOS_ID]}
    tokens = pair_tokens(pair)
    assert (tokens.chosen_ids, tokens.rejected_ids) == ([7, 8], [9, EOS_ID])
    legacy = pair_tokens(pair, eos_id=EOS_ID)  # train.append_eos: always
    assert (legacy.chosen_ids, legacy.rejected_ids) == ([7, 8, EOS_ID], [9, EOS_ID])
    with pytest.raises(TokenFormatError, match="no prompt_token_ids"):
        pair_tokens({"pair_id": "x", "chosen_token_ids": [1], "rejected_token_ids": [2]})


def test_length_policy_rejects_with_numbers_or_cuts_only_the_prompt_from_the_left() -> None:
    pair = TokenizedPair("p", list(range(10)), [1] * 6, [2] * 4)
    assert fit_length(pair, 16) == (pair, None)
    rejected, reason = fit_length(pair, 12)
    assert rejected is None and reason is not None
    assert "10 prompt + 6 response tokens = 16 > train.max_length 12" in reason
    cut, reason = fit_length(pair, 12, "truncate_prompt_left")
    assert reason is None and cut is not None
    assert cut.prompt_ids == list(range(4, 10)) and cut.chosen_ids == [1] * 6 and cut.prompt_cut == 4
    none, reason = fit_length(pair, 6, "truncate_prompt_left")  # the response alone does not fit
    assert none is None and "even without its prompt" in str(reason)


def test_generation_parts_split_the_block_from_the_answer() -> None:
    segments = [Segment.PREFILLED, Segment.TRACE, Segment.TRACE, Segment.FORCED, Segment.ANSWER, Segment.EOS]
    row = {
        "generation_id": "g",
        "prompt_token_ids": [1, 2],
        "response_token_ids": [10, 11, 12, 13, 14, 2],
        "response_segments": [int(s) for s in segments],
        "eos_emitted": True,
        "sampler_logprobs": [None, -1.0, -2.0, None, -3.0, -0.5],
    }
    parts = generation_parts(row)
    assert (parts.block_ids, parts.answer_ids, parts.eos_emitted) == ([10, 11, 12, 13], [14, 2], True)
    assert sampled_logprobs(row) == [
        (1, Segment.TRACE, -1.0),
        (2, Segment.TRACE, -2.0),
        (4, Segment.ANSWER, -3.0),
        (5, Segment.EOS, -0.5),
    ]
    with pytest.raises(TokenFormatError, match="6 response ids but 5 segments"):
        generation_parts(row | {"response_segments": row["response_segments"][:-1]})
    with pytest.raises(TokenFormatError, match="older version"):
        require_token_columns(["pair_id", "prompt_text"], "pairs_trace__v1")


def test_a_template_that_writes_bos_itself_gets_exactly_one_bos(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tokenizer.bos_token = "<unk>"  # stands in for a BOS the template writes (Llama 3 and R1-Distill do)
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    ids = render_prompt_ids(tokenizer, "hi", "trace", ReasoningConfig())
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    from pipeline.preflight import TraceFormatError, check_chat_template

    check_chat_template(tokenizer, ReasoningConfig(), "tiny")  # one BOS: fine
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    with pytest.raises(TraceFormatError, match="two BOS tokens"):
        check_chat_template(tokenizer, ReasoningConfig(), "tiny")


def test_reference_pass_scores_stored_ids_and_rejects_what_it_cannot_score(tiny: Path) -> None:
    good = [_pair(i) for i in range(3)]
    long_answer = _pair(3, answer="It is " + "very " * 30 + "long.")
    edited = _pair(4) | {"chosen_response": _pair(4)["chosen_response"] + " (edited)"}
    result = compute_reference_logps(
        str(tiny),
        {"trace": [*good, long_answer, edited], "empty": [_pair(5, "empty")]},
        model_label="tiny",
        max_length=96,
        bf16=False,
    )
    assert {r["pair_id"] for r in result.rows} == {"q0-trace", "q1-trace", "q2-trace", "q5-empty"}
    reasons = {r["row_key"]: r["reason"] for r in result.rejects}
    assert set(reasons) == {"q3-trace", "q4-trace"} and all(r["stage"] == "reference" for r in result.rejects)
    assert "> train.max_length 96" in reasons["q3-trace"]
    assert "do not decode to the stored chosen text" in reasons["q4-trace"]
    # The scored sequence is exactly the stored ids: the sum equals an independent forward on them.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    pair = good[0]
    ids = torch.tensor([pair["prompt_token_ids"] + pair["chosen_token_ids"]])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    start = len(pair["prompt_token_ids"]) - 1
    expected = logps[torch.arange(start, targets.numel()), targets[start:]].sum()
    row = next(r for r in result.rows if r["pair_id"] == "q0-trace")
    assert row["ref_chosen_logp"] == pytest.approx(float(expected), abs=1e-4)
    assert row["chosen_tokens"] == len(pair["chosen_token_ids"]) and row["prompt_cut"] == 0


def test_truncate_prompt_left_keeps_the_response_whole(tiny: Path) -> None:
    pair = _pair(0)
    prompt, longest = len(pair["prompt_token_ids"]), len(pair["rejected_token_ids"])
    result = compute_reference_logps(
        str(tiny),
        {"trace": [pair]},
        model_label="tiny",
        max_length=longest + 5,
        bf16=False,
        truncation="truncate_prompt_left",
    )
    (row,) = result.rows
    assert row["prompt_cut"] == prompt - 5 and row["prompt_tokens"] == 5
    assert row["rejected_tokens"] == longest


def test_agreement_compares_the_reference_with_the_sampler_per_token(tiny: Path) -> None:
    """The sampler's log-probs are the model's own (computed here): agreement ~0; shifted ones: not."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    pairs = [_pair(i) for i in range(2)]

    def generation(ids: list[int], prompt: list[int], shift: float) -> dict[str, Any]:
        full = torch.tensor([prompt + ids])
        with torch.no_grad():
            logps = torch.log_softmax(model(full).logits[0, :-1].float(), -1)
        own = [float(logps[len(prompt) - 1 + j, t]) + shift for j, t in enumerate(ids)]
        segments = [int(Segment.ANSWER)] * (len(ids) - 1) + [int(Segment.EOS)]
        return {"response_segments": segments, "sampler_logprobs": own}

    for shift, expect_warning in ((0.0, False), (0.3, True)):
        gens = {}
        for p in pairs:
            for side, key in (("chosen", "chosen_generation_id"), ("rejected", "rejected_generation_id")):
                gens[p[key]] = generation(p[f"{side}_token_ids"], p["prompt_token_ids"], shift)
        result = compute_reference_logps(
            str(tiny), {"trace": pairs}, model_label="tiny", max_length=512, bf16=False, generations=gens
        )
        overall = next(r for r in result.agreement if r["segment"] == "all")
        tokens = sum(len(p["chosen_token_ids"]) + len(p["rejected_token_ids"]) for p in pairs)
        assert overall["tokens"] == tokens
        assert overall["mean_abs_delta"] == pytest.approx(shift, abs=1e-4)
        assert {r["segment"] for r in result.agreement} == {"answer", "eos", "all"}
        assert bool(agreement_warnings(result.agreement, 0.05)) is expect_warning


def test_config_refuses_a_train_max_length_below_a_full_budget_response() -> None:
    with pytest.raises(ValueError, match=r"train.max_length \(200\) is below a full reasoning-on response"):
        PipelineConfig.model_validate(
            {"generation": {"max_trace_tokens": 128, "max_answer_tokens": 96}, "train": {"max_length": 200}}
        )


def test_the_generate_stage_warns_when_pairs_may_not_fit_training() -> None:
    from pipeline.config import GenerationConfig
    from pipeline.generation.limits import check_prompt_lengths, training_length_warning
    from tests.generation_fakes import WordTokenizer

    config = GenerationConfig(max_trace_tokens=8, max_answer_tokens=8, max_model_len=64)
    kept, _ = check_prompt_lengths(WordTokenizer(), [{"prompt_id": "a", "prompt": "w " * 20}], config)
    assert training_length_warning(WordTokenizer(), kept, config, 64) is None
    warning = training_length_warning(WordTokenizer(), kept, config, 30)
    assert warning is not None and "1 of 1 prompts" in warning and "train.max_length 30" in warning


def test_char_ids_match_the_tiny_tokenizer(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    text = "<|user|>What is 2?\n<|assistant|><think>\n"
    assert char_ids(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id == EOS_ID


def test_a_template_that_already_opens_the_trace_is_refused_under_prefill(tiny: Path) -> None:
    from transformers import AutoTokenizer

    from pipeline.preflight import TraceFormatError, check_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tokenizer.chat_template = tokenizer.chat_template.replace("<|assistant|>", "<|assistant|><think>\n")
    with pytest.raises(TraceFormatError, match="already opens the trace"):
        check_chat_template(tokenizer, ReasoningConfig(), "tiny")
