"""Degenerate answers: output that is not an answer at all, which a broken adapter produces long
before it produces anything a refusal judge would notice.

An answer is degenerate when it is

- `empty`: no letter or digit at all (nothing, whitespace, or only punctuation), or
- `repetitive`: of its word-and-punctuation trigrams, more than half repeat an earlier one
  (`1 - distinct / total > 0.5`), counted only from MIN_TRIGRAMS trigrams on, so a short answer
  is never called repetitive. A sentence said twice scores about 0.5; an answer stuck in a loop
  for the rest of its length scores 0.6 to 1.0; ordinary prose scores below 0.1.
"""

from __future__ import annotations

import re

MIN_TRIGRAMS = 8
MAX_REPEATED_RATIO = 0.5
_TOKENS = re.compile(r"\w+|[^\w\s]")


def repeated_trigram_ratio(text: str) -> float:
    """Share of the text's trigrams (over lower-cased words and punctuation marks) that are repeats."""
    tokens = _TOKENS.findall(text.lower())
    trigrams = list(zip(tokens, tokens[1:], tokens[2:]))
    return 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0


def degenerate(text: str) -> str | None:
    """Why `text` is degenerate (`empty` or `repetitive`), or None when it is a real answer."""
    if not any(ch.isalnum() for ch in text):
        return "empty"
    tokens = _TOKENS.findall(text.lower())
    if len(tokens) - 2 >= MIN_TRIGRAMS and repeated_trigram_ratio(text) > MAX_REPEATED_RATIO:
        return "repetitive"
    return None
