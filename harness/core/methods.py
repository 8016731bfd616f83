"""The training methods: one record per method, read by everything that needs to know about one.

Config validation (which sections a method uses, so its id and params hold only those), grid expansion (run
names, which methods may be a `from:` stage), pre-flight (LoRA targets, layers), the worker (which function
trains it) and the report (how to describe it) all read a method's `Method` record here; none of them names
a method in code. Adding a method is one module under `experiments/` exposing `train(ctx) -> dict`, one
`register(Method(...))` call (below, or from a plugin or a test), and its tests.

Nothing here imports torch or the training code: `entry` is a "module:function" string that only the
worker resolves.

    from harness.core import methods
    methods.get("dpo_lora").uses("dpo")        # True
    methods.get("dpo_lorra")                   # MethodError: unknown method 'dpo_lorra' — did you mean ...
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# The config sections a method may use besides the top-level fields; `schema.VariantSpec` has one of each.
SECTIONS = ("data", "train", "lora", "dpo", "simpo", "orpo", "kto", "partial_ft", "eval")


class MethodError(LookupError):
    """An unknown method name; the message lists the available ones."""


def _describe_generic(method: Method) -> Callable[[Mapping[str, Any]], str]:
    return lambda config: f"{method.name} ({method.summary})"


@dataclass(frozen=True)
class Method:
    """Everything the harness needs to know about one training method.

    The JSON-able part (all but `describe`) travels to the worker process in its job file, so a method
    registered at run time (a plugin, a test) trains in a worker that never saw the registration.
    """

    name: str
    """The YAML `method:` value; by convention also the module name under `experiments/`."""
    entry: str
    """"module:function" that trains one variant: `train(ctx: experiments.common.RunContext) -> dict`."""
    summary: str
    """One line for `--help`, the schema documentation and error messages."""
    sections: tuple[str, ...]
    """Config sections this method reads; the others are left out of its variant id and params."""
    data_kind: Literal["preference", "sft"]
    """What its training file must hold: preference pairs, or anything SFT accepts (pairs train on chosen)."""
    can_be_stage: bool = False
    """Another variant may start from this one's trained model (`from:`)."""
    can_start_from_stage: bool = False
    """This method may start from a stage's model (`from:`), which is then also its reference."""
    name_parts: tuple[tuple[str, str], ...] = ()
    """(field, prefix) pairs its run names show after method, model, size and epochs: ("dpo.beta", "b")."""
    optimises: str = ""
    """One sentence, for the report's row explanations: what its training objective pushes the model towards."""
    reference_free: bool = False
    """Its objective never sees a reference model (SimPO, ORPO, SFT). The measurement still compares the trained
    model with the starting model (LoRA: the adapter disabled), so for it "relative to the reference" means
    relative to where training started, not to an anchor the objective kept it near."""
    unit: Literal["pair", "example"] = "example"
    """What one training row is: a preference pair, or one completion with its own target or label (SFT: prompt ->
    chosen; KTO: each pair split into a desirable and an undesirable example). Counts in the report use it."""
    rows_per_pair: int = 1
    """Training rows each selected preference pair becomes (KTO: 2, a desirable and an undesirable example), so
    optimiser steps per epoch = ceil(pairs × rows_per_pair / train.batch_size)."""
    trainer_margin: str | None = None
    """What TRL's logged `rewards/margins` measures for this method, in words (scales differ between methods: never
    compare them across methods); None where its trainer logs none."""
    describe: Callable[[Mapping[str, Any]], str] | None = field(default=None, compare=False)
    """Flat config ({"lora.rank": 4, ...}) -> what was trained, in words, for the report."""

    def uses(self, section: str) -> bool:
        return section in self.sections

    @property
    def uses_lora(self) -> bool:
        return self.uses("lora")

    def describe_config(self, config: Mapping[str, Any]) -> str:
        return (self.describe or _describe_generic(self))(config)

    def train_function(self) -> Callable[..., dict]:
        """The training function (imports the method's module: torch and the trainers)."""
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(module), function or "train")

    def to_json(self) -> dict:
        return {"name": self.name, "entry": self.entry, "summary": self.summary, "sections": list(self.sections),
                "data_kind": self.data_kind, "can_be_stage": self.can_be_stage,
                "can_start_from_stage": self.can_start_from_stage,
                "name_parts": [list(p) for p in self.name_parts], "optimises": self.optimises,
                "reference_free": self.reference_free, "unit": self.unit, "rows_per_pair": self.rows_per_pair,
                "trainer_margin": self.trainer_margin}

    @classmethod
    def from_json(cls, d: dict) -> Method:
        return cls(**{**d, "sections": tuple(d["sections"]),
                      "name_parts": tuple(tuple(p) for p in d.get("name_parts", ()))})


_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    unknown = [s for s in method.sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"method {method.name!r}: unknown config section(s) {unknown}; sections: {SECTIONS}")
    if method.name in _REGISTRY and not replace and _REGISTRY[method.name] != method:
        raise ValueError(f"method {method.name!r} is already registered (pass replace=True to override it)")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MethodError(unknown_message(name)) from None


def unknown_message(name: Any) -> str:
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.6)
    hint = f" — did you mean '{close[0]}'?" if close else "."
    return f"unknown method {name!r}{hint} Available: {', '.join(_REGISTRY)}"


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def all_methods() -> tuple[Method, ...]:
    return tuple(_REGISTRY.values())


def stage_methods() -> tuple[str, ...]:
    return tuple(m.name for m in _REGISTRY.values() if m.can_be_stage)


# ---------------------------------------------------------------- the built-in methods


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, int | float) and not isinstance(x, bool) else str(x)


def _lora(c: Mapping[str, Any]) -> str:
    return f"LoRA r={c.get('lora.rank')}, alpha={_num(c.get('lora.alpha'))}, targets {c.get('lora.targets')}"


def _partial(c: Mapping[str, Any]) -> str:
    text = f"supervised fine-tuning on prompt → chosen of decoder layers {c.get('partial_ft.layers')}"
    if c.get("partial_ft.modules"):
        text += f" (parameters matching {c.get('partial_ft.modules')!r})"
    return text


def _dpo_loss(c: Mapping[str, Any]) -> str:
    """"sigmoid loss", "sigmoid + 0.5 × sft loss", "robust loss (label smoothing 0.1)"."""
    losses = c.get("dpo.loss_type") or "sigmoid"
    losses = [losses] if isinstance(losses, str) else list(losses)
    weights = c.get("dpo.loss_weights") or [1.0] * len(losses)
    text = " + ".join(loss if w == 1 else f"{_num(w)} × {loss}" for loss, w in zip(losses, weights, strict=False))
    if c.get("dpo.label_smoothing"):
        text += f" loss (label smoothing {_num(c.get('dpo.label_smoothing'))})"
        return text
    return text + " loss"


_LORA_NAME = (("lora.rank", "r"), ("lora.targets", ""))
_SFT_OPTIMISES = "the likelihood of the chosen completion given the prompt (rejected completions are never seen)"
_POLICY_REWARD = ("beta × log(policy / reference) of the chosen minus that of the rejected completion, summed over "
                  "tokens, averaged over one training batch")

register(Method(
    name="sft", entry="experiments.sft:train", summary="full supervised fine-tuning (TRL SFTTrainer)",
    sections=("data", "train", "eval"), data_kind="sft", can_be_stage=True,
    optimises=f"Raises {_SFT_OPTIMISES}, through every weight.", reference_free=True,
    describe=lambda c: "full supervised fine-tuning on prompt → chosen"))
register(Method(
    name="lora_sft", entry="experiments.lora_sft:train", summary="supervised fine-tuning through a LoRA adapter",
    sections=("data", "train", "lora", "eval"), data_kind="sft", can_be_stage=True, name_parts=_LORA_NAME,
    optimises=f"Raises {_SFT_OPTIMISES}, through a LoRA adapter.", reference_free=True,
    describe=lambda c: f"supervised fine-tuning on prompt → chosen through a {_lora(c)}"))
register(Method(
    name="partial_ft", entry="experiments.partial_ft:train",
    summary="supervised fine-tuning of selected decoder layers, the rest frozen",
    sections=("data", "train", "partial_ft", "eval"), data_kind="sft", can_be_stage=True,
    name_parts=(("partial_ft.layers", "L"),), describe=_partial,
    optimises=f"Raises {_SFT_OPTIMISES}, through the selected decoder layers only.", reference_free=True))
register(Method(
    name="dpo_lora", entry="experiments.dpo_lora:train", summary="DPO through a LoRA adapter (TRL DPOTrainer)",
    sections=("data", "train", "lora", "dpo", "eval"), data_kind="preference", can_start_from_stage=True,
    name_parts=(("dpo.beta", "b"), *_LORA_NAME), unit="pair",
    optimises="Widens the chosen-over-rejected log-prob margin relative to the reference (the starting model), "
              "by the loss dpo.loss_type names; beta keeps the policy near that reference.",
    trainer_margin=_POLICY_REWARD,
    describe=lambda c: f"DPO (beta {_num(c.get('dpo.beta'))}, {_dpo_loss(c)}) through a {_lora(c)}"))

# ---------------------------------------------------------------- the preference-method family (docs/preference-methods.md)

register(Method(
    name="simpo_lora", entry="experiments.simpo_lora:train",
    summary="SimPO through a LoRA adapter (TRL experimental CPOTrainer, loss_type simpo); reference-free",
    sections=("data", "train", "lora", "simpo", "eval"), data_kind="preference", can_start_from_stage=True,
    name_parts=(("simpo.beta", "b"), ("simpo.gamma", "g"), *_LORA_NAME), unit="pair", reference_free=True,
    optimises="Widens the margin between the chosen and the rejected completion's mean per-token log-prob until "
              "beta times it exceeds gamma; no reference model, so nothing holds the policy near its start.",
    trainer_margin="beta × (mean per-token log-prob of chosen - that of rejected) under the policy alone "
                   "(no reference), averaged over one training batch",
    describe=lambda c: f"SimPO (beta {_num(c.get('simpo.beta'))}, gamma {_num(c.get('simpo.gamma'))}"
                       + (f", NLL weight {_num(c.get('simpo.cpo_alpha'))}" if c.get("simpo.cpo_alpha") else "")
                       + f", reference-free) through a {_lora(c)}"))
register(Method(
    name="orpo_lora", entry="experiments.orpo_lora:train",
    summary="ORPO through a LoRA adapter (TRL experimental ORPOTrainer); reference-free, with an SFT term",
    sections=("data", "train", "lora", "orpo", "eval"), data_kind="preference", can_start_from_stage=True,
    name_parts=(("orpo.beta", "b"), *_LORA_NAME), unit="pair", reference_free=True,
    optimises="Raises the likelihood of the chosen completion (an SFT term) and, weighted by beta, the odds of "
              "chosen over rejected, in one pass with no reference model.",
    trainer_margin="beta × (mean per-token log-prob of chosen - that of rejected) under the policy alone "
                   "(no reference), averaged over one training batch; ORPO's own term is log_odds_ratio",
    describe=lambda c: f"ORPO (beta {_num(c.get('orpo.beta'))}, SFT term included, reference-free) "
                       f"through a {_lora(c)}"))
register(Method(
    name="kto_lora", entry="experiments.kto_lora:train",
    summary="KTO through a LoRA adapter (TRL KTOTrainer); each pair trains as one desirable (chosen) and one "
            "undesirable (rejected) example",
    sections=("data", "train", "lora", "kto", "eval"), data_kind="preference", can_start_from_stage=True,
    name_parts=(("kto.beta", "b"), *_LORA_NAME), unit="example", rows_per_pair=2,
    optimises="Raises each desirable completion's reward beta × log(policy / reference) above a reference point "
              "(the batch's KL estimate) and lowers each undesirable one below it, example by example: the pairing "
              "of chosen with rejected is not used.",
    trainer_margin="mean reward of the desirable examples minus mean reward of the undesirable examples in one "
                   "training batch, rewards beta × log(policy / reference) summed over tokens (not per pair)",
    describe=lambda c: f"KTO (beta {_num(c.get('kto.beta'))}, {c.get('kto.loss_type', 'kto')} loss; each pair "
                       f"split into a desirable and an undesirable example) through a {_lora(c)}"))
