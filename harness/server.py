"""One MLflow tracking server over the harness store, for workers on several machines (`--executor ray`).

    python -m harness server [--port 5000] [--results results] [--host 127.0.0.1 | --host ADDR --allow-remote]
    python -m harness run GRID --executor ray --tracking-uri http://127.0.0.1:5000

It runs `mlflow server` with the store a local run uses (`sqlite:///<results>/mlflow.db`) and serves artifacts
(`--serve-artifacts --artifacts-destination <results>/artifacts`): every worker's writes go through it over
HTTP — one process writing the sqlite file, which several machines could not safely share — and a worker
on another node needs no shared disk. Runs tracked through it are the runs `harness report` and `harness ui`
read from results/. It binds 127.0.0.1; another --host needs --allow-remote too (and is warned about: MLflow
has no authentication here), as for `harness ui`. Ctrl-C or SIGTERM stops the server's whole process tree.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.core.tracking import server_health
from harness.ui import (  # the same checks and stop as `harness ui`
    LOOPBACK,
    port_taken,
    raise_interrupt,
    remote_refused,
    stop_shielded,
)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def command(results: Path, host: str, port: int, workers: int) -> list[str]:
    results = results.resolve()
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{results / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(results / "artifacts"),
            "--host", host, "--port", str(port), "--workers", str(workers)]


def serve(results: Path, *, host: str = "127.0.0.1", port: int = 5000, workers: int = 2,
          ready_timeout: float = 180.0, allow_remote: bool = False) -> int:
    """Start the server, say when it answers, and run until interrupted. Exit code 2 for a port in use, a
    damaged store or a host other machines can reach without `allow_remote`, 130 on Ctrl-C/SIGTERM, else the
    server's own."""
    from harness.core.runs import StoreError, check_store

    refused = remote_refused("server", host, allow_remote)
    if refused:
        print(refused, file=sys.stderr)
        return EXIT_BAD_INPUT

    results = results.resolve()
    try:
        check_store(f"sqlite:///{results / 'mlflow.db'}")
    except StoreError as e:
        print(f"server: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    taken = port_taken(host, port)
    if taken:
        print(f"server: cannot listen on {host}:{port}: {taken}; pick another with --port", file=sys.stderr)
        return EXIT_BAD_INPUT
    if host not in LOOPBACK:
        print(f"server: warning: listening on {host}: anyone who can reach port {port} of this machine can read "
              f"and change every run (this MLflow server has no authentication); use it on a trusted network only",
              file=sys.stderr)
    results.mkdir(parents=True, exist_ok=True)
    (results / "artifacts").mkdir(exist_ok=True)
    # Job execution (MLflow's GenAI job runner, seven extra processes) is not used by harness.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    print(f"server: starting MLflow on {url} (store {results / 'mlflow.db'}, artifacts {results / 'artifacts'})",
          file=sys.stderr, flush=True)
    # The server is a tree (mlflow, uvicorn and its workers): a process group of its own, stopped as a whole.
    proc = subprocess.Popen(command(results, host, port, workers), env=env, start_new_session=True)
    old_term = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        local = url if host not in ("0.0.0.0", "::") else f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_timeout
        while server_health(local, timeout=2.0) is not None:
            if proc.poll() is not None:
                return proc.returncode or 1
            if time.monotonic() > deadline:
                print(f"server: MLflow did not answer on {url} within {ready_timeout:g} s; stopping it",
                      file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"server: ready on {url}; track runs there with --tracking-uri {url} (or MLFLOW_TRACKING_URI={url}); "
              f"Ctrl-C to stop", file=sys.stderr, flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        stop_shielded(proc, old_term)

