"""LLM-judge scorer: a pointwise rubric rating from 1 to 10 of the final answer, parsed without guessing.

The judge sees the user's prompt and the final answer only. Prompt building and rating parsing are pure
functions; the judge model is reached through a :class:`ChatClient`: an OpenAI-compatible endpoint
(:mod:`pipeline.scoring.openai_chat`, e.g. vLLM's server started by hand) or an in-process generation
engine (:class:`EngineChatClient`, for use inside a child process such as the generation worker).

A judgement whose rating cannot be read unambiguously is not guessed: it becomes an error result that the
scoring stage records as a reject, raw text included.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.generation.engine import SamplingSpec
from pipeline.generation.sampler import Engine
from pipeline.scoring.base import ScoreInput, ScoreResult

Message = dict[str, str]

MIN_RATING, MAX_RATING = 1.0, 10.0
MAX_STORED_JUDGEMENT_CHARS = 4000
"""Judgement text kept in the ``details`` column per row (rejects keep it too)."""

JUDGE_SYSTEM_PROMPT = (
    "You are an impartial, strict judge of answers written by an AI assistant. You judge only the "
    "final answer shown to you, against the user's request."
)

DEFAULT_RUBRIC = """Rate the assistant's answer to the user's request on a scale from 1 to 10.

Rubric:
- 9-10: fully correct and complete, follows every instruction, clear and concise.
- 7-8: correct and helpful, with minor omissions or style problems.
- 4-6: partly correct or partly follows the instructions; noticeable errors or gaps.
- 2-3: mostly wrong, off-topic or ignores important instructions.
- 1: empty, nonsensical, harmful, or entirely wrong.

[User request]
{question}

[Assistant's answer]
{answer}

First explain your judgement in at most three sentences. Then write the rating on the last line in \
exactly this format: "Rating: [[N]]", where N is an integer from 1 to 10."""

_PLACEHOLDER = re.compile(r"\{(question|answer)\}")
_NUMBER = r"(\d+(?:\.\d+)?)"
_BRACKETED = re.compile(r"\[\[\s*" + _NUMBER + r"\s*\]\]")
_LABELLED = re.compile(
    r"\b(?:rating|score|grade)\b[\"'*_`]*\s*(?:is|of|=|:)?\s*[\"'*_`]*\s*"
    + _NUMBER
    + r"(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?",
    re.IGNORECASE,
)
_OUT_OF = re.compile(_NUMBER + r"\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?)\b", re.IGNORECASE)
_BARE = re.compile(r"^[\W_]*" + _NUMBER + r"(?:\s*/\s*10)?[\W_]*$")
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def build_judge_messages(question: str, answer: str, rubric: str | None = None) -> list[Message]:
    """Chat messages asking the judge to rate ``answer`` to ``question`` (placeholders filled in one pass)."""
    template = DEFAULT_RUBRIC if rubric is None else rubric
    check_rubric(template)
    values = {"question": question, "answer": answer}
    content = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": content}]


def check_rubric(template: str) -> None:
    """A rubric must contain both placeholders, ``{question}`` and ``{answer}``."""
    found = set(_PLACEHOLDER.findall(template))
    missing = {"question", "answer"} - found
    if missing:
        raise ValueError(
            f"judge rubric lacks placeholder(s): {', '.join('{' + m + '}' for m in sorted(missing))}"
        )


@dataclass(frozen=True)
class ParsedRating:
    """A rating read from a judgement, or why none could be read."""

    rating: float | None
    reason: str | None = None


def strip_reasoning(text: str) -> str:
    """The judgement without ``<think>`` blocks; text after the last ``</think>`` if a block is left open."""
    text = _THINK_BLOCK.sub(" ", text)
    lowered = text.lower()
    if "</think>" in lowered:
        text = text[lowered.rindex("</think>") + len("</think>") :]
    elif "<think>" in lowered:
        return ""  # the judge never finished thinking: there is no verdict
    return text


def _single(values: list[float], what: str) -> ParsedRating:
    distinct = sorted(set(values))
    if len(distinct) > 1:
        shown = ", ".join(f"{v:g}" for v in distinct)
        return ParsedRating(None, f"ambiguous: {what} give different ratings ({shown})")
    rating = distinct[0]
    if not MIN_RATING <= rating <= MAX_RATING:
        return ParsedRating(None, f"rating {rating:g} is outside {MIN_RATING:g}-{MAX_RATING:g}")
    return ParsedRating(rating)


def parse_rating(text: str) -> ParsedRating:
    """Read the 1-10 rating from a judgement, most explicit form first; never guess.

    Order: ``[[N]]`` (the requested form), then labelled forms (``Rating: 7``, ``score of 7/10``,
    ``{"score": 7}``), then ``N/10``, then a judgement that is only a number. Within the first form that
    occurs, all occurrences must agree; a denominator other than 10 or a value outside 1-10 is rejected.
    """
    body = strip_reasoning(text or "").strip()
    if not body:
        return ParsedRating(None, "empty judgement")
    bracketed = [float(m) for m in _BRACKETED.findall(body)]
    if bracketed:
        return _single(bracketed, "[[N]] ratings")
    labelled = _LABELLED.findall(body)
    if labelled:
        if any(scale and float(scale) != MAX_RATING for _, scale in labelled):
            return ParsedRating(None, "rating given on a scale other than 10")
        return _single([float(value) for value, _ in labelled], "labelled ratings")
    out_of = _OUT_OF.findall(body)
    tens = [float(value) for value, scale in out_of if float(scale) == MAX_RATING]
    if tens:
        return _single(tens, "N/10 ratings")
    bare = _BARE.match(body)
    if bare:
        return _single([float(bare.group(1))], "the bare number")
    return ParsedRating(None, "no rating found")


def judgement_result(text: str, normalize: bool = True) -> ScoreResult:
    """Score of one judgement: (rating − 1) / 9 if ``normalize``, else the rating; unparseable: an error."""
    parsed = parse_rating(text)
    stored = (text or "")[:MAX_STORED_JUDGEMENT_CHARS]
    if parsed.rating is None:
        return ScoreResult(
            score=math.nan,
            checks={"rating_parsed": False},
            error=f"unparseable judgement ({parsed.reason})",
            details={"judgement": stored},
        )
    rating = parsed.rating
    score = (rating - MIN_RATING) / (MAX_RATING - MIN_RATING) if normalize else rating
    return ScoreResult(
        score=score, checks={"rating_parsed": True}, details={"rating": rating, "judgement": stored}
    )


class ChatClient(Protocol):
    """Anything that answers chat conversations with one text each, in order."""

    def chat(self, conversations: Sequence[list[Message]]) -> list[str]: ...


class EngineChatClient:
    """A :class:`ChatClient` over a generation engine (``VLLMEngine.complete``), run in its own process."""

    def __init__(
        self,
        engine: Engine,
        *,
        temperature: float = 0.0,
        max_tokens: int = 512,
        render: Callable[[list[Message]], str] | None = None,
    ) -> None:
        self.engine = engine
        self.spec = SamplingSpec(n=1, temperature=temperature, top_p=1.0, max_tokens=max_tokens)
        self.render = render or self._chat_template

    def _chat_template(self, messages: list[Message]) -> str:
        return str(
            self.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )

    def chat(self, conversations: Sequence[list[Message]]) -> list[str]:
        tokenizer = self.engine.tokenizer
        # Engines take token ids: the rendered text tokenized with no special tokens added (its template's
        # own, if any, are in the text), as generation does (docs/method.md §Token-exact sequences).
        prompts = [
            list(tokenizer(self.render(list(c)), add_special_tokens=False)["input_ids"])
            for c in conversations
        ]
        outputs = self.engine.complete(prompts, [self.spec] * len(prompts))
        return [out[0].text if out else "" for out in outputs]


class JudgeScorer:
    """Scores final answers with an LLM judge reached through a :class:`ChatClient`."""

    name = "judge"

    def __init__(self, client: ChatClient, *, rubric: str | None = None, normalize: bool = True) -> None:
        if rubric is not None:
            check_rubric(rubric)
        self.client = client
        self.rubric = rubric
        self.normalize = normalize

    def score_batch(self, items: Sequence[ScoreInput]) -> list[ScoreResult]:
        """Judge every item (the client shows progress and batches requests)."""
        conversations = [build_judge_messages(item.prompt, item.answer, self.rubric) for item in items]
        texts = self.client.chat(conversations) if conversations else []
        if len(texts) != len(items):
            raise RuntimeError(f"judge client returned {len(texts)} judgement(s) for {len(items)} request(s)")
        return [judgement_result(text, self.normalize) for text in texts]

    def close(self) -> None:
        close: Any = getattr(self.client, "close", None)
        if callable(close):
            close()
