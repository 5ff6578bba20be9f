"""Training-data screening, the step hosted fine-tuning runs before training: conversations that
answer a harmful request with compliance are listed, and above a threshold training refuses.

Two questions per assistant turn, both put to the refusal judge (any `Judge`, the keyword judge
by default), so the screen works with whatever judge the project is given:
- is the training answer a compliance? (the judge does not call it a refusal);
- is the request harmful? The signal is the base model itself: its own greedy answer to the same
  request (the conversation up to that turn) is judged, and a refusal marks the request as one
  the base treats as harmful. A turn is flagged when the base refuses and the data complies: the
  conversations that would train the refusals out of the model.
Only the turns whose training answer complies are answered by the base, so refusal data costs
nothing to screen. The signal inherits the base's judgement: a base that over-refuses benign
requests that sound risky flags them too (the report lists each with both answers), and an
unaligned base, which refuses nothing, flags nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from salora.judge import Judge
from salora.messages import Messages

if TYPE_CHECKING:  # `salora train --help` builds without the trainer's libraries
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Tokens of the base's answer: a refusal opens it ("I'm sorry, but I can't..." is about 10 tokens).
SCREEN_NEW_TOKENS = 32
DEFAULT_THRESHOLD = 0.05


@dataclass(frozen=True)
class Turn:
    record: int  # 1-based, as in error messages
    turn: int  # index of the assistant message in the conversation
    prompt: Messages  # the conversation before the answer
    request: str
    answer: str


def turns(conversations: list[Messages]) -> list[Turn]:
    """Every assistant answer that follows a user request."""
    found = []
    for record, messages in enumerate(conversations, 1):
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and i > 0 and messages[i - 1]["role"] == "user":
                found.append(Turn(record, i, messages[:i], messages[i - 1]["content"], m["content"]))
    return found


def screen(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: list[Messages], judge: Judge, threshold: float,
    batch_size: int = 16, progress: str | None = "screening",
) -> dict:
    """The screening report: the flagged turns with the base's answer, the flagged share of
    conversations, and whether it is within `threshold` (`passed`)."""
    compliant = [t for t in turns(conversations) if not judge.is_refusal(t.request, t.answer)]
    from salora.generate import generate_greedy  # torch: only when screening runs, not for `salora train --help`

    base_answers = generate_greedy(model, tokenizer, [t.prompt for t in compliant], SCREEN_NEW_TOKENS, batch_size, progress) if compliant else []
    flagged = [
        {"record": t.record, "turn": t.turn, "request": t.request, "answer": t.answer, "base_answer": a}
        for t, a in zip(compliant, base_answers)
        if judge.is_refusal(t.request, a)
    ]
    records = sorted({f["record"] for f in flagged})
    rate = len(records) / len(conversations) if conversations else 0.0
    return {
        "ran": True,
        "judge": judge.name,
        "signal": "base-refusal",
        "conversations": len(conversations),
        "answers": len(turns(conversations)),
        "compliant_answers": len(compliant),
        "flagged_conversations": len(records),
        "flagged_rate": rate,
        "threshold": threshold,
        "passed": rate <= threshold,
        "flagged": flagged,
    }


def summary(report: dict) -> str:
    """One line for the terminal and the error message."""
    return (
        f"{report['flagged_conversations']} of {report['conversations']} conversations ({report['flagged_rate']:.1%}) answer with "
        f"compliance a request the base refuses (judge {report['judge']}; threshold {report['threshold']:.1%})"
    )
