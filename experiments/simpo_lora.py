"""SimPO through a LoRA adapter (TRL's experimental CPOTrainer with loss_type "simpo" + PEFT).

Reference-free: a completion's reward is beta × its mean per-token log-prob under the policy, and the loss is
-log σ(beta × (mean log-prob of chosen - of rejected) - gamma). With `simpo.cpo_alpha: 0` (the default) there is
no NLL term: pure SimPO, as in the paper. Training never sees a reference; the measurement around it still
compares with the starting model (the adapter disabled), so its margin shift and drift are relative to where
training started. Run through a grid: `method: simpo_lora`, `simpo: {beta, gamma, cpo_alpha}`,
`lora: {rank, alpha, targets}`.

trl.experimental is unstable by TRL's own account: what this file relies on (CPOConfig's loss_type "simpo",
simpo_gamma and cpo_alpha; the loss and its per-token averaging) is pinned by tests/test_preference_methods.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # pinned by our tests instead of warned about per run

from datasets import Dataset
from trl.experimental.cpo import CPOConfig, CPOTrainer

from experiments import common


def train(ctx: common.RunContext) -> dict:
    tokenizer = common.load_tokenizer(ctx)
    rows = common.prepare_rows(ctx, "preference")
    rows = common.audit_and_log(ctx, rows, tokenizer, "preference")
    model = common.load_model(ctx, tokenizer)
    simpo = ctx.spec.simpo
    args = CPOConfig(**common.trainer_args(ctx), loss_type="simpo", beta=simpo.beta, simpo_gamma=simpo.gamma,
                     cpo_alpha=simpo.cpo_alpha)
    trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=common.lora_config(ctx, model), callbacks=[common.HarnessCallback(ctx)])
    result = common.fit(trainer, ctx)
    common.save_adapter(trainer.model, tokenizer, ctx)
    return result
