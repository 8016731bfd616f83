"""The variant schema: every field one training run can vary, with its default and meaning.

This module *is* the configuration documentation. A grid YAML holds only what differs from these
defaults (see `harness.grid` for how a grid file is expanded into variants). Which sections a method
reads is its record's business (`harness.core.methods`). Nothing here imports torch, so `harness plan` and
`harness validate` stay fast.

    python -m harness validate configs/two_round.yaml
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

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


# (section, field) left out of the id at their default, so every variant recorded before they existed keeps its id
ADDED_FIELDS = (("data", "label_noise"), ("train", "base_dtype"), ("dpo", "loss_weights"),
                ("dpo", "label_smoothing"))
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
    """LoRA adapter shape (every method whose record uses the `lora` section: lora_sft, dpo_lora, simpo_lora, ...)."""

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


# The losses of TRL 1.16's DPOTrainer that train on offline preference pairs (trl/trainer/dpo_trainer.py), with
# what each optimises. The reward of a completion is beta × log(policy / reference) of it, summed over its tokens.
DPO_LOSS_TYPES = {
    "sigmoid": "the original DPO loss, -log σ(beta × reward margin)",
    "sigmoid_norm": "DPO on the per-token (length-normalised) log-ratio margin; against length bias",
    "ipo": "IPO: squared distance of the per-token margin from 1 / (2 beta); for noisy labels",
    "robust": "robust DPO: unbiased under a label_smoothing fraction of flipped labels; for noisy labels",
    "hinge": "SLiC: hinge on the reward margin, max(0, 1 - beta × margin)",
    "exo_pair": "EXO: reverse KL to label_smoothing-smoothed preferences (needs label_smoothing > 0)",
    "nca_pair": "NCA: absolute rewards, raises the chosen one instead of only the margin",
    "bco_pair": "BCO (paired): classifies chosen as good and rejected as bad by their own rewards",
    "sppo_hard": "SPPO with hard 1/0 win probabilities: pushes the chosen reward to 1/2 and the rejected to -1/2",
    "aot": "AOT: aligns the sorted distribution of margins in each batch (needs train.batch_size >= 2)",
    "apo_zero": "APO-zero: raises chosen and lowers rejected, each against the reference (chosen better than the model)",
    "apo_down": "APO-down: lowers both, rejected more (chosen worse than the model's own answers)",
    "discopop": "DiscoPOP: a logistic/exponential blend of the margin found by LLM-driven search (tau 0.05)",
    "sft": "negative log-likelihood of chosen; only next to another loss (sigmoid + sft is RPO)",
}
# Offered by TRL's DPOConfig, refused here, and why.
DPO_LOSS_REFUSED = {
    "aot_unpaired": "it sorts chosen and rejected rewards separately, throwing away which rejected answer belongs to "
                    "which chosen one: it is for unpaired data, and every row here is a pair (for good/bad labels "
                    "without pairs, use method kto_lora)",
}
LABEL_SMOOTHING_LOSSES = ("robust", "exo_pair", "aot")  # the DPO losses that read dpo.label_smoothing


class DpoSpec(_Strict):
    """DPO objective (method `dpo_lora`)."""

    beta: PositiveFloat = 0.1
    """KL strength: larger keeps the policy closer to the reference (for ipo: the regularisation tau)."""
    loss_type: str | list[str] = "sigmoid"
    """A loss of TRL's DPOTrainer, or a list of them summed with `loss_weights`: sigmoid (the original DPO loss),
    sigmoid_norm (length-normalised), ipo, robust, hinge, exo_pair, nca_pair, bco_pair, sppo_hard, aot, apo_zero,
    apo_down, discopop, and sft (only in a list, e.g. [sigmoid, sft]). `DPO_LOSS_TYPES` above says what each
    optimises; aot_unpaired is refused (`DPO_LOSS_REFUSED`). A one-item list is the same variant as the name."""
    loss_weights: list[PositiveFloat] | None = None
    """One positive weight per loss type, in order (`[1.0, 0.5]` for `[sigmoid, sft]`). None = 1.0 each."""
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    """robust: the assumed fraction of flipped labels (0.1 in the robust-DPO paper); exo_pair: its epsilon (1e-3 in
    the EXO paper); aot: a conservative smoothing. Refused where no chosen loss reads it."""

    @field_validator("loss_type")
    @classmethod
    def _known_losses(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        if not names:
            raise ValueError("expected a loss type or a non-empty list of them")
        for name in names:
            if name in DPO_LOSS_REFUSED:
                raise ValueError(f"loss type {name!r} is not offered here: {DPO_LOSS_REFUSED[name]}")
            if name not in DPO_LOSS_TYPES:
                close = difflib.get_close_matches(name, list(DPO_LOSS_TYPES), n=1, cutoff=0.6)
                hint = f" — did you mean '{close[0]}'?" if close else "."
                raise ValueError(f"unknown loss type {name!r}{hint} Available: {', '.join(DPO_LOSS_TYPES)}")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"loss type(s) {twice} listed twice; give each once, with its weight in loss_weights")
        if names == ["sft"]:
            raise ValueError("sft alone is supervised fine-tuning on chosen (use method lora_sft); as a DPO loss "
                             "it goes next to another one, e.g. [sigmoid, sft]")
        return names[0] if len(names) == 1 else names  # [sigmoid] and sigmoid are one variant, one id

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)


class SimpoSpec(_Strict):
    """SimPO objective (method `simpo_lora`: TRL's experimental CPOTrainer, loss_type "simpo"). Reference-free: a
    completion's reward is beta × its mean per-token log-prob, and the loss is -log σ(beta × Δ - gamma)."""

    beta: PositiveFloat = 2.0
    """Reward scale on the per-token log-prob. The SimPO paper uses 2.0 to 2.5 (10 for Gemma); TRL's CPO default
    of 0.1 is a DPO-style value that leaves a per-token margin almost without gradient."""
    gamma: Annotated[float, Field(ge=0)] = 1.0
    """Target reward margin (TRL's simpo_gamma), in reward units; the paper's recipes keep gamma / beta near 0.5."""
    cpo_alpha: Annotated[float, Field(ge=0)] = 0.0
    """Weight of a negative log-likelihood term on chosen (TRL's cpo_alpha): 0 = pure SimPO, as in the paper;
    above 0, CPO-SimPO."""


class OrpoSpec(_Strict):
    """ORPO objective (method `orpo_lora`: TRL's experimental ORPOTrainer). Reference-free, one pass: the negative
    log-likelihood of chosen minus beta × log σ(log odds(chosen) - log odds(rejected)), odds from per-token means."""

    beta: PositiveFloat = 0.1
    """The paper's lambda: weight of the odds-ratio term next to the SFT term (TRL's default; the paper used 0.1
    to 0.25)."""


class KtoSpec(_Strict):
    """KTO objective (method `kto_lora`: TRL's KTOTrainer). Each preference pair trains as two examples: the
    chosen completion labelled desirable and the rejected one labelled undesirable."""

    beta: PositiveFloat = 0.1
    """Scale of the implicit reward beta × log(policy / reference); larger keeps the policy closer to it."""
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """kto: each reward against a reference point, the batch's KL estimate (needs train.batch_size >= 2);
    apo_zero_unpaired: raise desirable and lower undesirable, each against the reference, with no KL term."""
    desirable_weight: PositiveFloat = 1.0
    """Loss weight of the desirable (chosen) examples. Split pairs give as many of each, so 1.0 and 1.0 balance."""
    undesirable_weight: PositiveFloat = 1.0
    """Loss weight of the undesirable (rejected) examples."""


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
    partial_ft, dpo_lora (DPO through a LoRA adapter), simpo_lora, orpo_lora, kto_lora (the preference-method
    family through LoRA; see docs/preference-methods.md)."""
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
    simpo: SimpoSpec = SimpoSpec()
    orpo: OrpoSpec = OrpoSpec()
    kto: KtoSpec = KtoSpec()
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

    @model_validator(mode="after")
    def _consistent(self) -> VariantSpec:
        """The cross-field checks, all in one place; each names the key it refuses and quotes both values."""
        problems: list[InitErrorDetails] = []

        def refuse(loc: tuple[str, ...], value: Any, message: str) -> None:
            problems.append(InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": message}),
                                             loc=loc, input=value))

        dpo, losses = self.dpo, self.dpo.loss_types
        if dpo.loss_weights is not None and len(dpo.loss_weights) != len(losses):
            refuse(("dpo", "loss_weights"), dpo.loss_weights, f"Got {len(dpo.loss_weights)} weights for "
                   f"{len(losses)} loss types (loss_type {dpo.loss_type!r}); give one per loss type, in order")
        needs = {"robust": "the assumed fraction of flipped labels, e.g. 0.1 (at 0, robust is sigmoid)",
                 "exo_pair": "EXO's epsilon, e.g. 1e-3 (TRL refuses 0)"}
        needing = [loss for loss in losses if loss in needs]
        if needing and dpo.label_smoothing == 0:
            refuse(("dpo", "loss_type"), dpo.loss_type, f"{needing[0]} needs dpo.label_smoothing in (0, 0.5), "
                   f"{needs[needing[0]]}; label_smoothing is {dpo.label_smoothing:g}")
        if dpo.label_smoothing and not set(losses) & set(LABEL_SMOOTHING_LOSSES):
            refuse(("dpo", "label_smoothing"), dpo.label_smoothing, f"only {', '.join(LABEL_SMOOTHING_LOSSES)} "
                   f"read it, and loss_type is {dpo.loss_type!r}; set it on those variants only")
        record = self.method_record  # a known name: the method's own validator ran first
        if self.train.batch_size < 2 and record.uses("dpo") and "aot" in losses:
            refuse(("train", "batch_size"), self.train.batch_size, f"loss_type {dpo.loss_type!r}: aot sorts the "
                   f"margins across a batch and needs at least 2 pairs per step (at 1 it is sigmoid)")
        if self.train.batch_size < 2 and record.uses("kto") and self.kto.loss_type == "kto":
            refuse(("train", "batch_size"), self.train.batch_size, f"{self.method} estimates KTO's KL term from the "
                   f"other completions of its batch and needs at least 2 examples per step (TRL refuses 1); or "
                   f"kto.loss_type apo_zero_unpaired, which has no KL term")
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self

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
