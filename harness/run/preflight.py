"""Checks that need torch, run by `harness run` (and `harness validate --deep`) before anything trains.

They catch what the YAML alone cannot: LoRA modules the model does not have, layer indices past its
depth, bf16 on a device without it, conversational data for a tokenizer without a chat template. Every
problem is collected and reported at once, each naming the file and key path.
"""

from __future__ import annotations

from pathlib import Path

from experiments import data as D
from experiments import device as dev
from experiments import models as M
from harness.core.variant import Variant
from harness.grid import Grid


def check(grid: Grid, device: str) -> list[str]:
    return check_variants(grid.path, grid.variants, device)


def check_variants(path, variants: list[Variant], device: str | None) -> list[str]:
    """Every problem found before training; `device` None: the variants train on devices this machine cannot
    see (a Ray cluster's GPUs), so their precision is left to each worker to check."""
    errors: list[str] = []
    skeletons: dict[str, object] = {}
    tokenizers: dict[str, object] = {}
    audits: dict[tuple, bool] = {}  # (model, file, selection, max_length) -> every row fully truncated
    for v in variants:
        spec, where = v.spec, f"{path}: {v.source}"
        try:
            if device is not None:
                dev.resolve_precision(spec.train.precision, device)
        except dev.VariantError as e:
            errors.append(f"{where}: {e}")
        name = spec.base_model
        grid_dir = Path(v.grid_dir)
        if name not in skeletons:
            try:
                skeletons[name] = M.skeleton(name, grid_dir)
                tokenizers[name] = M.load_tokenizer(name, grid_dir)
            except Exception as e:  # noqa: BLE001 - any load failure is a reason not to start
                skeletons[name] = tokenizers[name] = None
                errors.append(f"{where}: base_model: cannot load {name!r}: {type(e).__name__}: {e}")
        local = M.local_path(name, grid_dir)
        if local is not None and not list(local.glob("*.safetensors")):
            errors.append(f"{where}: base_model: {local} has no .safetensors weights; harness loads only "
                          f"safetensors (convert with save_pretrained(..., safe_serialization=True))")
        model, tok = skeletons[name], tokenizers[name]
        if model is None:
            continue
        method = spec.method_record
        if method.uses_lora:
            try:
                targets, layers = M.resolve_lora_targets(spec.lora.targets, model)
            except M.ModelError as e:
                errors.append(f"{where}: lora.targets: {e}")
            else:
                smallest = M.smallest_linear_dim(model, targets, layers)
                if smallest and spec.lora.rank > smallest:
                    errors.append(f"{where}: lora.rank: {spec.lora.rank} is more than {smallest}, the smallest "
                                  f"dimension of the targeted modules ({', '.join(targets)}) of {name}; a LoRA update "
                                  f"has rank at most that, so a higher rank only adds memory (use 1..{smallest})")
        if method.uses("partial_ft"):
            try:
                M.select_layers(spec.partial_ft.layers, M.num_layers(model))
            except M.ModelError as e:
                errors.append(f"{where}: partial_ft.layers: {e}")
        if tok is not None and spec.chat_template is not None:
            try:
                template = M.chat_template_text(spec.chat_template, model.config.model_type, tok, grid_dir)
            except M.ModelError as e:
                errors.append(f"{where}: chat_template: {e}")
            else:
                tok = _with_template(tok, template)
        for key in ("train", "eval"):
            rows = D.read_rows(Path(v.data_paths[key]))
            first = rows[0]
            conversational = isinstance(first.get("prompt", first.get("messages")), list)
            if conversational and not getattr(tok, "chat_template", None):
                errors.append(f"{where}: data.{key}: {v.data_paths[key]} is conversational but {name}'s tokenizer "
                              f"has no chat template; declare how the model sees a conversation (chat_template: "
                              f"family, chatml, plain or a .jinja file), or use plain-string data")
        if tok is not None:
            errors.extend(f"{where}: {e}" for e in _usable_under_max_length(v, tok, audits))
            problem = _probe_fits(spec.eval.probe_length, model, tok, name)
            if problem:
                errors.append(f"{where}: eval.probe_length: {problem}")
        if device is not None:
            problem = _fits(spec, model, device)
            if problem:
                errors.append(f"{where}: memory: {problem}")
        if tok is not None and tok.pad_token is None and tok.eos_token is None:
            errors.append(f"{where}: base_model: {name}'s tokenizer has neither a pad nor an eos token")
    return list(dict.fromkeys(errors))


def _usable_under_max_length(v, tok, audits: dict[tuple, bool]) -> list[str]:
    """A data.max_length so small that the prompt alone fills it for every selected training row (or every
    evaluation pair) leaves nothing to train on or measure: the variant would only fail once started."""
    spec, out = v.spec, []
    sides = (("train", spec.data.size, spec.method_record.data_kind), ("eval", None, "preference"))
    for key, size, kind in sides:
        path = v.data_paths[key]
        cache = (spec.base_model, path, size, spec.data.shuffle_seed, kind, spec.data.max_length)
        if cache not in audits:
            rows = D.select(D.read_rows(Path(path)), size, spec.data.shuffle_seed) if key == "train" \
                else D.read_rows(Path(path))
            rows = D.preference_rows(rows) if kind == "preference" else D.sft_rows(rows)
            try:
                report = D.audit(rows, tok, spec.data.max_length, kind)
                audits[cache] = bool(rows) and report["fully_truncated"] == len(rows)
            except D.DataError:
                audits[cache] = False  # conversational data without a chat template: reported above
        if audits[cache]:
            out.append(f"data.max_length: {spec.data.max_length} tokens: the prompt alone fills it for every "
                       f"{'selected training row' if key == 'train' else 'evaluation pair'} of {path}, so nothing "
                       f"is left to {'train on' if key == 'train' else 'measure'}; raise data.max_length")
    return out


def _probe_fits(length: int, model, tok, name: str) -> str | None:
    """The drift probes generate `length` tokens after each probe prompt: past the model's positions that is
    an error deep inside generation (or, with rotary embeddings, hours of extrapolated nonsense)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if not positions:
        return None
    from experiments import evaluate as E

    longest = 0
    for prompt in E.probe_prompts():
        if isinstance(prompt, list):
            if not getattr(tok, "chat_template", None):
                continue  # conversational probes on a model without a template: reported as a data problem
            ids = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
            longest = max(longest, len(ids["input_ids"]))
        else:
            longest = max(longest, len(tok(text=prompt)["input_ids"]))
    if longest + length <= positions:
        return None
    return (f"{length} tokens after probe prompts of up to {longest} tokens exceed {name}'s {positions} positions "
            f"(max_position_embeddings); use at most {max(positions - longest, 1)}")


def _with_template(tok, template: str):
    """A copy of a (shared, cached) tokenizer with this variant's declared chat template."""
    import copy

    tok = copy.copy(tok)
    tok.chat_template = template
    return tok


def _fits(spec, model, device: str) -> str | None:
    """The memory model's estimate (at data.max_length: an upper bound) against what the device holds."""
    from experiments import memory

    try:
        precision, base_dtype = memory.resolved(spec, device)
        est = memory.estimate(spec, model, device=device, precision=precision, base_dtype=base_dtype)
    except Exception:  # noqa: BLE001 - other checks report a model or setting that cannot be resolved
        return None
    return memory.refusal(spec, est, memory.capacity(device), device)
