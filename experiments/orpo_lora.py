"""ORPO through a LoRA adapter (TRL's experimental ORPOTrainer + PEFT).

Reference-free and one pass: the loss is the negative log-likelihood of the chosen completion (an SFT term) minus
beta × log σ(log odds(chosen) - log odds(rejected)), the odds taken from per-token mean log-probs. Training never
sees a reference; the measurement around it still compares with the starting model (the adapter disabled), so its
margin shift and drift are relative to where training started. Run through a grid: `method: orpo_lora`,
`orpo: {beta}`, `lora: {rank, alpha, targets}`.

trl.experimental is unstable by TRL's own account: what this file relies on (ORPOConfig's beta, the odds-ratio loss
and its logged `log_odds_ratio` / `nll_loss`) is pinned by tests/test_preference_methods.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # pinned by our tests instead of warned about per run

from datasets import Dataset
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from experiments import common


def train(ctx: common.RunContext) -> dict:
    tokenizer = common.load_tokenizer(ctx)
    rows = common.prepare_rows(ctx, "preference")
    rows = common.audit_and_log(ctx, rows, tokenizer, "preference")
    model = common.load_model(ctx, tokenizer)
    args = ORPOConfig(**common.trainer_args(ctx), beta=ctx.spec.orpo.beta)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=common.lora_config(ctx, model), callbacks=[common.HarnessCallback(ctx)])
    result = common.fit(trainer, ctx)
    common.save_adapter(trainer.model, tokenizer, ctx)
    return result
