"""TRL's SFTTrainer trains a SaLoRA-wrapped model as it trains any HF causal LM: conversational
prompt/completion data, the loss on the completion, a standard PEFT adapter at the end."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from salora.api import get_salora_model, save_peft_adapter
from salora.chat import read_chat_jsonl
from salora.tuner import SaLoRAConfig
from tests.trainer.conftest import TARGETS


def test_trl_sft_trainer_trains_a_salora_model_and_peft_loads_the_adapter(tiny_model_dir, chat_files, qv_safety, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_salora_model(model, qv_safety, SaLoRAConfig(rank=4, target_modules=TARGETS, projection="both"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dataset = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in read_chat_jsonl(chat_files["task"])])
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3, report_to=[],
                     save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, max_length=128,
                     dataset_num_proc=None, bf16=False)  # SFTConfig defaults to bf16 autocast, which stays on model.forward
    assert args.gradient_checkpointing  # TRL's default: the SaLoRA layers recompute under it
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    # The loss is on the completion only (TRL's default for prompt/completion data).
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad and n.endswith(".B"))
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)

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
