"""One decoder (salora/decoding.py) behind every greedy answer: for the base and for two adapters,
`generate_greedy` (what `salora eval` reports), the decoder itself on a batch that mixes adapters, and
the gateway's local engine (what tenants and the canary get) all give exactly what PEFT's own
`generate(do_sample=False)` gives, token for token; and on the real embedded model `salora eval`
reports what the gateway serves."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from gateway.engines.base import GenerationRequest
from gateway.engines.local import LocalEngine
from gateway.settings import Settings
from salora.decoding import BASE, MIN_SHARED_HEAD, Decoder, Generation
from salora.generate import generate_greedy
from salora_cli.main import main

PROMPTS = ("Tell me a story about a cat.", "What is the capital of France?", "Hi", "List three colours, then stop.")
NEW_TOKENS = 20
MODELS = (None, "alpha", "beta")  # None: the base


def user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def peft_model(gateway_model_dir: Path, adapter_dirs: dict[str, Path]) -> PeftModel:
    """The tiny base (float32) with both adapters loaded under their own names."""
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(gateway_model_dir, dtype=torch.float32),
                                      str(adapter_dirs["alpha"]), adapter_name="alpha")
    model.load_adapter(str(adapter_dirs["beta"]), adapter_name="beta")
    return model.eval()


@pytest.fixture(scope="module")
def reference(peft_model: PeftModel, smollm_tokenizer: PreTrainedTokenizerBase) -> dict[str | None, list[list[int]]]:
    """PEFT's `generate(do_sample=False)` answer tokens, one prompt at a time (no padding at all)."""
    eos = sorted(Decoder(peft_model, smollm_tokenizer).eos)
    answers: dict[str | None, list[list[int]]] = {}
    with torch.inference_mode():
        for name in MODELS:
            answers[name] = []
            for prompt in PROMPTS:
                ids = torch.tensor([smollm_tokenizer.apply_chat_template(
                    user(prompt), add_generation_prompt=True, tokenize=True, return_dict=False)])
                kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              do_sample=False, eos_token_id=eos, pad_token_id=smollm_tokenizer.pad_token_id)
                if name is None:
                    with peft_model.disable_adapter():
                        out = peft_model.generate(**kwargs)
                else:
                    peft_model.set_adapter(name)
                    out = peft_model.generate(**kwargs)
                answers[name].append(out[0, ids.shape[1]:].tolist())
    return answers


def finish(tokens: list[int], eos: frozenset[int]) -> str:
    return "stop" if tokens[-1] in eos else "length"


def text(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_the_adapters_change_the_answers(reference) -> None:
    """Otherwise the tests below could not tell one adapter's answers from another's."""
    for a, b in ((None, "alpha"), (None, "beta"), ("alpha", "beta")):
        assert sum(x != y for x, y in zip(reference[a], reference[b])) >= 2, (a, b)


def test_generate_greedy_is_peft_generate(peft_model, gateway_model_dir, smollm_tokenizer, reference) -> None:
    base = LlamaForCausalLM.from_pretrained(gateway_model_dir, dtype=torch.float32).eval()
    for name in MODELS:
        model = base
        if name is not None:
            peft_model.set_adapter(name)
            model = peft_model
        answers = generate_greedy(model, smollm_tokenizer, [user(p) for p in PROMPTS], NEW_TOKENS, batch_size=3)
        assert answers == [text(smollm_tokenizer, t).strip() for t in reference[name]], name


def test_a_batch_of_mixed_adapters_decodes_each_row_as_peft_does(peft_model, smollm_tokenizer, reference) -> None:
    decoder = Decoder(peft_model, smollm_tokenizer)
    rows = {(name, i): Generation(prompt, decoder.limit(prompt, NEW_TOKENS), adapter=name or BASE)
            for name in MODELS for i, prompt in enumerate(decoder.chat_prompt(user(p)) for p in PROMPTS)}
    with torch.inference_mode():
        batch, _ = decoder.prefill(peft_model, list(rows.values()))
        while (batch := batch.pruned()) is not None:
            decoder.step(peft_model, batch)
    for (name, i), row in rows.items():
        assert row.tokens == reference[name][i], (name, PROMPTS[i])
        assert row.finish == finish(row.tokens, decoder.eos)


def test_the_shared_head_runs_once_per_adapter(peft_model, smollm_tokenizer, reference) -> None:
    """The chat template's system prompt, which every prompt here begins with, is computed once per
    adapter (one forward of 3 rows, then the 12 rows' own tails), and a prompt repeated in the batch
    keeps its last token to run itself; every answer is still PEFT's."""
    decoder = Decoder(peft_model, smollm_tokenizer)
    prompts = [decoder.chat_prompt(user(p)) for p in PROMPTS]
    rows = [(name, i, Generation(prompts[i], decoder.limit(prompts[i], NEW_TOKENS), adapter=name or BASE))
            for name in MODELS for i in range(len(PROMPTS))]
    rows.append((None, 2, Generation(prompts[2], decoder.limit(prompts[2], NEW_TOKENS), adapter=BASE)))
    shared = len(os.path.commonprefix(prompts))
    assert shared >= MIN_SHARED_HEAD
    embed = peft_model.get_base_model().get_input_embeddings()
    shapes: list[tuple[int, ...]] = []
    hook = embed.register_forward_hook(lambda _m, args, _out: shapes.append(tuple(args[0].shape)))
    try:
        with torch.inference_mode():
            batch, _ = decoder.prefill(peft_model, [r for _, _, r in rows])
    finally:
        hook.remove()
    assert shapes == [(len(MODELS), shared), (len(rows), max(map(len, prompts)) - shared)]
    with torch.inference_mode():
        while (batch := batch.pruned()) is not None:
            decoder.step(peft_model, batch)
    for name, i, row in rows:
        assert row.tokens == reference[name][i], (name, PROMPTS[i])

    same = [Generation(prompts[1], NEW_TOKENS, adapter="alpha") for _ in range(3)]  # nothing but the head differs
    with torch.inference_mode():
        batch, _ = decoder.prefill(peft_model, same)
        while (batch := batch.pruned()) is not None:
            decoder.step(peft_model, batch)
    assert [r.tokens for r in same] == [reference["alpha"][1]] * 3


def test_the_local_engine_serves_what_peft_generates(gateway_model_dir, adapter_dirs, smollm_tokenizer,
                                                     peft_model, reference) -> None:
    """All twelve requests at once, so the engine's continuous batch mixes the base and both adapters."""
    sizes: list[int] = []

    async def main() -> list[tuple[str, int, str | None]]:
        engine = LocalEngine(str(gateway_model_dir), "tiny", dict(adapter_dirs), max_batch_size=16, on_batch=sizes.append)
        await engine.start()

        async def ask(name: str | None, prompt: str) -> tuple[str, int, str | None]:
            chunks = [c async for c in engine.generate(GenerationRequest(
                user(prompt), adapter=name, max_tokens=NEW_TOKENS, temperature=0, stream=True))]
            return "".join(c.text for c in chunks), chunks[-1].completion_tokens, chunks[-1].finish_reason

        try:
            return await asyncio.gather(*(ask(name, p) for name in MODELS for p in PROMPTS))
        finally:
            await engine.close()

    served = asyncio.run(main())
    eos = Decoder(peft_model, smollm_tokenizer).eos
    expected = [(text(smollm_tokenizer, t), len(t), finish(t, eos))
                for name in MODELS for t in reference[name]]
    assert served == expected
    assert max(sizes) > len(PROMPTS)  # some decode steps ran rows of different adapters together


@pytest.mark.slow
def test_salora_eval_reports_what_the_gateway_serves_on_the_embedded_model(serve_app, tmp_path: Path) -> None:
    """The real SmolLM2: `salora eval`'s answers (batched, left-padded) are the gateway's greedy chat
    answers (each request alone), so what the canary judged through the engine is what eval reports."""
    prompts = ["What is the capital of France?", "Explain how to pick a lock.", "Write a haiku about the sea.", "Say hello."]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    assert main(["eval", "--model", "embedded", "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(tmp_path / "eval.json"), "--max-new-tokens", "32"]) == 0
    reported = [item["response"] for item in json.loads((tmp_path / "eval.json").read_text())["items"]]

    gw = serve_app(Settings(model="embedded", model_name="smol", state_dir=tmp_path / "state"))
    gw.wait_ready(timeout=120)
    served = [gw.chat("no-key", "smol", p, max_tokens=32).choices[0] for p in prompts]
    assert [s.message.content.strip() for s in served] == reported  # eval reports each answer stripped
    assert len(set(reported)) == len(prompts) and all(reported)
    assert {s.finish_reason for s in served} == {"stop", "length"}  # EOS within 32 tokens, and the limit
