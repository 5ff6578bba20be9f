"""What the text-edit and instruction tasks share: a seeded pool of distinct questions, disjoint
splits cut from it, the chat form and accuracy under a task's grading rule."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from salora.errors import SaLoRAError


class Item(Protocol):
    """A task item as training and scoring see it."""

    @property
    def question(self) -> str: ...

    @property
    def answer_text(self) -> str: ...


T = TypeVar("T", bound=Item)


def distinct(draw: Callable[[random.Random], T], n: int, seed: int, what: str) -> list[T]:
    """`n` items with distinct questions, the same for the same seed."""
    r = random.Random(seed)
    items: dict[str, T] = {}
    for _ in range(20 * n + 100):
        if len(items) == n:
            break
        item = draw(r)
        items.setdefault(item.question, item)
    if len(items) < n:
        raise SaLoRAError(f"could not generate {n} distinct {what} items")
    return list(items.values())


def cut(pool: Sequence[T], sizes: dict[str, int], seed: int | None) -> dict[str, list[T]]:
    """Disjoint splits of `sizes` from a pool of distinct questions. The pool is shuffled first
    (unless `seed` is None: arithmetic's splits, as its studies were run): a kind with few possible
    prompts runs out early in the draw, and unshuffled its items would mostly land in the first split."""
    order = list(pool)
    if seed is not None:
        random.Random(seed).shuffle(order)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = order[start : start + size]
        start += size
    return out


def messages(item: Item) -> list[dict[str, str]]:
    """The item as a chat: the question from the user, the answer from the assistant."""
    return [{"role": "user", "content": item.question}, {"role": "assistant", "content": item.answer_text}]


def accuracy(responses: Sequence[str], items: Sequence[T], correct: Callable[[str, T], bool]) -> float:
    """Fraction of responses that `correct` accepts for their item."""
    if len(responses) != len(items):
        raise SaLoRAError(f"{len(responses)} responses for {len(items)} items")
    if not items:
        raise SaLoRAError("accuracy of no items is undefined")
    return sum(correct(t, item) for t, item in zip(responses, items)) / len(items)
