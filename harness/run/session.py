"""Runs variants: each in its own process, tracked in MLflow, resumable, failure-isolated.

    python -m harness run configs/two_round.yaml [--force] [--jobs N]

The seam is `Session`: open the store and a parent run, `run_variants(variants) -> outcomes` as many times
as the caller likes, close. A grid (`run_grid`) calls it once with every variant; a search calls it with one
trial's variant at a time. Within a session:

- A parent MLflow run per invocation, a nested child run per variant (named by its readable name,
  tagged with its id). Variants with a FINISHED run of the same id are skipped unless --force (also those
  finished earlier in the same session).
- RUNNING runs left by an executor that died on this host are marked FAILED (tagged recovered).
- A variant that fails ends FAILED with its reason and traceback; the rest go on. Children of a
  failed stage are not run. Ctrl-C / SIGTERM end the running variants as KILLED.
- One variant per GPU when there are several; one at a time otherwise (`jobs` for more, the CPU's cores split
  between them). Workers are forked from a warm server that imported torch & co once (harness.run.spawn).
- Or, given a `backend` (harness.run.ray_backend: `--executor ray`), each variant is a task on a Ray cluster; the
  backend decides how many run at once and hands back the same kind of worker object, so everything above
  holds there too.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, TextIO

import yaml

from harness.run import describe, spawn
from harness.core import provenance
from harness.core import runs as R
from harness.core.tracking import MlflowTracker, default_tracking_uri, is_disk_full, redact, says_disk_full
from harness.core.variant import Variant
from harness.run.progress import Progress, outcome_line, summary_table
from harness.run.worker import EXIT_INTERRUPTED, PREFIX, TRACKING_URI_ENV

EXIT_OK, EXIT_FAILURES, EXIT_INTERRUPT = 0, 1, 130


class Backend(Protocol):
    """Where variants run when not in processes on this machine (harness.run.ray_backend.RayBackend)."""

    name: str  # tagged on every run (harness.executor)

    def slots(self, jobs: int | None) -> list: ...  # one entry per variant that may run at once

    def start(self, job: dict, *, env: dict[str, str], log: TextIO) -> spawn.Worker: ...


@dataclass
class Outcome:
    variant: Variant
    status: str  # FINISHED, FAILED, KILLED, PRUNED (stopped by its caller), SKIPPED (already finished),
    # BLOCKED (stage failed), NOT RUN
    run_id: str | None = None
    seconds: float = 0.0
    reason: str = ""
    steps: int | None = None


@dataclass
class Active:
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


def _read_events(act: Active) -> None:
    assert act.proc.stdout is not None
    for line in act.proc.stdout:
        if line.startswith(PREFIX):
            try:
                event = json.loads(line[len(PREFIX):])
                act.state.update(event)
                if "intermediate" in event:  # every point is kept: a watcher polling slower must not miss one
                    act.state.setdefault("intermediates", []).append(event["intermediate"])
                continue
            except json.JSONDecodeError:
                pass
        try:
            act.log.write(line)
        except OSError:  # a full disk: keep draining the pipe, or the worker blocks on a full one
            pass
    try:
        act.log.flush()
    except OSError:
        pass


def _slots(jobs: int | None) -> list[str | None]:
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


def _threads_per_slot(slots: list[str | None]) -> int | None:
    """Torch threads for each of several variants sharing the CPU: the cores split between the slots (None:
    one slot, or GPUs, keep torch's own default)."""
    if len(slots) < 2 or slots[0] is not None:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // len(slots))


class Session:
    """One invocation against the store: an experiment, a parent run, and the variants run under it.

        with Session("two_round", results_dir, parent_name=..., kind="grid") as session:
            outcomes = session.run_variants(grid.variants)
        return session.exit_code
    """

    def __init__(self, experiment: str, results_dir: Path, *, parent_name: str | None = None,
                 kind: str = R.KIND_GRID, parent_tags: dict | None = None, parent_params: dict | None = None,
                 parent_files: dict[str, str] | None = None, force: bool = False, jobs: int | None = None,
                 stream: TextIO | None = None, reuse_parent: str | None = None, backend: Backend | None = None):
        self.experiment_name = experiment
        self.results_dir = results_dir.resolve()
        self.runs_dir = self.results_dir / "runs"
        self.force = force
        self.jobs = jobs
        self.stream = stream or sys.stderr  # looked up now, not at import, so redirection is honoured
        self.uri = default_tracking_uri(self.results_dir)
        self.store = R.Store(self.uri, self.results_dir / "artifacts")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.parent_name = parent_name or f"{experiment}@{stamp}"
        self.kind = kind
        self.parent_tags = parent_tags or {}
        self.parent_params = parent_params or {}
        self.parent_files = parent_files or {}
        self.outcomes: dict[str, Outcome] = {}  # every variant this session saw, in order
        self.interrupted = False
        self.exp = ""
        self.parent_run = ""
        self.parent: MlflowTracker | None = None
        self.finished: dict[str, str] = {}
        self.reuse_parent = reuse_parent  # continue this parent run (a resumed search) instead of a new one
        self.child_tags: dict[str, dict] = {}  # variant id -> extra tags for its run (a search's trial number)
        self.backend = backend  # None: worker processes on this machine (harness.run.spawn)
        self._slots = backend.slots(jobs) if backend is not None else _slots(jobs)
        self._threads = None if backend is not None else _threads_per_slot(self._slots)
        self.claims = R.Claims(self.runs_dir)  # several runners on one results folder train each variant once
        self._waiting: set[str] = set()  # variants another runner is training (said once each)
        self._opened_ms = 0
        self._unshielded: dict[int, object] = {}  # signal handlers to restore once an interrupted session closes
        self.disk_full: R.DiskFullError | None = None  # set when a write found no space: nothing more starts
        self.unmarked: list[str] = []  # runs whose end could not be recorded (left RUNNING: disk full)

    # -------------------------------------------------------- open / close

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.parent is not None:  # opened: never leave the parent run RUNNING, even on a crash
            self.close(crashed=exc_type is not None)

    def _base_tags(self) -> dict:
        executor = self.backend.name if self.backend is not None else "local"
        return {R.TAG_GRID: self.experiment_name, R.TAG_EXECUTOR: executor, **provenance.tags()}

    def open(self) -> Session:
        try:
            return self._open()
        except Exception as e:
            if not is_disk_full(e):
                raise
            if self.parent_run:
                self._try_end(self.parent_run, "FAILED")
            raise R.DiskFullError(self.results_dir, _first_line(e)) from None

    def _open(self) -> Session:
        self._opened_ms = int(time.time() * 1000)
        if self.store.reanchored:
            print(f"note: {self.store.reanchored}", file=self.stream)
        self.exp = self.store.experiment(self.experiment_name)
        recovered = self.store.recover_orphans(self.exp)
        if recovered:
            print(f"marked {len(recovered)} orphaned RUNNING run(s) FAILED (their executor died)", file=self.stream)
        self.finished = {} if self.force else self.store.finished(self.exp)
        tags = {**self._base_tags(), R.TAG_KIND: self.kind, **self.parent_tags}
        if self.reuse_parent and self.store.reopen_run(self.reuse_parent, tags):
            self.parent_run = self.reuse_parent
        else:
            self.parent_run = self.store.start_run(self.exp, self.parent_name, tags)
        self.parent = MlflowTracker(self.uri, self.parent_run)
        for name, text in self.parent_files.items():
            self.parent.log_text(text, name)
        if self.parent_run != self.reuse_parent:  # params are immutable: a reopened run keeps its first ones
            self.parent.log_params({**self.parent_params, "force": self.force})
        return self

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPT
        return EXIT_FAILURES if self.failed() or self.disk_full else EXIT_OK

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.status in ("FAILED", "BLOCKED")]

    def close(self, *, crashed: bool = False) -> None:
        """Log the outcome table to the parent run and end it (KILLED, FAILED or FINISHED)."""
        ordered = list(self.outcomes.values())
        summary = summary_table(ordered)
        print("\n" + redact(summary), file=self.stream, flush=True)
        assert self.parent is not None
        try:
            status = "KILLED" if self.interrupted else (
                "FAILED" if self.failed() or crashed or self.disk_full else "FINISHED")
            try:
                self.parent.log_text(summary, R.SUMMARY_ARTIFACT)
            except Exception as e:
                if not is_disk_full(e):
                    raise
                self._disk_full_seen(e)
            if not self.disk_full:
                self._describe(ordered)
            self._try_end(self.parent_run, status)
            if self.disk_full:
                left = (f"{len(self.unmarked)} run(s) could not be marked and stay RUNNING: once there is space, the "
                        f"next `harness run` marks them FAILED and reruns their variants" if self.unmarked
                        else "every run was marked")
                print(f"{self.disk_full}; {left}", file=self.stream, flush=True)
        finally:
            # After an interrupt everything is recorded and the process is on its way out: a further Ctrl-C
            # there (people press it several times) must not turn exit code 130 into a traceback. A caller
            # that carries on after an interrupted session installs its own handlers again.
            for signum, handler in self._unshielded.items():
                signal.signal(signum, signal.SIG_IGN if self.interrupted else handler)
            self._unshielded = {}

    # -------------------------------------------------------- one variant's process

    def _start_child(self, v: Variant) -> str:
        tags = {**self._base_tags(), R.TAG_KIND: R.KIND_VARIANT, R.TAG_VARIANT: v.id, R.TAG_METHOD: v.spec.method,
                R.TAG_SOURCE: v.source, R.TAG_BASE_MODEL: v.spec.base_model, **self.child_tags.get(v.id, {})}
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
            self._try_end(run_id, "FAILED")
            raise
        return run_id

    def _disk_full_seen(self, e: BaseException) -> None:
        if self.disk_full is None:
            self.disk_full = R.DiskFullError(self.results_dir, _first_line(e))

    def _try_end(self, run_id: str, status: str) -> None:
        """End a run; on a full disk, remember it as left RUNNING instead of raising."""
        try:
            self.store.end_run(run_id, status)
        except Exception as e:
            if not is_disk_full(e):
                raise
            self._disk_full_seen(e)
            self.unmarked.append(run_id)

    def _launch(self, v: Variant, index: int, slot: int, is_stage: bool) -> Active:
        if self.disk_full is not None:  # nothing more starts; the loop stops the rest as after an interrupt
            raise self.disk_full
        try:
            return self._launch_one(v, index, slot, is_stage)
        except Exception as e:
            if not is_disk_full(e):
                raise
            self._disk_full_seen(e)
            raise self.disk_full from None

    def _launch_one(self, v: Variant, index: int, slot: int, is_stage: bool) -> Active:
        run_id = self._start_child(v)
        try:
            return self._start_worker(v, run_id, index, slot, is_stage)
        except BaseException as e:  # e.g. no space for the job file: the run must not stay RUNNING
            self.claims.release(v.id)
            interrupted = isinstance(e, KeyboardInterrupt)  # Ctrl-C while the worker was being started
            self._try_end(run_id, "KILLED" if interrupted else "FAILED")
            raise

    def _start_worker(self, v: Variant, run_id: str, index: int, slot: int, is_stage: bool) -> Active:
        out_dir = self.runs_dir / v.id
        if out_dir.exists():  # leftovers of an earlier failed or killed attempt
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        # The job file is on disk for as long as the results are: it holds no environment value (the store's
        # URI, which may carry a password, goes to the worker in its environment) and only masked labels.
        job = {"variant": _masked_labels(v.to_json()), "method": v.method.to_json(), "run_id": run_id,
               "out_dir": str(out_dir), "stage_dir": str(self.runs_dir / v.parent_id) if v.parent_id else None,
               "is_stage": is_stage, "cache_dir": str(self.results_dir / "cache")}
        job_path = out_dir / "job.json"
        job_path.write_text(json.dumps(job, indent=1))
        env = dict(os.environ)
        env[TRACKING_URI_ENV] = self.uri
        device = self._slots[slot]
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        log = (out_dir / "worker.log").open("w")
        if self._threads and spawn.THREADS_ENV not in os.environ:
            env[spawn.THREADS_ENV] = str(self._threads)
        try:
            if self.backend is not None:  # the claim stays with this runner until _finish releases it
                proc = self.backend.start(job, env=env, log=log)
            else:
                proc = spawn.start(job_path, env=env, log=log, keep_fds=(self.claims.fd(v.id),))  # claim: while it runs
        except BaseException:
            log.close()
            raise
        act = Active(variant=v, index=index, proc=proc, run_id=run_id, out_dir=out_dir, slot=slot, log=log)
        act.reader = threading.Thread(target=_read_events, args=(act,), daemon=True)
        act.reader.start()
        return act

    def _finish(self, act: Active, rc: int, interrupted: bool) -> Outcome:
        if act.reader is not None:
            act.reader.join(timeout=10)
        try:
            act.log.close()
        except OSError:  # its last flush found the disk full: what the worker wrote itself is there
            pass
        seconds = time.monotonic() - act.started
        result_path, error_path = act.out_dir / "result.json", act.out_dir / "error.json"
        tracker = MlflowTracker(self.uri, act.run_id)
        if rc == 0 and result_path.is_file():
            status, reason = "FINISHED", ""
            steps = json.loads(result_path.read_text()).get("global_step")
        else:
            steps = act.state.get("step")
            status = "KILLED" if interrupted or rc == EXIT_INTERRUPTED or act.stop_reason else "FAILED"
            if act.stop_reason:
                reason = act.stop_reason
            elif _json_or_none(error_path):
                reason = _json_or_none(error_path)["reason"]
            elif rc < 0:
                reason = f"worker killed by signal {signal.Signals(-rc).name}"
            else:
                reason = f"worker exited with code {rc}"
        log_path = act.out_dir / "worker.log"
        text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        if status != "FINISHED" and says_disk_full(text[-5000:]):  # the worker's own writes hit ENOSPC
            reason = f"disk full: no space left in {act.out_dir} ({reason})"
            self._disk_full_seen(OSError(errno.ENOSPC, "a worker found no space for its outputs"))  # stop here
        # What follows writes. Small store writes first, the run's end among them, then the log file: on a
        # nearly full disk the status is what must fit.
        if status == "FINISHED":
            self._headline(act)
        try:
            tags = {R.TAG_FAILURE_REASON: reason[:5000], R.TAG_FAILURE_STEP: steps or 0} if status != "FINISHED" else {}
            if act.stop_reason:
                tags[R.TAG_STOPPED] = act.stop_reason[:5000]
            if tags:
                tracker.set_tags(tags)
        except Exception as e:
            if not is_disk_full(e):
                raise
            self._disk_full_seen(e)
        self._try_end(act.run_id, status)
        try:
            masked = redact(text)
            if masked != text:  # libraries print what they are given (names, paths): mask the copy on disk too
                log_path.write_text(masked)
            if text:
                tracker.log_text(masked[-2_000_000:], "worker.log")
        except Exception as e:
            if not is_disk_full(e):
                raise
            self._disk_full_seen(e)
        self.claims.release(act.variant.id)
        if status == "FINISHED":
            self.finished[act.variant.id] = act.run_id
        label = "PRUNED" if act.stop_reason and not interrupted else status
        return Outcome(act.variant, label, act.run_id, seconds, reason, steps)

    def _headline(self, act: Active) -> None:
        """What the MLflow UI shows first for a finished variant (`describe.summarise_run`). A failure here is
        said, never the variant's: it trained and was measured."""
        try:
            describe.summarise_run(self.uri, act.run_id, act.out_dir / "pairs.csv")
        except Exception as e:  # noqa: BLE001
            if is_disk_full(e):
                self._disk_full_seen(e)
            else:
                print(f"note: could not log the headline of {act.variant.run_name} ({_first_line(e)})",
                      file=self.stream, flush=True)

    def _describe(self, ordered: list[Outcome]) -> None:
        """The parent run's table of its variants and the experiment's saved view (`describe`)."""
        members = [describe.Member(o.variant.run_name, o.status, o.run_id, o.reason) for o in ordered]
        hint = (f"The writeup with figures: `python -m harness report {self.experiment_name}` writes it and logs "
                f"`report/report.html` to this run.")
        try:
            describe.after_invocation(self.uri, self.exp, self.parent_run, self.experiment_name, members, hint)
        except Exception as e:  # noqa: BLE001
            if is_disk_full(e):
                self._disk_full_seen(e)
            else:
                print(f"note: could not describe the parent run ({_first_line(e)})", file=self.stream, flush=True)

    def _reusable(self, v: Variant, stages: set[str]) -> str | None:
        """Run id of a FINISHED run of this variant that can stand for it (a stage also needs its weights)."""
        done = self.finished.get(v.id)
        stage_ok = v.id not in stages or (self.runs_dir / v.id / "model" / "config.json").is_file()
        return done if done and stage_ok else None

    def _claim(self, v: Variant, stages: set[str], say: Callable[[str], None]) -> bool | str:
        """Claim `v` for this runner before training it. True: train it. False: another runner on this results
        folder is training it; wait (said once) and ask again. A run id: another runner finished it since,
        answer from the store (with --force, only a run started after this session opened counts)."""
        if self.disk_full is not None:  # nothing more starts; the loop stops the rest as after an interrupt
            raise self.disk_full
        if not self.claims.take(v.id):
            if v.id not in self._waiting:
                self._waiting.add(v.id)
                say(f"waiting: {v.run_name} ({v.id}) is being trained by another runner "
                    f"({self.claims.holder(v.id)}); it will be answered from the store")
            return False
        done = self.store.finished_since(self.exp, v.id, self._opened_ms if self.force else 0)
        if done and (v.id not in stages or (self.runs_dir / v.id / "model" / "config.json").is_file()):
            self.claims.release(v.id)
            self.finished[v.id] = done
            return done
        return True

    # -------------------------------------------------------- the loop

    def run_variants(self, variants: list[Variant]) -> list[Outcome]:
        """Run these variants (stages before their children), skipping finished ones; returns their outcomes
        in the order given. On Ctrl-C / SIGTERM the running ones end KILLED, the rest NOT RUN, and
        `self.interrupted` is set."""
        outcomes = self._loop(list(enumerate(variants, 1)), total=len(variants))
        return [outcomes[v.id] for v in variants]

    def run_stream(self, next_variant: Callable[[], Variant | None], *,
                   on_done: Callable[[Outcome], None] | None = None,
                   watch: Callable[[Active], str | None] | None = None, total: int | None = None) -> list[Outcome]:
        """Ask-and-tell: whenever a slot is free, `next_variant()` gives the next variant to run (None: no
        more); `on_done(outcome)` hears each as it ends (a finished variant is answered from the store as
        SKIPPED, without training). `watch(active)` is called while a variant runs; a reason it returns stops
        that variant, which ends PRUNED (KILLED in MLflow, the reason in its tags)."""
        return list(self._loop([], total=total, next_variant=next_variant, on_done=on_done, watch=watch).values())

    def _loop(self, pending: list[tuple[int, Variant]], *, total: int | None,
              next_variant: Callable[[], Variant | None] | None = None,
              on_done: Callable[[Outcome], None] | None = None,
              watch: Callable[[Active], str | None] | None = None) -> dict[str, Outcome]:
        out = self.stream
        stages = {v.parent_id for _, v in pending if v.parent_id}
        outcomes: dict[str, Outcome] = {}
        counter = [len(pending)]

        def record(index: int, o: Outcome) -> None:
            outcomes[o.variant.id] = o
            self.outcomes[o.variant.id] = o
            progress.line(outcome_line(index, total or counter[0], o))
            if on_done is not None:
                on_done(o)

        for item in list(pending):
            done = self._reusable(item[1], stages)
            if done:
                outcomes[item[1].id] = self.outcomes[item[1].id] = Outcome(item[1], "SKIPPED", done,
                                                                          reason="already FINISHED")
                pending.remove(item)
        if next_variant is None:
            n = len(pending) + len(outcomes)
            print(f"{self.experiment_name}: {n} variant{'s' if n != 1 else ''}, {len(outcomes)} already finished, "
                  f"{len(pending)} to run — tracking {self.store.uri_for_display()} "
                  f"(experiment {self.experiment_name!r})", file=out, flush=True)
            if self._threads == 1 and len(pending) > 1:
                print(f"note: {len(self._slots)} variants at once on the CPU leave each one torch thread; "
                      "training and measuring are compute, so on a small CPU this is no faster than one at a time "
                      "(results/benchmarks/README.md)", file=out, flush=True)

        if self.backend is None and (pending or next_variant is not None):
            spawn.warm_up()  # the workers' server imports torch & co while the first variant's run is created
        free = list(range(len(self._slots)))
        active: dict[str, Active] = {}
        progress = Progress(total or counter[0], out)
        exhausted = next_variant is None
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            while pending or active or not exhausted:
                for vid, act in list(active.items()):
                    rc = act.proc.poll()
                    if rc is None:
                        reason = watch(act) if watch is not None and not act.stop_reason else None
                        if reason:
                            act.stop_reason = reason
                            act.proc.send_signal(signal.SIGINT)
                        continue
                    free.append(act.slot)
                    del active[vid]
                    record(act.index, self._finish(act, rc, interrupted=False))
                for item in list(pending):
                    i, v = item
                    if v.parent_id:
                        stage = outcomes.get(v.parent_id)
                        if stage is None:
                            continue  # stage still pending or running
                        if stage.status not in ("FINISHED", "SKIPPED"):
                            pending.remove(item)
                            record(i, Outcome(v, "BLOCKED", reason=f"its stage {stage.variant.run_name} "
                                                                   f"ended {stage.status}"))
                            continue
                    if v.id in active:
                        continue  # the same variant (a repeated search trial) is training: answer it after
                    done = self._reusable(v, stages)
                    if done:
                        pending.remove(item)
                        record(i, Outcome(v, "SKIPPED", done, reason="already FINISHED"))
                        continue
                    if not free:
                        break
                    claim = self._claim(v, stages, progress.line)
                    if claim is False:
                        continue  # another runner trains it: ask again on the next pass
                    if claim is not True:
                        pending.remove(item)
                        record(i, Outcome(v, "SKIPPED", claim, reason="FINISHED by another runner"))
                        continue
                    slot = free.pop(0)
                    progress.line(f"[{i}/{total or counter[0]}] start {v.run_name} ({v.id})")
                    active[v.id] = self._launch(v, i, slot, is_stage=v.id in stages)
                    pending.remove(item)
                while free and not pending and not exhausted:
                    v = next_variant()
                    if v is None:
                        exhausted = True
                        break
                    counter[0] += 1
                    pending.append((counter[0], v))
                    if v.id in active:
                        break  # wait for the running copy, then answer this one from the store
                progress.refresh(list(active.values()))
                if active or pending:
                    time.sleep(0.25)
        except (KeyboardInterrupt, R.DiskFullError) as stop:
            self.interrupted = isinstance(stop, KeyboardInterrupt)
            self._shield(active, old_term)  # a second Ctrl-C must not break the shutdown half way
            progress.line(f"{'interrupted' if self.interrupted else stop}: stopping running variants (they end "
                          f"KILLED)...")
            for act in active.values():
                _stop(act.proc)
            for act in active.values():
                o = self._finish(act, act.proc.wait(), interrupted=True)
                outcomes[o.variant.id] = self.outcomes[o.variant.id] = o
                progress.line(outcome_line(act.index, total or counter[0], o))
                if on_done is not None:
                    on_done(o)
            for _, v in pending:
                outcomes[v.id] = self.outcomes[v.id] = o = Outcome(v, "NOT RUN", reason="interrupted" if
                                                                   self.interrupted else "disk full")
                if on_done is not None:
                    on_done(o)
        finally:
            if not self._unshielded:
                signal.signal(signal.SIGTERM, old_term)
        return outcomes

    def _shield(self, active: dict[str, Active], old_term) -> None:
        """From the first interrupt until `close` has recorded everything, a further Ctrl-C or SIGTERM no
        longer raises (it would leave runs RUNNING): it kills the running workers at once instead of waiting
        for them to stop, and they still end KILLED."""
        def again(signum, frame):
            print("interrupted again: killing the running variants now (they still end KILLED)", file=self.stream,
                  flush=True)
            for act in list(active.values()):
                if act.proc.poll() is None:
                    act.proc.kill()

        self._unshielded = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: old_term}
        signal.signal(signal.SIGINT, again)
        signal.signal(signal.SIGTERM, again)


def run_grid(grid, results_dir: Path, *, force: bool = False, jobs: int | None = None,
             stream: TextIO | None = None, argv: list[str] | None = None, backend: Backend | None = None) -> int:
    """Every variant of a grid under one parent run. Returns the exit code."""
    session = Session(grid.name, results_dir, force=force, jobs=jobs, stream=stream, backend=backend,
                      parent_tags={R.TAG_VARIANT_COUNT: len(grid.variants), R.TAG_ARGV: " ".join(argv or [])},
                      parent_params={"grid": grid.name, "variants": len(grid.variants)},
                      parent_files={f"grid/{grid.path.name}": grid.path.read_text()})
    with session:
        session.run_variants(grid.variants)
    return session.exit_code


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _json_or_none(path: Path) -> dict | None:
    """A small JSON file the worker wrote, or None when it is missing or cut short (a full disk)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _masked_labels(variant_json: dict) -> dict:
    """A variant's JSON with its free-text labels (name, from:, run name) masked by `redact`. The id and the
    data paths are what the worker needs; the labels are only shown."""
    spec = dict(variant_json["spec"])
    for key in ("name", "from"):
        if isinstance(spec.get(key), str):
            spec[key] = redact(spec[key])
    return {**variant_json, "spec": spec, "run_name": redact(variant_json["run_name"])}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop(proc: spawn.Worker, grace: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
