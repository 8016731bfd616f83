"""Finishing a variant: what its worker's exit comes to, recorded on its run, and the `Outcome` said for it.

A worker that exits 0 with a result.json FINISHED; one that was stopped (an interrupt, a pruned trial) KILLED;
anything else FAILED, with the reason it wrote in error.json or the signal or exit code. A finished variant's
headline is logged for the MLflow UI (harness/run/describe.py). Small store writes come first, the run's end
among them, then the log file: on a nearly full disk the status is what must fit.
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from harness.core import runs as R
from harness.core.tracking import MlflowTracker, is_disk_full, redact, says_disk_full
from harness.core.variant import Variant
from harness.run import describe, race, spawn
from harness.run.claims import VariantClaims
from harness.run.ends import RunEnds, first_line
from harness.run.launch import Active
from harness.run.worker import EXIT_INTERRUPTED


@dataclass
class Outcome:
    variant: Variant
    status: str  # FINISHED, FAILED, KILLED, PRUNED (stopped by its caller), SKIPPED (already finished),
    # BLOCKED (stage failed), NOT RUN
    run_id: str | None = None
    seconds: float = 0.0
    reason: str = ""
    steps: int | None = None


class Finisher:
    """Ends an `Active` variant whose worker has exited: `finish(act, rc, interrupted) -> Outcome`."""

    def __init__(self, uri: str, stream: TextIO, claims: VariantClaims, ends: RunEnds):
        self.uri = uri
        self.stream = stream
        self.claims = claims
        self.ends = ends

    def finish(self, act: Active, rc: int, interrupted: bool) -> Outcome:
        if act.reader is not None:
            act.reader.join(timeout=10)
        try:
            act.log.close()
        except OSError:  # its last flush found the disk full: what the worker wrote itself is there
            pass
        seconds = time.monotonic() - act.started
        status, reason, steps = self._status(act, rc, interrupted)
        log_path = act.out_dir / "worker.log"
        text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        if status != "FINISHED" and says_disk_full(text[-5000:]):  # the worker's own writes hit ENOSPC
            reason = f"disk full: no space left in {act.out_dir} ({reason})"
            self.ends.seen(OSError(errno.ENOSPC, "a worker found no space for its outputs"))  # stop here
        # What follows writes. Small store writes first, the run's end among them, then the log file: on a
        # nearly full disk the status is what must fit.
        tracker = MlflowTracker(self.uri, act.run_id)
        if status == "FINISHED":
            self._headline(act)
        try:
            tags = {R.TAG_FAILURE_REASON: reason[:5000], R.TAG_FAILURE_STEP: steps or 0} if status != "FINISHED" else {}
            if act.stop_reason:
                tags[R.TAG_STOPPED] = act.stop_reason[:5000]
                if race.verdict(act.stop_reason):  # the UI's verdict column says why it has none
                    tags[R.TAG_VERDICT] = race.verdict(act.stop_reason)
            if tags:
                tracker.set_tags(tags)
        except Exception as e:
            if not is_disk_full(e):
                raise
            self.ends.seen(e)
        self.ends.end(act.run_id, status)
        try:
            masked = redact(text)
            if masked != text:  # libraries print what they are given (names, paths): mask the copy on disk too
                log_path.write_text(masked)
            if text:
                tracker.log_text(masked[-2_000_000:], "worker.log")
        except Exception as e:
            if not is_disk_full(e):
                raise
            self.ends.seen(e)
        self.claims.release(act.variant.id)
        if status == "FINISHED":
            self.claims.finish(act.variant.id, act.run_id)
        label = "PRUNED" if act.stop_reason and not interrupted else status
        return Outcome(act.variant, label, act.run_id, seconds, reason, steps)

    @staticmethod
    def _status(act: Active, rc: int, interrupted: bool) -> tuple[str, str, int | None]:
        """(status, reason, steps) from the worker's exit code and what it left in its output folder."""
        result_path, error_path = act.out_dir / "result.json", act.out_dir / "error.json"
        if rc == 0 and result_path.is_file():
            return "FINISHED", "", json.loads(result_path.read_text()).get("global_step")
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
        return status, reason, steps

    def _headline(self, act: Active) -> None:
        """What the MLflow UI shows first for a finished variant (`describe.summarise_run`). A failure here is
        said, never the variant's: it trained and was measured."""
        try:
            describe.summarise_run(self.uri, act.run_id, act.out_dir / "pairs.csv")
        except Exception as e:  # noqa: BLE001
            if is_disk_full(e):
                self.ends.seen(e)
            else:
                print(f"note: could not log the headline of {act.variant.run_name} ({first_line(e)})",
                      file=self.stream, flush=True)


def stop(proc: spawn.Worker, grace: float = 30.0) -> None:
    """Ask a worker to stop (SIGINT: it ends KILLED, its outputs kept), and kill it after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()


def _json_or_none(path: Path) -> dict | None:
    """A small JSON file the worker wrote, or None when it is missing or cut short (a full disk)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
