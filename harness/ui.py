"""What a user sees first in the MLflow UI, and the server `harness ui` runs.

    python -m harness ui                 # the newest grid's (or search's) runs, at http://127.0.0.1:5000
    python -m harness ui two_round --open

What each run carries for the UI (a finished variant's headline, an invocation's table, the experiment's saved
view) is written as the runs end, by the run engine: harness/run/describe.py. `harness ui` re-anchors a moved or
copied store, adds headlines to runs logged before they existed, publishes the view, starts `mlflow server`
with one worker and no job runner in a process group of its own, and prints the view's URL, a compare URL for
the latest invocation's variants and the invocation's run (its table and report). A signal to it (Ctrl-C,
SIGTERM) stops the whole group.

The `workflowType` URL parameter is that of MLflow 3.17's UI, read from its source; the browser test
(`tests/test_ui.py`) is what notices when a later MLflow changes it.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from harness.core import runs as R
from harness.core.tracking import default_tracking_uri, redact
from harness.run.describe import has_artifact, publish_view, summarise_run

ML_MODE = "workflowType=machine_learning"  # MLflow 3 opens in GenAI mode (traces) unless told otherwise
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130



class UiError(LookupError):
    """Bad input to `harness ui` (an unknown grid); the message says what is there."""


@dataclass
class Links:
    base: str
    lines: list[tuple[str, str]] = field(default_factory=list)  # (what, URL)
    notes: list[str] = field(default_factory=list)


def experiment_name(target: str) -> str:
    """A grid or search name, or the `name:` of a grid/search file given instead."""
    path = Path(target)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        import yaml

        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise UiError(f"{target}: cannot be read as YAML ({e})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise UiError(f"{target}: no top-level `name:`; give the grid's name instead")
        return raw["name"]
    return target


def prepare(results_dir: Path, target: str | None, base: str) -> Links:
    """Get the store ready to be looked at and say where to look. Writes to the store: re-anchors a moved copy,
    adds headlines to runs logged before they existed, saves the experiment's view."""
    from analysis.load import select_runs

    uri = default_tracking_uri(results_dir)
    R.check_store(uri)
    links = Links(base=base)
    moved = R.reanchor(uri)
    if moved:
        links.notes.append(moved)
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if db is not None and not db.is_file():
        if target:
            raise UiError(f"no grid named {target!r}: {db} holds no runs yet")
        return links
    client = R.open_client(uri)
    if target:
        name = experiment_name(target)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = [e.name for e in client.search_experiments() if e.name != "Default"]
            raise UiError(f"no grid or search named {name!r} in {redact(uri)}; here: {', '.join(known) or 'none'}")
        exp_id = exp.experiment_id
    else:
        newest = [(r.info.start_time, r.info.experiment_id) for e in client.search_experiments()
                  for r in R.search(client, e.experiment_id, R.Q_GRIDS) + R.search(client, e.experiment_id,
                                                                                     R.Q_SEARCHES)]
        if not newest:
            return links
        exp_id = max(newest)[1]
        name = client.get_experiment(exp_id).name
    added = 0
    for run in R.search(client, exp_id, R.Q_VARIANTS_FINISHED):
        if "summary/shift" not in run.data.metrics and summarise_run(uri, run.info.run_id) is not None:
            added += 1
    if added:
        links.notes.append(f"added the headline (summary/ metrics, description, per-pair table) to {added} run(s) "
                           f"of {name} logged before harness wrote one")
    key = publish_view(uri, exp_id)
    links.lines.append((f"{name}: every variant, headline first",
                        f"{base}/#/experiments/{exp_id}/runs?{ML_MODE}&viewStateShareKey={key}"))
    parent = R.latest_grid_run(client, exp_id)
    if parent:
        _, _, _, members = select_runs(client, parent)
        if len(members) > 1:
            ids = json.dumps(sorted(r.info.run_id for r in members), separators=(",", ":"))
            links.lines.append((f"compare the latest invocation's {len(members)} variants",
                                f"{base}/#/compare-runs?runs={quote(ids)}&experiments="
                                f"{quote(json.dumps([exp_id]))}&{ML_MODE}"))
        run_url = f"{base}/#/experiments/{exp_id}/runs/{parent}"
        links.lines.append(("the latest invocation (its table; its report once written)", f"{run_url}?{ML_MODE}"))
        if has_artifact(client, parent, "report/report.html"):
            links.lines.append(("its report, with figures", f"{run_url}/artifacts/report/report.html?{ML_MODE}"))
    return links


def remote_refused(command: str, host: str, allow_remote: bool) -> str | None:
    """Why `command` (`ui`, `server`) will not bind `host`: one other machines can reach, without --allow-remote
    (an MLflow server has no login: anyone reaching it reads and changes every run). None when it may."""
    if host in LOOPBACK or allow_remote:
        return None
    return (f"{command}: --host {host} would let other machines read and change every run (the MLflow server has "
            f"no login); add --allow-remote to mean it, or leave --host out for 127.0.0.1")


def port_taken(host: str, port: int) -> str | None:
    """Why (host, port) cannot be listened on, or None. The MLflow server itself reports a taken port and
    exits 0, so it is asked here first (SO_REUSEADDR, as the server binds: a port in TIME_WAIT is free)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"unknown host ({e.strerror or e})"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            return "the port is already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
    return None


def server_command(uri: str, results_dir: Path, host: str, port: int, workers: int) -> list[str]:
    """`mlflow server` over the store; anything created through it (an experiment made in the UI) keeps its
    artifacts under results/artifacts, not in the current folder."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port",
            str(port), "--workers", str(workers), "--artifacts-destination",
            str((results_dir / "artifacts").resolve())]


def server_env(job_runner: bool) -> dict[str, str]:
    env = dict(os.environ)
    # MLflow's default job runner (a huey consumer per job type, ~10 processes) only serves GenAI jobs (judges,
    # scorers); telemetry would try to reach the network. Neither is needed to look at training runs.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if job_runner else "false"
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def wait_until_answering(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll `url` until it answers 200 (True), the server exits, or `timeout` seconds pass (False)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group led by `proc`, wait for every member to be gone, SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap our own child, or its zombie would count as a member
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def serve(results: Path, target: str | None, *, host: str = "127.0.0.1", port: int = 5000, workers: int = 1,
          allow_remote: bool = False, job_runner: bool = False, open_browser: bool = False) -> int:
    """`harness ui`: get the store ready, start the MLflow server, say where to look, and run until interrupted.
    Exit code 2 for bad input (a port in use, an unknown grid, a host other machines can reach without
    `allow_remote`), 130 on Ctrl-C/SIGTERM, else the server's own."""
    if workers < 1:
        print(f"ui: --workers: expected 1 or more, got {workers}", file=sys.stderr)
        return EXIT_BAD_INPUT
    refused = remote_refused("ui", host, allow_remote)
    if refused:
        print(refused, file=sys.stderr)
        return EXIT_BAD_INPUT
    if host not in LOOPBACK:  # allowed, and said at once
        print(f"warning: --host {host} --allow-remote: anyone who can reach this machine on port {port} can "
              f"read and change every run (the MLflow server has no login). It answers requests addressed to "
              f"localhost or a private-network address; MLFLOW_SERVER_ALLOWED_HOSTS adds other names", file=sys.stderr)
    taken = port_taken(host, port)
    if taken:
        print(f"ui: cannot listen on {host}:{port}: {taken}; pick another with --port", file=sys.stderr)
        return EXIT_BAD_INPUT
    uri = default_tracking_uri(results)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown_host}:{port}"
    try:
        links = prepare(results, target, base)
    except UiError as e:
        print(f"ui: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for note in links.notes:
        print(redact(f"note: {note}"), file=sys.stderr)
    # The server is a tree (mlflow, uvicorn): it gets a process group of its own, and whatever ends this process
    # (Ctrl-C, SIGTERM to this PID alone, an error) stops that whole group.
    shown_workers = f"{workers} worker{'s' if workers > 1 else ''}"
    print(f"starting the MLflow UI on {base} ({shown_workers}; Ctrl-C to stop) ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(server_command(uri, results, host, port, workers),
                            env=server_env(job_runner), start_new_session=True)
    old_term = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        answering = wait_until_answering(f"http://{shown_host}:{port}/health", proc, timeout=180)
        if proc.poll() is not None:
            print(f"ui: the MLflow server exited with code {proc.returncode} before answering", file=sys.stderr)
            return proc.returncode or 1
        print(f"MLflow UI on {base}" + ("" if answering else " (not answering yet; it may need a minute more)"),
              flush=True)
        for what, url in links.lines:
            print(f"  {what}:\n    {url}", flush=True)
        if open_browser and links.lines:
            import webbrowser

            webbrowser.open(links.lines[0][1])
        return proc.wait()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        stop_shielded(proc, old_term)


def stop_shielded(proc, old_term) -> None:
    """Stop a server's process group with further Ctrl-C and SIGTERM ignored (a second Ctrl-C must not cut the
    stop short), then put the handlers back (`ui` and `server` both end this way)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop_group(proc)
    signal.signal(signal.SIGTERM, old_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt

