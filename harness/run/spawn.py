"""How a variant's worker process starts: forked from a warm server (the default), or a fresh interpreter.

Importing torch, transformers, TRL, PEFT and MLflow costs about 7 s of CPU per process on the development
machine: more than training a small variant. So by default (`HARNESS_WORKER_START=fork`) a session starts one
multiprocessing *forkserver* that imports them once — and does nothing else: no CUDA, no model, no data, no
store — and every variant runs in a fresh fork of it. Each worker is still its own process with its own pid,
session, environment, memory and exit code, started from the same pristine state, so a crash cannot leak into
the next variant. `HARNESS_WORKER_START=exec` starts each worker as `python -m harness.run.worker JOB` instead (a
fresh interpreter, slower to start; for ruling the server out when debugging).

Both kinds hand back an object with the part of `subprocess.Popen`'s interface the executor uses: `pid`,
`stdout` (the worker's event stream), `poll`, `wait`, `send_signal`, `kill`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Protocol

from harness.run.worker import PARENT_PID_ENV, THREADS_ENV  # noqa: F401 - the executor sets THREADS_ENV through here

START_ENV = "HARNESS_WORKER_START"
MODES = ("fork", "exec")
# What every worker imports before it can do anything; imported once, in the server. None of these touches
# CUDA or reads the per-variant environment (tracking URI, visible devices) at import time.
PRELOAD = ["torch", "transformers", "peft", "trl", "mlflow", "harness.run.worker", "experiments.common",
           "experiments.evaluate"]


class Worker(Protocol):
    pid: int
    stdout: IO[str]

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


def mode(environ: Mapping[str, str] | None = None) -> str:
    """The start method asked for (`HARNESS_WORKER_START` in `environ`, default this process's environment),
    checked; fork where the platform has it."""
    asked = (os.environ if environ is None else environ).get(START_ENV, "").strip().lower()
    if asked and asked not in MODES:
        raise ValueError(f"{START_ENV}={asked!r}: expected one of {', '.join(MODES)}")
    if asked == "exec" or "forkserver" not in multiprocessing.get_all_start_methods():
        return "exec"
    return "fork"


def start(job_path: Path, *, env: dict[str, str], log: IO, keep_fds: tuple[int, ...] = (), cwd: Path | None = None,
          die_with_parent: bool = False, how: str | None = None) -> Worker:
    """Start the worker for `job_path` with exactly `env` as its environment, stderr into `log`, stdout as
    the returned object's event stream, and `keep_fds` (a claim's lock) held open for as long as it runs; in
    `cwd` if given. `die_with_parent`: the worker is SIGKILLed when its parent exits (`HARNESS_PARENT_PID`) --
    the caller for an exec'd worker; for a forked one the server, which exits when the caller does, so a
    killed caller takes its workers with it either way. `how`: "fork" or "exec" (default: `mode()`)."""
    if (how or mode()) == "exec":
        if die_with_parent:
            env = {**env, PARENT_PID_ENV: str(os.getpid())}
        return subprocess.Popen([sys.executable, "-m", "harness.run.worker", str(job_path)], stdout=subprocess.PIPE,
                                stderr=log, env=env, text=True, bufsize=1, start_new_session=True,
                                pass_fds=keep_fds, cwd=cwd)
    return _Forked(job_path, env, log, keep_fds, cwd, die_with_parent)


class _Fd:
    """A file descriptor as a Process argument: it travels with the fork request (SCM_RIGHTS), the server
    closes its copy once it has forked, and the worker receives its own."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return _received, (reduction.DupFd(self.fd),)  # only valid while Process.start() pickles its args


def _received(dup) -> int:
    return dup.detach()


_context = None


def _server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def warm_up() -> None:
    """Start the server now (it imports in the background) when workers will be forked from it."""
    if mode() == "fork":
        _server()
        from multiprocessing import forkserver

        forkserver.ensure_running()


def stop() -> None:
    """Stop the server warm_up started, without waiting for its imports (the input turned out bad after all:
    nothing will be forked, and the command should not linger or leave a process behind)."""
    if _context is None:
        return
    from multiprocessing import forkserver

    server = forkserver._forkserver  # the module's one ForkServer; ensure_running() is its public face
    if getattr(server, "_forkserver_pid", None) is not None:
        try:
            os.kill(server._forkserver_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server._stop()  # closes its pipe, reaps it, removes its socket


class _Forked:
    def __init__(self, job_path: Path, env: dict[str, str], log: IO, keep_fds: tuple[int, ...],
                 cwd: Path | None = None, die_with_parent: bool = False):
        read, write = os.pipe()
        self._process = _server().Process(
            target=_worker_main, name=f"harness.run.worker {Path(job_path).parent.name}", daemon=False,
            args=(str(job_path), env, _Fd(write), _Fd(log.fileno()), tuple(_Fd(fd) for fd in keep_fds),
                  str(cwd) if cwd else None, die_with_parent))
        try:
            self._process.start()  # waits for the server to finish importing, the first time
        except BaseException:
            # Interrupted (Ctrl-C) while starting: a worker the server may already have forked must not train
            # into a run the executor is about to mark KILLED. Kill it if its pid arrived; either way its event
            # pipe closes here, so its first event (sent before any training) ends it.
            if self._process.pid is not None:
                os.kill(self._process.pid, signal.SIGKILL)
            os.close(read)
            raise
        finally:
            os.close(write)  # the worker has its own copy: EOF here once it exits
        self.pid = self._process.pid
        self.stdout = open(read, encoding="utf-8", errors="replace")  # noqa: SIM115 - the event reader closes it
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._process.exitcode  # negative: killed by that signal, as with Popen
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired("harness.run.worker", timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it ended between the poll and the signal
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _worker_main(job_path: str, env: dict[str, str], stdout_fd: int, stderr_fd: int, keep_fds: tuple,
                 cwd: str | None = None, die_with_parent: bool = False) -> None:
    """In the forked worker: become what `python -m harness.run.worker JOB` would have been, then run it."""
    os.setsid()  # its own session: a Ctrl-C at the terminal reaches the executor, which stops workers itself
    if cwd:
        os.chdir(cwd)
    if die_with_parent:  # the server: it exits when the process that started it does (EOF on its alive pipe)
        env = {**env, PARENT_PID_ENV: str(os.getppid())}
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    os.close(stdout_fd)
    os.close(stderr_fd)
    sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    del keep_fds  # held open (not closed) until the process exits: the claim lives as long as the worker
    from harness.run import worker

    rc = worker.main([job_path], start="fork")
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(rc)
