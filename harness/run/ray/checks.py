"""What `--executor ray` asks before the first variant: Ray is installed, the tracking server answers and stores
artifacts in this results folder, the cluster is reachable and has a node that fits one variant.

Each refusal is a `BackendError` whose message says what to do; the CLI exits 2 on it (nothing was run).
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlparse

from harness.core.tracking import redact, server_health
from harness.run.ends import first_line

INSTALL = 'pip install -e ".[ray]"  (or: pip install "ray==2.60.0")'
PROBE_FOLDER = ".harness-probe"  # under results/artifacts, for the moment the server check takes


class BackendError(RuntimeError):
    """Ray cannot run the variants as asked; the message says what to do. The CLI exits 2 on it."""


def require_ray():
    try:
        import ray
    except ImportError:
        raise BackendError(f"--executor ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


def check_tracking(uri: str, results_dir: Path, artifact_root: Path):
    """The runs are tracked to an MLflow server that answers and stores artifacts in `artifact_root`; returns
    a client of it."""
    shown = redact(uri)
    if urlparse(uri).scheme not in ("http", "https"):
        raise BackendError(
            f"--executor ray: the runs would be tracked to {shown}, a store only this machine can write; workers "
            f"on other nodes log over HTTP to one MLflow server. Start it with `python -m harness server "
            f"--results {results_dir}` and pass --tracking-uri http://127.0.0.1:5000 (or set "
            f"MLFLOW_TRACKING_URI)")
    problem = server_health(uri)
    if problem:
        raise BackendError(f"cannot reach the MLflow tracking server at {shown}: {problem}; start it with "
                           f"`python -m harness server --results {results_dir}`")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    check_artifact_destination(uri, results_dir, artifact_root)
    return client


def check_artifact_destination(uri: str, results_dir: Path, artifact_root: Path) -> None:
    """Workers upload artifacts through the server (`mlflow-artifacts:/<experiment>/<run>/artifacts`), which
    must store them where this results folder's runs point: its own results/artifacts. Asked once by
    uploading a small file and looking for it there."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    name = f"probe-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        local.write_text("written by harness to see where the tracking server stores artifacts\n")
        try:
            repo = get_artifact_repository(f"mlflow-artifacts:/{PROBE_FOLDER}", tracking_uri=uri)
            repo.log_artifact(str(local))
        except Exception as e:  # noqa: BLE001 - MLflow raises its own types for a refused upload
            raise BackendError(f"the tracking server at {redact(uri)} does not take artifact uploads "
                               f"({first_line(e)}); start it with `python -m harness server`, which serves "
                               f"artifacts (mlflow server --serve-artifacts)") from None
    landed = artifact_root / PROBE_FOLDER / name
    if not landed.is_file():
        try:  # leave nothing behind in the server's own folder
            repo.delete_artifacts(name)
        except Exception:  # noqa: BLE001 - a server that refuses deletes keeps a 70-byte file
            pass
        raise BackendError(f"the tracking server at {redact(uri)} does not store artifacts in "
                           f"{artifact_root}, where this results folder's runs keep them: run it on this "
                           f"machine over this folder (`python -m harness server --results {results_dir}`)")
    landed.unlink()
    try:
        landed.parent.rmdir()
    except OSError:  # another runner's probe is there too
        pass


def connect(ray, address: str | None) -> None:
    """Connect to the cluster at `address`, or start a private local instance on this machine's loopback."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the network
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
    try:
        if address is None:  # a private local instance on this machine's loopback only
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
        else:
            ray.init(address=address, **quiet)
    except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, grpc errors for ray://
        hint = ("; start a cluster with `ray start --head` (or leave --address out for a local instance)"
                if address in ("auto", None) else "")
        extra = "; ray:// addresses need the Ray client: pip install \"ray[client]==2.60.0\"" if str(
            address).startswith("ray://") else ""
        if address is not None and not os.environ.get("RAY_AUTH_MODE"):
            extra += ("; a cluster with token authentication (Ray 2.60's default) also needs RAY_AUTH_MODE=token "
                      "and its token (~/.ray/auth_token or RAY_AUTH_TOKEN) here")
        raise BackendError(f"cannot connect to the Ray cluster at {address}: {first_line(e)}{hint}"
                           f"{extra}") from None


def check_cluster(ray, uri: str, cpus: float, gpus: float | None) -> tuple[float, str]:
    """A node fits one variant, and the tracking server is reachable from every node. Returns the GPUs per
    variant (`gpus`, or 1 when the cluster has GPUs and none was asked, else 0) and what the cluster holds, in
    words."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    if gpus is None:
        gpus = 1.0 if total.get("GPU", 0) > 0 else 0.0
    fits = [n for n in nodes
            if n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus]
    if not fits:
        have = ", ".join(f"{n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPU, "
                         f"{n['Resources'].get('GPU', 0):g} GPU" for n in nodes)
        raise BackendError(f"no node of the Ray cluster has {cpus:g} CPU and {gpus:g} GPU for one "
                           f"variant ({have}); change --cpus-per-variant / --gpus-per-variant")
    host = urlparse(uri).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        here = ray.get_runtime_context().get_node_id()
        ours = {n["NodeManagerAddress"] for n in nodes if n["NodeID"] == here}
        others = sorted({n["NodeManagerAddress"] for n in nodes} - ours)
        if others:
            raise BackendError(
                f"the tracking URI {redact(uri)} is this machine's loopback, which the cluster's other "
                f"nodes ({', '.join(others)}) cannot reach: start the server on an address they reach "
                f"(`python -m harness server --host 0.0.0.0 --allow-remote`) and pass --tracking-uri http://<this machine's "
                f"address>:PORT")
    return gpus, f"ray: {len(nodes)} node(s), {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU"
