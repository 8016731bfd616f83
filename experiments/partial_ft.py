"""Partial fine-tuning: freeze everything except the selected decoder layers (and, optionally, the
parameters matching a regex inside them), then TRL SFTTrainer on prompt -> chosen.

Run through a grid: `method: partial_ft`, `partial_ft: {layers: last_half | last:N | first:N | all | [i, ...],
modules: <regex>}`.
"""

from __future__ import annotations

import re

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from experiments import common
from experiments import models as M


def freeze_except(model, layers: list[int], modules: str | None) -> list[str]:
    """requires_grad only for parameters inside `layers` (matching `modules`); returns their names."""
    pattern = re.compile(modules) if modules else None
    layer_re = re.compile(r"\.layers\.(\d+)\.")
    trainable = []
    for name, param in model.named_parameters():
        m = layer_re.search(name)
        keep = bool(m) and int(m.group(1)) in layers and (pattern is None or bool(pattern.search(name)))
        param.requires_grad_(keep)
        if keep:
            trainable.append(name)
    return trainable


def train(ctx: common.RunContext) -> dict:
    tokenizer = common.load_tokenizer(ctx)
    rows = common.prepare_rows(ctx, "sft")
    rows = common.audit_and_log(ctx, rows, tokenizer, "sft")
    model = common.load_model(ctx, tokenizer)
    try:
        layers = M.select_layers(ctx.spec.partial_ft.layers, M.num_layers(model))
    except M.ModelError as e:
        raise common.VariantError(f"partial_ft.layers: {e}") from None
    trainable = freeze_except(model, layers, ctx.spec.partial_ft.modules)
    if not trainable:
        raise common.VariantError(f"partial_ft.modules: {ctx.spec.partial_ft.modules!r} matches no parameter in "
                                  f"layers {layers}")
    ctx.tracker.set_tags({"harness.partial_layers": ",".join(map(str, layers))})
    trainer = SFTTrainer(model=model, args=SFTConfig(**common.trainer_args(ctx)),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[common.HarnessCallback(ctx)])
    result = common.fit(trainer, ctx)
    common.save_full(trainer.model, tokenizer, ctx, needed_locally=ctx.is_stage)
    return result
