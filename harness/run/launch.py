"""Launching a variant: its MLflow child run, its output folder and job file, its worker process (or Ray task).

Where variants run: one slot per GPU when there are several, else `jobs` slots on the CPU (its cores split
between them), or whatever a backend (`--executor ray`) says. A local worker is forked from a warm server
(harness/run/spawn.py) and holds its variant's claim for as long as it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

import yaml

from harness.core import runs as R
from harness.core.tracking import MlflowTracker, is_disk_full, redact
from harness.core.variant import Variant
from harness.run import spawn
from harness.run.claims import VariantClaims
from harness.run.ends import RunEnds
from harness.run.events import start_reader
from harness.run.worker import TRACKING_URI_ENV


class Backend(Protocol):
    """Where variants run when not in processes on this machine (harness.run.ray.RayBackend)."""

    name: str  # tagged on every run (the harness.executor tag)

    def slots(self, jobs: int | None) -> list: ...  # one entry per variant that may run at once

    def start(self, job: dict, *, env: dict[str, str], log: TextIO) -> spawn.Worker: ...


@dataclass
class Active:
    """A variant whose worker is running."""

    variant: Variant
    index: int
    proc: spawn.Worker
    run_id: str
    out_dir: Path
    slot: int
    log: TextIO
    started: float = field(default_factory=time.monotonic)
    state: dict = field(default_factory=dict)  # the worker's latest events (step, loss, intermediate values)
    reader: threading.Thread | None = None
    stop_reason: str = ""  # set when the caller's `watch` stopped it (a pruned trial)


def slots(jobs: int | None) -> list[str | None]:
    """One slot per GPU (CUDA_VISIBLE_DEVICES value), or `jobs` CPU slots."""
    if jobs is not None and jobs < 1:  # no slot at all would wait forever for one to free up
        raise ValueError(f"jobs must be 1 or more, got {jobs}")
    try:
        import torch

        n_gpu = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        n_gpu = 0
    if n_gpu > 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(n_gpu)]
        return ids[: jobs or len(ids)]
    return [None] * (jobs or 1)


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_slot(slots: list[str | None]) -> int | None:
    """Torch threads for each of several variants sharing the CPU: the cores split between the slots (None:
    one slot, or GPUs, keep torch's own default)."""
    if len(slots) < 2 or slots[0] is not None:
        return None
    return max(1, cores() // len(slots))


class Launcher:
    """Starts variants under one parent run: `launch(v, ...)` returns it `Active`, or raises having left no run
    RUNNING and no claim held."""

    def __init__(self, *, uri: str, store: R.Store, experiment_id: str, parent_run: str, results_dir: Path,
                 base_tags: dict, slots: list[str | None], threads: int | None, backend: Backend | None,
                 claims: VariantClaims, ends: RunEnds):
        self.uri = uri
        self.store = store
        self.exp = experiment_id
        self.parent_run = parent_run
        self.results_dir = results_dir
        self.runs_dir = results_dir / "runs"
        self.base_tags = base_tags
        self.slots = slots
        self.threads = threads
        self.backend = backend  # None: worker processes on this machine (harness.run.spawn)
        self.claims = claims
        self.ends = ends

    def launch(self, v: Variant, index: int, slot: int, is_stage: bool, extra_tags: dict) -> Active:
        self.ends.guard()  # nothing more starts; the loop stops the rest as after an interrupt
        try:
            return self._launch_one(v, index, slot, is_stage, extra_tags)
        except Exception as e:
            if not is_disk_full(e):
                raise
            self.ends.seen(e)
            raise self.ends.disk_full from None

    def _launch_one(self, v: Variant, index: int, slot: int, is_stage: bool, extra_tags: dict) -> Active:
        run_id = self._start_child(v, extra_tags)
        try:
            return self._start_worker(v, run_id, index, slot, is_stage)
        except BaseException as e:  # e.g. no space for the job file: the run must not stay RUNNING
            self.claims.release(v.id)
            interrupted = isinstance(e, KeyboardInterrupt)  # Ctrl-C while the worker was being started
            self.ends.end(run_id, "KILLED" if interrupted else "FAILED")
            raise

    def _start_child(self, v: Variant, extra_tags: dict) -> str:
        tags = {**self.base_tags, R.TAG_KIND: R.KIND_VARIANT, R.TAG_VARIANT: v.id, R.TAG_METHOD: v.spec.method,
                R.TAG_SOURCE: v.source, R.TAG_BASE_MODEL: v.spec.base_model, **extra_tags}
        if v.parent_id:
            tags[R.TAG_STAGE] = v.parent_id
        if v.group_id:
            tags[R.TAG_GROUP] = v.group_id
        if v.replicate:
            tags[R.TAG_REPLICATE] = v.replicate
        run_id = self.store.start_run(self.exp, v.run_name, tags, parent=self.parent_run)
        try:
            tracker = MlflowTracker(self.uri, run_id)
            tracker.log_params({**v.params(), "variant_id": v.id})
            tracker.log_text(yaml.safe_dump(v.config(), sort_keys=False), R.VARIANT_ARTIFACT)
        except Exception:  # never leave a run RUNNING that no worker will end
            self.ends.end(run_id, "FAILED")
            raise
        return run_id

    def _start_worker(self, v: Variant, run_id: str, index: int, slot: int, is_stage: bool) -> Active:
        out_dir = self.runs_dir / v.id
        if out_dir.exists():  # leftovers of an earlier failed or killed attempt
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        # The job file is on disk for as long as the results are: it holds no environment value (the store's
        # URI, which may carry a password, goes to the worker in its environment) and only masked labels.
        job = {"variant": masked_labels(v.to_json()), "method": v.method.to_json(), "run_id": run_id,
               "out_dir": str(out_dir), "stage_dir": str(self.runs_dir / v.parent_id) if v.parent_id else None,
               "is_stage": is_stage, "cache_dir": str(self.results_dir / "cache")}
        job_path = out_dir / "job.json"
        job_path.write_text(json.dumps(job, indent=1))
        env = dict(os.environ)
        env[TRACKING_URI_ENV] = self.uri
        device = self.slots[slot]
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        log = (out_dir / "worker.log").open("w")
        if self.threads and spawn.THREADS_ENV not in os.environ:
            env[spawn.THREADS_ENV] = str(self.threads)
        try:
            if self.backend is not None:  # the claim stays with this runner until the finish releases it
                proc = self.backend.start(job, env=env, log=log)
            else:
                proc = spawn.start(job_path, env=env, log=log, keep_fds=(self.claims.fd(v.id),))  # claim: while it runs
        except BaseException:
            log.close()
            raise
        act = Active(variant=v, index=index, proc=proc, run_id=run_id, out_dir=out_dir, slot=slot, log=log)
        act.reader = start_reader(proc.stdout, act.state, log)
        return act


def masked_labels(variant_json: dict) -> dict:
    """A variant's JSON with its free-text labels (name, from:, run name) masked by `redact`. The id and the
    data paths are what the worker needs; the labels are only shown."""
    spec = dict(variant_json["spec"])
    for key in ("name", "from"):
        if isinstance(spec.get(key), str):
            spec[key] = redact(spec[key])
    return {**variant_json, "spec": spec, "run_name": redact(variant_json["run_name"])}
