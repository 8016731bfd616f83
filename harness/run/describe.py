"""What a run carries for the MLflow UI: each finished variant's headline, the invocation's table, the saved view.

After each variant finishes, the session calls `summarise_run`: its `summary/` metrics (the held-out margin
shift with its 95% CI bounds, accuracy before and after, KL, Δppl, ‖ΔW‖; logged at step 0, so MLflow's Chart
tab draws bars), a verdict tag, a markdown description, and the held-out per-pair margins as an MLflow table
(the Evaluation view compares it across variants). When an invocation closes, `describe_invocation` writes the
table of its variants onto its parent run, and `publish_view` saves a view of the experiment (MLflow's "Views"
menu, `?viewStateShareKey=`): variant runs only, flat, sorted by the shift, with the headline columns, the
fields that differ between variants, and bar charts of the headline first. `harness ui` (harness/ui.py) calls
the same functions for runs logged before they existed.

The view's format (an experiment tag `mlflow.sharedViewState.<key>` holding `{name, createdAt, state}`) and the
column ids are those of MLflow 3.17's UI, read from its source; the browser test (`tests/test_ui.py`) is what
notices when a later MLflow changes them.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from harness.core import runs as R
from harness.core.metrics import SUMMARY_KEYS
from harness.core.tracking import MlflowTracker

VIEW_KEY = "harness-variants"  # the saved view's key (its experiment tag is mlflow.sharedViewState.<key>)
VIEW_NAME = "harness: variants by held-out shift"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
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
    if not has_artifact(client, run_id, R.PAIRS_TABLE_ARTIFACT):  # log_table appends to an existing table
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


def has_artifact(client, run_id: str, path: str) -> bool:
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
