"""KTO through a LoRA adapter (TRL KTOTrainer + PEFT), on preference pairs split into labelled examples.

Each training pair becomes two examples: (prompt, chosen) labelled desirable and (prompt, rejected) labelled
undesirable, so 12 pairs train as 24 examples and `train.batch_size` counts examples. The split is logged
(`data/examples`, `data/desirable_examples`, `data/undesirable_examples`); the pairing itself is not used by the
loss. The reference is the starting model with the adapter disabled, as for DPO. Run through a grid:
`method: kto_lora`, `kto: {beta, loss_type, desirable_weight, undesirable_weight}`, `lora: {rank, alpha, targets}`.

KTO's reference point is a KL estimate from mismatched (prompt, completion) pairs, built by TRL by rotating the
completions by one inside each batch, in dataset order (its sampler is sequential). TRL's own unpairing puts every
desirable example before every undesirable one (batches of one label); here the examples are shuffled with the
variant's seed instead, and reshuffled while some example's rotated KL partner is the other half of its own pair
(the same prompt, which is no mismatch). What is left is logged as `data/kl_same_prompt`.
"""

from __future__ import annotations

import random

from datasets import Dataset
from trl import KTOConfig, KTOTrainer

from experiments import common

_SHUFFLES = 100  # attempts at an order with no same-prompt KL partner; a handful suffice from 3 pairs on


def train(ctx: common.RunContext) -> dict:
    tokenizer = common.load_tokenizer(ctx)
    rows = common.prepare_rows(ctx, "preference")
    rows = common.audit_and_log(ctx, rows, tokenizer, "preference")
    examples, same_prompt = unpaired_examples(rows, ctx.spec.train.batch_size, ctx.spec.seed)
    desirable = sum(e["label"] for e in examples)
    ctx.tracker.log_metrics({"data/examples": len(examples), "data/desirable_examples": desirable,
                             "data/undesirable_examples": len(examples) - desirable,
                             "data/kl_same_prompt": same_prompt}, step=0)
    model = common.load_model(ctx, tokenizer)
    kto = ctx.spec.kto
    args = KTOConfig(**common.trainer_args(ctx), beta=kto.beta, loss_type=kto.loss_type,
                     desirable_weight=kto.desirable_weight, undesirable_weight=kto.undesirable_weight)
    trainer = KTOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(examples),
                         processing_class=tokenizer, peft_config=common.lora_config(ctx, model),
                         callbacks=[common.HarnessCallback(ctx)])
    result = common.fit(trainer, ctx)
    common.save_adapter(trainer.model, tokenizer, ctx)
    return {**result, "examples": len(examples)}


def unpaired_examples(rows: list[dict], batch_size: int, seed: int) -> tuple[list[dict], int]:
    """One desirable and one undesirable example per pair, in a seeded order whose batches mix both labels; and
    how many examples still get a KL partner with their own prompt (0 unless no order avoids it)."""
    tagged = [(i, {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"})
              for i, r in enumerate(rows) for side in ("chosen", "rejected")]
    rng = random.Random(seed)
    best, fewest = list(tagged), None
    for _ in range(_SHUFFLES):
        rng.shuffle(tagged)
        clashes = same_prompt_partners([i for i, _ in tagged], batch_size)
        if fewest is None or clashes < fewest:
            best, fewest = list(tagged), clashes
        if clashes == 0:
            break
    return [example for _, example in best], fewest or 0


def same_prompt_partners(pair_of: list[int], batch_size: int) -> int:
    """Examples whose KL completion (TRL: the previous example of its batch, the first takes the last) comes from
    the same pair."""
    count = 0
    for start in range(0, len(pair_of), batch_size):
        batch = pair_of[start:start + batch_size]
        count += sum(len(batch) > 1 and batch[k] == batch[k - 1] for k in range(len(batch)))
    return count
