"""Checkable instruction constraints, one small pure function per type.

A constraint is a dict such as ``{"type": "max_words", "value": 40}``; flag constraints
(``all_lowercase``, ``all_uppercase``, ``no_commas``, ``json_format``) need no ``value``.
Every check sees the final answer only, never the reasoning trace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

_WORD = re.compile(r"\w+(?:['’]\w+)*")
_BULLET = re.compile(r"^[ \t]*[-*][ \t]+\S", re.MULTILINE)
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n(.*)\n```$", re.DOTALL)


def count_words(text: str) -> int:
    """Number of words: runs of word characters (an inner apostrophe keeps a word whole)."""
    return len(_WORD.findall(text))


def contains_word(text: str, word: str) -> bool:
    """Whether ``word`` (or phrase) occurs in ``text`` as a whole word, ignoring case."""
    needle = word.strip()
    if not needle:
        return False
    pattern = r"(?<!\w)" + re.escape(needle) + r"(?!\w)"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def _int_value(constraint: dict[str, Any]) -> int:
    value = constraint.get("value")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"constraint '{constraint.get('type')}' needs a non-negative integer value, got {value!r}"
        )
    return value


def _str_value(constraint: dict[str, Any]) -> str:
    value = constraint.get("value")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"constraint '{constraint.get('type')}' needs a non-empty text value, got {value!r}")
    return value.strip()


def _words_value(constraint: dict[str, Any]) -> list[str]:
    value = constraint.get("value")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(w, str) and w.strip() for w in value):
        raise ValueError(
            f"constraint '{constraint.get('type')}' needs a non-empty list of words, got {value!r}"
        )
    return value


def _max_words(constraint: dict[str, Any], answer: str) -> bool:
    return count_words(answer) <= _int_value(constraint)


def _min_words(constraint: dict[str, Any], answer: str) -> bool:
    return count_words(answer) >= _int_value(constraint)


def _include_keywords(constraint: dict[str, Any], answer: str) -> bool:
    return all(contains_word(answer, word) for word in _words_value(constraint))


def _forbid_words(constraint: dict[str, Any], answer: str) -> bool:
    return not any(contains_word(answer, word) for word in _words_value(constraint))


def _all_lowercase(constraint: dict[str, Any], answer: str) -> bool:
    return answer.islower()


def _all_uppercase(constraint: dict[str, Any], answer: str) -> bool:
    return answer.isupper()


def _start_with(constraint: dict[str, Any], answer: str) -> bool:
    return answer.lower().startswith(_str_value(constraint).lower())


def _end_with(constraint: dict[str, Any], answer: str) -> bool:
    return answer.lower().endswith(_str_value(constraint).lower())


def _num_bullets(constraint: dict[str, Any], answer: str) -> bool:
    return len(_BULLET.findall(answer)) == _int_value(constraint)


def _no_commas(constraint: dict[str, Any], answer: str) -> bool:
    return "," not in answer and "，" not in answer


def _json_format(constraint: dict[str, Any], answer: str) -> bool:
    """Valid JSON; one surrounding Markdown code fence (```json ... ```) is allowed."""
    fenced = _FENCE.match(answer)
    body = fenced.group(1) if fenced else answer
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


CHECKS: dict[str, Callable[[dict[str, Any], str], bool]] = {
    "max_words": _max_words,
    "min_words": _min_words,
    "include_keywords": _include_keywords,
    "forbid_words": _forbid_words,
    "all_lowercase": _all_lowercase,
    "all_uppercase": _all_uppercase,
    "start_with": _start_with,
    "end_with": _end_with,
    "num_bullets": _num_bullets,
    "no_commas": _no_commas,
    "json_format": _json_format,
}
"""Known constraint types and their checks."""


def check_constraint(constraint: dict[str, Any], answer: str) -> bool:
    """Whether ``answer`` satisfies ``constraint``; an unknown type or a malformed value raises ValueError."""
    if not isinstance(constraint, dict):
        raise ValueError(f"a constraint must be a dict, got {type(constraint).__name__}")
    kind = constraint.get("type")
    check = CHECKS.get(kind) if isinstance(kind, str) else None
    if check is None:
        raise ValueError(f"unknown constraint type {kind!r}; known: {', '.join(sorted(CHECKS))}")
    return check(constraint, answer.strip())
