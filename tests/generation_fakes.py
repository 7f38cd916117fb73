"""Test doubles for generation: a word tokenizer with a chat template, and a scripted engine.

The tokenizer makes one token of each word with the whitespace after it (and one of any leading
whitespace), so decoding is exact and token counts are word counts. The engine works in token ids like
vLLM: its completions are a pure function of (prompt ids, seed, sample), so a resumed run can be compared
with an uninterrupted one row by row; a trace stopped by the close tag includes the tag's tokens, and an
answer that ends by itself ends with the end-of-sequence token. No model runs here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.generation.engine import Completion, SamplingSpec

_PIECE = re.compile(r"\s+|\S+\s*")
EOS_TOKEN = "<eos>"


class WordTokenizer:
    """Word-level ids from a vocabulary shared by every instance (grown on first sight of a piece)."""

    _vocab: ClassVar[dict[str, int]] = {EOS_TOKEN: 0}
    _pieces: ClassVar[list[str]] = [EOS_TOKEN]
    eos_token = EOS_TOKEN
    eos_token_id = 0
    pad_token_id = 0
    chat_template = "word template"

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> str:
        text = "".join(f"<|{m['role']}|> {m['content']} <|end|>\n" for m in conversation)
        if kwargs.get("enable_thinking") is False:
            return text + "<|assistant|> <think>\n\n</think>\n\n"
        return text + "<|assistant|> "

    def _id(self, piece: str) -> int:
        if piece not in self._vocab:
            self._vocab[piece] = len(self._pieces)
            self._pieces.append(piece)
        return self._vocab[piece]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self._id(p) for p in _PIECE.findall(text)]

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts)}
        return {"input_ids": [self.encode(t) for t in texts]}

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return "".join(self._pieces[i] for i in ids)


class EngineCrash(RuntimeError):
    """Raised by :class:`ScriptedEngine` to simulate a crash in the middle of a run."""


@dataclass
class ScriptedEngine:
    """Traces of ``trace_words`` words (closed by the model when shorter than the budget), short answers."""

    trace_words: int = 3
    answer: str = "The answer is 42."
    crash_in_shard: int | None = None  # raise when this shard (counted from 0 in this run) starts sampling
    name: str = "fake"
    seeds: list[int] = field(default_factory=list)
    calls: list[tuple[list[list[int]], list[SamplingSpec]]] = field(default_factory=list)
    hf_tokenizer: Any = None  # the model's own tokenizer, when the stage ran on a real model folder
    _seed: int = 0

    @property
    def tokenizer(self) -> Any:
        return self.hf_tokenizer if self.hf_tokenizer is not None else WordTokenizer()

    def text(self, ids: list[int]) -> str:
        """The text of token ids (for assertions on what the engine was fed)."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def reseed(self, seed: int) -> int:
        self.seeds.append(seed)
        self._seed = seed
        return seed

    def complete(self, prompts: list[list[int]], specs: list[SamplingSpec]) -> list[list[Completion]]:
        if self.crash_in_shard is not None and len(self.seeds) - 1 >= self.crash_in_shard:
            raise EngineCrash(f"simulated crash in shard {len(self.seeds) - 1} of this run")
        self.calls.append((prompts, specs))
        return [[self._one(p, s, i) for i in range(s.n)] for p, s in zip(prompts, specs, strict=True)]

    def tag(self, prompt: list[int], index: int) -> str:
        return hashlib.sha256(f"{self._seed}|{self.text(prompt)}|{index}".encode()).hexdigest()[:6]

    def completion(
        self, text: str, finish: str, stop: str | None, max_tokens: int | None = None
    ) -> Completion:
        """A completion of ``text`` as the real engine returns it (ids, EOS when it ends by itself)."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) > max_tokens:
            ids, finish, stop = ids[:max_tokens], "length", None
        elif finish == "stop" and stop is None:
            ids = [*ids, self.tokenizer.eos_token_id]
        return Completion(self.text(ids), tuple(ids), finish, stop, tuple(-0.5 for _ in ids))

    def _one(self, prompt: list[int], spec: SamplingSpec, index: int) -> Completion:
        tag = self.tag(prompt, index)
        if spec.stop:  # the trace pass: the close tag's tokens are part of the output
            words = " ".join([f"w{tag}"] * self.trace_words)
            if self.trace_words >= spec.max_tokens:
                return self.completion(words, "length", None, spec.max_tokens)
            return self.completion(f"{words}\n{spec.stop[0]}", "stop", spec.stop[0])
        # After a trace the model closed itself, the model writes the blank line before its answer.
        lead = "\n\n" if self.text(prompt).endswith("</think>") else ""
        return self.completion(f"{lead}{self.answer} ({tag})", "stop", None, spec.max_tokens)
