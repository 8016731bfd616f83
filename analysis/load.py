"""Logged runs of a grid, from MLflow into pandas. Reads only what the runs logged: the typed config each
variant logged (`variant.yaml`), metrics, metric histories and the per-pair artifact `eval/pairs.csv`
(schema in `experiments/evaluate.py`; metric meanings in `harness.core.metrics`). Which runs are read is
decided by the run queries in `harness.core.runs`.

    from analysis.load import load_study
    study = load_study("two_round", Path("results"))   # or a parent run id
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from harness.core import runs as R
from harness.core.schema import flatten

HISTORY_KEYS = ("rewards/margins", "train/loss", "eval/margin_shift_mean")


def latest_per_step(history: list) -> list:
    """One point per step, the latest logged: a variant retried on Ray after a lost node logs its steps again
    into the same run, and its last attempt is the one that counts."""
    latest = {}
    for m in sorted(history, key=lambda m: (m.step, m.timestamp)):
        latest[m.step] = m
    return list(latest.values())


class StudyError(LookupError):
    """The grid or run asked for is not in the store; the message says what is."""


@dataclass
class Study:
    grid: str
    uri: str
    experiment_id: str
    parent_run_id: str | None  # the grid run the report is logged to
    runs: pd.DataFrame  # one row per variant id (its latest FINISHED run): meta columns + its typed config
    metrics: pd.DataFrame  # index run_id, one column per metric (latest value)
    pairs: pd.DataFrame  # per-pair rows of every run, with run_id
    history: pd.DataFrame  # run_id, key, step, value
    stopped: list[dict] = field(default_factory=list)  # runs a race (or a pruner) stopped early: name, id, why


def _summary_run_ids(client, parent_id: str) -> set[str]:
    """Run ids listed in a grid run's summary table (its finished and reused variants)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent_id, R.SUMMARY_ARTIFACT, tmp)
        except Exception:  # noqa: BLE001 - an interrupted grid run may have no summary
            return set()
        return set(re.findall(r"\b[0-9a-f]{32}\b", Path(path).read_text()))


def select_runs(client, target: str) -> tuple[str, str, str | None, list]:
    """(grid name, experiment id, parent run id, runs) for a grid name or a parent run id.

    A grid name: the latest FINISHED run of every variant id in the grid's experiment; the report goes to
    the grid's latest parent run. A parent run id: the FINISHED variant runs that invocation ran or reused.
    """
    if R.RUN_ID.match(target):
        try:
            parent = client.get_run(target)
        except Exception as e:  # noqa: BLE001 - MLflow raises its own RestException
            raise StudyError(f"no run {target} in this store ({e.__class__.__name__})") from None
        if not R.is_grid_run(parent):
            raise StudyError(f"run {target} is not a grid (parent) run; give a grid name or a parent run id")
        exp = parent.info.experiment_id
        ids = {r.info.run_id for r in R.children_of(client, exp, target)} | _summary_run_ids(client, target)
        runs = [client.get_run(i) for i in sorted(ids)]
        runs = [r for r in runs if r.info.status == "FINISHED" and R.is_variant_run(r)]
        return parent.data.tags.get(R.TAG_GRID, target), exp, target, runs
    exp = client.get_experiment_by_name(target)
    if exp is None:
        known = [e.name for e in client.search_experiments() if e.name != "Default"]
        raise StudyError(f"no grid named {target!r} in this store; grids here: {', '.join(known) or 'none'}")
    latest = R.latest_finished(client, exp.experiment_id)
    return target, exp.experiment_id, R.latest_grid_run(client, exp.experiment_id), list(latest.values())


def _config_of(client, run, tmp: str) -> dict:
    """The run's typed config, flat ({"lora.rank": 4, ...}), from the `variant.yaml` it logged."""
    try:
        path = client.download_artifacts(run.info.run_id, R.VARIANT_ARTIFACT, tmp)
    except Exception:  # noqa: BLE001 - every variant run logs it at start; a store written otherwise lacks it
        raise StudyError(f"run {run.info.run_id} has no {R.VARIANT_ARTIFACT} artifact: its config cannot be "
                         f"read back with types") from None
    return flatten(yaml.safe_load(Path(path).read_text()) or {})


def _pairs_of(client, run_id: str, tmp: str) -> pd.DataFrame | None:
    try:
        path = client.download_artifacts(run_id, R.PAIRS_ARTIFACT, tmp)
    except Exception:  # noqa: BLE001 - runs from before measurement existed have no table
        return None
    frame = pd.read_csv(path, keep_default_na=True)
    frame["category"] = frame["category"].fillna("")
    frame.insert(0, "run_id", run_id)
    return frame


def load_study(target: str, results_dir: Path) -> Study:
    client, uri = R.client_for(results_dir)
    grid, exp, parent, runs = select_runs(client, target)
    if not runs:
        raise StudyError(f"grid {grid!r} has no FINISHED variant runs to report on")
    runs = sorted(runs, key=lambda r: r.info.start_time)
    meta, metric_rows, pair_frames, hist = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            rid = r.info.run_id
            row = {"run_id": rid, "run_name": r.data.tags.get(R.RUN_NAME_TAG, rid),
                   "start_time": r.info.start_time, "end_time": r.info.end_time,
                   "device": r.data.tags.get(R.TAG_DEVICE, ""), "gpu": r.data.tags.get(R.TAG_GPU, "")}
            row.update(_config_of(client, r, str(Path(tmp) / rid / "config")))
            row["variant_id"] = r.data.tags.get(R.TAG_VARIANT)
            row["group_id"] = r.data.tags.get(R.TAG_GROUP, "")  # runs logged before groups existed have none
            meta.append(row)
            metric_rows.append({"run_id": rid, **r.data.metrics})
            frame = _pairs_of(client, rid, str(Path(tmp) / rid))
            if frame is not None:
                pair_frames.append(frame)
            for key in HISTORY_KEYS:
                hist.extend({"run_id": rid, "key": key, "step": m.step, "value": m.value}
                            for m in latest_per_step(client.get_metric_history(rid, key)))
    runs_df = pd.DataFrame(meta, dtype=object)  # object: an int param stays an int next to a missing one
    metrics_df = pd.DataFrame(metric_rows).set_index("run_id")
    pairs_df = pd.concat(pair_frames, ignore_index=True) if pair_frames else pd.DataFrame(columns=["run_id"])
    hist_df = pd.DataFrame(hist, columns=["run_id", "key", "step", "value"])
    return Study(grid=grid, uri=uri, experiment_id=exp, parent_run_id=parent, runs=runs_df, metrics=metrics_df,
                 pairs=pairs_df, history=hist_df, stopped=stopped_runs(client, exp, parent, set(runs_df["variant_id"])))


def stopped_runs(client, experiment_id: str, parent_run_id: str | None, finished: set[str]) -> list[dict]:
    """The variant runs of the report's grid run that were stopped early on purpose (KILLED with
    `harness.stopped`: `run --race` left them behind) and have no FINISHED run: what the report lists instead
    of pretending they finished."""
    if parent_run_id is None:
        return []
    out = []
    for r in sorted(R.children_of(client, experiment_id, parent_run_id), key=lambda r: r.info.start_time):
        why = r.data.tags.get(R.TAG_STOPPED)
        if r.info.status == "KILLED" and why and r.data.tags.get(R.TAG_VARIANT) not in finished:
            out.append({"run_id": r.info.run_id, "run_name": r.data.tags.get(R.RUN_NAME_TAG, r.info.run_id),
                        "variant_id": r.data.tags.get(R.TAG_VARIANT), "why": why})
    return out


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


__all__ = ["Study", "StudyError", "load_study", "grid_file_text"]
