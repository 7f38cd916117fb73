"""The user message inside a chat-rendered prompt, and back (docs/method.md §Reasoning on/off formats).

Pairs store the prompt as the chat template rendered it for their mode. Export in the conversational
layout needs the user message again, and a standard-layout import may bring prompts that are already
rendered; both are found by rendering the template around a sentinel and matching what is around it.
"""

from __future__ import annotations

from typing import Any

from pipeline.generation.reasoning import Mode, TraceFormat

_SENTINEL = "\x00bvpo-user-message\x00"


def template_frame(tokenizer: Any, fmt: TraceFormat, mode: Mode) -> tuple[str, str]:
    """The text the chat template writes before and after a single user message in ``mode``."""
    rendered = fmt.render_prompt(tokenizer, _SENTINEL, mode)
    head, found, tail = rendered.partition(_SENTINEL)
    if not found:
        raise ValueError("the chat template does not write the user message verbatim")
    return head, tail


def user_message(rendered: str, frame: tuple[str, str]) -> str | None:
    """The user message of a prompt rendered with ``frame``; None when it was not rendered that way."""
    head, tail = frame
    if len(rendered) > len(head) + len(tail) and rendered.startswith(head) and rendered.endswith(tail):
        return rendered[len(head) : len(rendered) - len(tail)]
    return None
