"""Reasoning on/off: prompt rendering and trace/answer parsing (docs/method.md §Reasoning on/off formats).

Mode ``trace`` samples a reasoning trace ``r`` then an answer ``y``; mode ``empty`` disables reasoning
(``r = ∅``) by prefilling an empty trace block. What a trainer scores as the response is the trace block
followed by the answer, so ``log π(r, y | x)`` and ``log π(∅, y | x)`` are taken over the same kind of
sequence in both modes. Everything the engine is fed is token ids (docs/method.md §Token-exact sequences):
the chat prompt is rendered once and tokenized once with exactly the special tokens its template writes
(none added), and each prefilled or forced piece has its own fixed ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pipeline.config import ReasoningConfig

Mode = Literal["trace", "empty"]
MODES: tuple[Mode, Mode] = ("trace", "empty")


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (special-token strings in it are parsed)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class TraceFormat:
    """Renders the prefixes of each mode and parses what the model wrote."""

    config: ReasoningConfig

    @property
    def trace_prefix(self) -> str:
        """Prefilled at the start of a reasoning-on response."""
        return f"{self.config.open_tag}\n"

    @property
    def empty_block(self) -> str:
        """The whole trace block of a reasoning-off response."""
        return f"{self.config.open_tag}\n\n{self.config.close_tag}\n\n"

    def close_trace(self, trace: str) -> str:
        """The trace block once a trace is finished (by the model or by the budget)."""
        return f"{self.trace_prefix}{trace.strip()}\n{self.config.close_tag}\n\n"

    def prompt_ids(self, tokenizer: Any, prompt: str, mode: Mode) -> list[int]:
        """The chat-rendered prompt of ``mode`` as ids: the template's own special tokens, none added."""
        return encode_text(tokenizer, self.render_prompt(tokenizer, prompt, mode))

    def prefix_ids(self, tokenizer: Any, mode: Mode) -> list[int]:
        """Ids prefilled after the prompt before sampling starts (see :meth:`response_prefix`)."""
        return encode_text(tokenizer, self.response_prefix(mode))

    def forced_close_ids(self, tokenizer: Any) -> list[int]:
        """Ids forced after a trace the budget stopped: a newline and the close tag, then a blank line."""
        return encode_text(tokenizer, f"\n{self.config.close_tag}\n\n")

    def render_prompt(self, tokenizer: ChatTokenizer, prompt: str, mode: Mode) -> str:
        """Chat-rendered prompt that precedes the response text of ``mode``."""
        messages = [{"role": "user", "content": prompt}]
        if self.config.control == "native":
            return str(
                tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, enable_thinking=(mode == "trace")
                )
            )
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def response_prefix(self, mode: Mode) -> str:
        """What is prefilled after the rendered prompt before sampling starts."""
        if mode == "trace":
            return self.trace_prefix
        # A native template already writes the empty block when enable_thinking=False.
        return "" if self.config.control == "native" else self.empty_block

    def check_answer(self, answer: str) -> str | None:
        """Why an answer cannot be used (``None`` when it is fine)."""
        if not answer.strip():
            return "empty answer"
        if self.config.open_tag in answer or self.config.close_tag in answer:
            return "answer contains reasoning tags"
        return None
