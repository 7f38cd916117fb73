"""The built-in prompt set: deterministic, distinct, seed-sensitive, stably split and checkable."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from fractions import Fraction

import pytest

from pipeline.prompts.builtin import (
    CONSTRAINT_TYPES,
    build_builtin_prompts,
    format_number,
    prompt_id_for,
    render_constraint,
    split_for,
)
from pipeline.scoring.constraints import CHECKS, check_constraint
from pipeline.scoring.verifiable import VerifiableScorer


@pytest.fixture(scope="module")
def prompts_400() -> list:
    return build_builtin_prompts(400, seed=0, eval_fraction=0.25)


def test_deterministic_for_a_seed(prompts_400: list) -> None:
    assert build_builtin_prompts(400, seed=0, eval_fraction=0.25) == prompts_400


def test_prefix_property_and_count() -> None:
    small = build_builtin_prompts(10, seed=3)
    large = build_builtin_prompts(30, seed=3)
    assert len(small) == 10 and len(large) == 30
    assert large[:10] == small


def test_prompts_are_distinct(prompts_400: list) -> None:
    texts = [p.prompt for p in prompts_400]
    assert len(set(texts)) == len(texts) == 400
    assert len({p.prompt_id for p in prompts_400}) == 400


def test_seeds_give_different_sets() -> None:
    a = {p.prompt for p in build_builtin_prompts(50, seed=1)}
    b = {p.prompt for p in build_builtin_prompts(50, seed=2)}
    assert a != b
    assert len(a & b) < 25


def test_fields(prompts_400: list) -> None:
    for p in prompts_400:
        assert p.prompt_id == prompt_id_for(p.prompt)
        assert len(p.prompt_id) == 16 and int(p.prompt_id, 16) >= 0
        assert p.source == "builtin:seed=0"
        assert p.split in {"train", "eval"}
        assert p.task_type in {"math", "instruction"}


def test_families_are_mixed_half_and_half(prompts_400: list) -> None:
    counts = Counter(p.task_type for p in prompts_400)
    assert counts == {"math": 200, "instruction": 200}
    assert Counter(p.task_type for p in build_builtin_prompts(7, seed=5))["math"] in {3, 4}


def test_prompt_id_is_sha256_prefix() -> None:
    assert prompt_id_for("abc") == "ba7816bf8f01cfea"
    assert prompt_id_for("abc") != prompt_id_for("abd")


def test_split_is_stable_and_depends_only_on_id(prompts_400: list) -> None:
    for p in prompts_400:
        assert p.split == split_for(p.prompt_id, 0.25)
    other_seed = build_builtin_prompts(400, seed=9, eval_fraction=0.25)
    by_id = {p.prompt_id: p.split for p in prompts_400}
    shared = [p for p in other_seed if p.prompt_id in by_id]
    assert all(by_id[p.prompt_id] == p.split for p in shared)


def test_split_proportion(prompts_400: list) -> None:
    share = sum(p.split == "eval" for p in prompts_400) / len(prompts_400)
    assert 0.18 <= share <= 0.32


def test_split_edges() -> None:
    ids = [prompt_id_for(str(i)) for i in range(200)]
    assert all(split_for(i, 0.0) == "train" for i in ids)
    assert all(split_for(i, 1.0) == "eval" for i in ids)
    # Monotone in the fraction: an eval prompt stays eval when the fraction grows.
    assert all(split_for(i, 0.5) == "eval" for i in ids if split_for(i, 0.2) == "eval")
    with pytest.raises(ValueError):
        split_for(ids[0], 1.5)


def test_math_reference_answers_verify_against_themselves(prompts_400: list) -> None:
    scorer = VerifiableScorer()
    math = [p for p in prompts_400 if p.task_type == "math"]
    for p in math:
        assert p.reference_answer is not None and p.constraints == []
        float(p.reference_answer)  # a plain number
        assert "number" in p.prompt or "numeric" in p.prompt
        result = scorer.score("math", p.reference_answer, [], p.reference_answer)
        assert result.score == 1.0, p
        wrong = str(Fraction(p.reference_answer) + 1)
        assert scorer.score("math", p.reference_answer, [], wrong).score == 0.0, p


def test_instruction_prompts_have_known_constraints(prompts_400: list) -> None:
    instructions = [p for p in prompts_400 if p.task_type == "instruction"]
    sizes = Counter(len(p.constraints) for p in instructions)
    assert set(sizes) <= {1, 2, 3} and len(sizes) == 3
    used = set()
    for p in instructions:
        assert p.reference_answer is None
        kinds = [c["type"] for c in p.constraints]
        assert len(set(kinds)) == len(kinds)
        assert not {"max_words", "min_words"} <= set(kinds)
        assert not {"all_lowercase", "all_uppercase"} <= set(kinds)
        for c in p.constraints:
            assert c["type"] in CHECKS
            assert render_constraint(c) in p.prompt
            check_constraint(c, "some answer")  # raises on unknown or malformed constraints
            used.add(c["type"])
    assert used == set(CONSTRAINT_TYPES) == set(CHECKS)


def test_bad_arguments() -> None:
    assert build_builtin_prompts(0) == []
    with pytest.raises(ValueError):
        build_builtin_prompts(-1)
    with pytest.raises(ValueError):
        build_builtin_prompts(5, eval_fraction=-0.1)


def test_format_number() -> None:
    assert format_number(Fraction(12)) == "12"
    assert format_number(Fraction(7, 2)) == "3.5"
    assert format_number(Fraction(1, 4)) == "0.25"
    with pytest.raises(ValueError):
        format_number(Fraction(1, 3))


def test_records_are_frozen(prompts_400: list) -> None:
    record = prompts_400[0]
    with pytest.raises(AttributeError):
        record.prompt = "changed"  # type: ignore[misc]
    assert replace(record, split="eval").split == "eval"
