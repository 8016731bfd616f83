"""What every training method shares: device and precision, data preparation with its audit, trainer
arguments, the logging/progress/NaN callback, the before/after parameter bookkeeping, and the margin and
drift measurement around training (`fit`, through `experiments.evaluate`).

Method modules (sft.py, lora_sft.py, partial_ft.py, dpo_lora.py) call these functions; there is no base
class to inherit from.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from experiments import data as D
from experiments import device as dev
from experiments import evaluate as E
from experiments import faults
from experiments import memory
from experiments import models as M
from experiments import refcache
from experiments.device import VariantError  # methods raise common.VariantError
from harness.core.tracking import Tracker
from harness.core.variant import Variant


class NonFiniteLoss(VariantError):
    pass


@dataclass
class RunContext:
    variant: Variant
    tracker: Tracker
    out_dir: Path
    stage_dir: Path | None = None  # output folder of the `from:` stage, if any
    device: str = "cpu"
    precision: str = "fp32"
    is_stage: bool = False  # another variant starts from this one's model
    emit: Any = field(default=lambda **event: None)  # progress events to the executor
    cache_dir: Path | None = None  # shared caches (the reference measurement), e.g. results/cache
    train_indices: list[int] = field(default_factory=list)  # file rows of the training rows kept by the audit
    flipped: list[int] = field(default_factory=list)  # file rows trained with chosen and rejected swapped
    memory: Any = None  # experiments.memory.Estimate of this variant, made when its model loads
    longest: int | None = None  # tokens of the longest selected training pair (the audit's), for that estimate
    base_dtype: str = "fp32"  # how the base is stored (train.base_dtype resolved)

    @property
    def spec(self):
        return self.variant.spec


# ---------------------------------------------------------------- data


def variant_rows(ctx: RunContext, key: str) -> list[dict]:
    """Every row of the variant's data.train or data.eval file, refused unless it is the content the variant's
    id was computed from (a file edited while the grid ran must not be recorded under the old id)."""
    try:
        return D.read_rows(Path(ctx.variant.data_paths[key]), expect=ctx.variant.data_fingerprints.get(key))
    except D.DataError as e:
        raise VariantError(f"data.{key}: {e}") from None


def prepare_rows(ctx: RunContext, kind: str) -> list[dict]:
    """Selected training rows for this variant (before the audit drops unusable ones)."""
    spec = ctx.spec
    all_rows = variant_rows(ctx, "train")
    ctx.train_indices = D.select_indices(len(all_rows), spec.data.size, spec.data.shuffle_seed)
    rows = selected_train_rows(ctx, all_rows, ctx.train_indices)
    rows = D.preference_rows(rows) if kind == "preference" else D.sft_rows(rows)
    return rows


def selected_train_rows(ctx: RunContext, all_rows: list[dict], indices: list[int]) -> list[dict]:
    """The selected training rows as the variant trains on them: with `data.label_noise`, chosen and rejected
    swapped on its seeded, nested fraction of them (the evaluation pairs are never touched)."""
    flipped = D.flipped_indices(indices, ctx.spec.data.label_noise, ctx.spec.data.shuffle_seed)
    ctx.flipped = sorted(flipped)
    return D.with_label_noise([all_rows[i] for i in indices], indices, flipped)


def audit_and_log(ctx: RunContext, rows: list[dict], tokenizer, kind: str) -> list[dict]:
    """Audit the rows, log the audit, and return the usable ones.

    Rows whose prompt alone fills max_length are dropped, as TRL's DPO preprocessing drops them (for SFT
    they would be all-masked batches with a 0/0 loss); they are counted in `data/fully_truncated`.
    """
    try:
        report = D.audit(rows, tokenizer, ctx.spec.data.max_length, kind)
    except D.DataError as e:
        raise VariantError(str(e)) from None
    unusable = set(report.pop("unusable_rows"))
    report["file"] = ctx.variant.data_paths["train"]
    ctx.longest = report["tokens_max"] or None
    report["label_noise"] = ctx.spec.data.label_noise
    report["flipped"] = len(ctx.flipped)  # pairs whose chosen and rejected were swapped
    report["flipped_rows"] = list(ctx.flipped)
    ctx.tracker.log_dict(report, "data_audit.json")
    ctx.tracker.log_metrics({f"data/{k}": v for k, v in report.items() if isinstance(v, int | float)}, step=0)
    if report["usable"] == 0:
        raise VariantError(f"{report['file']}: no usable rows for this variant: {report['rows']} selected, "
                           f"{report['fully_truncated']} fully truncated at max_length={report['max_length']}, "
                           f"{report['chosen_eq_rejected']} chosen == rejected, {report['empty']} empty")
    ctx.train_indices = [idx for i, idx in enumerate(ctx.train_indices) if i not in unusable]
    return [r for i, r in enumerate(rows) if i not in unusable]


# ---------------------------------------------------------------- model


def load_tokenizer(ctx: RunContext):
    try:
        return M.load_padded_tokenizer(ctx.spec.base_model, _grid_dir(ctx), ctx.spec.chat_template)
    except M.ModelError as e:
        raise VariantError(str(e)) from None


def load_model(ctx: RunContext, tokenizer):
    """The starting model: the base, or the `from:` stage's trained model, in fp32, or in bf16 for the frozen
    base of a LoRA method where `train.base_dtype` resolves so (2 bytes a parameter instead of 4: 16 GB for an
    8B model instead of 32).

    bf16/fp16 training computes through autocast. The measurement (margins, probes, perplexity) always runs in
    fp32: a bf16 base is upcast while measuring (`device.fp32_weights`, exact both ways), so it scores exactly
    the bf16-rounded weights that were trained. Scoring in bf16 itself was tried and refused: its rounding noise
    (+-0.2 nats on SmolLM2's ~80-token summed log-probs on an H100, a KL of 1.6e-3 against 6e-7) was larger than
    the shifts it measures."""
    if ctx.stage_dir is not None:
        stage_model = ctx.stage_dir / "model"
        if not (stage_model / "config.json").is_file():
            raise VariantError(f"stage output {stage_model} is missing; rerun the grid with --force to rebuild it")
        recorded = stage_model / "harness_variant.json"
        got = json.loads(recorded.read_text()).get("variant_id") if recorded.is_file() else None
        if got != ctx.variant.parent_id:
            raise VariantError(f"stage output {stage_model} was written by variant {got}, not by this variant's "
                               f"stage {ctx.variant.parent_id}; refusing to start from it (rerun with --force)")
        model = M.load_model(str(stage_model), dtype=_base_dtype(ctx))
    else:
        model = M.load_model(ctx.spec.base_model, dtype=_base_dtype(ctx), base_dir=_grid_dir(ctx),
                             vocab_size=len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    try:  # what the memory model says this variant needs, logged beside what it took (`fit`)
        ctx.memory = memory.estimate(ctx.spec, model, device=ctx.device, precision=ctx.precision,
                                     base_dtype=ctx.base_dtype, longest=ctx.longest)
    except Exception as e:  # noqa: BLE001 - an estimate must never stop a run
        print(f"memory estimate unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    return model


def _base_dtype(ctx: RunContext):
    """torch dtype the base is stored in (train.base_dtype, resolved for this device and precision), logged."""
    chosen = dev.resolve_base_dtype(ctx.spec.train.base_dtype, ctx.device, ctx.precision,
                                    ctx.spec.method_record.uses_lora)
    ctx.base_dtype = chosen
    ctx.tracker.set_tags({"harness.base_dtype": chosen})
    return torch.bfloat16 if chosen == "bf16" else torch.float32


def _grid_dir(ctx: RunContext) -> Path:
    return Path(ctx.variant.grid_dir)


def lora_config(ctx: RunContext, model):
    from peft import LoraConfig

    try:
        targets, layers = M.resolve_lora_targets(ctx.spec.lora.targets, model)
    except M.ModelError as e:
        raise VariantError(f"lora.targets: {e}") from None
    return LoraConfig(r=ctx.spec.lora.rank, lora_alpha=ctx.spec.lora.alpha, lora_dropout=ctx.spec.lora.dropout,
                      target_modules=targets, layers_to_transform=layers, task_type="CAUSAL_LM", bias="none")


# ---------------------------------------------------------------- trainer


# transformers 5.20 renamed TrainingArguments.gradient_checkpointing to activation_checkpointing (the old name
# warns there); 5.17, the GPU machine's, knows only the old one
_CHECKPOINTING_ARG = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                      else "gradient_checkpointing")


def trainer_args(ctx: RunContext) -> dict:
    t = ctx.spec.train
    return dict(
        output_dir=str(ctx.out_dir / "trainer"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of total steps
        weight_decay=t.weight_decay,
        seed=ctx.spec.seed,
        data_seed=ctx.spec.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        report_to="none",
        logging_nan_inf_filter=False,  # the default replaces a NaN loss with the running mean: we must see it
        save_strategy="no",
        disable_tqdm=True,
        bf16=ctx.precision == "bf16",
        fp16=ctx.precision == "fp16",
        use_cpu=ctx.device == "cpu",
        **{_CHECKPOINTING_ARG: t.gradient_checkpointing},
        max_length=ctx.spec.data.max_length,
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )


class HarnessCallback(TrainerCallback):
    """Trainer metrics -> tracker (one batched call per logging step), progress -> executor, NaN -> stop."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.t0 = time.monotonic()
        self.parent_pid = os.getppid()

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.monotonic()
        self.ctx.emit(event="begin", max_steps=state.max_steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        faults.maybe_inject(self.ctx, model, state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if os.getppid() != self.parent_pid:  # the executor died: do not train on as an orphan
            raise KeyboardInterrupt("executor process is gone")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        metrics = {f"train/{k}" if "/" not in k else k: v for k, v in logs.items() if isinstance(v, int | float)}
        self.ctx.tracker.log_metrics(metrics, step=state.global_step)
        loss = logs.get("loss")
        self.ctx.emit(event="step", step=state.global_step, max_steps=state.max_steps, loss=loss,
                      elapsed=time.monotonic() - self.t0)
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss} at step {state.global_step}")


def param_fingerprint(model) -> dict[str, tuple[float, float]]:
    """Cheap per-tensor checksums (sum, sum of squares) to tell which parameters training changed."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().double()
            out[name] = (x.sum().item(), (x * x).sum().item())
    return out


def changes(before: dict, after: dict, trainable: set[str]) -> dict:
    per_param = {name: {"trainable": name in trainable, "changed": before.get(name) != after[name]}
                 for name in after}
    return {
        "params": per_param,
        "summary": {
            "trainable": sum(v["trainable"] for v in per_param.values()),
            "frozen": sum(not v["trainable"] for v in per_param.values()),
            "changed_trainable": sum(v["trainable"] and v["changed"] for v in per_param.values()),
            "changed_frozen": sum((not v["trainable"]) and v["changed"] for v in per_param.values()),
        },
    }


def measurement_setup(ctx: RunContext) -> "E.Setup":
    """What `evaluate` scores for this variant: every row of data.eval, and the selected training rows when
    the training file holds preference pairs (SFT methods train on their chosen side)."""
    spec = ctx.spec
    eval_rows = variant_rows(ctx, "eval")
    all_train = variant_rows(ctx, "train")
    train_idx = D.select_indices(len(all_train), spec.data.size, spec.data.shuffle_seed)
    as_trained = selected_train_rows(ctx, all_train, train_idx)  # the training pairs as trained (flips included)
    train_rows = [D.preference_rows([row])[0] | {"category": row.get("category", "")}
                  for row in as_trained] if D.data_format(all_train[0]) == "preference" else None
    return E.Setup.standard(eval_rows, train_rows=train_rows, train_indices=train_idx,
                            max_length=spec.data.max_length, batch_size=spec.eval.batch_size,
                            probe_length=spec.eval.probe_length, beta=implicit_reward_beta(spec))


def implicit_reward_beta(spec) -> float | None:
    """DPO's beta, when the method trains with one (its implicit reward margin is beta × margin shift)."""
    return spec.dpo.beta if spec.method_record.uses("dpo") else None


def reference_cache(ctx: RunContext, model) -> refcache.ReferenceCache:
    """The cache of reference measurements for this variant's reference (its stage's model, or its base)."""
    memo = ctx.cache_dir / "digests" if ctx.cache_dir else None
    if ctx.stage_dir is not None:
        weights = refcache.weights_identity(ctx.stage_dir / "model", "", memo)
    else:
        folder = M.weights_folder(ctx.spec.base_model, _grid_dir(ctx))
        recipe = M.recipe(ctx.spec.base_model) if folder is None else ""
        weights = refcache.weights_identity(folder, recipe, memo) if folder or recipe else "unhashable:hub"
    return refcache.ReferenceCache(ctx.cache_dir / "reference" if ctx.cache_dir else None, weights, model)


def fit(trainer, ctx: RunContext, *, before_train=None) -> dict:
    """Measure the reference, train, measure again; log which parameters moved, the margins and the drift.
    `before_train(trainer, baseline)` lets a method reuse the reference measurement (DPO's reference
    log-probs). Returns a summary for result.json."""
    model = trainer.model
    tokenizer = trainer.processing_class
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    ctx.tracker.log_metrics({"params/trainable_numel": n_trainable, "params/total_numel": n_total}, step=0)
    ctx.emit(event="measure", when="before")
    cache = reference_cache(ctx, model)
    with dev.fp32_weights(model):  # a bf16-stored base is measured in fp32, as the model it is
        baseline = E.before(model, tokenizer, measurement_setup(ctx), cache=cache)
    if cache.hits:  # which parts of the reference measurement were reused (1) or computed and stored (0)
        ctx.tracker.log_metrics({f"cache/reference_{part}_hit": float(hit) for part, hit in cache.hits.items()},
                                step=0)
    if before_train is not None:
        before_train(trainer, baseline)
    if ctx.spec.eval.every:
        trainer.add_callback(_InFp32(E.IntermediateEval(model, tokenizer, baseline, ctx.spec.eval.every,
                                                        ctx.tracker, emit=ctx.emit), model))
    before = param_fingerprint(model)
    t0 = time.monotonic()
    out = trainer.train()
    seconds = time.monotonic() - t0
    moved = changes(before, param_fingerprint(model), trainable)
    (ctx.out_dir / "param_changes.json").write_text(json.dumps(moved, indent=1))
    ctx.tracker.log_artifact(ctx.out_dir / "param_changes.json")
    ctx.tracker.log_metrics({f"params/{k}": v for k, v in moved["summary"].items()}, step=out.global_step)
    ctx.tracker.log_metrics({"train/seconds": seconds, "train/global_step": out.global_step}, step=out.global_step)
    ctx.emit(event="measure", when="after")
    with dev.fp32_weights(model):
        rows, metrics = E.after(model, tokenizer, baseline)
    ctx.tracker.log_artifact(E.write_table(rows, ctx.out_dir / "pairs.csv"), "eval")
    ctx.tracker.log_metrics(metrics, step=out.global_step)
    log_memory(ctx, out.global_step)
    return {"global_step": out.global_step, "train_loss": out.training_loss, "seconds": seconds,
            "trainable_numel": n_trainable, "total_numel": n_total, **moved["summary"],
            "eval_margin_shift_mean": metrics.get("eval/margin_shift_mean"),
            "drift_kl_mean": metrics.get("drift/kl_mean"), "measure_seconds": metrics["eval/seconds"]}


class _InFp32(TrainerCallback):
    """A measuring callback run with the model's weights upcast to fp32 (see `device.fp32_weights`)."""

    def __init__(self, inner, model):
        self.inner, self.model = inner, model

    def on_step_end(self, args, state, control, **kwargs):
        with dev.fp32_weights(self.model):
            return self.inner.on_step_end(args, state, control, **kwargs)


def log_memory(ctx: RunContext, step: int) -> None:
    """The memory model's estimate (by part) and the measured peak, so every run checks the model."""
    values = {"memory/peak_gb": memory.measured_peak(ctx.device) / memory.GB}
    if ctx.memory is not None:
        values["memory/estimate_gb"] = ctx.memory.gb()
        values.update({f"memory/estimate_{part}_gb": ctx.memory.gb(part) for part in ctx.memory.parts})
    ctx.tracker.log_metrics(values, step=step)


def save_adapter(model, tokenizer, ctx: RunContext) -> None:
    path = ctx.out_dir / "adapter"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    ctx.tracker.log_artifact(path, "adapter")


def save_full(model, tokenizer, ctx: RunContext, *, needed_locally: bool) -> None:
    """Full weights: kept locally when a child stage needs them, logged as an artifact when asked."""
    if not (needed_locally or ctx.spec.save_weights):
        return
    path = ctx.out_dir / "model"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # children check this before starting from these weights
    (path / "harness_variant.json").write_text(json.dumps({"variant_id": ctx.variant.id}))
    if ctx.spec.save_weights:
        ctx.tracker.log_artifact(path, "model")
