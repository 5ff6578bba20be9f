"""Batched greedy generation for evaluation, calibration (`--generate-responses`) and probes, through
the decoder the gateway serves with (`salora.decoding`), so an answer reported here is the answer a
tenant or the canary gets for the same prompt."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from salora.chat import Messages
from salora.decoding import NONFINITE, Decoder, Generation
from salora.errors import SaLoRAError


@torch.inference_mode()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: str | None = None,
) -> list[str]:
    """Greedy answers to chat prompts (stripped of surrounding whitespace), in left-padded batches of
    similar length. A PeftModel answers with its active adapter."""
    decoder = Decoder(model, tokenizer)
    rows = []
    for p in prompts:
        prompt = decoder.chat_prompt(p)
        rows.append(Generation(prompt, decoder.limit(prompt, max_new_tokens)))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=progress, disable=progress is None, unit="batch"):
        _complete(decoder, model, [rows[i] for i in batch])
    return [r.text.strip() for r in rows]


def _complete(decoder: Decoder, model: PreTrainedModel, rows: list[Generation]) -> None:
    """Decode one batch until every row has finished."""
    running, _ = decoder.prefill(model, rows)
    while (running := running.pruned()) is not None:
        decoder.step(model, running)
    if any(r.finish == NONFINITE for r in rows):
        raise SaLoRAError("the model's scores were not finite numbers (overflowing weights?): no answer to report")
