"""What a user sees first in the MLflow UI, and the server `harness ui` runs.

    python -m harness ui                 # the newest grid's (or search's) runs, at http://127.0.0.1:5000
    python -m harness ui two_round --open

After each variant finishes, the executor calls `summarise_run`: its `summary/` metrics (the held-out margin
shift with its 95% CI bounds, accuracy before and after, KL, Δppl, ‖ΔW‖; logged at step 0, so MLflow's Chart
tab draws bars), a verdict tag, a markdown description, and the held-out per-pair margins as an MLflow table
(the Evaluation view compares it across variants). When an invocation closes, `describe_invocation` writes the
table of its variants onto its parent run, and `publish_view` saves a view of the experiment (MLflow's "Views"
menu, `?viewStateShareKey=`): variant runs only, flat, sorted by the shift, with the headline columns, the
fields that differ between variants, and bar charts of the headline first.

`harness ui` then re-anchors a moved or copied store, adds headlines to runs logged before they existed,
publishes the view, starts `mlflow server` with one worker and no job runner in a process group of its own,
and prints the view's URL, a compare URL for the latest invocation's variants and the invocation's run (its
table and report). A signal to it (Ctrl-C, SIGTERM) stops the whole group.

The view's format (an experiment tag `mlflow.sharedViewState.<key>` holding `{name, createdAt, state}`), the
column ids and the `workflowType` URL parameter are those of MLflow 3.17's UI, read from its source; the
browser test (`tests/test_ui.py`) is what notices when a later MLflow changes them.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from harness.core import runs as R
from harness.core.metrics import SUMMARY_KEYS
from harness.core.tracking import MlflowTracker, default_tracking_uri, redact

VIEW_KEY = "harness-variants"  # the saved view's key (its experiment tag is mlflow.sharedViewState.<key>)
VIEW_NAME = "harness: variants by held-out shift"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
ML_MODE = "workflowType=machine_learning"  # MLflow 3 opens in GenAI mode (traces) unless told otherwise
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
NOT_A_FIELD = {"variant_id", "name"}  # params that differ between every variant: no comparison to make
TABLE_COLUMNS = ("pair", "margin_shift", "margin_before", "margin_after", "chosen_shift", "rejected_shift",
                 "displaced", "category")  # the Evaluation view groups by the first and compares the second


# ---------------------------------------------------------------- what the runs carry


def summarise_run(uri: str, run_id: str, pairs_csv: Path | None = None):
    """Log a finished variant run's headline (summary/ metrics, verdict, description, per-pair table). Reads
    what the run logged: its metrics and params, and its per-pair table (`pairs_csv`, or the artifact). Returns
    the `analysis.headline.Headline`, or None when the run measured no held-out pairs."""
    import pandas as pd

    from analysis.headline import headline, held_out

    client = R.client(uri)
    run = R.retry(lambda: client.get_run(run_id), "get run")
    pairs = _read_pairs(client, run_id, pairs_csv)
    h = headline(run.data.metrics, pairs, run.data.params)
    if h is None:
        return None
    tracker = MlflowTracker(uri, run_id)
    tracker.log_metrics(h.values, step=0)  # one step: MLflow draws a bar, not a lone point
    tags = {R.TAG_VERDICT: h.verdict}
    note = run.data.tags.get(R.NOTE_TAG)
    if not note or run.data.tags.get(R.TAG_NOTE) == "generated":  # never overwrite a description a user wrote
        tags.update({R.NOTE_TAG: h.description, R.TAG_NOTE: "generated"})
    tracker.set_tags(tags)
    if not _has_artifact(client, run_id, R.PAIRS_TABLE_ARTIFACT):  # log_table appends to an existing table
        rows = held_out(pairs)
        table = pd.DataFrame({c: rows[c] for c in TABLE_COLUMNS if c in rows})
        tracker.log_table(table.reset_index(drop=True), R.PAIRS_TABLE_ARTIFACT)
    return h


def _read_pairs(client, run_id: str, pairs_csv: Path | None):
    import pandas as pd

    if pairs_csv is not None and pairs_csv.is_file():
        return pd.read_csv(pairs_csv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return pd.read_csv(client.download_artifacts(run_id, R.PAIRS_ARTIFACT, tmp))
        except Exception:  # noqa: BLE001 - a run from before measurement existed has no table
            return None


def _has_artifact(client, run_id: str, path: str) -> bool:
    folder = path.rsplit("/", 1)[0] if "/" in path else None
    try:
        return any(f.path == path for f in client.list_artifacts(run_id, folder))
    except Exception:  # noqa: BLE001
        return False


@dataclass
class Member:
    """One variant of an invocation, as the executor saw it end."""

    name: str
    status: str
    run_id: str | None
    reason: str = ""


def describe_invocation(uri: str, parent_run_id: str, title: str, members: list[Member], report_hint: str) -> None:
    """The parent run's description: a table of its variants' headlines (read back from their runs)."""
    from analysis.headline import Row, invocation_note

    client = R.client(uri)
    parent = R.retry(lambda: client.get_run(parent_run_id), "get run")
    if parent.data.tags.get(R.NOTE_TAG) and parent.data.tags.get(R.TAG_NOTE) != "generated":
        return  # a user's own description stays
    rows = []
    for m in members:
        metrics, verdict = {}, ""
        if m.run_id and m.status in ("FINISHED", "SKIPPED"):
            run = R.retry(lambda rid=m.run_id: client.get_run(rid), "get run")
            metrics, verdict = run.data.metrics, run.data.tags.get(R.TAG_VERDICT, "")
        rows.append(Row(m.name, m.status, metrics, verdict, m.reason))
    MlflowTracker(uri, parent_run_id).set_tags({R.NOTE_TAG: invocation_note(title, rows, report_hint=report_hint),
                                               R.TAG_NOTE: "generated"})


# ---------------------------------------------------------------- the experiment's view


def _col(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # MLflow's column id: metrics.`summary/shift`, params.`dpo.beta`


def _bar(section: str, keys: list[str], title: str) -> dict:
    return {"uuid": uuid.uuid4().hex, "type": "BAR", "runsCountToCompare": 20, "metricSectionId": section,
            "deleted": False, "isGenerated": False, "metricKey": keys[0],
            **({"selectedMetricKeys": keys} if len(keys) > 1 else {}), "displayName": title}


def varying_params(runs: list) -> list[str]:
    """Params whose value differs between these runs, in the report's order of fields."""
    from analysis.report import AXES_ORDER

    keys = {k for r in runs for k in r.data.params} - NOT_A_FIELD
    out = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    return sorted(out, key=lambda k: (AXES_ORDER.index(k) if k in AXES_ORDER else len(AXES_ORDER), k))


def view_state(params: list[str]) -> dict:
    """The saved view: variant runs only (sorted by a metric, MLflow lists nested runs flat), headline columns
    first, then the fields that differ, and a chart section of headline bars ahead of the step curves."""
    section = uuid.uuid4().hex
    metric_cols = [_col("metrics", k) for k in SUMMARY_KEYS]
    param_cols = [_col("params", k) for k in params]
    verdict_col = _col("tags", R.TAG_VERDICT)
    name_col = _col("attributes", "Run Name")
    columns = [*param_cols, *metric_cols[:3], verdict_col, *metric_cols[3:]]  # what differs, then what came of it
    return {
        "searchFilter": f"tags.`{R.TAG_KIND}` = '{R.KIND_VARIANT}'",
        "orderByKey": _col("metrics", "summary/shift"), "orderByAsc": False,
        "selectedColumns": columns,
        "columnOrder": [name_col, *columns],  # widths apply to the columns named here
        "columnWidths": {name_col: 280, **{c: 100 for c in param_cols}, verdict_col: 130,
                         **{c: max(110, round(22 + 6.6 * len(c.split("`")[1]))) for c in metric_cols}},  # header
        "compareRunCharts": [
            _bar(section, ["summary/shift"], "held-out margin shift (nats)"),
            _bar(section, ["summary/shift_lo", "summary/shift", "summary/shift_hi"], "shift with its 95% CI"),
            _bar(section, ["summary/acc_before", "summary/acc_after"], "held-out accuracy before, after"),
            _bar(section, ["summary/kl"], "KL to the reference (nats/token)"),
            _bar(section, ["summary/dppl"], "perplexity change"),
            _bar(section, ["summary/dw"], "weight change norm"),
        ],
        "compareRunSections": [{"uuid": section, "name": "summary", "display": True, "isReordered": True}],
        "isAccordionReordered": True,  # keep "summary" first (MLflow sorts sections by name otherwise)
        "runsHiddenMode": "FIRST_20_RUNS",
    }


def publish_view(uri: str, experiment_id: str) -> str:
    """Save (or refresh) the experiment's view of its variants; returns its key."""
    client = R.client(uri)
    runs = R.search(client, experiment_id, R.Q_VARIANTS_FINISHED)
    now = int(time.time() * 1000)
    envelope = {"name": VIEW_NAME, "createdAt": now, "updatedAt": now,
                "state": json.dumps(view_state(varying_params(runs)))}
    R.retry(lambda: client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + VIEW_KEY, json.dumps(envelope)),
            "save view")
    R.retry(lambda: client.set_experiment_tag(experiment_id, R.EXPERIMENT_KIND_TAG, R.EXPERIMENT_KIND), "tag kind")
    return VIEW_KEY


def after_invocation(uri: str, experiment_id: str, parent_run_id: str, title: str, members: list[Member],
                     report_hint: str) -> None:
    """What the executor calls as an invocation closes: the parent's description and the experiment's view."""
    describe_invocation(uri, parent_run_id, title, members, report_hint)
    publish_view(uri, experiment_id)


# ---------------------------------------------------------------- `harness ui`


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
        if _has_artifact(client, parent, "report/report.html"):
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
