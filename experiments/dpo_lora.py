"""DPO through a LoRA adapter (TRL DPOTrainer + PEFT).

The reference is the starting model with the adapter disabled: the base model, or, with `from: <stage>`,
that SFT stage's trained model. Run through a grid: `method: dpo_lora`, `dpo: {beta, loss_type, loss_weights,
label_smoothing}` (any offline-pair loss of TRL's DPOTrainer, or a weighted list of them: see
`harness.core.schema.DPO_LOSS_TYPES`), `lora: {rank, alpha, targets}`.

The reference log-probs of the training pairs are the ones the measurement already took before training
(same tokenisation, same reference, cached across variants by `experiments.refcache`): they are handed to TRL
as its precomputed `ref_chosen_logps` / `ref_rejected_logps` columns, so no training step runs a reference
forward pass. `HARNESS_REFERENCE_CACHE=off` leaves TRL to compute them itself.
"""

from __future__ import annotations

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from experiments import common, refcache


def train(ctx: common.RunContext) -> dict:
    tokenizer = common.load_tokenizer(ctx)
    rows = common.prepare_rows(ctx, "preference")
    rows = common.audit_and_log(ctx, rows, tokenizer, "preference")
    model = common.load_model(ctx, tokenizer)
    dpo = ctx.spec.dpo
    args = DPOConfig(**common.trainer_args(ctx), beta=dpo.beta, loss_type=dpo.loss_types,
                     loss_weights=dpo.loss_weights, label_smoothing=dpo.label_smoothing)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=common.lora_config(ctx, model),
                         callbacks=[common.HarnessCallback(ctx)])
    result = common.fit(trainer, ctx, before_train=lambda t, baseline: supply_reference_logps(t, ctx, baseline))
    common.save_adapter(trainer.model, tokenizer, ctx)
    return result


def supply_reference_logps(trainer, ctx: common.RunContext, baseline) -> bool:
    """Give TRL the reference log-probs the measurement took, row by row; False (TRL computes them per step)
    when they cannot be matched to every training row, the reuse is switched off, or training computes in
    bf16/fp16 (the measurement's fp32 reference would then differ from the policy's own log-probs at step 0 by
    the rounding noise, not by 0 as in TRL's own path)."""
    reused = False
    scored = dict(zip((p.index for p in baseline.pairs.get("train", [])), baseline.logps.get("train", []),
                      strict=True))
    dataset = trainer.train_dataset
    if (refcache.enabled() and ctx.precision == "fp32" and not trainer.precompute_ref_logps
            and len(dataset) == len(ctx.train_indices) and all(i in scored for i in ctx.train_indices)):
        # the tokenised dataset keeps the order of the rows it was built from (TRL drops no row the audit kept)
        trainer.train_dataset = (dataset.add_column("ref_chosen_logps", [scored[i][0] for i in ctx.train_indices])
                                 .add_column("ref_rejected_logps", [scored[i][1] for i in ctx.train_indices]))
        trainer.precompute_ref_logps = True  # TRL's switch: read the reference from the batch, skip its forward
        reused = True
    ctx.tracker.log_metrics({"cache/reference_logps_reused": float(reused)}, step=0)
    return reused
