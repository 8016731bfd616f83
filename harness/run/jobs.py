"""`run --jobs auto`: as many variants at once as the device allows, and why (recorded in the grid run's tags).

- Several GPUs: one variant per GPU, as without --jobs.
- One GPU: as many as fit in its free memory by the memory model's estimate of the largest variant
  (`experiments.memory`, at data.max_length: an upper bound), keeping a tenth free for the allocator's slack,
  at most one per variant to run.
- A CPU: by cores, each variant keeping at least `MIN_CPU_THREADS` torch threads, and by memory as on a GPU. On
  this project's 2-core machine two variants at once measured slower than one at a time (each gets one thread:
  results/benchmarks/README.md), so auto picks 1 there; 8 threads a variant is a judgement, not a measurement.
"""

from __future__ import annotations

import os

MIN_CPU_THREADS = 8
GPU_HEADROOM = 0.9  # share of a GPU's free memory the variants may plan on
CPU_HEADROOM = 0.8  # share of the machine's available memory
GB = 1024**3


def choose(*, device: str, gpus: int, cores: int, free_bytes: float, peak_bytes: float,
           variants: int) -> tuple[int | None, str]:
    """(jobs, why) from the facts alone; jobs None: one variant per GPU (the session's own default)."""
    if device.startswith("cuda") and gpus > 1:
        return None, f"one variant per GPU ({gpus} GPUs)"
    headroom = GPU_HEADROOM if device.startswith("cuda") else CPU_HEADROOM
    by_memory = max(1, int(free_bytes * headroom // peak_bytes)) if peak_bytes > 0 else variants
    memory_note = (f"{free_bytes / GB:.1f} GB free, the largest variant needs about {peak_bytes / GB:.2f} GB "
                   f"(estimate), {int(100 * headroom)}% planned on: room for {by_memory}")
    if device.startswith("cuda"):
        jobs = max(1, min(by_memory, variants))
        return jobs, f"{jobs} at once on the GPU: {memory_note}"
    by_cores = max(1, cores // MIN_CPU_THREADS)
    jobs = max(1, min(by_cores, by_memory, variants))
    return jobs, (f"{jobs} at once on the CPU: {cores} core(s), each variant keeping at least {MIN_CPU_THREADS} "
                  f"threads: room for {by_cores}; {memory_note}")


def auto_jobs(variants, device: str) -> tuple[int | None, str]:
    """Gather the facts for `choose`: the device's GPUs or cores, its free memory, the largest estimate."""
    from experiments import memory
    from experiments import models as M
    from harness.run import launch

    peak = 0.0
    for v in variants:
        try:
            precision, base_dtype = memory.resolved(v.spec, device)
            est = memory.estimate(v.spec, M.skeleton(v.spec.base_model, v.grid_dir), device=device,
                                  precision=precision, base_dtype=base_dtype)
        except Exception:  # noqa: BLE001, S112 - the pre-flight has said what is wrong with the variant already
            continue
        peak = max(peak, est.peak)
    gpus, free = 0, _available_ram()
    if device.startswith("cuda"):
        import torch

        gpus, free = torch.cuda.device_count(), float(torch.cuda.mem_get_info()[0])
    return choose(device=device, gpus=gpus, cores=launch.cores(), free_bytes=free, peak_bytes=peak, variants=len(variants))


def _available_ram() -> float:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), else the physical total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
