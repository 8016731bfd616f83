"""Which device a variant trains on and in which precision, and the error a variant that cannot run raises.

torch only: the pre-flight check in the process that runs the grid reads these without importing the training
stack (transformers' Trainer, PEFT, TRL), which the workers import for themselves.
"""

from __future__ import annotations

import contextlib

import torch


class VariantError(RuntimeError):
    """A variant cannot run (bad data, bad module names, unsupported precision...); message says why."""


def pick_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return device == "cpu"  # CPU autocast supports bf16 (slow but correct); MPS autocast does not train it well


def resolve_precision(requested: str, device: str) -> str:
    """auto -> bf16 on a GPU that supports it, else fp32. Explicit bf16/fp16 where unsupported is an error."""
    if requested == "auto":
        return "bf16" if device == "cuda" and bf16_supported(device) else "fp32"
    if requested == "bf16" and not bf16_supported(device):
        raise VariantError(f"train.precision: bf16 is not supported on {device}; use precision: auto or fp32")
    if requested == "fp16" and device != "cuda":
        raise VariantError(f"train.precision: fp16 mixed precision needs a CUDA GPU, this is {device}; "
                           f"use precision: auto or fp32")
    return requested


def resolve_base_dtype(requested: str, device: str, precision: str, uses_lora: bool) -> str:
    """Where a frozen base is stored: auto -> bf16 for a LoRA method computing in bf16 (a GPU's default), else
    fp32. bf16 is refused for a method that trains the base, and without bf16 compute (fp32 activations cannot
    meet bf16 weights in a matmul)."""
    if requested == "auto":
        return "bf16" if uses_lora and precision == "bf16" and device == "cuda" else "fp32"
    if requested == "bf16" and not uses_lora:
        raise VariantError("train.base_dtype: bf16 stores a frozen base; this method trains the base itself, which "
                           "stays fp32 (use base_dtype: auto or fp32)")
    if requested == "bf16" and precision != "bf16":
        raise VariantError(f"train.base_dtype: a bf16 base needs bf16 compute, and this variant computes in "
                           f"{precision}; set train.precision: bf16 (on a CPU too) or base_dtype: fp32")
    return requested


@contextlib.contextmanager
def fp32_weights(model):
    """The model's bf16/fp16 parameters upcast to fp32 for the duration (exact), and rounded back after (exact
    too: the values came from that dtype), so a bf16-stored base is measured in fp32 as the model it is."""
    lowered = [(p, p.dtype) for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)]
    for p, _ in lowered:
        p.data = p.data.float()
    try:
        yield model
    finally:
        for p, dtype in lowered:
            p.data = p.data.to(dtype)
