"""One variant in its own process (started by harness.run.spawn): `python -m harness.run.worker JOB.json`.

The job file names the variant, its method's registry record (so a method registered at run time, by a
plugin or a test, trains here too), the MLflow run to log into and the output folder; from a Ray task
(harness.run.ray) also where to upload the run's artifacts through the tracking server and which attempt
this is. Progress events go
to stdout as `@@harness {json}` lines; everything else the libraries print goes to the log. Exit codes:
0 finished, 1 failed (reason in error.json, traceback logged), 130 interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

PREFIX = "@@harness "
# The store's URI reaches the worker in its environment, never in the job file (it may hold a password).
TRACKING_URI_ENV = "HARNESS_TRACKING_URI"
THREADS_ENV = "HARNESS_THREADS"  # torch threads for this worker (set by the executor when variants share the CPU)
# Set by a parent that is not the executor (a Ray task): the worker dies with that parent, so a lost or cancelled
# task leaves no orphan training on (and logging into its run) while a retry trains again.
PARENT_PID_ENV = "HARNESS_PARENT_PID"
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _emit(**event) -> None:
    sys.stdout.write(PREFIX + json.dumps(event) + "\n")
    sys.stdout.flush()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (named in HARNESS_PARENT_PID) exits, and exit now if it
    already has. Elsewhere the step-end check in experiments.common (parent pid changed) still stops it."""
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(expected):  # the parent died before the line above took effect
        os._exit(EXIT_INTERRUPTED)


def main(argv: list[str], start: str = "exec") -> int:
    # A parent may have these blocked, and a blocked mask is inherited (a Ray task's thread has them blocked):
    # the executor's stop request must reach this process.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    _die_with_parent()
    job = json.loads(Path(argv[0]).read_text())
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)

    from harness.core import methods
    from harness.core import runs as R
    from harness.core.tracking import MlflowTracker, NullTracker, redact
    from harness.core.variant import Variant

    if job.get("method") and job["method"]["name"] not in methods.names():
        methods.register(methods.Method.from_json(job["method"]))
    variant = Variant.from_json(job["variant"])
    uri = os.environ.get(TRACKING_URI_ENV) or job.get("tracking_uri")
    tracker = (MlflowTracker(uri, job["run_id"], artifact_uri=job.get("artifact_uri")) if job.get("run_id") and uri
               else NullTracker())
    step = {"step": 0}

    def emit(**event):
        if "step" in event:
            step["step"] = event["step"]
        _emit(**event)

    try:
        import torch

        from experiments import common
        from experiments import device as dev

        if os.environ.get(THREADS_ENV):  # several variants share the CPU: each its share of the cores
            torch.set_num_threads(int(os.environ[THREADS_ENV]))
        device = job.get("device") or dev.pick_device()
        precision = dev.resolve_precision(variant.spec.train.precision, device)
        tags = {R.TAG_DEVICE: device, R.TAG_PRECISION: precision, R.TAG_THREADS: torch.get_num_threads(),
                R.TAG_WORKER_START: start, R.TAG_WORKER_HOST: socket.gethostname()}
        if job.get("attempt"):
            tags[R.TAG_ATTEMPT] = job["attempt"]
        if device == "cuda":
            tags[R.TAG_GPU] = torch.cuda.get_device_name()
        tracker.set_tags(tags)
        emit(event="setup", device=device, precision=precision)
        stage_dir = Path(job["stage_dir"]) if job.get("stage_dir") else None
        ctx = common.RunContext(variant=variant, tracker=tracker, out_dir=out_dir, stage_dir=stage_dir,
                                device=device, precision=precision, is_stage=bool(job.get("is_stage")), emit=emit,
                                cache_dir=Path(job["cache_dir"]) if job.get("cache_dir") else None)
        result = variant.method.train_function()(ctx)
        (out_dir / "result.json").write_text(json.dumps(result, indent=1))
        tracker.log_dict(result, "result.json")
        return 0
    except KeyboardInterrupt as e:
        (out_dir / "error.json").write_text(json.dumps({"reason": f"interrupted ({e})", "step": step["step"]}))
        return EXIT_INTERRUPTED
    except BaseException as e:  # noqa: BLE001 - any failure ends this variant, never the grid
        tb = traceback.format_exc()
        reason = f"{type(e).__name__}: {e}"
        text = str(e).lower()
        if "out of memory" in text or "can't allocate memory" in text or isinstance(e, MemoryError):
            reason = f"out of memory: {type(e).__name__}: {e}"
        tb, reason = redact(tb), redact(reason)  # exception messages quote values, names and paths
        (out_dir / "traceback.txt").write_text(tb)
        (out_dir / "error.json").write_text(json.dumps({"reason": reason, "step": step["step"]}))
        sys.stderr.write(tb)
        try:
            tracker.log_text(tb, "traceback.txt")
        except Exception:  # noqa: BLE001 - the executor logs the file if this fails
            pass
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
