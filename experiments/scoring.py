"""Scoring a model: the forward passes the measurement is made of (`experiments.evaluate` composes them).

A *pair* is a prompt and two completions as token ids, cut as TRL's DPOTrainer cuts them. From a model this
computes, always in fp32 and in inference mode (no dropout, no gradients): the summed log-prob of each
completion given its prompt (`pair_logps`: the prompt run once for both sides from its key/value cache when
that passes fewer tokens, else each side whole), per-position log-probs and greedy completions (the drift
probes), perplexity on neutral text, KL to the reference's stored log-probs, and the norm of a weight change.
What the numbers mean, and the per-pair table they fill, is said in `experiments.evaluate`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from experiments import data as D

SHARE_BELOW = 0.8  # pair_logps shares the prompt when that leaves fewer than this share of the tokens


@dataclass(frozen=True)
class Pair:
    split: str
    index: int  # row in its data file
    category: str
    prompt_ids: list[int]
    chosen_ids: list[int]  # after truncation
    rejected_ids: list[int]




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
