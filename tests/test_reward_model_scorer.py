"""Reward-model scorer on a tiny sequence-classification model built here from a config (no download)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from pipeline.config import RewardModelOptions
from pipeline.scoring.base import ScoreInput
from pipeline.scoring.reward_model import RewardModelScorer, conversation, length_sorted_batches, sigmoid
from pipeline.scoring.stage import score_generations

CORPUS = [
    "what is two plus two",
    "the answer is four",
    "the answer is five i think",
    "describe the sea at dawn in a few calm words",
    "the sea is grey then gold and the light comes slowly over the water",
    "think step by step first add two and two",
]
CHAT_TEMPLATE = "<s>{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s>{% endfor %}"


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama reward model and a word-level tokenizer with a chat template, saved locally."""
    path = tmp_path_factory.mktemp("tiny-rm")
    trainer = trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    )
    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=core.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)  # rewards of order 1, so answers differ clearly
    model.save_pretrained(path)
    return path


def _items() -> list[ScoreInput]:
    answers = [
        "the answer is four",
        "five",
        "the answer is five i think",
        "",
        "the sea is grey then gold and the light comes slowly over the water",
        "four",
        "the light comes",
        "what",
    ]
    prompts = ["what is two plus two"] * 4 + ["describe the sea at dawn in a few calm words"] * 4
    return [ScoreInput(prompt=p, answer=a) for p, a in zip(prompts, answers, strict=True)]


def _scores(model_dir: Path, items: list[ScoreInput], **options: object) -> list[float]:
    options.setdefault("device", "cpu")  # fp32: exact comparisons hold on any machine
    scorer = RewardModelScorer(RewardModelOptions(model=str(model_dir), **options))  # type: ignore[arg-type]
    try:
        return [r.score for r in scorer.score_batch(items)]
    finally:
        scorer.close()


def test_scores_do_not_depend_on_batch_size_or_order(reward_model_dir: Path) -> None:
    items = _items()
    one_by_one = _scores(reward_model_dir, items, batch_size=1)
    assert len(set(one_by_one)) == len(items)  # different answers, different rewards
    for batch_size in (3, 8):
        assert _scores(reward_model_dir, items, batch_size=batch_size) == pytest.approx(one_by_one, abs=1e-5)
    order = list(range(len(items)))
    random.Random(1).shuffle(order)
    shuffled = _scores(reward_model_dir, [items[i] for i in order], batch_size=3)
    assert shuffled == pytest.approx([one_by_one[i] for i in order], abs=1e-5)


def test_the_trace_is_ignored(reward_model_dir: Path) -> None:
    prompt = {"prompt_id": "p", "prompt": "what is two plus two", "task_type": "math"}
    prompt |= {"reference_answer": "4", "constraints": "[]"}

    def gen(gid: str, trace: str, answer: str) -> dict[str, object]:
        response = f"<think>\n{trace}\n</think>\n\n{answer}"
        row = {"generation_id": gid, "prompt_id": "p", "mode": "trace", "trace": trace}
        return row | {"response_text": response, "answer": answer}

    gens = [
        gen("a", "think step by step first add two and two", "the answer is four"),
        gen("b", "the sea is grey", "the answer is four"),
        gen("c", "", "the answer is four"),
        gen("d", "think step by step first add two and two", "the answer is five i think"),
    ]
    spec = {
        "name": "reward_model",
        "options": {"model": str(reward_model_dir), "batch_size": 2, "device": "cpu"},
    }
    result = score_generations(gens, {"p": prompt}, [spec])
    scores = {r["generation_id"]: r["score"] for r in result.rows}
    assert not result.rejects
    # a, b and c are the same text to the reward model. Where one sits in its batch (and whether it is padded
    # to d's longer answer) moves float32 rounding: by ~1e-6 on an AVX2-only CPU, never the decision.
    assert scores["b"] == pytest.approx(scores["a"], abs=1e-5)
    assert scores["c"] == pytest.approx(scores["a"], abs=1e-5)
    assert abs(scores["d"] - scores["a"]) > 1e-3
    row = result.rows[0]
    assert row["scorer"] == "reward_model"
    assert json.loads(row["components"]) == {"reward_model": row["score"]}
    assert json.loads(row["checks"]) == {"reward_model.within_max_length": True}
    details = json.loads(row["details"])["reward_model"]
    assert details["truncated"] is False and details["raw_reward"] == pytest.approx(row["score"])


def test_truncation_is_flagged_and_keeps_the_end(reward_model_dir: Path) -> None:
    scorer = RewardModelScorer(RewardModelOptions(model=str(reward_model_dir), max_length=12, device="cpu"))
    short, long = _items()[1], _items()[4]
    results = scorer.score_batch([short, long])
    assert [r.checks["within_max_length"] for r in results] == [True, False]
    assert results[1].details["tokens"] == 12 and results[1].details["truncated"] is True
    ids, truncated = scorer.encode(long)
    full = scorer._tokenizer.apply_chat_template(conversation(long.prompt, long.answer), tokenize=False)
    assert truncated and ids == scorer._tokenizer(full, add_special_tokens=False)["input_ids"][-12:]


def test_sigmoid_normalization_maps_rewards_into_unit_interval(reward_model_dir: Path) -> None:
    items = _items()
    raw = _scores(reward_model_dir, items)
    squashed = _scores(reward_model_dir, items, normalize="sigmoid")
    assert squashed == pytest.approx([1 / (1 + math.exp(-r)) for r in raw])
    assert all(0.0 < s < 1.0 for s in squashed)


def test_composes_with_verifiable_as_a_weighted_sum(reward_model_dir: Path) -> None:
    prompt = {"prompt_id": "p", "prompt": "what is two plus two", "task_type": "math"}
    prompt |= {"reference_answer": "4", "constraints": "[]"}
    gens = [
        {"generation_id": "a", "prompt_id": "p", "mode": "empty", "answer": "four"},
        {"generation_id": "b", "prompt_id": "p", "mode": "empty", "answer": "the answer is 4"},
    ]
    specs = [
        {"name": "verifiable", "weight": 0.7},
        {
            "name": "reward_model",
            "weight": 0.3,
            "options": {"model": str(reward_model_dir), "normalize": "sigmoid"},
        },
    ]
    result = score_generations(gens, {"p": prompt}, specs)
    for row in result.rows:
        parts = json.loads(row["components"])
        assert set(parts) == {"verifiable", "reward_model"}
        assert row["score"] == pytest.approx(0.7 * parts["verifiable"] + 0.3 * parts["reward_model"])
    assert [json.loads(r["components"])["verifiable"] for r in result.rows] == [0.0, 1.0]
    assert result.rows[0]["scorer"] == "0.7*verifiable+0.3*reward_model"


def test_pure_helpers() -> None:
    assert length_sorted_batches([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    assert conversation("q", "a") == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert sigmoid(0.0) == 0.5 and sigmoid(-1000.0) == 0.0 and sigmoid(1000.0) == 1.0
    assert RewardModelOptions(model="m").trust_remote_code is False
    assert RewardModelOptions(model="m", device="cuda:1").device == "cuda:1"
    with pytest.raises(ValueError):
        RewardModelOptions(model="m", device="tpu")
