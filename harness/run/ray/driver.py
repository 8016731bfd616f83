"""The driver's side of `--executor ray`: `RayBackend`, the Session's backend (harness.run.launch.Backend).

`open()` checks the tracking server and the cluster (harness/run/ray/checks.py) and starts the session's relay;
`start(job)` ships the variant's files through Ray's object store, submits its task (harness/run/ray/node.py)
and hands back its `RayWorker` (harness/run/ray/task.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from harness.core.tracking import default_tracking_uri
from harness.run import spawn
from harness.run.ray.checks import BackendError, check_cluster, check_tracking, connect, require_ray
from harness.run.ray.node import run_variant
from harness.run.ray.relay import Relay, pack
from harness.run.ray.task import RayWorker, Refused
from harness.run.worker import THREADS_ENV, TRACKING_URI_ENV

# What a worker on another node gets from this process's environment, besides the tracking URI: the switches
# that change how a variant trains. Paths (HARNESS_CACHE_DIR, PYTHONPATH) and credentials stay each node's own.
FORWARDED_ENV = ("HARNESS_FAULT", THREADS_ENV, "HARNESS_REFERENCE_CACHE", spawn.START_ENV, "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")


def _here(ray):
    """The relay's place: this driver's node, so that only losing the driver loses it (on a node that Ray may
    lose mid-grid, it would take every variant's output lines and attempt counts with it). Ray's default where
    the node cannot be named (the Ray client)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    except Exception:  # noqa: BLE001 - no node id here
        return "DEFAULT"


class RayBackend:
    """A Session backend (harness.run.launch.Backend): `slots` says how many variants run at once, `start`
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
        self.client = check_tracking(self.uri, self.results_dir, self.artifact_root)
        ray = require_ray()
        connect(ray, self.address)
        self._connected = True
        try:
            self.gpus, cluster = check_cluster(ray, self.uri, self.cpus, self.gpus)
            print(f"{cluster}; each variant takes {self.cpus:g} CPU and {self.gpus:g} GPU, up to "
                  f"{len(self.slots(None))} at once, retried {self.max_retries} time(s) if its node is lost",
                  file=self.stream, flush=True)
            self.relay = ray.remote(num_cpus=0)(Relay).options(scheduling_strategy=_here(ray)).remote()
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
