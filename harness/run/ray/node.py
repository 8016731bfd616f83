"""On a Ray node: the task that trains one variant in a worker process of its own and relays its output.

The shipped files (the variant's data, a stage's model) go into a temporary folder; the worker starts there as a
local run starts it (harness/run/spawn.py), dies with the task, and its output folder goes back as a tar.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from harness.run import spawn
from harness.run.ray.relay import pack, unpack, write_error
from harness.run.ray.task import RELAY_EVERY
from harness.run.worker import EXIT_INTERRUPTED, PREFIX

STOP_GRACE = 30.0  # seconds a worker asked to stop gets to write its error.json before it is killed


def run_variant(job: dict, data: dict[str, tuple[str, Any]], stage: bytes | None, env: dict[str, str], relay,
                key: str) -> dict:
    """The Ray task: train one variant in a worker process of its own (`harness.run.spawn`), relaying its output.
    Returns {"rc": exit code, "outputs": tar of its output folder}."""
    import ray

    from experiments.models import cache_dir

    host, pid = socket.gethostname(), os.getpid()
    attempt, stop = ray.get(relay.begin.remote(key), timeout=60)
    with tempfile.TemporaryDirectory(prefix="harness-ray-") as tmp:
        root = Path(tmp)
        out_dir = root / "out"
        out_dir.mkdir()
        if stop:  # stopped while it waited for resources
            write_error(out_dir, "interrupted before it started", EXIT_INTERRUPTED)
            return {"rc": EXIT_INTERRUPTED, "outputs": pack(out_dir)}
        paths = {}
        for role, (name, ref) in data.items():
            target = root / "data" / role / name
            target.parent.mkdir(parents=True)
            target.write_bytes(ray.get(ref))
            paths[role] = str(target)
        stage_dir = None
        if stage is not None:  # a top-level argument: Ray has already fetched it (the data refs sit in a dict)
            stage_dir = root / "stage"
            unpack(stage, stage_dir / "model")
        job = {**job, "variant": {**job["variant"], "data_paths": paths}, "out_dir": str(out_dir), "attempt": attempt,
               "stage_dir": str(stage_dir) if stage_dir else None, "cache_dir": str(cache_dir() / "ray")}
        job_path = root / "job.json"
        job_path.write_text(json.dumps(job))
        placed = PREFIX + json.dumps({"event": None, "step": 0, "node": host, "pid": pid, "attempt": attempt}) + "\n"
        said = (f"ray: attempt {attempt} on {host}: an earlier attempt's process or node was lost; training again "
                f"from step 0 into the same run\n" if attempt > 1 else f"ray: running on {host}\n")
        read_err, write_err = os.pipe()
        with open(write_err, "w", encoding="utf-8") as log:  # the worker holds its own copy: EOF once it exits
            proc = spawn.start(job_path, env={**os.environ, **env}, log=log, cwd=root, die_with_parent=True,
                               how=spawn.mode(env))
        with open(read_err, encoding="utf-8", errors="replace") as err:
            try:
                _relay_until_exit(proc, err, relay, key, [placed, said])
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return {"rc": proc.poll(), "outputs": pack(out_dir, skip=("trainer",))}


def _relay_until_exit(proc: spawn.Worker, err: IO[str], relay, key: str, first: list[str]) -> None:
    """Push the worker's lines every RELAY_EVERY seconds until it exits and its pipes are drained; SIGINT it
    when the driver asks to stop, SIGKILL it STOP_GRACE seconds later."""
    import ray

    lines: queue.Queue[str] = queue.Queue()

    def read(stream) -> None:
        for line in stream:
            lines.put(line)

    readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in (proc.stdout, err)]
    for r in readers:
        r.start()
    batch, stopping = list(first), None
    while True:
        exited = proc.poll() is not None and not any(r.is_alive() for r in readers)
        while not lines.empty():
            batch.append(lines.get())
        stop = ray.get(relay.push.remote(key, batch), timeout=60)
        batch = []
        if exited:
            return
        if stop and stopping is None:
            proc.send_signal(signal.SIGINT)
            stopping = time.monotonic()
        elif stopping is not None and time.monotonic() - stopping > STOP_GRACE:
            proc.kill()
        time.sleep(RELAY_EVERY)
