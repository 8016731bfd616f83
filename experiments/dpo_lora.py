"""DPO through a LoRA adapter (TRL DPOTrainer + PEFT).

The reference is the starting model with the adapter disabled: the base model, or, with `from: <stage>`,
that SFT stage's trained model. Run through a grid: `method: dpo_lora`, `dpo: {beta, loss_type}`,
`lora: {rank, alpha, targets}`.
"""

from __future__ import annotations

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from experiments import common


def train(ctx: common.RunContext) -> dict:
    tokenizer = common.load_tokenizer(ctx)
    rows = common.prepare_rows(ctx, "preference")
    rows = common.audit_and_log(ctx, rows, tokenizer, "preference")
    model = common.load_model(ctx, tokenizer, weights_dtype=common.weights_dtype(ctx))
    args = DPOConfig(**common.trainer_args(ctx), beta=ctx.spec.dpo.beta, loss_type=[ctx.spec.dpo.loss_type])
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=common.lora_config(ctx, model),
                         callbacks=[common.HarnessCallback(ctx)])
    result = common.fit(trainer, ctx)
    common.save_adapter(trainer.model, tokenizer, ctx)
    return result
