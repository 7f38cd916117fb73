"""R1-Distill-style chat templates under the paper config's trace format (configs/paper-r1-distill-*.yaml).

The template here is this project's own, written to behave like DeepSeek-R1-Distill's: it writes the BOS
token itself, takes no ``enable_thinking``, and drops the reasoning of earlier assistant turns from the
history. Its tokenizer also adds a BOS when asked for special tokens, so a prompt tokenized that way would
start with two. The ids the generation stage feeds the engine must hold exactly one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config
from pipeline.generation.reasoning import MODES, TraceFormat
from pipeline.generation.sampler import generate_responses
from tests.generation_fakes import ScriptedEngine

ROOT = Path(__file__).resolve().parents[1]
BOS, USER, ASSISTANT, EOS = "<|bos|>", "<|User|>", "<|Assistant|>", "<|eos|>"
R1_LIKE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}"
    "{% set content = m['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    + ASSISTANT
    + "{{ content }}"
    + EOS
    + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, USER, ASSISTANT, "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )  # like Llama-family tokenizers: add_special_tokens=True prepends a BOS
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token="<unk>", pad_token=EOS
    )
    tok.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT]})
    tok.chat_template = R1_LIKE_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def paper_format() -> TraceFormat:
    config = load_config(ROOT / "configs" / "paper-r1-distill-qwen-1.5b.yaml")
    assert config.generation.reasoning.control == "prefill"  # R1-Distill templates take no enable_thinking
    return TraceFormat(config.generation.reasoning)


def test_the_template_writes_bos_and_drops_reasoning_from_history(tokenizer: Any) -> None:
    history = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think>\nsecret scratch work\n</think>\n\nIt is 4."},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert text.startswith(BOS) and text.count(BOS) == 1
    assert "secret scratch work" not in text and f"{ASSISTANT}It is 4.{EOS}" in text
    assert text.endswith(ASSISTANT)
    # The trap the stage must avoid: tokenizing the rendered text with special tokens doubles the BOS.
    assert tokenizer(text)["input_ids"][:2] == [tokenizer.bos_token_id] * 2


def test_prompt_ids_hold_one_bos_in_both_modes(tokenizer: Any, paper_format: TraceFormat) -> None:
    bos = tokenizer.bos_token_id
    for mode in MODES:
        ids = paper_format.prompt_ids(tokenizer, "Name a prime number.", mode)
        assert ids[0] == bos and ids.count(bos) == 1, mode
        prefix = tokenizer.decode(paper_format.prefix_ids(tokenizer, mode))
        assert prefix == ("<think>\n" if mode == "trace" else "<think>\n\n</think>\n\n")


def test_generation_feeds_one_bos_and_one_open_tag(tokenizer: Any) -> None:
    config = load_config(
        ROOT / "configs" / "paper-r1-distill-qwen-1.5b.yaml",
        ["generation.samples_per_prompt=2", "generation.max_trace_tokens=16"],
    )
    engine = ScriptedEngine(hf_tokenizer=tokenizer)
    prompts = [{"prompt_id": "p0", "prompt": "Name a prime number."}]
    rows = generate_responses(engine, prompts, config.generation, "r1-like")
    assert {r["mode"] for r in rows} == {"trace", "empty"}
    fed = [ids for batch, _ in engine.calls for ids in batch]
    assert fed
    for ids in fed:
        text = engine.text(ids)
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id, text
        assert text.count("<think>") == 1, text
    for row in rows:
        assert row["prompt_token_ids"].count(tokenizer.bos_token_id) == 1
        assert tokenizer.bos_token_id not in row["response_token_ids"]
