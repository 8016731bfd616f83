"""Measurement around training, for every method: how far the preferences moved, and what it cost.

Before training (the *reference*) and after it, on the held-out evaluation pairs (`data.eval`) and on the
variant's own training pairs, this scores the summed log-prob of the chosen and of the rejected completion
given the prompt, with exactly the tokenisation DPO trains on (TRL's prompt/completion split, its chat
template, EOS appended to plain-string completions, `keep_start` truncation to `data.max_length`). From
these: the margin m = logp(chosen) - logp(rejected), the margin shift m_after - m_before, their per-token
versions, preference accuracy (m > 0), how chosen and rejected moved separately ("likelihood displacement"
when both fell) and, for DPO, the implicit reward margin beta * shift (what TRL logs as `rewards/margins`).
Drift from the reference: KL(policy || reference) per token over the reference's own greedy completions of
the probe prompts, perplexity on neutral text, and the norm of the weight change.

The reference is what DPO uses: the starting model (the base, or the `from:` stage's model). For LoRA
methods that is the model with its adapter disabled, so no copy is kept; full methods are measured before
`trainer.train()` and keep only the numbers (and, for the weight-change norm, the trainable tensors on CPU).
`experiments.common.fit` runs this for every method; `python -m harness evaluate` runs it without training.

Results schema (what `analysis/` reads; nothing else):

Per-pair table, artifact `eval/pairs.csv` (also `<out_dir>/pairs.csv`), one row per pair and split:

    split                    eval (the held-out pairs of data.eval) | train (this variant's selected pairs)
    pair                     0-based row of the pair in its data file
    category                 the row's `category` field ("" if absent)
    n_prompt                 prompt tokens
    n_chosen, n_rejected     completion tokens scored (after truncation)
    logp_chosen_before       summed log-prob of the chosen completion under the reference (nats)
    logp_rejected_before     same, rejected
    logp_chosen_after        under the trained model
    logp_rejected_after      same, rejected
    margin_before            logp_chosen_before - logp_rejected_before
    margin_after             logp_chosen_after - logp_rejected_after
    margin_shift             margin_after - margin_before
    norm_margin_before       per-token margin: logp_chosen/n_chosen - logp_rejected/n_rejected, before
    norm_margin_after        same, after
    norm_margin_shift        norm_margin_after - norm_margin_before
    chosen_shift             logp_chosen_after - logp_chosen_before
    rejected_shift           logp_rejected_after - logp_rejected_before
    displaced                1 if chosen_shift < 0 and rejected_shift < 0 (likelihood displacement), else 0
    implicit_reward_margin   dpo_lora only: beta * margin_shift (TRL's rewards/margins of this pair); else empty

A model measured on its own (`harness evaluate` without a reference) has `logp_chosen`, `logp_rejected`,
`margin`, `norm_margin` instead of the before/after columns, and metrics `<s>/margin_mean`,
`<s>/norm_margin_mean`, `<s>/accuracy`, `drift/ppl`.

Summary metrics, logged at the final step: their keys, meanings and directions are the metric catalogue,
`harness/core/metrics.py` (`python -m harness metrics` prints it); `summarise` and `after` below produce
exactly those keys (a test checks it).

With `eval.every: k`, `eval/margin_shift_mean` is also logged every k optimiser steps (with its step).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from experiments import data as D
from experiments.scoring import (
    Pair,
    delta_norm,
    greedy_completions,
    inference,
    is_peft,
    kl_to_reference,
    lora_delta_norm,
    pair_logps,
    perplexity,
    position_logprobs,
    prompt_ids,
    reference_of,
    snapshot,
)

PROBE_FILE = D.BUILTIN_DIR / "probe_prompts.jsonl"
NEUTRAL_FILE = D.BUILTIN_DIR / "neutral_text.txt"
SPLITS = {"eval": "eval", "train": "train_pairs"}  # split -> metric prefix
# How the reference side is computed, part of its cache key: an entry scored another way (here: before the
# prompt was shared between the two sides, or probes generated in other batches) is not mixed with new scores.
SCORING = "shared-prompt-v1"


# ---------------------------------------------------------------- inputs


@dataclass
class Setup:
    """What one measurement needs besides the model: the data, and how to score it."""

    eval_rows: list[dict]
    eval_indices: list[int]
    train_rows: list[dict] | None  # None: the training file is not preference data
    train_indices: list[int]
    max_length: int
    batch_size: int = 8  # sequences per forward pass (a pair is two)
    probe_length: int = 32
    beta: float | None = None  # dpo_lora: report the implicit reward margin
    probe_prompts: list[Any] = field(default_factory=list)
    neutral_text: list[str] = field(default_factory=list)

    @classmethod
    def standard(cls, eval_rows: list[dict], *, train_rows: list[dict] | None = None,
                 train_indices: list[int] | None = None, max_length: int, batch_size: int = 8,
                 probe_length: int = 32, beta: float | None = None) -> Setup:
        """Every row of `eval_rows` (and `train_rows`), the built-in probe prompts and neutral text: what
        `fit` measures around training and `harness evaluate` measures without it."""
        return cls(eval_rows=eval_rows, eval_indices=list(range(len(eval_rows))), train_rows=train_rows,
                   train_indices=list(train_indices or []), max_length=max_length, batch_size=batch_size,
                   probe_length=probe_length, beta=beta, probe_prompts=probe_prompts(),
                   neutral_text=neutral_paragraphs())


def probe_prompts() -> list[Any]:
    return [row["prompt"] for row in D.read_rows(PROBE_FILE)]


def neutral_paragraphs() -> list[str]:
    return [p.strip() for p in NEUTRAL_FILE.read_text().split("\n\n") if p.strip()]


def _with_eos(text: str, eos: str | None) -> str:
    return text if not eos or text.endswith(eos) else text + eos


def encode_pairs(tokenizer, rows: list[dict], indices: list[int], split: str,
                 max_length: int) -> tuple[list[Pair], int]:
    """Token ids as TRL's DPOTrainer builds them; returns (pairs, number dropped as fully truncated).

    The prompt is the shorter of the two prompt/completion splits (TRL's `prompt_len = min(...)`);
    prompt + completion is cut to `max_length` keeping the start; a pair whose prompt alone fills
    `max_length` has no completion token left and is dropped, as TRL drops it.
    """
    pairs, dropped = [], 0
    for index, row in zip(indices, rows, strict=True):
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if not isinstance(prompt, list):  # TRL appends EOS to plain-string completions
            chosen, rejected = _with_eos(chosen, tokenizer.eos_token), _with_eos(rejected, tokenizer.eos_token)
        p_c, c = D.tokenize_pair(tokenizer, prompt, chosen)
        p_r, r = D.tokenize_pair(tokenizer, prompt, rejected)
        n = min(len(p_c), len(p_r))
        full_c, full_r = p_c + c, p_r + r
        if n >= max_length:
            dropped += 1
            continue
        pairs.append(Pair(split, index, str(row.get("category", "") or ""), full_c[:n],
                          full_c[n:max_length], full_r[n:max_length]))
    return pairs, dropped


# ---------------------------------------------------------------- before / after


@dataclass
class Baseline:
    """The reference's numbers, taken before training (or with the adapter disabled)."""

    setup: Setup
    pairs: dict[str, list[Pair]]
    dropped: dict[str, int]
    logps: dict[str, list[tuple[float, float]]]
    probe_sequences: list[tuple[list[int], int]]
    probe_logprobs: list[torch.Tensor]
    ppl: float
    weights: dict[str, torch.Tensor] | None  # full methods: trainable tensors before training
    seconds: float = 0.0


def before(model, tokenizer, setup: Setup, *, keep_weights: bool | None = None, cache=None) -> Baseline:
    """Score everything under the reference. `keep_weights` defaults to: not a PEFT model. With a
    `refcache.ReferenceCache`, each part (the evaluation pairs with the probes and the neutral text; the training
    pairs) is read from the cache when an entry with the same content key exists, and stored otherwise."""
    t0 = time.monotonic()
    pad = tokenizer.pad_token_id
    pairs, dropped = {}, {}
    pairs["eval"], dropped["eval"] = encode_pairs(tokenizer, setup.eval_rows, setup.eval_indices, "eval",
                                                  setup.max_length)
    if setup.train_rows is not None:
        pairs["train"], dropped["train"] = encode_pairs(tokenizer, setup.train_rows, setup.train_indices, "train",
                                                        setup.max_length)
    logps: dict[str, list[tuple[float, float]]] = {}
    with inference(model), reference_of(model):
        content = {"pairs": _pair_ids(pairs["eval"]), "batch_size": setup.batch_size, "scoring": SCORING,
                   "probes": [prompt_ids(tokenizer, p) for p in setup.probe_prompts],
                   "probe_length": setup.probe_length, "eos": tokenizer.eos_token_id, "pad": pad,
                   "neutral": [list(tokenizer(text=p)["input_ids"]) for p in setup.neutral_text],
                   "max_length": setup.max_length}
        key = cache.key("eval", content) if cache is not None else None
        with _measuring(cache, key):
            logps["eval"], probes, probe_lp, ppl = _reference_eval(model, tokenizer, setup, pairs["eval"], pad,
                                                                   cache, key)
        if "train" in pairs:
            content = {"pairs": _pair_ids(pairs["train"]), "batch_size": setup.batch_size, "scoring": SCORING}
            key = cache.key("train", content) if cache is not None else None
            with _measuring(cache, key):
                hit = cache.get("train", key) if cache is not None else None
                if hit is not None and len(hit["logps"]) == len(pairs["train"]):
                    logps["train"] = [tuple(x) for x in hit["logps"]]
                else:
                    logps["train"] = pair_logps(model, pairs["train"], pad, setup.batch_size)
                    if cache is not None:
                        cache.put("train", key, {"logps": logps["train"]})
    if keep_weights is None:
        keep_weights = not is_peft(model)
    weights = snapshot(model) if keep_weights else None
    return Baseline(setup, pairs, dropped, logps, probes, probe_lp, ppl, weights, time.monotonic() - t0)


def _measuring(cache, key):
    """The cache's lock on `key` (variants running at once measure a shared reference once), if there is one."""
    return cache.measuring(key) if cache is not None else contextlib.nullcontext()


def _reference_eval(model, tokenizer, setup: Setup, pairs: list[Pair], pad: int, cache, key):
    """The reference's held-out log-probs, probe completions, their distributions and the neutral-text
    perplexity: from the cache, or measured (and stored)."""
    hit = cache.get("eval", key) if cache is not None else None
    if hit is not None and len(hit["logps"]) == len(pairs):
        logps = [tuple(x) for x in hit["logps"]]
        probes = [(list(ids), n) for ids, n in hit["probes"]]
        return logps, probes, [hit["tensors"][f"probe_{i}"] for i in range(len(probes))], hit["ppl"]
    logps = pair_logps(model, pairs, pad, setup.batch_size)
    # all probes in one batch: decoding reads every weight once per new token, whatever the batch, so one batch
    # of 16 takes about as long as one of 8 (on the 2-core CPU: 6-7 s against 10-11 s for two)
    probes = greedy_completions(model, tokenizer, setup.probe_prompts, setup.probe_length,
                                max(setup.batch_size, len(setup.probe_prompts)))
    probe_lp = position_logprobs(model, probes, pad, setup.batch_size)
    ppl = perplexity(model, tokenizer, setup.neutral_text, setup.max_length, setup.batch_size)
    if cache is not None:
        cache.put("eval", key, {"logps": logps, "probes": probes, "ppl": ppl},
                  {f"probe_{i}": t for i, t in enumerate(probe_lp)})
    return logps, probes, probe_lp, ppl


def _pair_ids(pairs: list[Pair]) -> list:
    return [[p.index, p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in pairs]


def pair_rows(pairs: list[Pair], before_: list[tuple[float, float]],
              after_: list[tuple[float, float]] | None, beta: float | None) -> list[dict]:
    """Rows of the per-pair table (schema in the module docstring)."""
    rows = []
    for i, p in enumerate(pairs):
        n_c, n_r = len(p.chosen_ids), len(p.rejected_ids)
        row: dict[str, Any] = {"split": p.split, "pair": p.index, "category": p.category,
                               "n_prompt": len(p.prompt_ids), "n_chosen": n_c, "n_rejected": n_r}
        c0, r0 = before_[i]
        if after_ is None:
            row.update(logp_chosen=c0, logp_rejected=r0, margin=c0 - r0, norm_margin=c0 / n_c - r0 / n_r)
            rows.append(row)
            continue
        c1, r1 = after_[i]
        row.update(logp_chosen_before=c0, logp_rejected_before=r0, logp_chosen_after=c1, logp_rejected_after=r1,
                   margin_before=c0 - r0, margin_after=c1 - r1, margin_shift=(c1 - r1) - (c0 - r0),
                   norm_margin_before=c0 / n_c - r0 / n_r, norm_margin_after=c1 / n_c - r1 / n_r)
        row["norm_margin_shift"] = row["norm_margin_after"] - row["norm_margin_before"]
        row.update(chosen_shift=c1 - c0, rejected_shift=r1 - r0, displaced=int(c1 < c0 and r1 < r0),
                   implicit_reward_margin=beta * row["margin_shift"] if beta is not None else None)
        rows.append(row)
    return rows


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(rows: list[dict], prefix: str, dropped: int) -> dict[str, float]:
    """The `<prefix>/...` summary metrics of one split's per-pair rows."""
    out: dict[str, float] = {f"{prefix}/pairs": len(rows), f"{prefix}/dropped": dropped}
    if not rows:
        return out
    if "margin" in rows[0]:  # a single model
        out[f"{prefix}/margin_mean"] = _mean(r["margin"] for r in rows)
        out[f"{prefix}/norm_margin_mean"] = _mean(r["norm_margin"] for r in rows)
        out[f"{prefix}/accuracy"] = _mean(r["margin"] > 0 for r in rows)
        return out
    for key in ("margin_before", "margin_after", "margin_shift", "norm_margin_before", "norm_margin_after",
                "norm_margin_shift", "chosen_shift", "rejected_shift"):
        out[f"{prefix}/{key}_mean"] = _mean(r[key] for r in rows)
    shifts = [r["margin_shift"] for r in rows]
    mean = out[f"{prefix}/margin_shift_mean"]
    out[f"{prefix}/margin_shift_std"] = math.sqrt(_mean((s - mean) ** 2 for s in shifts))
    out[f"{prefix}/accuracy_before"] = _mean(r["margin_before"] > 0 for r in rows)
    out[f"{prefix}/accuracy_after"] = _mean(r["margin_after"] > 0 for r in rows)
    out[f"{prefix}/displaced_frac"] = _mean(r["displaced"] for r in rows)
    if rows[0]["implicit_reward_margin"] is not None:
        out[f"{prefix}/implicit_reward_margin_mean"] = _mean(r["implicit_reward_margin"] for r in rows)
    return out


def after(model, tokenizer, baseline: Baseline) -> tuple[list[dict], dict[str, float]]:
    """Score the trained model against the baseline: per-pair rows and summary metrics."""
    t0 = time.monotonic()
    setup, pad = baseline.setup, tokenizer.pad_token_id
    rows: list[dict] = []
    metrics: dict[str, float] = {}
    with inference(model):
        for split, pairs in baseline.pairs.items():
            now = pair_logps(model, pairs, pad, setup.batch_size)
            split_rows = pair_rows(pairs, baseline.logps[split], now, setup.beta)
            metrics.update(summarise(split_rows, SPLITS[split], baseline.dropped[split]))
            rows += split_rows
        kl, kl_tokens = kl_to_reference(model, baseline.probe_sequences, baseline.probe_logprobs, pad,
                                        setup.batch_size)
        ppl = perplexity(model, tokenizer, setup.neutral_text, setup.max_length, setup.batch_size)
    metrics.update({"drift/kl_mean": kl, "drift/kl_tokens": kl_tokens, "drift/ppl_before": baseline.ppl,
                    "drift/ppl_after": ppl, "drift/ppl_change": ppl - baseline.ppl})
    if baseline.weights is not None:
        metrics["drift/weight_delta_norm"] = delta_norm(model, baseline.weights)
    elif is_peft(model):
        metrics["drift/weight_delta_norm"] = lora_delta_norm(model)
    metrics["eval/seconds"] = baseline.seconds + time.monotonic() - t0
    return rows, metrics


def margin_shifts_now(model, tokenizer, baseline: Baseline) -> list[float]:
    """Each eval-split pair's margin shift under the model as it is now (for intermediate evaluation)."""
    with inference(model):
        now = pair_logps(model, baseline.pairs["eval"], tokenizer.pad_token_id, baseline.setup.batch_size)
    return [(c1 - r1) - (c0 - r0) for (c0, r0), (c1, r1) in zip(baseline.logps["eval"], now, strict=True)]


def margin_shift_now(model, tokenizer, baseline: Baseline) -> float:
    """Mean eval-split margin shift of the model as it is now."""
    return _mean(margin_shifts_now(model, tokenizer, baseline))


class IntermediateEval(TrainerCallback):
    """Every `every` optimiser steps, log the eval-split `eval/margin_shift_mean` at that step.

    The executor hears it too, with the pairs' standard deviation and count: a search reports the mean to its
    pruner, `run --race` builds an interval from all three. The final step is left to `after()`, which logs
    the same metric there.
    """

    def __init__(self, model, tokenizer, baseline: Baseline, every: int, tracker, emit=None):
        self.model, self.tokenizer, self.baseline = model, tokenizer, baseline
        self.every, self.tracker = every, tracker
        self.emit = emit or (lambda **event: None)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.every == 0 and step < state.max_steps:
            shifts = margin_shifts_now(self.model, self.tokenizer, self.baseline)
            shift = _mean(shifts)
            sd = math.sqrt(sum((s - shift) ** 2 for s in shifts) / (len(shifts) - 1)) if len(shifts) > 1 else 0.0
            self.tracker.log_metrics({"eval/margin_shift_mean": shift}, step=step)
            self.emit(event="intermediate", intermediate={"step": step, "eval/margin_shift_mean": shift,
                                                          "sd": sd, "n": len(shifts)})


def write_table(rows: list[dict], path: Path) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def measure(model, tokenizer, setup: Setup, reference=None) -> tuple[list[dict], dict[str, float]]:
    """Measure without training (`python -m harness evaluate`).

    - `model` a PEFT model, `reference` None: the reference is `model` with its adapter disabled.
    - `reference` another model: `model` is scored against it (drift and weight change included).
    - neither: `model` is scored on its own (logp/margin columns, `<s>/margin_mean`, `<s>/accuracy`).
    """
    if reference is None and not is_peft(model):
        t0 = time.monotonic()
        pad, rows, metrics = tokenizer.pad_token_id, [], {}
        for split, data, indices in (("eval", setup.eval_rows, setup.eval_indices),
                                     ("train", setup.train_rows, setup.train_indices)):
            if data is None:
                continue
            pairs, dropped = encode_pairs(tokenizer, data, indices, split, setup.max_length)
            with inference(model):
                split_rows = pair_rows(pairs, pair_logps(model, pairs, pad, setup.batch_size), None, setup.beta)
            metrics.update(summarise(split_rows, SPLITS[split], dropped))
            rows += split_rows
        with inference(model):
            metrics["drift/ppl"] = perplexity(model, tokenizer, setup.neutral_text, setup.max_length,
                                                    setup.batch_size)
        metrics["eval/seconds"] = time.monotonic() - t0
        return rows, metrics
    baseline = before(reference if reference is not None else model, tokenizer, setup,
                      keep_weights=reference is not None)
    return after(model, tokenizer, baseline)
