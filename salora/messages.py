"""Chat messages as plain data, with no tokenizer behind them: the gateway passes them on unchanged."""

from __future__ import annotations

Messages = list[dict[str, str]]
ROLES = {"system", "user", "assistant"}


def prompt_text(messages: Messages) -> str:
    """The last user turn: what a judge sees as the prompt."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
