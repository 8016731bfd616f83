"""Tracking: a small interface with an MLflow implementation and a null one, and secret redaction.

`Tracker` is what a training process uses to log into one existing run: params, step metrics (one batched
call per step: a one-call-per-metric loop against sqlite costs tens of milliseconds per metric), artifacts.
Code that trains takes a Tracker and never asks whether tracking is on: `NullTracker` has the same methods.
The executor's side (experiments, parent and child runs, resume queries, tag names) is `harness.core.runs`.

Default store: sqlite:///results/mlflow.db (MLFLOW_TRACKING_URI wins). MLflow is imported lazily so
`harness plan` stays fast.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# A key is secret when one of its words is one of these ("hub_token" yes, "probe_tokens" no).
_SECRET_WORDS = {"token", "secret", "password", "passwd", "apikey", "auth", "credential", "credentials"}
_URL_PASSWORD = re.compile(r"(//[^/:@\s]+:)[^@/\s]+@")
# Well-known token shapes, as the issuers make them: Hugging Face (hf_ + 34 letters), OpenAI/Anthropic-style
# (sk- + 20 to 150 characters of a random alphabet: `sk-proj-…`, `sk-ant-api03-…`, 48 letters and digits), GitHub
# (ghp_ + 36, github_pat_ + 82), AWS access key ids (AKIA + 16). A prefix alone is not a key: `sk-learn-baseline`
# and `hf_cache` are ordinary names, so each shape asks for the length real keys have, and sk- also for what a
# random alphabet shows (a digit, a capital, or 32 characters without a separator), unlike hyphenated words.
_TOKEN_SHAPES = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-(?=[A-Za-z0-9_-]*[0-9A-Z]|[A-Za-z0-9_-]*[A-Za-z0-9]{32})[A-Za-z0-9_-]{20,}"
                           r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,}|AKIA[0-9A-Z]{16})\b")
_TOKEN_KINDS = {"hf_": "a Hugging Face token", "sk-": "an API key", "gh": "a GitHub token", "github_pat_":
                "a GitHub token", "AKIA": "an AWS access key id"}


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


def token_shaped(text: str) -> str | None:
    """What kind of key `text` contains, if it holds a token-shaped string (None if not): a name that would
    be masked in one place and kept in clear in another (an experiment name, a folder) is refused instead."""
    found = _TOKEN_SHAPES.search(text)
    if not found:
        return None
    return next(kind for prefix, kind in sorted(_TOKEN_KINDS.items(), key=lambda kv: -len(kv[0]))
                if found.group().startswith(prefix))


def redact_document(text: str, name: str) -> str:
    """`redact` for a file's text that stays readable as what its name says: YAML and JSON are masked value by
    value and written again (a bare `***` in YAML is an alias, and the file would no longer parse)."""
    masked = redact(text)
    if masked == text or not name.endswith((".yaml", ".yml", ".json")):
        return masked
    import yaml

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return redact(value)
        if isinstance(value, dict):
            return {walk(k): walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    try:
        if name.endswith(".json"):
            return json.dumps(walk(json.loads(text)), indent=1, default=str)
        return yaml.safe_dump(walk(yaml.safe_load(text)), sort_keys=False, allow_unicode=True)
    except Exception:  # noqa: BLE001 - a file that does not parse as its name says: mask the text as text
        return masked


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


def server_health(uri: str, timeout: float = 5.0) -> str | None:
    """None if an MLflow server answers at `uri` (any HTTP answer), else why not. Credentials in the URL are
    not sent; MLflow's client would retry an unreachable server for minutes before saying so."""
    import urllib.error
    import urllib.parse
    import urllib.request

    parsed = urllib.parse.urlparse(uri)
    netloc = parsed.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parsed.port:
        netloc += f":{parsed.port}"
    url = urllib.parse.urlunparse((parsed.scheme, netloc, parsed.path.rstrip("/") + "/health", "", "", ""))
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: a server is there (auth or an older MLflow without /health)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return str(getattr(reason, "strerror", None) or reason)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC, however it arrives: an OSError from a file write, or sqlite's "database or disk is full"
    wrapped by SQLAlchemy and MLflow."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or says_disk_full(str(e))


def says_disk_full(text: str) -> bool:
    """Whether a message or log tail reports a full disk."""
    text = text.lower()
    return "database or disk is full" in text or "no space left on device" in text


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

    def log_table(self, data: Any, name: str) -> None: ...


NullTracker = Tracker


class MlflowTracker(Tracker):
    """Logs into one run of the store at `uri`. `artifact_uri`, when given, is where this process writes the
    run's artifacts instead of the run's own location: a worker on another machine uploads through the
    tracking server (`mlflow-artifacts:/...`) what a local one writes straight into results/artifacts."""

    def __init__(self, uri: str, run_id: str, artifact_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.repo = None
        if artifact_uri:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            self.repo = get_artifact_repository(artifact_uri, tracking_uri=uri)

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
        target = self.repo or self.client
        args = () if self.repo else (self.run_id,)
        if path.is_dir():
            retry(lambda: target.log_artifacts(*args, str(path), artifact_path), "log artifacts")
        else:
            retry(lambda: target.log_artifact(*args, str(path), artifact_path), "log artifact")

    def log_dict(self, data: Any, name: str) -> None:
        self.log_text(json.dumps(data, indent=1, default=str), name)

    def log_text(self, text: str, name: str) -> None:
        if self.repo is None:
            retry(lambda: self.client.log_text(self.run_id, redact_document(text, name), name), "log text")
            return
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # the repository uploads files: write the text as one
            local = Path(tmp) / Path(name).name
            local.write_text(redact_document(text, name), encoding="utf-8")
            folder = str(Path(name).parent) if Path(name).parent != Path(".") else None
            retry(lambda: self.repo.log_artifact(str(local), folder), "log text")

    def log_table(self, data: Any, name: str) -> None:
        """A pandas DataFrame as an MLflow table (`name` ends in .json): the UI's Evaluation view lists it and
        compares it across runs. Through an artifact repository (a tracking server), the same JSON as a file."""
        if self.repo is not None:
            self.log_text(data.to_json(orient="split", index=False), name)
            return
        retry(lambda: self.client.log_table(self.run_id, data=data, artifact_file=name), "log table")
