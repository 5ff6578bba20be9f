"""Batched greedy generation for evaluation, calibration (`--generate-responses`) and probes."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from salora.chat import Messages


@torch.inference_mode()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: str | None = None,
) -> list[str]:
    """Greedy answers to chat prompts, left-padded in batches of similar length."""
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[str] = [""] * len(texts)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc=progress, disable=progress is None, unit="batch"):
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row, i in enumerate(batch):
                answers[i] = tokenizer.decode(out[row, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = padding_side
    return answers
