"""Test doubles for generation: a whitespace tokenizer with a chat template, and a scripted engine.

The engine's completions are a pure function of (prompt, seed, sample), so a resumed run can be compared
with an uninterrupted one row by row. No model runs here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from pipeline.generation.engine import Completion, SamplingSpec


class WordTokenizer:
    """One token per whitespace-separated word; a readable chat template."""

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> str:
        text = "".join(f"<|{m['role']}|> {m['content']} <|end|>\n" for m in conversation)
        if kwargs.get("enable_thinking") is False:
            return text + "<|assistant|> <think>\n\n</think>\n\n"
        return text + "<|assistant|> "

    def __call__(self, texts: list[str]) -> dict[str, list[list[str]]]:
        return {"input_ids": [t.split() for t in texts]}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        return text.split()


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
    calls: list[tuple[list[str], list[SamplingSpec]]] = field(default_factory=list)
    _seed: int = 0

    @property
    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer()

    def reseed(self, seed: int) -> int:
        self.seeds.append(seed)
        self._seed = seed
        return seed

    def complete(self, prompts: list[str], specs: list[SamplingSpec]) -> list[list[Completion]]:
        if self.crash_in_shard is not None and len(self.seeds) - 1 >= self.crash_in_shard:
            raise EngineCrash(f"simulated crash in shard {len(self.seeds) - 1} of this run")
        self.calls.append((prompts, specs))
        return [[self._one(p, s, i) for i in range(s.n)] for p, s in zip(prompts, specs, strict=True)]

    def _one(self, prompt: str, spec: SamplingSpec, index: int) -> Completion:
        tag = hashlib.sha256(f"{self._seed}|{prompt}|{index}".encode()).hexdigest()[:6]
        if spec.stop:  # the trace pass
            words = [f"w{tag}"] * self.trace_words
            if self.trace_words >= spec.max_tokens:
                return Completion(" ".join(words[: spec.max_tokens]), spec.max_tokens, "length", None)
            return Completion(" ".join(words), len(words), "stop", spec.stop[0])
        text = f"{self.answer} ({tag})"
        return Completion(text, len(text.split()), "stop", None)
