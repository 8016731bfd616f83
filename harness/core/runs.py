"""Runs in the MLflow store: the tag names harness writes, and every query that reads runs back.

One experiment per grid; one parent run per invocation (`harness.kind = grid`); one nested child run per
variant (`harness.kind = variant`, `harness.variant_id = <id>`). The executor (`Store`), the report
(`analysis.load`) and `harness evaluate` all ask through the functions here, so "the latest FINISHED run
of a variant" means one thing everywhere.

MLflow is imported lazily, so `harness plan` stays fast.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from harness.core.tracking import default_tracking_uri, is_disk_full, redact, redact_mapping, retry

TAG_VARIANT = "harness.variant_id"
TAG_GRID = "harness.grid"
TAG_METHOD = "harness.method"
TAG_KIND = "harness.kind"  # KIND_GRID (parent) or KIND_VARIANT (child)
TAG_PID = "harness.executor_pid"
TAG_HOST = "harness.host"
TAG_RECOVERED = "harness.recovered"
TAG_STAGE = "harness.stage_variant_id"  # a child's `from:` stage
TAG_GROUP = "harness.group"  # the variant id without the seed: shared by the seed replicates of one variant
TAG_REPLICATE = "harness.replicate"  # "2/3": which of its group's seed replicates this run is (only when several)
TAG_SOURCE = "harness.source"
TAG_BASE_MODEL = "harness.base_model"
TAG_FAILURE_REASON = "harness.failure_reason"
TAG_FAILURE_STEP = "harness.failure_step"
TAG_STOPPED = "harness.stopped"  # why the caller stopped a run early (a pruned trial, a lost race); status KILLED
TAG_RACE = "harness.race"  # on a grid run: `run --race` raced it, with the rule's alpha and looks
TAG_JOBS = "harness.jobs"  # on a grid run: `--jobs auto` and what it chose, and why
TAG_DEVICE = "harness.device"
TAG_PRECISION = "harness.precision"
TAG_GPU = "harness.gpu"
TAG_THREADS = "harness.threads"  # torch CPU threads the worker trained with
TAG_WORKER_START = "harness.worker_start"  # fork (from the warm server) or exec (a fresh interpreter)
TAG_EXECUTOR = "harness.executor"  # local (processes on this machine) or ray (tasks on a Ray cluster)
TAG_WORKER_HOST = "harness.worker_host"  # the machine the variant trained on
TAG_ATTEMPT = "harness.attempt"  # ray: which attempt trained the run (2+: retried after a lost node)
TAG_VARIANT_COUNT = "harness.variants"
TAG_ARGV = "harness.argv"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
KIND_GRID, KIND_VARIANT, KIND_SEARCH = "grid", "variant", "search"
TAG_STUDY = "harness.study"  # a search's study name, on its parent and on every trial's run
TAG_TRIAL = "harness.trial"  # a trial's number in its study
TAG_TRIAL_STATE = "harness.trial_state"  # COMPLETE, PRUNED or FAIL, as told to Optuna
TAG_STORAGE = "harness.search_storage"  # where the study lives: journal:<path under results/> or a redacted URL

TAG_VERDICT = "harness.verdict"  # a finished variant's held-out shift: above zero, below zero, not distinguishable...
TAG_NOTE = "harness.note"  # "generated": harness wrote the run's description (and may rewrite it)
NOTE_TAG = "mlflow.note.content"  # MLflow's run description (markdown), the first thing a run's page shows
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3: which UI an experiment belongs to
EXPERIMENT_KIND = "custom_model_development"  # "Model training", not GenAI traces

VARIANT_ARTIFACT = "variant.yaml"  # the variant's typed config (what analysis reads back)
PAIRS_ARTIFACT = "eval/pairs.csv"
PAIRS_TABLE_ARTIFACT = "eval/heldout_pairs.json"  # the held-out rows again, as an MLflow table (the UI compares it)
SUMMARY_ARTIFACT = "summary.txt"  # a parent run's outcome table
RUN_ID = re.compile(r"^[0-9a-f]{32}$")

Q_VARIANTS_FINISHED = f"tags.`{TAG_KIND}` = '{KIND_VARIANT}' and attributes.status = 'FINISHED'"
Q_GRIDS = f"tags.`{TAG_KIND}` = '{KIND_GRID}'"
Q_SEARCHES = f"tags.`{TAG_KIND}` = '{KIND_SEARCH}'"
Q_RUNNING = "attributes.status = 'RUNNING'"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def client_for(results_dir: Path):
    """(client, uri) of the store of a results folder (MLFLOW_TRACKING_URI wins). Raises StoreError for a
    damaged store. A store that was moved or copied is re-anchored first (see `reanchor`)."""
    uri = default_tracking_uri(results_dir)
    check_store(uri)
    reanchor(uri)
    return open_client(uri), uri


def search(client, experiment_id: str, query: str) -> list:
    """Every active run of the experiment matching `query`, all pages."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = retry(lambda: client.search_runs([experiment_id], query, run_view_type=ViewType.ACTIVE_ONLY,
                                                max_results=1000, page_token=token), "search runs")
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def latest_finished(client, experiment_id: str) -> dict[str, Any]:
    """variant id -> its newest FINISHED run."""
    latest: dict[str, Any] = {}
    for run in sorted(search(client, experiment_id, Q_VARIANTS_FINISHED), key=lambda r: r.info.start_time):
        latest[run.data.tags[TAG_VARIANT]] = run
    return latest


def latest_grid_run(client, experiment_id: str) -> str | None:
    """The newest parent run (of a grid or a search) of the experiment, or None."""
    parents = search(client, experiment_id, Q_GRIDS) + search(client, experiment_id, Q_SEARCHES)
    return max(parents, key=lambda r: r.info.start_time).info.run_id if parents else None


def latest_search_run(client, experiment_id: str):
    """The newest search parent run of the experiment (the study's run), or None."""
    parents = search(client, experiment_id, Q_SEARCHES)
    return max(parents, key=lambda r: r.info.start_time) if parents else None


def children_of(client, experiment_id: str, parent_run_id: str) -> list:
    return search(client, experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def is_variant_run(run) -> bool:
    return run.data.tags.get(TAG_KIND) == KIND_VARIANT


def is_grid_run(run) -> bool:
    """A parent run: one grid invocation, or a search's study."""
    return run.data.tags.get(TAG_KIND) in (KIND_GRID, KIND_SEARCH)


class StoreError(RuntimeError):
    """The tracking store cannot be opened or written; the message names it and says what to do."""


class DiskFullError(StoreError):
    """No space left where the store or the run outputs are written."""

    def __init__(self, folder: Path, detail: str):
        self.folder, self.detail = folder, detail
        super().__init__(f"disk full: no space left in {folder} ({detail})")


def check_store(uri: str) -> None:
    """Refuse a damaged sqlite store (a truncated or overwritten mlflow.db), or a sqlite file of another program,
    before MLflow opens it: MLflow would answer the first with a long SQLAlchemy traceback and add its tables to
    the second. Read-only: the file is left exactly as it is."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.is_file() or path.stat().st_size == 0:
        return  # a new store: MLflow creates it
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            result = con.execute("PRAGMA quick_check(1)").fetchone()
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
        problem = None if result == ("ok",) else str(result[0] if result else "no answer")
    except sqlite3.Error as e:
        problem = str(e)
    if problem and not any(w in problem.lower() for w in ("locked", "busy")):  # busy is another runner, fine
        raise StoreError(f"{path}: the MLflow store is damaged (sqlite: {problem}); it was left as it is. "
                         f"Restore it from a backup, or give another --results folder")
    if not problem and tables and not tables & {"experiments", "alembic_version"}:
        # MLflow would add its tables to another program's database
        raise StoreError(f"{path}: this sqlite file is not an MLflow store (its tables: "
                         f"{', '.join(sorted(tables)[:5])}); it was left as it is. Give another --results folder")


def _file_path(location: str | None) -> Path | None:
    """The local folder of a `file://` (or plain path) artifact location, else None."""
    from urllib.parse import unquote, urlparse

    if not location:
        return None
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(location) if not parsed.scheme and location.startswith("/") else None


def reanchor(uri: str) -> str | None:
    """Point the artifact locations of a moved or copied store back at the `artifacts/` folder beside it.

    MLflow records every artifact location as an absolute `file://` path, so a `results/` folder copied or moved
    elsewhere would show (or, for a copy, quietly read and write) the artifacts of the old place. harness creates
    each experiment's artifacts in `<results>/artifacts/<grid>`; when an experiment's recorded location is such a
    folder somewhere else and `artifacts/<grid>` exists next to this `mlflow.db`, its location and its runs' are
    rewritten to that folder (one sqlite transaction; nothing else changes). Returns a sentence saying what was
    re-anchored, or None when nothing needed it. A store that cannot be written is left as it is (the sentence
    says so)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_file() or db.stat().st_size == 0:
        return None
    here = (db.parent / "artifacts").resolve()
    try:
        con = sqlite3.connect(db, timeout=30)
    except sqlite3.Error:
        return None
    try:
        try:
            experiments = con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall()
        except sqlite3.Error:
            return None  # not an MLflow store (yet): MLflow creates the tables
        moves = []
        for exp_id, location in experiments:
            path = _file_path(location)
            if path is None or path.parent.name != "artifacts" or path.parent.resolve() == here:
                continue
            if (here / path.name).is_dir():
                moves.append((exp_id, location, (here / path.name).as_uri(), path.parent.parent))
        if not moves:
            return None
        runs = 0
        try:
            with con:  # one transaction: every location moves, or none
                for exp_id, old, new, _ in moves:
                    con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, exp_id))
                    runs += con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE "
                                        "experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                                        (new, len(old) + 1, exp_id, len(old), old)).rowcount
        except sqlite3.Error as e:
            return (f"{db}: its artifact locations point at {moves[0][3]} (the store was moved or copied), and they "
                    f"could not be re-pointed at {here} ({e}); artifacts show from the old place, if it exists")
        olds = sorted({str(m[3]) for m in moves})
        return (f"{db.parent} was moved or copied from {', '.join(olds)}: the artifact locations of {len(moves)} "
                f"experiment(s) and {runs} run(s) now point at {here}")
    finally:
        con.close()


def _create_atomically(db: Path) -> None:
    """Create a new sqlite store whole or not at all. MLflow builds its schema (dozens of migrations, a few
    seconds) when a client first opens a missing file; interrupted, that leaves a half-built store no later
    command can open. So a missing store is built in a temporary file next to it and linked into place only
    when complete (callers hold the store's lock; an existing file is left alone)."""
    if db.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # a new name per try
    try:
        retry(lambda: client(f"sqlite:///{tmp}").search_experiments(max_results=1), "create store")
        try:
            os.link(tmp, db)
        except FileExistsError:  # another program made one meanwhile: theirs stands
            pass
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


def _count_runs(db: Path) -> str:
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            return str(con.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return "no readable"


def open_client(uri: str):
    """The MLflow client of a store, opened the one way every command opens it: a new sqlite store is built whole
    (`_create_atomically`) under the store's lock, and a store MLflow cannot open (half-built, another MLflow
    version's schema, an unwritable folder) raises StoreError naming the file and what to do, never a
    SQLAlchemy traceback. Callers check the file first (`check_store`)."""
    if uri.startswith("sqlite:///"):
        # A new sqlite store is created by running migrations when the client first opens it; several
        # runners starting at once on one new file would race on that, so they open it under a lock.
        from filelock import FileLock

        db = Path(uri.removeprefix("sqlite:///"))
        existed = db.exists() and db.stat().st_size > 0
        try:
            if not existed:  # an existing store is complete (built whole), so only its creation takes the lock
                with FileLock(str(db) + ".lock"):
                    _create_atomically(db)
            opened = client(uri)
            retry(lambda: opened.search_experiments(max_results=1), "initialise store")
        except Exception as e:  # noqa: BLE001 - a folder we cannot write: PermissionError or sqlite's own
            text = str(getattr(e, "orig", None) or e).splitlines()[0]
            if is_disk_full(e):
                raise DiskFullError(db.parent, text) from None
            writable = not isinstance(e, OSError) and "readonly" not in text and "unable to open" not in text
            if writable and existed and type(e).__module__.split(".")[0] in ("sqlalchemy", "mlflow"):
                # a half-built store (its creation interrupted) or another MLflow version's schema
                raise StoreError(f"{db}: MLflow cannot open this store: {text.rstrip('.')}. A store whose "
                                 f"creation was interrupted (before harness built new stores whole) holds no "
                                 f"runs; this one holds {_count_runs(db)}: if none, delete it and run "
                                 f"again") from None
            if writable:
                raise
            raise StoreError(f"{Path(uri.removeprefix('sqlite:///')).parent}: cannot create or write the "
                             f"MLflow store there ({text}); check that the folder is writable, or give "
                             f"another --results folder") from None
    else:
        opened = client(uri)
    return opened


class Store:
    """The executor's view of MLflow: experiments, parent/child runs, resume and recovery."""

    def __init__(self, uri: str, artifact_root: Path):
        # Every call goes through this explicit client. (mlflow.set_tracking_uri would also export
        # MLFLOW_TRACKING_URI into os.environ, leaking one store into every later run in this process.)
        self.uri = uri
        self.artifact_root = artifact_root
        check_store(uri)
        self.reanchored = reanchor(uri)  # a moved or copied results folder: said by the caller
        self.client = open_client(uri)

    def uri_for_display(self) -> str:
        return redact(self.uri)

    def experiment(self, name: str) -> str:
        def get_or_create() -> str:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            try:
                location = (self.artifact_root / name).resolve().as_uri()
                return self.client.create_experiment(name, artifact_location=location,
                                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
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

    def reopen_run(self, run_id: str, tags: dict[str, Any]) -> bool:
        """Mark an ended run of this store RUNNING again under this process (a resumed search's parent).
        False if it is gone or deleted."""
        try:
            run = retry(lambda: self.client.get_run(run_id), "get run")
        except Exception:  # noqa: BLE001 - MLflow raises RestException for a missing run
            return False
        if run.info.lifecycle_stage != "active":
            return False
        retry(lambda: self.client.update_run(run_id, status="RUNNING"), "reopen run")
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in redact_mapping({**tags, TAG_PID: os.getpid(),
                                                               TAG_HOST: socket.gethostname()}).items()]
        retry(lambda: self.client.log_batch(run_id, tags=items), "tag reopened run")
        return True

    def end_run(self, run_id: str, status: str) -> None:
        retry(lambda: self.client.set_terminated(run_id, status=status), "end run")

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        retry(lambda: self.client.set_tag(run_id, key, redact(str(value))), "set tag")

    def finished(self, experiment_id: str) -> dict[str, str]:
        """variant id -> run id of its newest FINISHED run."""
        return {vid: run.info.run_id for vid, run in latest_finished(self.client, experiment_id).items()}

    def finished_since(self, experiment_id: str, variant_id: str, since_ms: int = 0) -> str | None:
        """Run id of the newest FINISHED run of one variant started at or after `since_ms` (epoch ms), or None:
        asked again just after claiming a variant, because another runner may have finished it meanwhile."""
        runs = [r for r in search(self.client, experiment_id,
                                  f"{Q_VARIANTS_FINISHED} and tags.`{TAG_VARIANT}` = '{variant_id}'")
                if r.info.start_time >= since_ms]
        return max(runs, key=lambda r: r.info.start_time).info.run_id if runs else None

    def recover_orphans(self, experiment_id: str) -> list[str]:
        """RUNNING runs whose executor process on this host is gone: mark FAILED, tag as recovered."""
        host = socket.gethostname()
        recovered = []
        for run in search(self.client, experiment_id, Q_RUNNING):
            tags = run.data.tags
            if tags.get(TAG_HOST) != host or alive(int(tags.get(TAG_PID, "0") or 0)):
                continue
            self.set_tag(run.info.run_id, TAG_RECOVERED, "executor died while this run was RUNNING")
            self.end_run(run.info.run_id, "FAILED")
            recovered.append(run.info.run_id)
        return recovered


class Claims:
    """Which runner trains which variant, when several share one results folder: an exclusive, non-blocking
    `flock` on `runs/.claims/<variant id>` per variant being trained.

    The kernel drops the lock when its last holder exits, so a runner killed with -9 leaves no stale claim;
    the runner hands the descriptor to its worker (`fd`), so the claim also lasts while an orphaned worker
    finishes its step. Local folders only (flock over NFS is not reliable)."""

    def __init__(self, runs_dir: Path):
        self.folder = runs_dir / ".claims"
        self.held: dict[str, int] = {}  # variant id -> descriptor holding its lock

    def take(self, variant_id: str) -> bool:
        """Claim the variant for this process; False when another process holds it."""
        import fcntl

        if variant_id in self.held:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / variant_id, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:  # who holds it, for the other runner's message; the lock itself needs no space
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError:
            pass
        self.held[variant_id] = fd
        return True

    def holder(self, variant_id: str) -> str:
        """Who holds a claim, as written by its holder (for "waiting for ..." messages)."""
        try:
            return (self.folder / variant_id).read_text().strip() or "another runner"
        except OSError:
            return "another runner"

    def fd(self, variant_id: str) -> int:
        return self.held[variant_id]

    def release(self, variant_id: str) -> None:
        fd = self.held.pop(variant_id, None)
        if fd is not None:
            os.close(fd)  # the lock goes with the last descriptor (the worker's copy is closed when it exits)


def alive(pid: int) -> bool:
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
