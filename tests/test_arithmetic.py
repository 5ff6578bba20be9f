"""The arithmetic task: answers exactly right (recomputed from each problem's steps), seeded
determinism, disjoint splits, answer extraction and accuracy."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from salora.chat import read_chat_jsonl
from salora.errors import SaLoRAError
from salora.tasks import arithmetic
from salora.tasks.arithmetic import accuracy, extract_answer


@pytest.fixture(scope="module")
def splits():
    return arithmetic.splits()


def all_problems(splits):
    return [p for ps in splits.values() for p in ps]


def check_exact(p: arithmetic.Problem) -> None:
    """Recompute every step, and check each number of the question is used exactly once and each
    intermediate result feeds exactly one later step."""
    assert 2 <= len(p.steps) <= 3
    given_numbers = Counter(int(n) for n in re.findall(r"\d+", p.question))
    results: list[int] = []
    used: Counter[int] = Counter()
    for s in p.steps:
        for operand in (s.a, s.b):
            if operand in results:
                results.remove(operand)
            else:
                used[operand] += 1
        if s.op == "/":
            assert s.b != 0 and s.b * s.result == s.a
        else:
            assert s.result == {"+": s.a + s.b, "-": s.a - s.b, "*": s.a * s.b}[s.op]
        assert 0 <= s.result <= 999
        results.append(s.result)
    assert results == [p.answer] and p.steps[-1].result == p.answer
    assert used == given_numbers
    working = ", ".join(f"{s.a} {s.op} {s.b} = {s.result}" for s in p.steps)
    assert p.answer_text == f"{working}\nAnswer: {p.answer}"


def test_answers_are_exact(splits):
    problems = all_problems(splits)
    for p in problems:
        check_exact(p)
    ops = Counter(s.op for p in problems for s in p.steps)
    assert set(ops) == {"+", "-", "*", "/"}
    assert Counter(len(p.steps) for p in problems)[3] > 100


def test_split_sizes_and_disjoint(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 3000, "validation": 200, "test": 300}
    questions = [p.question for p in all_problems(splits)]
    assert len(set(questions)) == len(questions)


def test_every_template_is_used(splits):
    shapes = {re.sub(r"\d+|[A-Z][a-z]+", "#", p.question)[:25] for p in splits["train"]}
    assert len(shapes) >= len(arithmetic.TEMPLATES)


def test_deterministic_by_seed(splits):
    assert arithmetic.generate(50, seed=7) == arithmetic.generate(50, seed=7)
    assert arithmetic.generate(50, seed=7) != arithmetic.generate(50, seed=8)
    assert arithmetic.splits(0) == splits


def test_messages_and_jsonl(tmp_path, splits):
    problems = splits["validation"][:20]
    path = tmp_path / "task.jsonl"
    arithmetic.write_jsonl(problems, path)
    assert read_chat_jsonl(path) == [arithmetic.to_messages(p) for p in problems]
    assert arithmetic.to_messages(problems[0])[1]["content"].endswith(f"Answer: {problems[0].answer}")


def test_extract_answer_round_trips(splits):
    assert all(extract_answer(p.answer_text) == p.answer for p in all_problems(splits))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 31", 31),
        ("  answer :   31  \n", 31),
        ("ANSWER:7", 7),
        ("12 * 3 = 36, 36 - 5 = 31\nAnswer: 31\nAnswer: 40", 31),
        ("Answer: -4", -4),
        ("3 + 4 = 7, so the total is 9 apples.", 9),
        ("I think it is 12", 12),
        ("Answer: none", None),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer_cases(text, expected):
    assert extract_answer(text) == expected


junk = st.text(st.characters(blacklist_characters="0123456789"), max_size=40).filter(lambda t: "answer" not in t.lower())


@given(prefix=junk, suffix=junk, n=st.integers(0, 10**6))
def test_extract_answer_finds_the_answer_line(prefix, suffix, n):
    assert extract_answer(f"{prefix}\nAnswer: {n}\n{suffix}") == n


@given(text=junk)
def test_extract_answer_without_digits_is_none(text):
    assert extract_answer(text) is None


@given(text=st.text(max_size=200))
def test_extract_answer_never_raises(text):
    assert extract_answer(text) is None or isinstance(extract_answer(text), int)


def test_accuracy(splits):
    problems = splits["test"][:4]
    responses = [problems[0].answer_text, f"Answer: {problems[1].answer + 1}", "no idea", f"It is {problems[3].answer}"]
    assert accuracy(responses, problems) == 0.5
    assert accuracy([p.answer_text for p in problems], problems) == 1.0
    with pytest.raises(SaLoRAError):
        accuracy(responses[:3], problems)
    with pytest.raises(SaLoRAError):
        accuracy([], [])
