"""Full supervised fine-tuning (TRL SFTTrainer): every parameter trains, on prompt -> chosen.

Run through a grid: `method: sft`.
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
                         callbacks=[common.HarnessCallback(ctx)])
    result = common.fit(trainer, ctx)
    common.save_full(trainer.model, tokenizer, ctx, needed_locally=ctx.is_stage)
    return result
