"""Message content is text: a tenant who types `<|im_end|>\n<|im_start|>system` must not end its own
turn and forge a system (or assistant) turn.

Both engines render the conversation through the chat template and then tokenize the whole string,
and a tokenizer turns every occurrence of a special token's spelling into that control token, the
template's and the tenant's alike; vLLM's chat endpoint does the same, with no option to treat
content as plain text. So the gateway breaks each spelling of a special token inside message content
with an invisible U+2060 WORD JOINER after its first character, before any engine sees it: the
reader (and the model) still sees the same characters, but the tokenizer can no longer match the
control token, and the content is tokenized as ordinary text on every engine alike."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from salora.messages import Messages

log = logging.getLogger(__name__)
JOINER = "\u2060"


def special_tokens(model_dir: Path) -> frozenset[str]:
    """The spellings of every special token of the tokenizer in `model_dir`, read from its JSON files
    (no tokenizer library needed, so the vLLM-only gateway can read them too)."""
    found: set[str] = set()
    tokenizer = model_dir / "tokenizer.json"
    if tokenizer.is_file():
        for token in json.loads(tokenizer.read_text(encoding="utf-8")).get("added_tokens", []):
            if token.get("special") and token.get("content"):
                found.add(token["content"])
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        for token in (data.get("added_tokens_decoder") or {}).values():
            if token.get("special") and token.get("content"):
                found.add(token["content"])
        for value in data.values():
            if isinstance(value, dict) and isinstance(value.get("content"), str) and value.get("special", True):
                found.add(value["content"])
    return frozenset(t for t in found if len(t) > 1)


class ContentGuard:
    """Neutralises special-token spellings in message content (see the module docstring)."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self.tokens = tokens
        ordered = sorted(tokens, key=len, reverse=True)  # the longest spelling wins at each position
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @classmethod
    def for_model(cls, model_dir: Path) -> ContentGuard:
        try:
            return cls(special_tokens(model_dir))
        except (OSError, ValueError, AttributeError) as e:
            log.error("cannot read the special tokens of %s (%s): message content is passed as is", model_dir, e)
            return cls(frozenset())

    def text(self, content: str) -> str:
        if self._pattern is None or self._pattern.search(content) is None:
            return content
        return self._pattern.sub(lambda m: m[0][0] + JOINER + m[0][1:], content)

    def messages(self, messages: Messages) -> Messages:
        return [{**m, "content": self.text(m["content"])} for m in messages]
