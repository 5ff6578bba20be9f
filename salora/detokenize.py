"""Incremental detokenization, as vLLM and TGI do it: each new token's text is the decode of a short
window (the tokens since `prefix_offset`) less the decode of the window's already-read part, so the
cost of a token does not grow with the answer (decoding the whole answer again for every token made
a 2,048-token answer quadratic: 2.47 s of decoding alone). The window's leading tokens give the
tokenizer the context it needs to decode the new ones as it would in the whole (a leading space, a
character split across byte tokens); a tail that ends in an incomplete UTF-8 character (decoded as
U+FFFD) waits for the next token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], *, skip_special_tokens: bool, clean_up_tokenization_spaces: bool) -> str: ...


@dataclass(slots=True)
class Detokenized:
    """One answer's tokens and the text decoded from them so far."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0  # the window starts here
    read_offset: int = 0  # tokens before this one are in `text`

    def add(self, tokenizer: Decoder, token: int, final: bool = False) -> None:
        """Append `token` and the text it completes; `final` (the last token) flushes an incomplete
        character too, as decoding the whole answer would show it."""
        self.tokens.append(token)
        window = self.tokens[self.prefix_offset:]
        prefix = _decode(tokenizer, window[: self.read_offset - self.prefix_offset])
        new = _decode(tokenizer, window)
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            self.text += new[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)


def _decode(tokenizer: Decoder, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) if ids else ""
