"""The variant schema: every field one training run can vary, with its default and meaning.

This module *is* the configuration documentation. A grid YAML holds only what differs from these
defaults (see `harness.grid` for how a grid file is expanded into variants). Which sections a method
reads is its record's business (`harness.core.methods`). Nothing here imports torch, so `harness plan` and
`harness validate` stay fast.

    python -m harness validate configs/two_round.yaml
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.core import methods

LORA_PRESETS = ("qv", "qkvo", "all-linear", "all-linear-last-half")

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
# numpy and torch seed their generators with an unsigned 32-bit value; anything else fails at run time.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class _Strict(BaseModel):
    # Unknown keys fail loudly; "8" and `true` are not silently the int 8 and 1 (strict), while an int is a
    # valid float (`alpha: 16`). inf/nan are refused: a learning rate of .inf trains nothing but NaNs.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True, allow_inf_nan=False)


ADDED_FIELDS = (("data", "label_noise"), ("train", "base_dtype"))  # (section, field) left out of the id at their default
CHAT_FORMATS = ("family", "chatml", "plain")  # named `chat_template:` values (else a .jinja file)


class DataSpec(_Strict):
    """What a variant trains and evaluates on."""

    train: str = "builtin"
    """`builtin` (the project's preference set, 64 train pairs) or a .jsonl/.csv/.parquet path,
    relative to the grid file. Preference format (prompt/chosen/rejected); SFT methods train on the
    chosen side, or on prompt/completion or messages files."""
    size: PositiveInt | None = None
    """Use the first `size` rows of one seeded shuffle, so sizes are nested: 4 ⊂ 12 ⊂ 48. None = all."""
    shuffle_seed: Seed = 0
    """Seed of that shuffle. Separate from `seed` so varying the training seed keeps the data fixed."""
    max_length: PositiveInt = 512
    """Token budget for prompt + completion; longer pairs are truncated (counted in the data audit). `run`
    and `validate --deep` refuse a budget that leaves no row of the training or evaluation data usable."""
    eval: str = "builtin"
    """The grid's evaluation pairs ("eval_data"): `builtin` (32 held-out pairs) or a preference file path
    like `train`. Margins are measured on every row of it, before and after training."""
    label_noise: Fraction = 0.0
    """Preference consistency: swap chosen and rejected on this fraction of the selected *training* pairs
    (rounded to a whole pair; never the evaluation pairs). Seeded by `shuffle_seed` and nested: the pairs
    flipped at 0.1 are among those flipped at 0.25. Needs a preference training file."""


class TrainSpec(_Strict):
    """Optimiser and loop settings shared by all methods."""

    learning_rate: PositiveFloat = 5e-5
    """Peak learning rate. LoRA usually wants ~10x the full fine-tuning rate."""
    epochs: PositiveInt = 1
    """Passes over the training data."""
    batch_size: PositiveInt = 4
    """Pairs (DPO) or examples (SFT) per device step."""
    grad_accum: PositiveInt = 1
    """Gradient accumulation steps; effective batch = batch_size * grad_accum."""
    max_steps: PositiveInt | None = None
    """Stop after this many optimiser steps (overrides epochs). For smoke runs."""
    warmup_ratio: Fraction = 0.0
    """Fraction of steps spent warming the learning rate up from zero."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """AdamW weight decay."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after warmup."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto = bf16 where the device supports it, else fp32. bf16/fp16 are refused where unsupported."""
    gradient_checkpointing: bool = False
    """Trade compute for memory on large models."""
    base_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """How a LoRA method stores its frozen base: bf16 halves its memory (2 bytes a parameter). auto = bf16 where
    the variant computes in bf16 on a GPU, else fp32. Margins and drift are still computed in fp32, on the
    bf16-rounded weights that were trained (upcast while measuring). bf16 needs `precision: bf16`."""
    logging_steps: PositiveInt = 1
    """Log trainer metrics every this many steps."""


class LoraSpec(_Strict):
    """LoRA adapter shape (methods `lora_sft`, `dpo_lora`)."""

    rank: PositiveInt = 8
    """Adapter rank r. Higher: more capacity and memory. At most the smallest dimension of the targeted
    modules (a higher rank adds parameters, not capacity); `run` and `validate --deep` check it."""
    alpha: PositiveFloat = 16
    """Scaling numerator; the update is scaled by alpha / rank."""
    dropout: Fraction = 0.0
    """Dropout on the adapter input."""
    targets: str | list[str] = "qv"
    """A preset from the scope ladder: qv, qkvo, all-linear, all-linear-last-half; or an explicit list
    of module names (e.g. [q_proj, gate_proj]) that must exist in the model."""

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("expected a preset (qv, qkvo, all-linear, all-linear-last-half) or a non-empty list "
                             "of module names; an empty list adapts nothing")
        return value


class DpoSpec(_Strict):
    """DPO objective (method `dpo_lora`)."""

    beta: PositiveFloat = 0.1
    """KL strength: larger keeps the policy closer to the reference."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid = the original DPO loss."""


class PartialSpec(_Strict):
    """Which parameters partial fine-tuning trains (method `partial_ft`); everything else is frozen."""

    layers: str | list[int] = "last_half"
    """Decoder layers to train: last_half, last:N, first:N, all, or a list of layer indices."""
    modules: str | None = None
    """Optional regex on parameter names inside those layers (e.g. 'mlp|self_attn\\.o_proj')."""


class EvalSpec(_Strict):
    """Measurement around training (every method): preference margins on `data.eval` and on the training
    pairs, and drift from the reference (see `experiments/evaluate.py` for what is logged)."""

    every: PositiveInt | None = None
    """Also log the held-out margin shift every this many optimiser steps. None = before and after only."""
    probe_length: PositiveInt = 32
    """Tokens the reference generates greedily per probe prompt; the KL drift is averaged over them.
    (Not `probe_tokens`: params whose key contains "token" are logged masked, as secrets.)"""
    batch_size: PositiveInt = 8
    """Sequences per forward pass while measuring (a preference pair is two)."""


class VariantSpec(_Strict):
    """One fully resolved training run."""

    name: str | None = None
    """Label for this variant (shown in run names); also what `from:` refers to. Not part of the id."""
    method: str = "dpo_lora"
    """Training method, a name from the method registry (`harness.core.methods`): sft (full), lora_sft,
    partial_ft, dpo_lora (DPO through a LoRA adapter)."""
    base_model: str = "smollm2-135m-instruct"
    """smollm2-135m-instruct, gemma-3-270m (a raw pretrained base; the `[gemma]` extra), tiny-random-llama, a
    local HF model folder, a .gguf file (de-quantised once into the cache), or a hub id (needs network)."""
    chat_template: str | None = None
    """How conversations are shown to the model, declared, never guessed. None: the tokenizer's own template
    (conversational data on a model without one is refused). `family`: the model family's documented turn
    format (Gemma: <start_of_turn>user … <end_of_turn>), where the tokenizer has its special tokens;
    `chatml`; `plain` ("User: …" / "Assistant: …" lines); or a path to a Jinja template file (.jinja), its
    content part of the id. Replaces the tokenizer's own template when given."""
    seed: Seed = 0
    """Training seed (initialisation of adapters, data order), 0 to 2**32 - 1."""
    from_: str | None = Field(default=None, alias="from")
    """Name of an sft/lora_sft/partial_ft variant of this grid to start from. That stage trains once;
    its model becomes both the starting point and the DPO reference."""
    save_weights: bool = False
    """Also log full model weights as an artifact (adapters are always logged)."""
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    lora: LoraSpec = LoraSpec()
    dpo: DpoSpec = DpoSpec()
    partial_ft: PartialSpec = PartialSpec()
    eval: EvalSpec = EvalSpec()

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        if value is not None and value not in CHAT_FORMATS and not value.endswith(".jinja"):
            raise ValueError(f"expected one of {', '.join(CHAT_FORMATS)} or a path to a .jinja template file")
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in methods.names():
            raise ValueError(methods.unknown_message(value))
        return value

    @property
    def method_record(self) -> methods.Method:
        return methods.get(self.method)


def relevant_config(spec: VariantSpec) -> dict:
    """The fields that define what this variant trains, as plain JSON-able data (no `name`).

    Only the sections the method uses (its registry record) are included, so a grid that varies dpo.beta
    does not produce five identical SFT runs."""
    out: dict = {
        "method": spec.method,
        "base_model": spec.base_model,
        "seed": spec.seed,
        "from": spec.from_,
        "save_weights": spec.save_weights,
    }
    if spec.chat_template is not None:  # only when declared: the ids of every earlier variant stay as they were
        out["chat_template"] = spec.chat_template
    for section in spec.method_record.sections:
        out[section] = getattr(spec, section).model_dump()
    # fields added after runs were recorded count only when set, so every earlier variant keeps its id
    for section, key in ADDED_FIELDS:
        if section in out and out[section][key] == getattr(type(getattr(spec, section))(), key):
            del out[section][key]
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    """{"lora": {"rank": 4}} -> {"lora.rank": 4}. Lists stay leaves."""
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def unflatten(flat: dict) -> dict:
    """{"lora.rank": 4} -> {"lora": {"rank": 4}}."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def normalise(d: dict) -> dict:
    """Accept both nested ({lora: {rank: 4}}) and dotted ({lora.rank: 4}) keys."""
    return unflatten(flatten(d))


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, merging nested mappings key by key."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def field_names(model: type[BaseModel] = VariantSpec, prefix: str = "") -> list[str]:
    """Every valid dotted key path, for 'did you mean' suggestions."""
    names = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names.extend(field_names(ann, f"{prefix}{key}."))
        else:
            names.append(f"{prefix}{key}")
    return names
