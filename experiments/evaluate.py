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

PROBE_FILE = D.BUILTIN_DIR / "probe_prompts.jsonl"
NEUTRAL_FILE = D.BUILTIN_DIR / "neutral_text.txt"
SPLITS = {"eval": "eval", "train": "train_pairs"}  # split -> metric prefix
# How the reference side is computed, part of its cache key: an entry scored another way (here: before the
# prompt was shared between the two sides, or probes generated in other batches) is not mixed with new scores.
SCORING = "shared-prompt-v1"
SHARE_BELOW = 0.8  # pair_logps shares the prompt when that leaves fewer than this share of the tokens


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Pair:
    split: str
    index: int  # row in its data file
    category: str
    prompt_ids: list[int]
    chosen_ids: list[int]  # after truncation
    rejected_ids: list[int]


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


# ---------------------------------------------------------------- scoring


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def reference_of(model):
    """Context in which `model` computes as the reference: adapter disabled for PEFT models."""
    return model.disable_adapter() if is_peft(model) else contextlib.nullcontext()


@contextlib.contextmanager
def inference(model):
    """Eval mode, no grad and the model's own precision, restoring all three afterwards (intermediate evals
    run mid-training).

    A Trainer with bf16/fp16 has Accelerate replace the model's `forward` by an autocast-wrapped one that stays
    after training; measured through it, "after" would compute in bf16 while "before" computed in fp32, and the
    difference would be rounding noise, not training. So the original forward is put back for the measurement
    and autocast is off: every score is computed in the weights' dtype (fp32 in the harness)."""
    was_training = model.training
    wrapped = model.__dict__.get("forward")
    original = model.__dict__.get("_original_forward")  # Accelerate's record of the forward it wrapped
    if wrapped is not None and original is not None:
        model.forward = original
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(_device(model).type, enabled=False):
            yield
    finally:
        if wrapped is not None and original is not None:
            model.forward = wrapped
        model.train(was_training)


def _device(model):
    return next(model.parameters()).device


def _batches(seqs: list[tuple[list[int], int]], batch_size: int):
    """Longest first, so padding is small; yields (positions in `seqs`, batch)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, [seqs[i] for i in idx]


def _keeps_logits(model) -> bool:
    """Whether the model's forward can compute logits at chosen positions only (`logits_to_keep`)."""
    import inspect

    base = model.get_base_model() if is_peft(model) else model
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def _forward(model, batch: list[tuple[list[int], int]], pad_id: int):
    """Right-padded forward; returns (float32 logits, labels, completion mask), aligned so that logits[:, t]
    predicts labels[:, t]. Only positions from the earliest completion on are projected to the vocabulary
    (the LM head is a quarter of a small model's compute), when the model supports it."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    completion = torch.zeros((len(batch), width), dtype=torch.bool)
    for j, (ids, n_prompt) in enumerate(batch):
        input_ids[j, :len(ids)] = torch.tensor(ids)
        attention[j, :len(ids)] = 1
        completion[j, n_prompt:len(ids)] = True
    device = _device(model)
    start = max(0, min(n for _, n in batch) - 1)  # first position whose logits predict a completion token
    kwargs = {}
    if start > 0 and _keeps_logits(model):
        kwargs["logits_to_keep"] = torch.arange(start, width - 1, device=device)
    else:
        start = 0
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False,
                   **kwargs).logits
    if not kwargs:
        logits = logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()  # at least float32 for the softmax
    return logits, input_ids[:, start + 1:].to(device), completion[:, start + 1:].to(device)


def completion_logps(model, seqs: list[tuple[list[int], int]], pad_id: int, batch_size: int) -> list[float]:
    """Summed log-prob of tokens `n_prompt:` of each (ids, n_prompt) sequence."""
    out = [0.0] * len(seqs)
    for idx, batch in _batches(seqs, batch_size):
        logits, labels, mask = _forward(model, batch, pad_id)
        token_logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        sums = torch.where(mask, token_logp, 0.0).sum(1).tolist()
        for i, s in zip(idx, sums, strict=True):
            out[i] = s
    return out


def pair_logps(model, pairs: list[Pair], pad_id: int, batch_size: int) -> list[tuple[float, float]]:
    """(logp chosen, logp rejected) per pair. The prompt, common to both sides, is computed once per pair
    (`shared_prompt_logps`) when that passes at least `SHARE_BELOW` fewer tokens through the model
    (`planned_tokens`) and the model can continue from a key/value cache; otherwise each side is scored as one
    whole sequence. A token costs more in the continuation than in a whole sequence (every padded completion
    position goes through the vocabulary projection, and the attention reads the cache through an explicit
    mask): on the 2-core CPU the built-in pairs, 11% fewer tokens shared, took 17.0 s against 14.8 s whole, and
    the same pairs behind a ~290-token context, 37% fewer, 31.3 s against 48.4 s (`harness.bench.scoring`)."""
    if pairs and _keeps_logits(model) and not getattr(model.config, "is_encoder_decoder", False):
        plan = planned_tokens(pairs, batch_size)
        if plan["shared"] < SHARE_BELOW * plan["whole"]:
            shared = shared_prompt_logps(model, pairs, pad_id, batch_size)
            if shared is not None:
                return shared
    return separate_logps(model, pairs, pad_id, batch_size)


def planned_tokens(pairs: list[Pair], batch_size: int) -> dict[str, int]:
    """Tokens each way passes through the model, padding included: `whole` (`separate_logps`) and `shared`
    (`shared_prompt_logps`). Sharing the prompt saves a prompt per pair but pads both sides of a pair to the
    longer one, so with short prompts and sides of very different lengths it can cost more. `pair_logps`
    decides from these counts, which depend on the token ids and the batch size alone: the reference and the
    trained model are always scored the same way."""
    whole = 0
    for _, batch in _batches(_sides(pairs), batch_size):
        whole += len(batch) * max(len(ids) for ids, _ in batch)
    shared = 0
    for idx in _pair_batches(pairs, batch_size):
        batch = [pairs[i] for i in idx]
        shared += len(batch) * max(len(p.prompt_ids) for p in batch)
        shared += 2 * len(batch) * max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in batch)
    return {"whole": whole, "shared": shared}


def _sides(pairs: list[Pair]) -> list[tuple[list[int], int]]:
    seqs = []
    for p in pairs:
        seqs += [(p.prompt_ids + p.chosen_ids, len(p.prompt_ids)), (p.prompt_ids + p.rejected_ids, len(p.prompt_ids))]
    return seqs


def _pair_batches(pairs: list[Pair], batch_size: int):
    """Positions in `pairs`, `batch_size // 2` pairs at a time (a pair is two sequences), longest side first."""
    per_batch = max(1, batch_size // 2)
    order = sorted(range(len(pairs)), key=lambda i: -max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids)))
    for start in range(0, len(order), per_batch):
        yield order[start:start + per_batch]


def separate_logps(model, pairs: list[Pair], pad_id: int, batch_size: int) -> list[tuple[float, float]]:
    """(logp chosen, logp rejected) per pair, each side one right-padded sequence, prompt included."""
    flat = completion_logps(model, _sides(pairs), pad_id, batch_size)
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(pairs))]


def shared_prompt_logps(model, pairs: list[Pair], pad_id: int, batch_size: int) -> list[tuple[float, float]] | None:
    """(logp chosen, logp rejected) per pair, the prompt computed once for both sides; None when the model's
    forward returns no key/value cache that can be duplicated row by row.

    `batch_size // 2` pairs at a time (a pair is two sequences): the prompts, left-padded so that they all end
    in the same column, go through the model once, keeping their keys and values; the cache is duplicated per
    pair and the chosen and the rejected completions (right-padded) continue from it, positions counted from
    each prompt's real length. The first completion token is predicted by the prompt's last position, the others
    by the completion's own positions. The same sums as scoring each side whole, to float rounding (a test
    checks it against an independent computation). Worth it for long prompts (see `pair_logps`).
    """
    device = _device(model)
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
    for idx in _pair_batches(pairs, batch_size):
        batch = [pairs[i] for i in idx]
        width = max(len(p.prompt_ids) for p in batch)
        prompt = torch.full((len(batch), width), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, p in enumerate(batch):
            prompt[j, width - len(p.prompt_ids):] = torch.tensor(p.prompt_ids)
            prompt_mask[j, width - len(p.prompt_ids):] = 1
        positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
        first = model(input_ids=prompt.to(device), attention_mask=prompt_mask.to(device),
                      position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
        cache = first.past_key_values
        if not hasattr(cache, "batch_repeat_interleave"):
            return None
        cache.batch_repeat_interleave(2)  # rows: pair 0 chosen, pair 0 rejected, pair 1 chosen, ...
        sides = [ids for p in batch for ids in (p.chosen_ids, p.rejected_ids)]
        n_prompt = [len(p.prompt_ids) for p in batch for _ in range(2)]
        length = max(len(ids) for ids in sides)
        completion = torch.full((len(sides), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sides), length), dtype=torch.bool)
        for j, ids in enumerate(sides):
            completion[j, :len(ids)] = torch.tensor(ids)
            mask[j, :len(ids)] = True
        completion, mask = completion.to(device), mask.to(device)
        head = first.logits[:, -1].float().repeat_interleave(2, 0)  # predicts each side's first token
        sums = head.gather(-1, completion[:, :1]).squeeze(-1) - head.logsumexp(-1)
        sums = torch.where(mask[:, 0], sums, 0.0)
        if length > 1:
            attention = torch.cat([prompt_mask.repeat_interleave(2, 0).to(device), mask.long()], 1)
            positions = torch.tensor(n_prompt).unsqueeze(1) + torch.arange(length).unsqueeze(0)
            logits = model(input_ids=completion, attention_mask=attention, position_ids=positions.to(device),
                           past_key_values=cache, use_cache=True,
                           logits_to_keep=torch.arange(0, length - 1, device=device)).logits
            logits = logits if logits.dtype == torch.float64 else logits.float()
            token_logp = logits.gather(-1, completion[:, 1:].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
            sums = sums + torch.where(mask[:, 1:], token_logp, 0.0).sum(1)
        sums = sums.tolist()
        for j, i in enumerate(idx):
            out[i] = (sums[2 * j], sums[2 * j + 1])
    return out


def position_logprobs(model, seqs: list[tuple[list[int], int]], pad_id: int, batch_size: int) -> list[torch.Tensor]:
    """Full next-token log-distributions at the positions predicting tokens `n_prompt:` (CPU, float32)."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    for idx, batch in _batches(seqs, batch_size):
        logits, _, mask = _forward(model, batch, pad_id)
        logp = torch.log_softmax(logits, -1)
        for j, i in enumerate(idx):
            out[i] = logp[j][mask[j]].cpu()
    return out


def prompt_ids(tokenizer, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(text=D.text_of(prompt))["input_ids"])


def greedy_completions(model, tokenizer, prompts: list[Any], new_tokens: int,
                       batch_size: int) -> list[tuple[list[int], int]]:
    """(prompt + greedy completion ids, prompt length) per prompt; stops after the first EOS."""
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    eos = tokenizer.eos_token_id
    out = []
    device = _device(model)
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for j, ids in enumerate(batch):  # left padding: generation continues every row at the same column
            input_ids[j, width - len(ids):] = torch.tensor(ids)
            attention[j, width - len(ids):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   max_new_tokens=new_tokens, min_new_tokens=1, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                   temperature=None, top_p=None, top_k=None)
        for j, ids in enumerate(batch):
            new = generated[j, width:].tolist()
            if eos is not None and eos in new:
                new = new[:new.index(eos) + 1]
            out.append((ids + new, len(ids)))
    return out


def perplexity(model, tokenizer, paragraphs: list[str], max_length: int, batch_size: int) -> float:
    """exp(mean negative log-likelihood per predicted token) over the paragraphs (each cut to max_length)."""
    seqs = [(ids[:max_length], 1) for ids in (list(tokenizer(text=p)["input_ids"]) for p in paragraphs)]
    seqs = [s for s in seqs if len(s[0]) > 1]
    logps = completion_logps(model, seqs, tokenizer.pad_token_id, batch_size)
    tokens = sum(len(ids) - 1 for ids, _ in seqs)
    return math.exp(-sum(logps) / tokens) if tokens else float("nan")


def lora_delta_norm(model) -> float:
    """sqrt(sum over adapted modules of ||scale * B @ A||_F^2): the size of the adapter's weight change."""
    from peft.tuners.lora import LoraLayer

    total = 0.0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for name in module.active_adapters:
                if name in module.lora_A or name in getattr(module, "lora_embedding_A", {}):
                    delta = module.get_delta_weight(name).float()
                    total += float((delta * delta).sum())
    return math.sqrt(total)


def snapshot(model, *, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """CPU copies of the (trainable) parameters, for the weight-change norm of full methods."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
            if p.requires_grad or not trainable_only}


def delta_norm(model, before: dict[str, torch.Tensor]) -> float:
    """||theta_now - theta_before|| over the snapshot's tensors, accumulated tensor by tensor on CPU."""
    total, matched = 0.0, 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in before and before[name].shape == p.shape:
                d = p.detach().to("cpu", torch.float64) - before[name].to(torch.float64)
                total += float((d * d).sum())
                matched += 1
    return math.sqrt(total) if matched else float("nan")


def kl_to_reference(model, sequences: list[tuple[list[int], int]], reference: list[torch.Tensor], pad_id: int,
                    batch_size: int) -> tuple[float, int]:
    """Mean over the completion tokens of KL(policy || reference) of the next-token distributions."""
    policy = position_logprobs(model, sequences, pad_id, batch_size)
    total, tokens = 0.0, 0
    for pol, ref in zip(policy, reference, strict=True):
        total += float((pol.exp() * (pol - ref)).sum())
        tokens += pol.shape[0]
    return (total / tokens if tokens else float("nan")), tokens


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


def margin_shift_now(model, tokenizer, baseline: Baseline) -> float:
    """Mean eval-split margin shift of the model as it is now (for intermediate evaluation)."""
    with inference(model):
        now = pair_logps(model, baseline.pairs["eval"], tokenizer.pad_token_id, baseline.setup.batch_size)
    return _mean((c1 - r1) - (c0 - r0) for (c0, r0), (c1, r1) in zip(baseline.logps["eval"], now, strict=True))


class IntermediateEval(TrainerCallback):
    """Every `every` optimiser steps, log the eval-split `eval/margin_shift_mean` at that step.

    The final step is left to `after()`, which logs the same metric there.
    """

    def __init__(self, model, tokenizer, baseline: Baseline, every: int, tracker, emit=None):
        self.model, self.tokenizer, self.baseline = model, tokenizer, baseline
        self.every, self.tracker = every, tracker
        self.emit = emit or (lambda **event: None)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.every == 0 and step < state.max_steps:
            shift = margin_shift_now(self.model, self.tokenizer, self.baseline)
            self.tracker.log_metrics({"eval/margin_shift_mean": shift}, step=step)
            # the executor hears it too: a search reports it to its pruner
            self.emit(event="intermediate", intermediate={"step": step, "eval/margin_shift_mean": shift})


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
