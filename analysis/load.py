"""Logged runs of a grid, from MLflow into pandas. Reads only what the runs logged: params, metrics, metric
histories and the per-pair artifact `eval/pairs.csv` (schema in `experiments/evaluate.py`).

    from analysis.load import load_study
    study = load_study("two_round", Path("results"))   # or a parent run id
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

HISTORY_KEYS = ("rewards/margins", "train/loss", "eval/margin_shift_mean")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class StudyError(LookupError):
    """The grid or run asked for is not in the store; the message says what is."""


@dataclass
class Study:
    grid: str
    uri: str
    experiment_id: str
    parent_run_id: str | None  # the grid run the report is logged to
    runs: pd.DataFrame  # one row per variant id (its latest FINISHED run): meta columns + params as logged
    metrics: pd.DataFrame  # index run_id, one column per metric (latest value)
    pairs: pd.DataFrame  # per-pair rows of every run, with run_id
    history: pd.DataFrame  # run_id, key, step, value


def parse_param(value: str):
    """Params are logged as strings: give numbers, booleans and None back their type; lists stay text."""
    if value in ("None", ""):
        return None
    if value in ("True", "False"):
        return value == "True"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def client_for(results_dir: Path):
    from mlflow.tracking import MlflowClient

    from harness.tracking import default_tracking_uri

    uri = default_tracking_uri(results_dir)
    return MlflowClient(uri), uri


def _search(client, experiment_id: str, query: str) -> list:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _summary_run_ids(client, parent_id: str) -> set[str]:
    """Run ids listed in a grid run's summary table (its finished and reused variants)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent_id, "summary.txt", tmp)
        except Exception:  # noqa: BLE001 - an interrupted grid run may have no summary
            return set()
        return set(re.findall(r"\b[0-9a-f]{32}\b", Path(path).read_text()))


def select_runs(client, target: str) -> tuple[str, str, str | None, list]:
    """(grid name, experiment id, parent run id, runs) for a grid name or a parent run id.

    A grid name: the latest FINISHED run of every variant id in the grid's experiment; the report goes to
    the grid's latest parent run. A parent run id: the FINISHED variant runs that invocation ran or reused.
    """
    if _RUN_ID.match(target):
        try:
            parent = client.get_run(target)
        except Exception as e:  # noqa: BLE001 - MLflow raises its own RestException
            raise StudyError(f"no run {target} in this store ({e.__class__.__name__})") from None
        if parent.data.tags.get("harness.kind") != "grid":
            raise StudyError(f"run {target} is not a grid (parent) run; give a grid name or a parent run id")
        exp = parent.info.experiment_id
        children = _search(client, exp, f"tags.`mlflow.parentRunId` = '{target}'")
        ids = {r.info.run_id for r in children} | _summary_run_ids(client, target)
        runs = [client.get_run(i) for i in sorted(ids)]
        runs = [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("harness.kind") == "variant"]
        return parent.data.tags.get("harness.grid", target), exp, target, runs
    exp = client.get_experiment_by_name(target)
    if exp is None:
        known = [e.name for e in client.search_experiments() if e.name != "Default"]
        raise StudyError(f"no grid named {target!r} in this store; grids here: {', '.join(known) or 'none'}")
    runs = _search(client, exp.experiment_id, "tags.`harness.kind` = 'variant' and attributes.status = 'FINISHED'")
    latest: dict[str, object] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        latest[run.data.tags["harness.variant_id"]] = run
    parents = _search(client, exp.experiment_id, "tags.`harness.kind` = 'grid'")
    parent = max(parents, key=lambda r: r.info.start_time).info.run_id if parents else None
    return target, exp.experiment_id, parent, list(latest.values())


def _pairs_of(client, run_id: str, tmp: str) -> pd.DataFrame | None:
    try:
        path = client.download_artifacts(run_id, "eval/pairs.csv", tmp)
    except Exception:  # noqa: BLE001 - runs from before measurement existed have no table
        return None
    frame = pd.read_csv(path, keep_default_na=True)
    frame["category"] = frame["category"].fillna("")
    frame.insert(0, "run_id", run_id)
    return frame


def load_study(target: str, results_dir: Path) -> Study:
    client, uri = client_for(results_dir)
    grid, exp, parent, runs = select_runs(client, target)
    if not runs:
        raise StudyError(f"grid {grid!r} has no FINISHED variant runs to report on")
    runs = sorted(runs, key=lambda r: r.info.start_time)
    meta, metric_rows, pair_frames, hist = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            rid = r.info.run_id
            row = {"run_id": rid, "run_name": r.data.tags.get("mlflow.runName", rid),
                   "start_time": r.info.start_time, "end_time": r.info.end_time,
                   "device": r.data.tags.get("harness.device", ""), "gpu": r.data.tags.get("harness.gpu", "")}
            row.update({k: parse_param(v) for k, v in r.data.params.items()})
            row["variant_id"] = r.data.tags.get("harness.variant_id", row.get("variant_id"))
            meta.append(row)
            metric_rows.append({"run_id": rid, **r.data.metrics})
            frame = _pairs_of(client, rid, str(Path(tmp) / rid))
            if frame is not None:
                pair_frames.append(frame)
            for key in HISTORY_KEYS:
                for m in client.get_metric_history(rid, key):
                    hist.append({"run_id": rid, "key": key, "step": m.step, "value": m.value})
    runs_df = pd.DataFrame(meta, dtype=object)  # object: an int param stays an int next to a missing one
    metrics_df = pd.DataFrame(metric_rows).set_index("run_id")
    pairs_df = pd.concat(pair_frames, ignore_index=True) if pair_frames else pd.DataFrame(columns=["run_id"])
    hist_df = pd.DataFrame(hist, columns=["run_id", "key", "step", "value"])
    return Study(grid=grid, uri=uri, experiment_id=exp, parent_run_id=parent, runs=runs_df, metrics=metrics_df,
                 pairs=pairs_df, history=hist_df)


def grid_file_text(client, parent_run_id: str | None) -> str | None:
    """The grid YAML the parent run logged (for the report's header)."""
    if parent_run_id is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            files = client.list_artifacts(parent_run_id, "grid")
            if not files:
                return None
            return Path(client.download_artifacts(parent_run_id, files[0].path, tmp)).read_text()
        except Exception:  # noqa: BLE001
            return None


__all__ = ["Study", "StudyError", "load_study", "parse_param", "client_for", "grid_file_text"]
