"""Incremental detokenization (salora/detokenize.py) gives the text of decoding the whole
answer, token by token, on the real SmolLM2 tokenizer: multi-byte characters split across byte
tokens, special tokens, leading spaces."""

from __future__ import annotations

import random

import pytest
from transformers import PreTrainedTokenizerBase

from salora.detokenize import Detokenized

TEXT = ("Grüße aus Zürich! 東京の天気は晴れです。 Ça coûte 12 € — naïve café. 🙂🚀 Emoji and\n"
        "    indented code: def f(x): return x ** 2  # done\n<|im_end|>\nMore text after a special token.")


def whole(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def sequences(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    rng = random.Random(0)
    encoded = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    vocabulary = len(tokenizer)
    return [encoded, *([rng.randrange(vocabulary) for _ in range(200)] for _ in range(5))]


@pytest.mark.parametrize("which", range(6))
def test_incremental_text_is_the_whole_decode(smollm_tokenizer: PreTrainedTokenizerBase, which: int) -> None:
    tokens = sequences(smollm_tokenizer)[which]
    answer = Detokenized()
    for i, token in enumerate(tokens):
        answer.add(smollm_tokenizer, token, final=i == len(tokens) - 1)
        so_far = whole(smollm_tokenizer, tokens[: i + 1])
        assert so_far.startswith(answer.text)  # never a character that later changes
        assert len(so_far.rstrip("\ufffd")) - len(answer.text) <= 8  # held back: at most an incomplete character's worth
    assert answer.text == whole(smollm_tokenizer, tokens)


def test_an_incomplete_character_waits_for_its_last_byte(smollm_tokenizer: PreTrainedTokenizerBase) -> None:
    tokens = smollm_tokenizer("🚀", add_special_tokens=False)["input_ids"]
    assert len(tokens) > 1  # byte tokens: the emoji is split
    answer = Detokenized()
    for token in tokens[:-1]:
        answer.add(smollm_tokenizer, token)
        assert answer.text == ""
    answer.add(smollm_tokenizer, tokens[-1])
    assert answer.text == "🚀"
    cut = Detokenized()
    cut.add(smollm_tokenizer, tokens[0], final=True)  # the answer ends mid-character: shown as the whole decode
    assert cut.text == whole(smollm_tokenizer, tokens[:1]) == "\ufffd"
