"""SaLoRA from Python as PEFT users expect: wrap an HF causal LM, train it with transformers.Trainer,
save a standard PEFT adapter, load it with PeftModel."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from salora.api import get_salora_model, save_peft_adapter
from salora.chat import collate, read_chat_jsonl, tokenize_chat
from salora.tuner import SaLoRAConfig
from tests.trainer.conftest import TARGETS


def test_transformers_trainer_trains_a_salora_model_and_peft_loads_the_adapter(tiny_model_dir, chat_files, qv_safety, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_salora_model(model, qv_safety, SaLoRAConfig(rank=4, target_modules=TARGETS, projection="both"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    examples = [tokenize_chat(tokenizer, c, 128) for c in read_chat_jsonl(chat_files["task"])]
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    class Collator:
        def __call__(self, rows):
            from salora.chat import Example

            return collate([Example(r["input_ids"], r["labels"]) for r in rows], tokenizer.pad_token_id)

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, remove_unused_columns=False,
                             dataloader_num_workers=0, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=dataset, data_collator=Collator()).train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad and n.endswith(".B"))

    record = save_peft_adapter(model, tmp_path / "adapter")
    assert record["rank"] == 4
    model.eval()
    enc = tokenizer(["What is 3 plus 4?", "Hello there"], return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**enc).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        untouched = base(**enc).logits
        peft_logits = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(**enc).logits
    assert ((untouched - reference).norm() / reference.norm()).item() > 1e-3
    assert ((peft_logits - reference).norm() / reference.norm()).item() < 1e-4
