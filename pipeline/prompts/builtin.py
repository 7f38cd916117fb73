"""The built-in prompt set: checkable prompts generated from a seed (written for this project).

Two families, mixed half and half: ``math`` word problems with a numeric reference answer, and
``instruction`` tasks with 1-3 constraints that ``pipeline.scoring.constraints`` can check. The set is
a pure function of ``(num_prompts, seed)``; a prompt's split is a pure function of its id.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

TASK_TYPES = ("math", "instruction")

_NAMES = (
    "Maya", "Tom", "Aisha", "Luis", "Mei", "Omar", "Sara", "Ben",
    "Priya", "Ivan", "Lena", "Kofi", "Nora", "Jamal", "Elena", "Yuki",
)  # fmt: skip
_ITEMS = (
    ("notebook", "notebooks"), ("pencil", "pencils"), ("apple", "apples"), ("ticket", "tickets"),
    ("mug", "mugs"), ("book", "books"), ("candle", "candles"), ("ball", "balls"),
    ("plant", "plants"), ("sandwich", "sandwiches"), ("poster", "posters"), ("kite", "kites"),
)  # fmt: skip
_ANSWER_HINTS = (
    "Give the final answer as a number.",
    "Answer with a single number.",
    "End with the final numeric answer.",
    "State the final answer as a number.",
)

_TOPICS = (
    "Describe a sunrise over the sea",
    "Give advice on learning to cook",
    "Explain why people enjoy gardening",
    "Describe your ideal weekend",
    "Give tips for staying focused while studying",
    "Explain how a bicycle works",
    "Describe a busy city market",
    "Give advice to someone starting a new job",
    "Explain why sleep matters",
    "Describe a walk through a forest in autumn",
    "Write a short note thanking a teacher",
    "Explain how to make a cup of tea",
    "Give advice on saving money",
    "Describe a thunderstorm",
    "Explain why people keep pets",
    "Give tips for a long train journey",
    "Describe an old lighthouse",
    "Explain how rain forms",
    "Give advice on learning a new language",
    "Describe a quiet library",
    "Explain why regular exercise helps",
    "Write a short welcome message for a new neighbour",
    "Describe a favourite childhood game",
    "Give tips for writing a clear email",
    "Explain how plants grow from seeds",
    "Describe a snowy mountain village",
    "Give advice on planning a picnic",
    "Explain why maps are useful",
    "Describe the night sky in the countryside",
    "Give tips for keeping a tidy desk",
)
_KEYWORDS = (
    "river", "light", "balance", "patience", "window", "morning", "journey", "garden",
    "signal", "quiet", "bridge", "spark", "harbor", "compass", "rhythm", "colour",
)  # fmt: skip
_FORBIDDEN = ("very", "really", "just", "thing", "things", "good", "nice", "amazing", "important", "always")
# Answers are short (generation.max_answer_tokens defaults to 96), so word limits stay small.
_MAX_WORDS = (15, 20, 30, 40, 50, 60)
_MIN_WORDS = (10, 15, 20, 30, 40)
_START_PHRASES = ("Here is my answer", "In short", "To begin", "My view")
_END_PHRASES = ("That is all.", "Thank you for reading.", "Any other questions?", "The end.")

_CONFLICTS: dict[str, frozenset[str]] = {
    "max_words": frozenset({"min_words"}),
    "min_words": frozenset({"max_words"}),
    "all_lowercase": frozenset({"all_uppercase", "json_format"}),
    "all_uppercase": frozenset({"all_lowercase", "json_format"}),
    "json_format": frozenset(
        {"num_bullets", "start_with", "end_with", "all_lowercase", "all_uppercase", "no_commas"}
    ),
    "num_bullets": frozenset({"json_format"}),
    "start_with": frozenset({"json_format"}),
    "end_with": frozenset({"json_format"}),
    "no_commas": frozenset({"json_format"}),
    "include_keywords": frozenset(),
    "forbid_words": frozenset(),
}
"""Constraint types that cannot (or should not) be asked for together."""
CONSTRAINT_TYPES = tuple(sorted(_CONFLICTS))


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of the ``prompts`` dataset."""

    prompt_id: str
    prompt: str
    task_type: str
    reference_answer: str | None
    constraints: list[dict]
    source: str
    split: str


def prompt_id_for(text: str) -> str:
    """Content hash of a prompt: the first 16 hex characters of sha256(text)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def split_for(prompt_id: str, eval_fraction: float) -> str:
    """Stable split by hash: int(sha256("split:"+prompt_id), 16) mapped to [0,1); < eval_fraction -> 'eval'.

    The split depends on nothing but the id and the fraction, so it survives re-generation and
    re-ordering. With few prompts the eval (or train) split may come out empty; that is accepted.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    digest = hashlib.sha256(("split:" + prompt_id).encode("utf-8")).hexdigest()
    position = int(digest, 16) / 2 ** (4 * len(digest))
    return "eval" if position < eval_fraction else "train"


def format_number(value: Fraction) -> str:
    """An integer or a terminating decimal as text ("12", "3.5", "0.25")."""
    if value.denominator == 1:
        return str(value.numerator)
    places = 0
    while (value * 10**places).denominator != 1:
        places += 1
        if places > 6:
            raise ValueError(f"{value} has no short decimal form")
    return f"{float(value):.{places}f}"


# --- math templates: each returns (question, exact answer) ---------------------------------------


def _shopping(rng: random.Random) -> tuple[str, Fraction]:
    name, (_, items) = rng.choice(_NAMES), rng.choice(_ITEMS)
    count, price, extra = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 9)
    text = (
        f"{name} buys {count} {items} at {price} dollars each and a bag for {extra} dollars. "
        f"How many dollars does {name} spend in total?"
    )
    return text, Fraction(count * price + extra)


def _sharing(rng: random.Random) -> tuple[str, Fraction]:
    name, (_, items) = rng.choice(_NAMES), rng.choice(_ITEMS)
    people, each = rng.randint(2, 8), rng.randint(2, 12)
    text = (
        f"{name} shares {people * each} {items} equally among {people} friends. "
        f"How many {items} does each friend get?"
    )
    return text, Fraction(each)


def _distance(rng: random.Random) -> tuple[str, Fraction]:
    speed, hours = rng.choice((20, 30, 40, 45, 50, 60, 70, 80)), rng.randint(2, 6)
    vehicle = rng.choice(("train", "bus", "car", "ferry"))
    if rng.random() < 0.5:
        text = (
            f"A {vehicle} travels at {speed} kilometres per hour for {hours} hours. "
            "How many kilometres does it travel?"
        )
        return text, Fraction(speed * hours)
    text = (
        f"A {vehicle} travels {speed * hours} kilometres in {hours} hours. "
        "What is its speed in kilometres per hour?"
    )
    return text, Fraction(speed)


def _ages(rng: random.Random) -> tuple[str, Fraction]:
    first, second = rng.sample(_NAMES, 2)
    age, gap, years = rng.randint(5, 40), rng.randint(2, 15), rng.randint(2, 10)
    text = (
        f"{first} is {age} years old. {second} is {gap} years older than {first}. "
        f"How old will {second} be in {years} years?"
    )
    return text, Fraction(age + gap + years)


def _sums(rng: random.Random) -> tuple[str, Fraction]:
    name = rng.choice(_NAMES)
    (_, items) = rng.choice(_ITEMS)
    a, b, c = (rng.randint(3, 40) for _ in range(3))
    text = (
        f"{name} collects {a} {items} on Monday, {b} on Tuesday and {c} on Wednesday. "
        f"How many {items} does {name} collect in the three days?"
    )
    return text, Fraction(a + b + c)


def _products(rng: random.Random) -> tuple[str, Fraction]:
    rows, per_row, boxes = rng.randint(2, 6), rng.randint(2, 8), rng.randint(2, 5)
    text = f"A box holds {rows} rows of {per_row} eggs. How many eggs are there in {boxes} such boxes?"
    return text, Fraction(rows * per_row * boxes)


def _differences(rng: random.Random) -> tuple[str, Fraction]:
    total, lent = rng.randint(40, 200), rng.randint(5, 39)
    place = rng.choice(("library", "school", "shop", "club"))
    text = f"A {place} had {total} books and gave away {lent} of them. How many books are left?"
    return text, Fraction(total - lent)


def _multi_step(rng: random.Random) -> tuple[str, Fraction]:
    name, (_, items) = rng.choice(_NAMES), rng.choice(_ITEMS)
    count, price = rng.randint(2, 6), rng.randint(2, 9)
    start, earned = count * price + rng.randint(1, 30), rng.randint(5, 25)
    text = (
        f"{name} has {start} dollars, buys {count} {items} at {price} dollars each, "
        f"then earns {earned} dollars. How many dollars does {name} have now?"
    )
    return text, Fraction(start - count * price + earned)


def _halves(rng: random.Random) -> tuple[str, Fraction]:
    length, pieces = rng.randint(3, 25), rng.choice((2, 4, 5))
    thing = rng.choice(("rope", "ribbon", "plank", "pipe"))
    text = (
        f"A {thing} {length} metres long is cut into {pieces} equal pieces. "
        "How many metres long is each piece?"
    )
    return text, Fraction(length, pieces)


def _average(rng: random.Random) -> tuple[str, Fraction]:
    name = rng.choice(_NAMES)
    scores = [rng.randint(5, 20) for _ in range(rng.choice((2, 4)))]
    listed = ", ".join(str(s) for s in scores[:-1]) + f" and {scores[-1]}"
    text = f"{name} scores {listed} points in {len(scores)} games. What is the average score per game?"
    return text, Fraction(sum(scores), len(scores))


def _discount(rng: random.Random) -> tuple[str, Fraction]:
    price, percent = rng.choice(range(20, 201, 4)), rng.choice((10, 20, 25, 50))
    (item, _) = rng.choice(_ITEMS)
    text = f"A {item} costs {price} dollars and is sold at {percent}% off. What is the sale price in dollars?"
    return text, Fraction(price * (100 - percent), 100)


_MATH_TEMPLATES: tuple[Callable[[random.Random], tuple[str, Fraction]], ...] = (
    _shopping, _sharing, _distance, _ages, _sums, _products,
    _differences, _multi_step, _halves, _average, _discount,
)  # fmt: skip


def _math_prompt(rng: random.Random) -> tuple[str, str, list[dict[str, Any]]]:
    question, answer = rng.choice(_MATH_TEMPLATES)(rng)
    return f"{question} {rng.choice(_ANSWER_HINTS)}", format_number(answer), []


# --- instruction prompts -------------------------------------------------------------------------


def _quoted(words: list[str], joiner: str) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" {joiner} {quoted[-1]}"


def _make_constraint(kind: str, rng: random.Random) -> dict[str, Any]:
    values: dict[str, Callable[[], Any]] = {
        "max_words": lambda: rng.choice(_MAX_WORDS),
        "min_words": lambda: rng.choice(_MIN_WORDS),
        "include_keywords": lambda: rng.sample(_KEYWORDS, rng.randint(1, 3)),
        "forbid_words": lambda: rng.sample(_FORBIDDEN, rng.randint(1, 3)),
        "start_with": lambda: rng.choice(_START_PHRASES),
        "end_with": lambda: rng.choice(_END_PHRASES),
        "num_bullets": lambda: rng.randint(2, 5),
    }
    if kind in values:
        return {"type": kind, "value": values[kind]()}
    return {"type": kind}


def render_constraint(constraint: dict[str, Any]) -> str:
    """The constraint as an instruction sentence."""
    kind, value = constraint["type"], constraint.get("value")
    sentences: dict[str, Callable[[], str]] = {
        "max_words": lambda: f"Use at most {value} words.",
        "min_words": lambda: f"Use at least {value} words.",
        "include_keywords": lambda: (
            f"Include the word{'s' if len(value) > 1 else ''} {_quoted(value, 'and')}."
        ),
        "forbid_words": lambda: f"Do not use the word{'s' if len(value) > 1 else ''} {_quoted(value, 'or')}.",
        "all_lowercase": lambda: "Write your whole answer in lowercase letters, with no capital letters.",
        "all_uppercase": lambda: "Write your whole answer in capital letters only.",
        "start_with": lambda: f'Begin your answer with the words "{value}".',
        "end_with": lambda: f'End your answer with the exact phrase "{value}"',
        "num_bullets": lambda: (
            f'Format your answer as exactly {value} markdown bullet points, each starting with "- ".'
        ),
        "no_commas": lambda: "Do not use any commas.",
        "json_format": lambda: "Format your entire answer as valid JSON.",
    }
    if kind not in sentences:
        raise ValueError(f"unknown constraint type {kind!r}")
    return sentences[kind]()


def _instruction_prompt(rng: random.Random) -> tuple[str, None, list[dict[str, Any]]]:
    topic = rng.choice(_TOPICS)
    wanted = rng.randint(1, 3)
    kinds: list[str] = []
    for kind in rng.sample(CONSTRAINT_TYPES, len(CONSTRAINT_TYPES)):
        if len(kinds) == wanted:
            break
        if not any(kind in _CONFLICTS[chosen] or chosen in _CONFLICTS[kind] for chosen in kinds):
            kinds.append(kind)
    constraints = [_make_constraint(kind, rng) for kind in kinds]
    text = " ".join([f"{topic}."] + [render_constraint(c) for c in constraints])
    return text, None, constraints


def build_builtin_prompts(num_prompts: int, seed: int = 0, eval_fraction: float = 0.25) -> list[PromptRecord]:
    """``num_prompts`` distinct prompts, half math and half instruction, deterministic for ``seed``."""
    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    split_for("", eval_fraction)  # validates the fraction before any work
    rng = random.Random(seed)
    makers = {"math": _math_prompt, "instruction": _instruction_prompt}
    counts = dict.fromkeys(TASK_TYPES, 0)
    records: list[PromptRecord] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 50 * num_prompts + 1000
    while len(records) < num_prompts:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(
                f"only {len(records)} distinct built-in prompts after {max_attempts} attempts; "
                f"ask for fewer than {num_prompts}"
            )
        task_type = min(TASK_TYPES, key=lambda t: (counts[t], rng.random()))
        text, reference, constraints = makers[task_type](rng)
        if text in seen:
            continue
        seen.add(text)
        counts[task_type] += 1
        prompt_id = prompt_id_for(text)
        records.append(
            PromptRecord(
                prompt_id=prompt_id,
                prompt=text,
                task_type=task_type,
                reference_answer=reference,
                constraints=constraints,
                source=f"builtin:seed={seed}",
                split=split_for(prompt_id, eval_fraction),
            )
        )
    return records
