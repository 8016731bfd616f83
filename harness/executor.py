"""Runs a grid: each variant in its own process, tracked in MLflow, resumable, failure-isolated.

    python -m harness run configs/two_round.yaml [--force] [--jobs N]

- A parent MLflow run per invocation, a nested child run per variant (named by its readable name,
  tagged with its id). Variants with a FINISHED run of the same id are skipped unless --force.
- RUNNING runs left by an executor that died on this host are marked FAILED (tagged recovered).
- A variant that fails ends FAILED with its reason and traceback; the grid goes on. Children of a
  failed stage are not run. Ctrl-C / SIGTERM end the running variants as KILLED.
- One variant per GPU when there are several; one at a time otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import yaml

from harness import provenance
from harness.grid import Grid, Variant
from harness.tracking import (
    TAG_GRID,
    TAG_KIND,
    TAG_METHOD,
    TAG_VARIANT,
    MlflowTracker,
    Store,
    default_tracking_uri,
    redact,
)
from harness.worker import EXIT_INTERRUPTED, PREFIX

EXIT_OK, EXIT_FAILURES, EXIT_INTERRUPT = 0, 1, 130


@dataclass
class Outcome:
    variant: Variant
    status: str  # FINISHED, FAILED, KILLED, SKIPPED (already finished), BLOCKED (stage failed), NOT RUN
    run_id: str | None = None
    seconds: float = 0.0
    reason: str = ""
    steps: int | None = None


@dataclass
class Active:
    variant: Variant
    index: int
    proc: subprocess.Popen
    run_id: str
    out_dir: Path
    slot: int
    log: TextIO
    started: float = field(default_factory=time.monotonic)
    state: dict = field(default_factory=dict)
    reader: threading.Thread | None = None


class Progress:
    """A live view of the grid: variant i/N, step, loss, ETA. Redraws on a terminal, prints lines otherwise."""

    def __init__(self, total: int, stream: TextIO | None = None, interval: float = 10.0):
        self.total = total
        self.stream = stream or sys.stderr or sys.stderr  # looked up now, not at import, so redirection is honoured
        self.tty = stream.isatty()
        self.interval = interval
        self.drawn = 0
        self.last_line: dict[str, tuple[float, int | None]] = {}

    def _status(self, act: Active) -> str:
        s = act.state
        step, max_steps = s.get("step", 0), s.get("max_steps")
        elapsed = time.monotonic() - act.started
        parts = [f"[{act.index}/{self.total}] {act.variant.run_name}"]
        if s.get("event") is None:
            parts.append("starting")
        elif max_steps:
            parts.append(f"step {step}/{max_steps}")
            if s.get("loss") is not None:
                parts.append(f"loss {s['loss']:.4f}")
            rate = s.get("elapsed", 0) / step if step else None
            if rate:
                parts.append(f"eta {_hms(rate * (max_steps - step))}")
        else:
            parts.append(s.get("event", ""))
        parts.append(f"({_hms(elapsed)})")
        return " ".join(parts)

    def line(self, text: str) -> None:
        self._clear()
        print(redact(text), file=self.stream, flush=True)

    def refresh(self, active: list[Active]) -> None:
        if self.tty:
            self._clear()
            lines = [redact(self._status(a)) for a in active]
            for text in lines:
                print(text[: shutil.get_terminal_size().columns - 1], file=self.stream)
            self.stream.flush()
            self.drawn = len(lines)
            return
        now = time.monotonic()
        for a in active:
            if not a.state.get("max_steps"):
                continue
            last_time, last_step = self.last_line.get(a.variant.id, (0.0, None))
            moved = a.state.get("step") != last_step
            # a line per new step at most every `interval` seconds; a heartbeat each minute otherwise
            if (moved and now - last_time >= self.interval) or now - last_time >= 60:
                self.last_line[a.variant.id] = (now, a.state.get("step"))
                print(redact(self._status(a)), file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _read_events(act: Active) -> None:
    assert act.proc.stdout is not None
    for line in act.proc.stdout:
        if line.startswith(PREFIX):
            try:
                act.state.update(json.loads(line[len(PREFIX):]))
            except json.JSONDecodeError:
                act.log.write(line)
        else:
            act.log.write(line)
    act.log.flush()


def _slots(jobs: int | None) -> list[str | None]:
    """One slot per GPU (CUDA_VISIBLE_DEVICES value), or `jobs` CPU slots."""
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


class Executor:
    def __init__(self, grid: Grid, results_dir: Path, *, force: bool = False, jobs: int | None = None,
                 stream: TextIO | None = None, argv: list[str] | None = None):
        self.grid = grid
        self.results_dir = results_dir.resolve()
        self.runs_dir = self.results_dir / "runs"
        self.force = force
        self.jobs = jobs
        self.stream = stream or sys.stderr  # looked up now, not at import, so redirection is honoured
        self.argv = argv or []
        self.uri = default_tracking_uri(self.results_dir)
        self.store = Store(self.uri, self.results_dir / "artifacts")
        self.stages = {v.parent_id for v in grid.variants if v.parent_id}

    # -------------------------------------------------------- bookkeeping

    def _base_tags(self) -> dict:
        return {TAG_GRID: self.grid.name, **provenance.tags()}

    def _start_child(self, v: Variant, exp: str, parent_run: str) -> str:
        tags = {**self._base_tags(), TAG_KIND: "variant", TAG_VARIANT: v.id, TAG_METHOD: v.spec.method,
                "harness.source": v.source, "harness.base_model": v.spec.base_model}
        if v.parent_id:
            tags["harness.stage_variant_id"] = v.parent_id
        run_id = self.store.start_run(exp, v.run_name, tags, parent=parent_run)
        tracker = MlflowTracker(self.uri, run_id)
        tracker.log_params({**v.params(), "variant_id": v.id})
        tracker.log_text(yaml.safe_dump(v.config(), sort_keys=False), "variant.yaml")
        return run_id

    def _launch(self, v: Variant, index: int, exp: str, parent_run: str, slot: int, device: str | None) -> Active:
        run_id = self._start_child(v, exp, parent_run)
        out_dir = self.runs_dir / v.id
        if out_dir.exists():  # leftovers of an earlier failed or killed attempt
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        job = {"variant": v.to_json(), "tracking_uri": self.uri, "run_id": run_id, "out_dir": str(out_dir),
               "stage_dir": str(self.runs_dir / v.parent_id) if v.parent_id else None,
               "is_stage": v.id in self.stages}
        job_path = out_dir / "job.json"
        job_path.write_text(json.dumps(job, indent=1))
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        log = (out_dir / "worker.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "harness.worker", str(job_path)], stdout=subprocess.PIPE,
                                stderr=log, env=env, text=True, bufsize=1, start_new_session=True)
        act = Active(variant=v, index=index, proc=proc, run_id=run_id, out_dir=out_dir, slot=slot, log=log)
        act.reader = threading.Thread(target=_read_events, args=(act,), daemon=True)
        act.reader.start()
        return act

    def _finish(self, act: Active, rc: int, interrupted: bool) -> Outcome:
        if act.reader is not None:
            act.reader.join(timeout=10)
        act.log.close()
        seconds = time.monotonic() - act.started
        result_path, error_path = act.out_dir / "result.json", act.out_dir / "error.json"
        tracker = MlflowTracker(self.uri, act.run_id)
        if rc == 0 and result_path.is_file():
            status, reason = "FINISHED", ""
            steps = json.loads(result_path.read_text()).get("global_step")
        else:
            steps = act.state.get("step")
            if interrupted or rc == EXIT_INTERRUPTED:
                status = "KILLED"
            else:
                status = "FAILED"
            if error_path.is_file():
                err = json.loads(error_path.read_text())
                reason = err["reason"]
            elif rc < 0:
                reason = f"worker killed by signal {signal.Signals(-rc).name}"
            else:
                reason = f"worker exited with code {rc}"
            tracker.set_tags({"harness.failure_reason": reason[:5000], "harness.failure_step": steps or 0})
        log_path = act.out_dir / "worker.log"
        if log_path.is_file():
            tracker.log_text(log_path.read_text(errors="replace")[-2_000_000:], "worker.log")
        self.store.end_run(act.run_id, status)
        return Outcome(act.variant, status, act.run_id, seconds, reason, steps)

    # -------------------------------------------------------- main loop

    def run(self) -> int:
        grid, out = self.grid, self.stream
        exp = self.store.experiment(grid.name)
        recovered = self.store.recover_orphans(exp)
        if recovered:
            print(f"marked {len(recovered)} orphaned RUNNING run(s) FAILED (their executor died)", file=out)
        finished = {} if self.force else self.store.finished(exp)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        parent_run = self.store.start_run(exp, f"{grid.name}@{stamp}", {**self._base_tags(), TAG_KIND: "grid",
                                          "harness.variants": len(grid.variants), "harness.argv": " ".join(self.argv)})
        parent = MlflowTracker(self.uri, parent_run)
        parent.log_text(grid.path.read_text(), f"grid/{grid.path.name}")
        parent.log_params({"grid": grid.name, "variants": len(grid.variants), "force": self.force})

        outcomes: dict[str, Outcome] = {}
        pending: list[tuple[int, Variant]] = []
        for i, v in enumerate(grid.variants, 1):
            done = finished.get(v.id)
            stage_ok = v.id not in self.stages or (self.runs_dir / v.id / "model" / "config.json").is_file()
            if done and stage_ok:
                outcomes[v.id] = Outcome(v, "SKIPPED", done, reason="already FINISHED")
            else:
                pending.append((i, v))
        n_skip = len(outcomes)
        print(f"grid {grid.name}: {len(grid.variants)} variants, {n_skip} already finished, {len(pending)} to run"
              f" — tracking {self.store.uri_for_display()} (experiment {grid.name!r})", file=out, flush=True)

        slots = _slots(self.jobs)
        free = list(range(len(slots)))
        active: dict[str, Active] = {}
        progress = Progress(len(grid.variants), out)
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        interrupted = False
        try:
            while pending or active:
                for vid, act in list(active.items()):
                    rc = act.proc.poll()
                    if rc is None:
                        continue
                    outcomes[vid] = o = self._finish(act, rc, interrupted=False)
                    free.append(act.slot)
                    del active[vid]
                    progress.line(_outcome_line(act.index, len(grid.variants), o))
                for item in list(pending):
                    i, v = item
                    if v.parent_id:
                        stage = outcomes.get(v.parent_id)
                        if stage is None:
                            continue  # stage still pending or running
                        if stage.status not in ("FINISHED", "SKIPPED"):
                            outcomes[v.id] = Outcome(v, "BLOCKED", reason=f"its stage {stage.variant.run_name} "
                                                     f"ended {stage.status}")
                            pending.remove(item)
                            progress.line(_outcome_line(i, len(grid.variants), outcomes[v.id]))
                            continue
                    if not free:
                        break
                    slot = free.pop(0)
                    progress.line(f"[{i}/{len(grid.variants)}] start {v.run_name} ({v.id})")
                    active[v.id] = self._launch(v, i, exp, parent_run, slot, slots[slot])
                    pending.remove(item)
                progress.refresh(list(active.values()))
                time.sleep(0.25)
        except KeyboardInterrupt:
            interrupted = True
            progress.line("interrupted: stopping running variants (they end KILLED)...")
            for act in active.values():
                _stop(act.proc)
            for vid, act in active.items():
                outcomes[vid] = o = self._finish(act, act.proc.wait(), interrupted=True)
                progress.line(_outcome_line(act.index, len(grid.variants), o))
            for _, v in pending:
                outcomes[v.id] = Outcome(v, "NOT RUN", reason="grid interrupted")
        finally:
            signal.signal(signal.SIGTERM, old_term)

        ordered = [outcomes[v.id] for v in grid.variants]
        summary = summary_table(ordered)
        print("\n" + redact(summary), file=out, flush=True)
        parent.log_text(summary, "summary.txt")
        failed = [o for o in ordered if o.status in ("FAILED", "BLOCKED")]
        status = "KILLED" if interrupted else ("FAILED" if failed else "FINISHED")
        self.store.end_run(parent_run, status)
        if interrupted:
            return EXIT_INTERRUPT
        return EXIT_FAILURES if failed else EXIT_OK


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()


def _outcome_line(i: int, n: int, o: Outcome) -> str:
    text = f"[{i}/{n}] {o.status.lower()} {o.variant.run_name}"
    if o.status in ("FINISHED", "FAILED", "KILLED"):
        text += f" in {_hms(o.seconds)}"
    if o.reason:
        text += f": {o.reason}"
    return text


def summary_table(outcomes: list[Outcome]) -> str:
    rows = [("status", "variant", "id", "steps", "time", "run id / reason")]
    for o in outcomes:
        detail = o.reason if o.status not in ("FINISHED", "SKIPPED") else (o.run_id or "")
        rows.append((o.status, o.variant.run_name, o.variant.id, "" if o.steps is None else str(o.steps),
                     _hms(o.seconds) if o.seconds else "", detail))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(5)) + "  " + r[5] for r in rows]
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in counts.items()))
    return "\n".join(lines)
