"""Tracking: a small interface with an MLflow implementation and a null one.

Two roles. `Store` is what the grid executor uses: one experiment per grid, a parent run per
invocation, a nested child run per variant, resume lookups and run status. `Tracker` is what a training
process uses to log into one existing run: params, step metrics (one batched call per step: a
one-call-per-metric loop against sqlite costs tens of milliseconds per metric), artifacts. Code that
trains takes a Tracker and never asks whether tracking is on: `NullTracker` has the same methods.

Default store: sqlite:///results/mlflow.db (MLFLOW_TRACKING_URI wins). MLflow is imported lazily so
`harness plan` stays fast.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

TAG_VARIANT = "harness.variant_id"
TAG_GRID = "harness.grid"
TAG_METHOD = "harness.method"
TAG_KIND = "harness.kind"  # "grid" (parent) or "variant" (child)
TAG_PID = "harness.executor_pid"
TAG_HOST = "harness.host"
TAG_RECOVERED = "harness.recovered"
PARENT_TAG = "mlflow.parentRunId"

# A key is secret when one of its words is one of these ("hub_token" yes, "probe_tokens" no).
_SECRET_WORDS = {"token", "secret", "password", "passwd", "apikey", "auth", "credential", "credentials"}
_URL_PASSWORD = re.compile(r"(//[^/:@\s]+:)[^@/\s]+@")
# Well-known token shapes: Hugging Face, OpenAI-style, GitHub, AWS access key ids.
_TOKEN_SHAPES = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16})\b")


_SECRET_ENV_PARTS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "APIKEY"}


def _secret_env_name(name: str) -> bool:
    parts = set(name.upper().split("_"))
    return bool(parts & _SECRET_ENV_PARTS) or name.upper().endswith(("_KEY", "_API_KEY"))


def _env_secrets() -> list[str]:
    """Values of environment variables whose names look secret (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, ...)."""
    values = [v for k, v in os.environ.items() if _secret_env_name(k) and len(v) >= 6]
    return sorted(set(values), key=len, reverse=True)


def redact(text: str) -> str:
    """Hide URL passwords, token-shaped strings and the values of secret-looking environment variables."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    text = _TOKEN_SHAPES.sub("***", text)
    for value in _env_secrets():
        text = text.replace(value, "***")
    return text


def _secret_key(key: str) -> bool:
    words = re.split(r"[^a-z0-9]+", key.lower())
    return bool(set(words) & _SECRET_WORDS) or "api_key" in key.lower()


def redact_mapping(d: dict[str, Any]) -> dict[str, Any]:
    """Values of secret-looking keys become '***'; URLs lose their passwords."""
    return {k: "***" if _secret_key(k) else (redact(v) if isinstance(v, str) else v) for k, v in d.items()}


def default_tracking_uri(results_dir: Path) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    results_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(results_dir / 'mlflow.db').resolve()}"


def retry(fn: Callable[[], T], what: str, attempts: int = 8) -> T:
    """Run `fn`, retrying sqlite lock contention with jittered backoff (several processes share one db)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - MLflow wraps the sqlite error in several exception types
            if "locked" not in str(e).lower() and "busy" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**i) * (0.5 + random.random()))
    raise AssertionError(what)  # unreachable


class Tracker:
    """Logs into one run. This base class is the null tracker: every method does nothing."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, data: Any, name: str) -> None: ...

    def log_text(self, text: str, name: str) -> None: ...


NullTracker = Tracker


class MlflowTracker(Tracker):
    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in redact_mapping(params).items()]
        for i in range(0, len(items), 100):  # MLflow caps params per batch at 100
            retry(lambda chunk=items[i:i + 100]: self.client.log_batch(self.run_id, params=chunk), "log params")

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in redact_mapping(tags).items()]
        retry(lambda: self.client.log_batch(self.run_id, tags=items), "set tags")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, int | float) and math.isfinite(v)]
        if items:
            retry(lambda: self.client.log_batch(self.run_id, metrics=items), "log metrics")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            retry(lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path), "log artifacts")
        else:
            retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path), "log artifact")

    def log_dict(self, data: Any, name: str) -> None:
        self.log_text(json.dumps(data, indent=1, default=str), name)

    def log_text(self, text: str, name: str) -> None:
        retry(lambda: self.client.log_text(self.run_id, redact(text), name), "log text")


class Store:
    """The executor's view of MLflow: experiments, parent/child runs, resume and recovery."""

    def __init__(self, uri: str, artifact_root: Path):
        from mlflow.tracking import MlflowClient

        # Every call goes through this explicit client. (mlflow.set_tracking_uri would also export
        # MLFLOW_TRACKING_URI into os.environ, leaking one store into every later run in this process.)
        self.uri = uri
        self.artifact_root = artifact_root
        if uri.startswith("sqlite:///"):
            # A new sqlite store is created by running migrations when the client first opens it; several
            # runners starting at once on one new file would race on that, so they open it under a lock.
            from filelock import FileLock

            with FileLock(uri.removeprefix("sqlite:///") + ".lock"):
                self.client = MlflowClient(uri)
                retry(lambda: self.client.search_experiments(max_results=1), "initialise store")
        else:
            self.client = MlflowClient(uri)

    def uri_for_display(self) -> str:
        return redact(self.uri)

    def experiment(self, name: str) -> str:
        def get_or_create() -> str:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            try:
                location = (self.artifact_root / name).resolve().as_uri()
                return self.client.create_experiment(name, artifact_location=location)
            except Exception:  # noqa: BLE001 - another process created it first
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
                return exp.experiment_id

        return retry(get_or_create, "create experiment")

    def start_run(self, experiment_id: str, run_name: str, tags: dict[str, Any], parent: str | None = None) -> str:
        tags = {**tags, TAG_PID: os.getpid(), TAG_HOST: socket.gethostname()}
        if parent:
            tags[PARENT_TAG] = parent
        tags = {k: str(v) for k, v in redact_mapping(tags).items()}
        run = retry(lambda: self.client.create_run(experiment_id, run_name=redact(run_name), tags=tags), "create run")
        return run.info.run_id

    def end_run(self, run_id: str, status: str) -> None:
        retry(lambda: self.client.set_terminated(run_id, status=status), "end run")

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        retry(lambda: self.client.set_tag(run_id, key, redact(str(value))), "set tag")

    def _search(self, experiment_id: str, query: str) -> list:
        from mlflow.entities import ViewType

        runs, token = [], None
        while True:
            page = retry(lambda: self.client.search_runs([experiment_id], query, run_view_type=ViewType.ACTIVE_ONLY,
                                                         max_results=1000, page_token=token), "search runs")
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def finished(self, experiment_id: str) -> dict[str, str]:
        """variant id -> run id of its newest FINISHED run."""
        runs = self._search(experiment_id, f"tags.`{TAG_KIND}` = 'variant' and attributes.status = 'FINISHED'")
        out: dict[str, str] = {}
        for run in sorted(runs, key=lambda r: r.info.start_time):
            out[run.data.tags[TAG_VARIANT]] = run.info.run_id
        return out

    def recover_orphans(self, experiment_id: str) -> list[str]:
        """RUNNING runs whose executor process on this host is gone: mark FAILED, tag as recovered."""
        host = socket.gethostname()
        recovered = []
        for run in self._search(experiment_id, "attributes.status = 'RUNNING'"):
            tags = run.data.tags
            if tags.get(TAG_HOST) != host or _alive(int(tags.get(TAG_PID, "0") or 0)):
                continue
            self.set_tag(run.info.run_id, TAG_RECOVERED, "executor died while this run was RUNNING")
            self.end_run(run.info.run_id, "FAILED")
            recovered.append(run.info.run_id)
        return recovered


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True
