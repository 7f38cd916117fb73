"""A tiny random Llama saved as a complete Hugging Face folder (weights, tokenizer, chat template), offline.

The tokenizer maps every printable ASCII character to one token, so any prompt or answer tokenizes; the
model has a few thousand parameters, so loading and training it takes milliseconds. Stages that take a
model path (generate's token checks, reference log-probs, training, evaluation) run on it unchanged.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A plain template: it ignores ``enable_thinking`` (so only ``reasoning.control: prefill`` fits it)."""

_EMPTY_BLOCK = "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
NATIVE_TEMPLATE = CHAT_TEMPLATE.replace("{% endif %}", _EMPTY_BLOCK + "{% endif %}")
"""A template with native reasoning control: ``enable_thinking=False`` writes the empty trace block."""

SPECIALS = ["<pad>", "<unk>", "</s>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
EOS_ID = SPECIALS.index("</s>")


def char_ids(text: str) -> list[int]:
    """The tiny tokenizer's ids of ``text`` (one per character), without loading it."""
    return [len(SPECIALS) + CHARS.index(c) for c in text]


def save_tiny_checkpoint(
    folder: Path,
    *,
    hidden: int = 16,
    layers: int = 2,
    chat_template: str | None = CHAT_TEMPLATE,
    seed: int = 0,
) -> Path:
    """Write a random tiny Llama and a character tokenizer to ``folder``; return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one char, one id
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        bos_token_id=None,
    )
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
