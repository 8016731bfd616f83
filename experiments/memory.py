"""What a variant needs in memory, estimated from its spec and the model's shape alone, before anything loads.

The model is built on torch's meta device (`models.skeleton`): names and shapes, nothing allocated, so an
8B shape can be planned on a 24 GB machine. The estimate is a sum of named parts, each a formula a reader can
check (bytes):

    weights      every parameter of the base, in the dtype it is stored in (fp32 here; bf16 where set)
    trainable    the trained parameters' gradient (fp32) and AdamW's two moments (fp32); a LoRA adapter's own
                 fp32 weights too: 16 B a LoRA parameter, 12 B a trained base parameter
    activations  what backward keeps, per decoder layer and token: the inputs of the attention projections and
                 the MLP, the attention and MLP outputs (≈ 8 × hidden + 4 × intermediate values), for every
                 sequence of a step (a preference pair is two); with gradient checkpointing, one hidden state
                 per layer and token plus one layer's worth. Attention scores are not kept (SDPA).
    logits       the vocabulary's scores for every token of a step in fp32, three times over (logits, their
                 log-softmax, its gradient): the part that dominates a 262k-token vocabulary
    reference    a DPO reference forward without gradients (logits twice), when TRL computes it per step
    measurement  the before/after scoring: `eval.batch_size` sequences' logits twice, in fp32
    probes       the drift probes' next-token distributions (probe prompts × `eval.probe_length` × vocabulary,
                 fp32): the reference's are held from before training to after it, the trained model's join
                 them while measuring
    runtime      the interpreter, torch, transformers and TRL themselves on a CPU (measured: ~0.9 GB)

Peak = weights + trainable + runtime + probes/2 + the largest of (activations + logits, reference,
measurement + probes/2): the three happen one after another, never at once.

    python -m harness plan grid.yaml --memory     # the estimate per variant
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1e9
CPU_RUNTIME = 0.9 * GB  # python + torch + transformers + TRL + MLflow client, resident before the model loads


@dataclass
class Estimate:
    parts: dict[str, float] = field(default_factory=dict)  # name -> bytes
    peak: float = 0.0
    notes: list[str] = field(default_factory=list)

    def gb(self, part: str | None = None) -> float:
        return (self.parts[part] if part else self.peak) / GB

    def line(self) -> str:
        shown = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.parts.items() if v)
        return f"{self.peak / GB:.2f} GB ({shown})"


def _dtype_bytes(name: str) -> int:
    return {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}[name]


def estimate(spec, model, *, device: str = "cpu", precision: str = "fp32", base_dtype: str = "fp32",
             longest: int | None = None, probe_prompts: int = 16) -> Estimate:
    """The memory a variant needs at its peak. `model`: the skeleton (meta device) of its base model.
    `longest`: the longest tokenised pair of its data, when known (batches are padded to their longest
    sequence); else `data.max_length`, which makes the estimate an upper bound. `probe_prompts`: how many
    drift probes the measurement generates from (the built-in set has 16)."""
    from experiments import models as M

    config = model.config
    text = getattr(config, "text_config", None) or config
    hidden, inter = int(text.hidden_size), int(getattr(text, "intermediate_size", 4 * text.hidden_size))
    vocab, layers = int(text.vocab_size), M.num_layers(model)
    n_params = sum(p.numel() for p in model.parameters())
    method = spec.method_record
    act_bytes = _dtype_bytes(precision)

    trained_base, lora = 0, 0
    if method.uses_lora:
        targets, chosen_layers = M.resolve_lora_targets(spec.lora.targets, model)
        lora = _lora_params(model, targets, chosen_layers, spec.lora.rank)
    elif method.uses("partial_ft"):
        chosen = set(M.select_layers(spec.partial_ft.layers, layers))
        trained_base = sum(p.numel() for n, p in model.named_parameters() if _layer(n) in chosen)
    else:
        trained_base = n_params
    base_bytes = _dtype_bytes(base_dtype) if method.uses_lora else 4  # a trained base stays fp32

    length = min(spec.data.max_length, longest) if longest else spec.data.max_length
    seqs = spec.train.batch_size * (2 if method.data_kind == "preference" else 1)
    tokens = seqs * length
    per_layer = tokens * (8 * hidden + 4 * inter) * act_bytes
    if spec.train.gradient_checkpointing:
        activations = layers * tokens * hidden * act_bytes + per_layer
    else:
        activations = layers * per_layer
    parts = {
        "weights": n_params * base_bytes,
        "trainable": 16 * lora + 12 * trained_base,
        "activations": activations,
        "logits": 3 * tokens * vocab * 4,
        "reference": 2 * tokens * vocab * 4 if method.uses("dpo") else 0,
        "measurement": 2 * spec.eval.batch_size * length * vocab * 4
                       + (n_params * 4 if base_bytes < 4 else 0),  # scoring upcasts a bf16 base to fp32
        "probes": 2 * probe_prompts * spec.eval.probe_length * vocab * 4,
        "runtime": CPU_RUNTIME if device == "cpu" else 0,
    }
    held = parts["probes"] / 2  # the reference's distributions, from before training until after it
    peak = parts["weights"] + parts["trainable"] + parts["runtime"] + held + max(
        parts["activations"] + parts["logits"], parts["reference"], parts["measurement"] + held)
    return Estimate(parts=parts, peak=peak)


def _layer(name: str) -> int | None:
    import re

    found = re.search(r"\.layers\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def _lora_params(model, targets: list[str], layers: list[int] | None, rank: int) -> int:
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            index = _layer(name)
            if index is not None and (layers is None or index in layers):
                total += rank * (module.in_features + module.out_features)
    return total


def measured_peak(device: str) -> float:
    """What this process has used at its peak, in bytes: allocated CUDA memory on a GPU, resident memory on
    a CPU (the process's own high-water mark)."""
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.max_memory_allocated())
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kB on Linux


def capacity(device: str) -> float:
    """What the device holds, in bytes: a GPU's total memory, or this machine's physical memory on a CPU
    (the total, not what happens to be free now, so the same grid is judged the same way each time)."""
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.mem_get_info()[1])
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def resolved(spec, device: str) -> tuple[str, str]:
    """(precision, base dtype) this variant will use on `device`, as the worker resolves them."""
    from experiments import device as dev

    precision = dev.resolve_precision(spec.train.precision, device)
    return precision, dev.resolve_base_dtype(spec.train.base_dtype, device, precision,
                                             spec.method_record.uses_lora)


def refusal(spec, est: Estimate, limit: float, device: str) -> str | None:
    """Why the variant cannot fit (naming what would make it fit), or None."""
    if est.peak <= limit:
        return None
    options = []
    if spec.method_record.uses_lora and est.parts["weights"] and spec.train.base_dtype != "bf16":
        options.append(f"train.base_dtype: bf16 (with precision: bf16) halves the weights' "
                       f"{est.gb('weights'):.1f} GB")
    if not spec.train.gradient_checkpointing and est.parts["activations"]:
        options.append(f"train.gradient_checkpointing: true (activations {est.gb('activations'):.1f} GB)")
    if spec.train.batch_size > 1:
        options.append(f"a smaller train.batch_size (now {spec.train.batch_size}) with train.grad_accum")
    options.append(f"a smaller data.max_length (now {spec.data.max_length}; logits "
                   f"{est.gb('logits'):.1f} GB, measurement {est.gb('measurement'):.1f} GB)")
    if spec.method_record.uses_lora and spec.lora.targets not in ("qv",):
        options.append("fewer lora.targets")
    return (f"needs about {est.gb():.1f} GB at its peak ({est.line()}) and the {device} holds "
            f"{limit / GB:.1f} GB; to fit: " + "; ".join(options))
