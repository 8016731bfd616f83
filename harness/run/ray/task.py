"""One variant's Ray task as the driver sees it: an object with the part of a worker process's interface the
session uses (`harness.run.spawn.Worker`), so the loop, the progress view and the finish treat it as a local one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

from harness.run.ends import first_line
from harness.run.ray.relay import unpack, write_error
from harness.run.worker import PREFIX

RELAY_EVERY = 0.5  # seconds between a task's pushes of output lines (each also asks whether to stop)


class RayWorker:
    """One variant's Ray task, seen as the executor sees a worker process (`harness.run.spawn.Worker`): `stdout`
    yields the worker's lines as the relay brings them, `poll`/`wait` give its exit code once the task is done
    (after writing what it returned into the output folder), SIGINT asks it to stop (it ends KILLED, its
    outputs kept), `kill` cancels the task outright."""

    def __init__(self, ref, relay, key: str, out_dir: Path, max_retries: int):
        self._ref, self._relay, self._key, self._out_dir = ref, relay, key, out_dir
        self._max_retries = max_retries
        self.pid = 0  # the worker's pid on its node, once it is known
        self.node = ""
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self.stdout = self._lines()

    def _lines(self):
        import ray

        while True:
            try:
                finished = self._task_done()  # asked first: a finished task pushed its last lines before returning
                lines = ray.get(self._relay.take.remote(self._key), timeout=60)
            except Exception:  # noqa: BLE001 - Ray or the relay is gone (the session is closing): nothing more comes
                return
            for line in lines:
                if line.startswith(PREFIX) and '"attempt"' in line:
                    placed = json.loads(line[len(PREFIX):])
                    self.pid, self.node = placed.get("pid", 0), placed.get("node", "")
                yield line
            if finished and not lines:
                return
            if not lines:
                time.sleep(RELAY_EVERY / 2)

    def _task_done(self) -> bool:
        import ray

        ready, _ = ray.wait([self._ref], timeout=0, fetch_local=False)
        return bool(ready)

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None and self._task_done():
                self.returncode = self._collect()
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import ray

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired("harness.run.worker (ray task)", timeout)
            ray.wait([self._ref], timeout=min(0.5, left) if left is not None else 0.5, fetch_local=False)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        if sig == signal.SIGKILL:
            self.kill()
            return
        try:  # the task sees it within RELAY_EVERY seconds and SIGINTs its worker, which ends KILLED
            self._relay.stop.remote(self._key)
        except Exception:  # noqa: BLE001 - the relay is gone: cancel instead
            self.kill()

    def kill(self) -> None:
        import ray

        try:
            ray.cancel(self._ref, force=True)  # its process dies; the worker dies with it (PR_SET_PDEATHSIG)
        except Exception:  # noqa: BLE001 - already finished
            pass

    def _collect(self) -> int:
        """The task's result into the output folder; its exit code (or the worker's)."""
        import ray
        from ray import exceptions as X

        try:
            result = ray.get(self._ref)
        except X.TaskCancelledError:
            return write_error(self._out_dir, "its Ray task was cancelled", -int(signal.SIGKILL))
        except X.RayTaskError as e:  # run_variant itself raised: say where and why
            cause = e.cause if getattr(e, "cause", None) is not None else e
            return write_error(self._out_dir, f"ray task failed: {type(cause).__name__}: {first_line(cause)}", 1)
        except X.RayError as e:  # the worker process or its node was lost, and so were its retries
            return write_error(self._out_dir, f"ray: the task was lost {self._max_retries + 1} time(s) (its "
                                               f"process or node died; --max-retries {self._max_retries}): "
                                               f"{type(e).__name__}: {first_line(e)}", 1)
        finally:
            try:
                self._relay.forget.remote(self._key)
            except Exception:  # noqa: BLE001
                pass
        try:
            unpack(result["outputs"], self._out_dir)
        except OSError as e:  # no space or no permission here: the variant fails, the session goes on
            try:
                return write_error(self._out_dir, f"could not write its outputs into {self._out_dir}: {e}", 1)
            except OSError:
                return 1
        return int(result["rc"])


class Refused:
    """A variant that could not be submitted: a worker that has already failed with a reason."""

    def __init__(self, out_dir: Path, reason: str):
        self.pid, self.returncode = 0, write_error(out_dir, reason, 1)
        self.stdout = iter(())

    def poll(self) -> int:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...
