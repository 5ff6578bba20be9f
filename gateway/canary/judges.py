"""Judges for the canary. The default is the gateway's own judge (the keyword judge unless the app
was given another), so canary rates and live refusal rates are measured the same way. The option is
an LLM judge behind any OpenAI-compatible chat endpoint (`salora.chat_judge.ChatJudge`, the same one
`salora eval --judge openai:...` uses): a general instruct model asked to classify the reply, or a
guard model such as Llama Guard that classifies the conversation as safe or unsafe."""

from __future__ import annotations

from gateway.canary.config import ChatJudgeConfig
from salora.chat_judge import ChatJudge
from salora.judge import Judge


def chat_judge(config: ChatJudgeConfig) -> ChatJudge:
    key = config.api_key.get_secret_value() if config.api_key else None
    return ChatJudge(config.url, config.model, key, config.style, config.timeout_s, config.constrain)


def canary_judges(config: ChatJudgeConfig | None, default: Judge) -> tuple[Judge, Judge]:
    """(judge of harmful answers, judge of benign answers). A guard model judges only harmful answers;
    benign ones go to `default`, which can tell a refusal from an answer."""
    if config is None:
        return default, default
    judge = chat_judge(config)
    return judge, (default if config.style == "guard" else judge)
