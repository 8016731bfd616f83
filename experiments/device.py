"""Which device a variant trains on and in which precision, and the error a variant that cannot run raises.

torch only: the pre-flight check in the process that runs the grid reads these without importing the training
stack (transformers' Trainer, PEFT, TRL), which the workers import for themselves.
"""

from __future__ import annotations

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
