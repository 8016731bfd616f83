"""Fault injection for the fault-tolerance tests: make one variant fail in a chosen way at a chosen step.

    HARNESS_FAULT="nan:<name>:<step>"   the model's logits become NaN from that step on (a real NaN loss)
    HARNESS_FAULT="oom:<name>:<step>"   torch.OutOfMemoryError is raised at that step
    HARNESS_FAULT="raise:<name>:<step>" RuntimeError is raised at that step
    HARNESS_FAULT="sleep:<name>:<step>" each step from then on sleeps 1 s (to kill a run mid-variant)
    HARNESS_FAULT="linger:<name>:<step>" the same, and an interrupt during that sleep takes 3 s more to stop
                                         (a worker slow to shut down, as one saving a large model is)

<name> is matched against the variant's `name`; several faults are separated by commas. Unset in normal
use; the tests set it for one invocation.
"""

from __future__ import annotations

import os
import time

import torch


def _fault(variant_name: str | None) -> tuple[str, int] | None:
    raw = os.environ.get("HARNESS_FAULT")
    if not raw or not variant_name:
        return None
    for item in raw.split(","):
        kind, name, step = item.split(":")
        if name == variant_name:
            return kind, int(step)
    return None


def maybe_inject(ctx, model, step: int) -> None:
    """Called at the beginning of every optimiser step (step counts from 1)."""
    fault = _fault(ctx.spec.name)
    if fault is None or step < fault[1]:
        return
    kind, at = fault
    if kind == "sleep":
        time.sleep(1.0)
    elif kind == "linger":
        try:
            time.sleep(1.0)
        except KeyboardInterrupt:
            time.sleep(3.0)
            raise
    elif step != at:
        return
    elif kind == "raise":
        raise RuntimeError(f"injected failure at step {step}")
    elif kind == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at step {step})")
    elif kind == "nan":
        # Poison the final norm's output rather than the LM head: TRL computes log-probs with a fused head
        # that never calls the head module's forward.
        final_norm = [m for n, m in model.named_modules() if n.endswith(".norm") and ".layers." not in n][-1]
        final_norm.register_forward_hook(lambda module, args, output: output * float("nan"))
