"""Refusal evaluation: greedy answers to a prompt file, scored by a judge."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from salora.atomic import write_json_atomic
from salora.chat import read_prompts
from salora.errors import SaLoRAError
from salora.generate import generate_greedy
from salora.judge import Judge, KeywordJudge, agreement, judge_all
from salora.messages import prompt_text
from salora.models import load_model, model_id


def evaluate(
    model_spec: str,
    prompts_file: str | Path,
    out: str | Path,
    adapter: str | Path | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    judge: Judge | None = None,
    label: str | None = None,
    device: str | None = "cpu",
    dtype: str | None = "float32",
) -> dict:
    """Answer every prompt greedily, judge each answer, write `{n, refusal_rate, items, ...}` as JSON.
    With a judge other than the keyword judge, the keyword judge runs too and the result adds each
    judge's rate (`judges`), their `agreement` (fraction and Cohen's kappa) and per item `verdicts`;
    `refused` and `refusal_rate` stay those of `judge`."""
    from salora.checks import at_least
    from salora.distributed import refuse_distributed

    at_least("--max-new-tokens", max_new_tokens)
    at_least("--batch-size", batch_size)
    refuse_distributed("eval")
    judge = judge or KeywordJudge()
    judges = [judge] if isinstance(judge, KeywordJudge) else [judge, KeywordJudge()]
    prompts = read_prompts(prompts_file)
    if hasattr(judge, "check"):
        judge.check()  # an unusable judge stops the run before minutes of generation
    model, tokenizer = load_model(model_spec, device, dtype)
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise SaLoRAError(f"{adapter}: not a PEFT adapter directory (run `salora export` on a checkpoint)")
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    answers = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, progress="eval")
    pairs = [(prompt_text(p), a) for p, a in zip(prompts, answers)]
    verdicts = {j.name: judge_all(j, pairs) for j in judges}
    items = [{"prompt": p, "response": a, "refused": verdicts[judge.name][i]} for i, (p, a) in enumerate(pairs)]
    result = {
        "label": label or (Path(adapter).name if adapter else model_id(model_spec)),
        "model": model_id(model_spec),
        "adapter": str(adapter) if adapter else None,
        "prompts": str(prompts_file),
        "judge": judge.name,
        "max_new_tokens": max_new_tokens,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "n": len(items),
        "refusal_rate": sum(i["refused"] for i in items) / len(items),
        "items": items,
    }
    if len(judges) > 1:
        result["judges"] = {name: {"refusal_rate": sum(v) / len(v)} for name, v in verdicts.items()}
        result["agreement"] = {"judges": list(verdicts), **agreement(*verdicts.values())}
        for i, item in enumerate(items):
            item["verdicts"] = {name: v[i] for name, v in verdicts.items()}
    write_json_atomic(out, result)
    return result
