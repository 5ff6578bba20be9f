"""Arithmetic word problems (2-3 steps of + - * and exact integer division, every value from 0 to
999) in a fixed answer format: small enough for a 135M model to learn, and graded exactly.

The answer is the working as one line of equations, then `Answer: N`:

    12 * 3 = 36, 36 - 5 = 31
    Answer: 31
"""

from __future__ import annotations

import operator
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from salora.datasets import write_jsonl as _write_rows
from salora.errors import SaLoRAError
from salora.tasks.common import cut, distinct

OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
SPLIT_SIZES = {"train": 3000, "validation": 200, "test": 300}
MAX_VALUE = 999

NAMES = ("Maya", "Liam", "Sofia", "Noah", "Aisha", "Mateo", "Yuki", "Omar", "Priya", "Lucas",
         "Chloe", "Kofi", "Elena", "Ravi", "Hana", "Diego", "Nora", "Felix", "Zara", "Ivan")
GOODS = ("notebooks", "pens", "mugs", "T-shirts", "plants", "books", "candles", "towels", "puzzles", "scarves")
SNACKS = ("apples", "pears", "muffins", "bagels", "oranges", "cookies", "lemons", "peaches")
VEHICLES = ("bus", "train", "truck", "car", "ferry", "van")
BAKES = (("flour", "cake", "cakes"), ("sugar", "pie", "pies"), ("butter", "tray of biscuits", "trays of biscuits"),
         ("rice", "pot of soup", "pots of soup"), ("cheese", "pizza", "pizzas"))
FLOWERS = ("tulips", "roses", "daisies", "sunflowers", "lilies")
PRIZES = ("stickers", "pencils", "erasers", "bookmarks", "badges")


@dataclass(frozen=True)
class Step:
    """One equation of the working: `a op b = result`."""

    a: int
    op: str
    b: int
    result: int


@dataclass(frozen=True)
class Problem:
    """A question, its worked answer, and the steps both were computed from."""

    question: str
    answer_text: str
    answer: int
    steps: tuple[Step, ...]


class _Rejected(Exception):
    """A draw broke the task's bounds; the generator draws again."""


class _Work:
    """Records each operation as it is computed, so the working always matches the answer; a value
    out of range or an inexact division rejects the draw (the generator draws again)."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def __call__(self, a: int, op: str, b: int) -> int:
        result = OPS[op](a, b)
        if (op == "/" and a % b) or not 0 <= result <= MAX_VALUE:
            raise _Rejected
        self.steps.append(Step(a, op, b, result))
        return result


# Each template draws its numbers, computes the answer through `w` (in the order of the working)
# and returns the question text.
Template = Callable[[random.Random, _Work], str]


def _shop_change(r: random.Random, w: _Work) -> str:
    name, item, n, price = r.choice(NAMES), r.choice(GOODS), r.randint(2, 9), r.randint(2, 15)
    bill = r.choice([b for b in (20, 50, 100, 200) if b > n * price])
    w(bill, "-", w(n, "*", price))
    return f"{name} buys {n} {item} at {price} dollars each and pays with a {bill}-dollar bill. How many dollars of change does {name} get?"


def _shop_two(r: random.Random, w: _Work) -> str:
    name, (x, y) = r.choice(NAMES), r.sample(SNACKS, 2)
    a, p, b, q = r.randint(2, 9), r.randint(2, 20), r.randint(2, 9), r.randint(2, 20)
    w(w(a, "*", p), "+", w(b, "*", q))
    return f"{name} buys {a} {x} at {p} cents each and {b} {y} at {q} cents each. How many cents does {name} spend in total?"


def _travel_distance(r: random.Random, w: _Work) -> str:
    vehicle, speed, hours, extra = r.choice(VEHICLES), r.randrange(20, 95, 5), r.randint(2, 6), r.randint(5, 150)
    w(w(speed, "*", hours), "+", extra)
    return f"A {vehicle} travels at {speed} km per hour for {hours} hours, then goes another {extra} km. How many kilometers does it travel in total?"


def _travel_taxi(r: random.Random, w: _Work) -> str:
    n, share, toll = r.randint(2, 6), r.randint(5, 40), r.randint(1, 9)
    fare = n * share
    w(w(fare, "/", n), "+", toll)
    return f"{n} friends share a taxi fare of {fare} dollars equally, and each of them also pays a {toll}-dollar toll. How many dollars does each friend pay?"


def _travel_budget(r: random.Random, w: _Work) -> str:
    n, ticket, meals = r.randint(2, 6), r.randint(10, 90), r.randint(10, 150)
    budget = n * ticket + meals + r.randint(0, 300)
    w(budget, "-", w(w(n, "*", ticket), "+", meals))
    return (f"A family of {n} goes on a day trip with {budget} dollars. Train tickets cost {ticket} dollars per person "
            f"and they spend {meals} dollars on meals. How many dollars do they have left?")


def _cook_left(r: random.Random, w: _Work) -> str:
    name, (food, one, many) = r.choice(NAMES), r.choice(BAKES)
    grams, k = r.randrange(20, 160, 10), r.randint(2, 6)
    total = grams * k + r.randint(0, 200)
    w(total, "-", w(grams, "*", k))
    return f"A recipe needs {grams} grams of {food} for each {one}. {name} has {total} grams of {food} and makes {k} {many}. How many grams of {food} are left?"


def _cook_boxes(r: random.Random, w: _Work) -> str:
    name, batches, box = r.choice(NAMES), r.randint(2, 6), r.randint(2, 12)
    per_batch = r.choice([c for c in range(6, 41) if batches * c % box == 0])
    w(w(batches, "*", per_batch), "/", box)
    return f"{name} bakes {batches} batches of {per_batch} cookies and packs them into boxes of {box}. How many boxes does {name} fill?"


def _work_pay(r: random.Random, w: _Work) -> str:
    name, hours, days, wage = r.choice(NAMES), r.randint(2, 8), r.randint(2, 6), r.randint(5, 20)
    w(w(hours, "*", days), "*", wage)
    return f"{name} works {hours} hours a day for {days} days and earns {wage} dollars an hour. How many dollars does {name} earn?"


def _work_team(r: random.Random, w: _Work) -> str:
    name, n, share, extra = r.choice(NAMES), r.randint(2, 9), r.randint(5, 60), r.randint(2, 20)
    boxes = n * share
    w(w(boxes, "/", n), "+", extra)
    return (f"A team of {n} workers shares the packing of {boxes} boxes equally. Afterwards {name} packs {extra} "
            f"more boxes. How many boxes does {name} pack in all?")


def _school_desks(r: random.Random, w: _Work) -> str:
    rows, cols = r.randint(3, 8), r.randint(3, 8)
    absent = r.randint(2, 9)
    w(w(rows, "*", cols), "-", absent)
    return (f"A classroom has {rows} rows of {cols} desks, and each desk belongs to one student. If {absent} "
            f"students are absent today, how many students are present?")


def _school_pages(r: random.Random, w: _Work) -> str:
    name, per_day, days = r.choice(NAMES), r.randint(5, 40), r.randint(2, 9)
    total = per_day * days + r.randint(1, 200)
    w(total, "-", w(per_day, "*", days))
    return f"{name}'s book has {total} pages. {name} reads {per_day} pages a day for {days} days. How many pages are left to read?"


def _school_prizes(r: random.Random, w: _Work) -> str:
    prize, n, each = r.choice(PRIZES), r.randint(5, 30), r.randint(2, 6)
    total = n * each + r.randint(0, 60)
    w(total, "-", w(n, "*", each))
    return f"A teacher has {total} {prize} and gives {each} to each of the {n} students in her class. How many {prize} are left?"


def _shop_shelves(r: random.Random, w: _Work) -> str:
    boxes, per_box, shelves = r.randint(2, 9), r.randint(5, 30), r.randint(2, 6)
    total = boxes * per_box
    sold = r.choice([s for s in range(1, total) if (total - s) % shelves == 0])
    w(w(w(boxes, "*", per_box), "-", sold), "/", shelves)
    return (f"A store has {boxes} boxes with {per_box} pens in each box. It sells {sold} pens and puts the rest "
            f"equally on {shelves} shelves. How many pens go on each shelf?")


def _garden(r: random.Random, w: _Work) -> str:
    name, flower, rows, per_row = r.choice(NAMES), r.choice(FLOWERS), r.randint(2, 9), r.randint(3, 15)
    more, picked = r.randint(2, 30), r.randint(2, 20)
    w(w(w(rows, "*", per_row), "+", more), "-", picked)
    return (f"{name} plants {rows} rows of {per_row} {flower}, then plants {more} more. Later {picked} of them are "
            f"picked for a bouquet. How many {flower} are still in the garden?")


TEMPLATES: tuple[Template, ...] = (
    _shop_change, _shop_two, _shop_shelves, _travel_distance, _travel_taxi, _travel_budget, _cook_left,
    _cook_boxes, _work_pay, _work_team, _school_desks, _school_pages, _school_prizes, _garden,
)


def _draw(r: random.Random) -> Problem:
    while True:
        w = _Work()
        try:
            question = r.choice(TEMPLATES)(r, w)
        except _Rejected:
            continue
        working = ", ".join(f"{s.a} {s.op} {s.b} = {s.result}" for s in w.steps)
        answer = w.steps[-1].result
        return Problem(question, f"{working}\nAnswer: {answer}", answer, tuple(w.steps))


def generate(n: int, seed: int) -> list[Problem]:
    """`n` problems with distinct questions, the same for the same seed."""
    return distinct(_draw, n, seed, "arithmetic")


def splits(seed: int = 0) -> dict[str, list[Problem]]:
    """Disjoint train/validation/test splits (no question in two splits) from one seeded pool."""
    return cut(generate(sum(SPLIT_SIZES.values()), seed), SPLIT_SIZES, None)


def to_messages(problem: Problem) -> list[dict[str, str]]:
    """The problem as a chat: the question from the user, the worked answer from the assistant."""
    return [{"role": "user", "content": problem.question}, {"role": "assistant", "content": problem.answer_text}]


_ANSWER = re.compile(r"answer\s*:\s*(-?[0-9]+)", re.IGNORECASE)
_INTEGER = re.compile(r"-?[0-9]+")


def extract_answer(text: str) -> int | None:
    """The integer on the first `Answer: N` line; failing that, the last integer in the text (a model
    that drops the format but ends on the right number still counts); None if there is none."""
    if m := _ANSWER.search(text):
        return int(m.group(1))
    integers = _INTEGER.findall(text)
    return int(integers[-1]) if integers else None


def accuracy(responses: Sequence[str], problems: Sequence[Problem]) -> float:
    """Fraction of responses whose extracted answer equals the problem's answer exactly."""
    if len(responses) != len(problems):
        raise SaLoRAError(f"{len(responses)} responses for {len(problems)} problems")
    if not problems:
        raise SaLoRAError("accuracy of no problems is undefined")
    return sum(extract_answer(t) == p.answer for t, p in zip(responses, problems)) / len(problems)


def write_jsonl(problems: Sequence[Problem], path: str | Path) -> None:
    """Chat records for `salora train --data`; `answer` rides along for exact grading."""
    _write_rows(({"messages": to_messages(p), "answer": p.answer} for p in problems), path)
