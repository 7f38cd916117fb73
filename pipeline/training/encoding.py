"""The one place training sequences are built from stored rows (docs/method.md §Token-exact sequences).

Generation stores, per row, the prompt ids exactly as fed to the engine and every response id after them
(prefilled, sampled, forced and end-of-sequence tokens, with a segment code each); pairs carry the ids of
their prompt and of both responses. Pairs, the reference pass, the trainer, the gradient probe and the
evaluation all take their sequences from here, so what is scored is exactly what was sampled: nothing is
re-tokenized from text. Text is tokenized only for data that was not sampled here (imported pairs), by
:func:`encode_text` and :func:`render_prompt_ids`, which generation uses too.

Length is a policy, not an accident (:func:`fit_length`): a pair whose prompt plus longer response exceeds
``max_length`` is rejected with the numbers, or (on request) its prompt is cut from the left; a response is
never cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pipeline.config import ReasoningConfig
from pipeline.generation.reasoning import Mode, TraceFormat
from pipeline.generation.reasoning import encode_text as _encode_text
from pipeline.generation.segments import BLOCK, SAMPLED, Segment

PAIR_TOKEN_COLUMNS = ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids")
GENERATION_TOKEN_COLUMNS = ("prompt_token_ids", "response_token_ids", "response_segments", "eos_emitted")

Truncation = Literal["reject", "truncate_prompt_left"]


class TokenFormatError(ValueError):
    """A stored dataset has no token ids (written before token-exact sequences) or inconsistent ones."""


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids: the shared prompt and the two responses.

    ``truncated``: the prompt was cut from the left to fit (``prompt_cut`` ids removed).
    """

    pair_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    prompt_cut: int = 0

    @property
    def length(self) -> int:
        """Tokens of the longer of the two sequences."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass(frozen=True)
class GenerationParts:
    """A generation row split where the answer starts.

    ``block_ids``: the trace block (prefilled open tag, sampled trace, forced close tag; or the empty
    block); ``answer_ids``: the sampled answer, with the end-of-sequence token when the model emitted it.
    """

    prompt_ids: list[int]
    block_ids: list[int]
    answer_ids: list[int]
    eos_emitted: bool

    @property
    def response_ids(self) -> list[int]:
        return self.block_ids + self.answer_ids


def require_token_columns(columns: Iterable[str], dataset: str, kind: str = "pairs") -> None:
    """Raise :class:`TokenFormatError` naming the dataset when it predates token-exact sequences."""
    needed = PAIR_TOKEN_COLUMNS if kind == "pairs" else GENERATION_TOKEN_COLUMNS
    missing = [c for c in needed if c not in set(columns)]
    if missing:
        raise TokenFormatError(
            f"{dataset} has no {', '.join(missing)}: it was written by an older version of this pipeline "
            "that stored text only, and training now scores the exact token ids the sampler produced. "
            "Re-run the data refresh (it regenerates; the old datasets stay readable) or use a new workspace."
        )


def pair_tokens(pair: Mapping[str, Any], *, eos_id: int | None = None) -> TokenizedPair:
    """The pair's stored ids as a :class:`TokenizedPair` (no tokenizer involved).

    ``eos_id``: append this end-of-sequence id to a response that does not end with it
    (``train.append_eos: always``); ``None`` keeps EOS only where the model emitted it.
    """
    missing = [c for c in PAIR_TOKEN_COLUMNS if pair.get(c) is None]
    if missing:
        raise TokenFormatError(f"pair '{pair.get('pair_id')}' has no {', '.join(missing)}")
    chosen, rejected = list(pair["chosen_token_ids"]), list(pair["rejected_token_ids"])
    if eos_id is not None:
        chosen, rejected = _with_eos(chosen, eos_id), _with_eos(rejected, eos_id)
    return TokenizedPair(str(pair["pair_id"]), list(pair["prompt_token_ids"]), chosen, rejected)


def _with_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids if ids and ids[-1] == eos_id else [*ids, eos_id]


def fit_length(
    pair: TokenizedPair, max_length: int, policy: Truncation = "reject"
) -> tuple[TokenizedPair | None, str | None]:
    """``(pair, None)`` when it fits ``max_length`` (cut as ``policy`` allows), else ``(None, reason)``.

    ``truncate_prompt_left`` removes prompt ids from the left until the longer sequence fits, keeping at
    least one prompt id; responses are never cut, so a response alone longer than ``max_length − 1`` is
    rejected under either policy.
    """
    if pair.length <= max_length:
        return pair, None
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    numbers = (
        f"{len(pair.prompt_ids)} prompt + {longest} response tokens = {pair.length} > "
        f"train.max_length {max_length}"
    )
    if policy == "reject":
        return None, f"too long for training: {numbers} (train.truncation: reject)"
    room = max_length - longest
    if room < 1:
        return None, f"response too long for training even without its prompt: {numbers}"
    cut = len(pair.prompt_ids) - room
    return replace(pair, prompt_ids=pair.prompt_ids[cut:], truncated=True, prompt_cut=cut), None


def generation_parts(row: Mapping[str, Any]) -> GenerationParts:
    """Split a stored generation row's response into its trace block and its answer."""
    missing = [c for c in GENERATION_TOKEN_COLUMNS if row.get(c) is None]
    if missing:
        raise TokenFormatError(f"generation '{row.get('generation_id')}' has no {', '.join(missing)}")
    ids, segments = list(row["response_token_ids"]), list(row["response_segments"])
    if len(ids) != len(segments):
        raise TokenFormatError(
            f"generation '{row.get('generation_id')}' has {len(ids)} response ids but "
            f"{len(segments)} segments"
        )
    start = next((i for i, s in enumerate(segments) if s not in BLOCK), len(ids))
    return GenerationParts(list(row["prompt_token_ids"]), ids[:start], ids[start:], bool(row["eos_emitted"]))


def sampled_logprobs(row: Mapping[str, Any]) -> list[tuple[int, Segment, float]]:
    """``(response position, segment, sampler raw log-prob)`` of every sampled token that has one."""
    logps = row.get("sampler_logprobs")
    if logps is None:
        return []
    out = []
    for position, (segment, value) in enumerate(zip(row["response_segments"], logps, strict=True)):
        if Segment(segment) in SAMPLED and value is not None and value == value:  # None/NaN: none given
            out.append((position, Segment(segment), float(value)))
    return out


def decode_mismatch(tokenizer: Any, ids: Sequence[int], text: str, what: str) -> str | None:
    """Why ``ids`` do not decode to ``text`` (``None`` when they do)."""
    decoded = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    eos = getattr(tokenizer, "eos_token", None)
    if decoded == text or (eos and decoded.endswith(eos) and decoded[: -len(eos)] == text):
        return None
    at = next(
        (i for i, (a, b) in enumerate(zip(decoded, text, strict=False)) if a != b),
        min(len(decoded), len(text)),
    )
    return (
        f"stored {what} token ids do not decode to the stored {what} text (first difference at character "
        f"{at}: {decoded[at : at + 20]!r} vs {text[at : at + 20]!r}); the row was edited or written by "
        "another tokenizer"
    )


def pair_decode_problem(tokenizer: Any, pair: Mapping[str, Any]) -> str | None:
    """The first way a stored pair's ids disagree with its text columns, or ``None``."""
    checks = (
        ("prompt", pair["prompt_token_ids"], pair["prompt_text"]),
        ("chosen", pair["chosen_token_ids"], pair["chosen_response"]),
        ("rejected", pair["rejected_token_ids"], pair["rejected_response"]),
    )
    for what, ids, text in checks:
        problem = decode_mismatch(tokenizer, ids, text, what)
        if problem is not None:
            return problem
    return None


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` with no special tokens added: the one tokenization of data not sampled here."""
    return _encode_text(tokenizer, text)


def render_prompt_ids(tokenizer: Any, prompt: str, mode: Mode, reasoning: ReasoningConfig) -> list[int]:
    """The chat-rendered prompt of ``mode`` as ids, exactly as generation feeds it to the engine."""
    return TraceFormat(reasoning).prompt_ids(tokenizer, prompt, mode)


def response_prefix_ids(tokenizer: Any, mode: Mode, reasoning: ReasoningConfig) -> list[int]:
    """The ids generation prefills after the prompt in ``mode`` (open tag, or the empty block)."""
    return TraceFormat(reasoning).prefix_ids(tokenizer, mode)
