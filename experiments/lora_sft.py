"""Supervised fine-tuning through a LoRA adapter (TRL SFTTrainer + PEFT), on prompt -> chosen.

Run through a grid: `method: lora_sft`, shaped by `lora: {rank, alpha, dropout, targets}`.
"""

from __future__ import annotations

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from experiments import common


def train(ctx: common.RunContext) -> dict:
    tokenizer = common.load_tokenizer(ctx)
    rows = common.prepare_rows(ctx, "sft")
    rows = common.audit_and_log(ctx, rows, tokenizer, "sft")
    model = common.load_model(ctx, tokenizer)
    trainer = SFTTrainer(model=model, args=SFTConfig(**common.trainer_args(ctx)),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=common.lora_config(ctx, model), callbacks=[common.HarnessCallback(ctx)])
    result = common.fit(trainer, ctx)
    common.save_adapter(trainer.model, tokenizer, ctx)
    if ctx.is_stage:  # a child DPO stage starts from (and is referenced against) the merged model
        common.save_full(trainer.model.merge_and_unload(), tokenizer, ctx, needed_locally=True)
    return result
