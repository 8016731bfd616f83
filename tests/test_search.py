"""Optuna search through the executor seam, on the in-process tiny model: trials end to end with two workers,
one parent run per study with nested trials, export -> run reproduces the variant, rerun continues the study,
Ctrl-C then rerun, a pruned trial, a Pareto front under a constraint, and clear errors for a bad space."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness import search as S
from harness.cli import main
from harness.core import runs as R
from harness.searchfile import load_search

ROOT = Path(__file__).resolve().parent.parent

BASE = """
name: {name}
defaults:
  base_model: tiny-random-llama
  method: dpo_lora
  data: {{size: 4, max_length: 128}}
  train: {{max_steps: {steps}, batch_size: 2}}
  eval: {{probe_length: 4{every}}}
variants:
  - {{name: s}}
search:
{search}
"""


def write(folder: Path, name: str, search: str, *, steps: int = 1, every: int | None = None) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(BASE.format(name=name, steps=steps, every=f", every: {every}" if every else "",
                                search=textwrap.indent(textwrap.dedent(search).strip(), "  ")))
    return path


SPACE = """
space:
  dpo.beta: {log: [0.01, 1.0]}
  train.learning_rate: {log: [1.0e-4, 1.0e-2]}
objectives: [{metric: eval/margin_shift_mean}]
pruner: none
"""


def study_of(results: Path, name: str):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(results / "search" / f"{name}.journal"),
        lock_obj=optuna.storages.journal.JournalFileOpenLock(str(results / "search" / f"{name}.journal.lock"))))
    return optuna.load_study(study_name=name, storage=storage)


def runs_of(results: Path, name: str):
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(R.TAG_KIND) == R.KIND_SEARCH]
    trials = [r for r in runs if r.data.tags.get(R.TAG_KIND) == R.KIND_VARIANT]
    return client, parents, trials


def test_bad_search_file_is_refused_before_anything_runs(tmp_path, capsys):
    path = write(tmp_path, "bad", """
        space:
          dpo.beat: {log: [0.01, 1.0]}
          train.learning_rate: {log: [0, 1.0e-3]}
          lora.rank: {choice: []}
          data.size: {int: [4, 500]}
          partial_ft.layers: {choice: [all]}
        objectives: [{metric: eval/margin_shift_meen}]
        sampler: cmaes
        pruner: median
    """)
    results = tmp_path / "results"
    assert main(["search", str(path), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "search.space.dpo.beat: unknown field — did you mean 'dpo.beta'?" in err
    assert "search.space.train.learning_rate.log: a log scale needs low > 0" in err
    assert "search.space.lora.rank.choice: expected a non-empty list" in err
    assert "search.space.partial_ft.layers: method dpo_lora does not use the partial_ft section" in err
    assert "search.objectives[0].metric: unknown metric 'eval/margin_shift_meen' — did you mean" in err
    assert "search.sampler: expected one of tpe, nsga2, random, got 'cmaes'" in err
    assert "search.pruner: median pruning needs intermediate values: set eval.every" in err
    assert not (results / "search").exists() and not (results / "mlflow.db").exists()  # nothing started
    # a bound is checked as a real variant: data.size beyond the file's rows
    path = write(tmp_path, "big", """
        space: {data.size: {int: [4, 500]}}
        objectives: [eval/margin_shift_mean]
    """)
    assert main(["search", str(path), "--results", str(results)]) == 2
    assert "search.space.data.size.int[1]" in capsys.readouterr().err


def test_search_two_workers_tracks_exports_and_continues(tmp_path, capsys):
    path = write(tmp_path, "tiny_search", SPACE)
    results = tmp_path / "results"
    assert main(["search", str(path), "--results", str(results), "--trials", "2", "--workers", "2",
                 "--export", str(tmp_path / "best.yaml")]) == 0
    out = capsys.readouterr()
    assert "best trial:" in out.err and "exported the best trial(s)" in out.out
    study = study_of(results, "tiny_search")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    client, parents, trials = runs_of(results, "tiny_search")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(int(r.data.tags[R.TAG_TRIAL]) for r in trials) == [0, 1]
    for r in trials:
        assert r.data.tags[R.PARENT_TAG] == parents[0].info.run_id
        assert r.data.tags[R.TAG_STUDY] == "tiny_search" and r.data.tags[R.TAG_TRIAL_STATE] == "COMPLETE"
        assert r.info.status == "FINISHED" and "search/objective_0" in r.data.metrics
        trial = study.trials[int(r.data.tags[R.TAG_TRIAL])]
        assert trial.values[0] == pytest.approx(r.data.metrics["eval/margin_shift_mean"])
        assert float(r.data.params["dpo.beta"]) == pytest.approx(trial.params["dpo.beta"])
    # two workers: the two trials trained at the same time
    a, b = sorted(trials, key=lambda r: r.info.start_time)
    assert b.info.start_time < a.info.end_time
    artifacts = {f.path for f in client.list_artifacts(parents[0].info.run_id, "search")}
    assert {"search/tiny_search.yaml", "search/space.yaml", "search/best.txt"} <= artifacts

    # the exported grid reproduces the best trial's variant id
    best = max(study.trials, key=lambda t: t.values[0])
    exported = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert main(["plan", str(tmp_path / "best.yaml")]) == 0
    assert best.user_attrs["variant_id"] in capsys.readouterr().out
    assert exported["variants"][0]["dpo"]["beta"] == best.params["dpo.beta"]

    # rerunning with a larger target continues the same study and the same parent run
    assert main(["search", str(path), "--results", str(results), "--trials", "3"]) == 0
    assert "2 trial(s) in the study, 1 to run" in capsys.readouterr().err
    assert len(study_of(results, "tiny_search").trials) == 3
    _, parents, trials = runs_of(results, "tiny_search")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(trials) == 3
    assert len({r.data.tags[R.TAG_VARIANT] for r in trials}) == 3

    # the study writeup
    assert main(["report", "tiny_search", "--results", str(results)]) == 0
    report = (results / "tiny_search" / "report.md").read_text()
    assert "## Best trial" in report and "search_history.png" in report and "## All trials" in report
    assert (results / "tiny_search" / "search_history.png").is_file()
    assert (results / "tiny_search" / "best" / "report.md").is_file()


def test_ctrl_c_mid_trial_then_rerun_continues(tmp_path):
    path = write(tmp_path, "interrupted", SPACE, steps=3)
    results = tmp_path / "results"
    env = {**os.environ, "HARNESS_FAULT": "sleep:s:1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "harness", "search", str(path), "--results", str(results),
                             "--trials", "2"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    seen = ""
    while time.monotonic() < deadline and "step 0/3" not in seen:  # training has begun
        seen += proc.stderr.readline()
    assert "step 0/3" in seen, seen
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    study = study_of(results, "interrupted")
    [trial] = study.trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["interrupted"]
    _, parents, trials = runs_of(results, "interrupted")
    assert [r.info.status for r in trials] == ["KILLED"] and parents[0].info.status == "KILLED"

    assert main(["search", str(path), "--results", str(results), "--trials", "2"]) == 0
    study = study_of(results, "interrupted")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    _, parents, trials = runs_of(results, "interrupted")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    finished = [r.data.tags[R.TAG_VARIANT] for r in trials if r.info.status == "FINISHED"]
    assert len(finished) == 2 == len(set(finished))


def test_a_pruned_trial_ends_pruned_not_finished(tmp_path):
    path = write(tmp_path, "pruned", """
        space: {dpo.beta: {log: [0.01, 1.0]}}
        objectives: [eval/margin_shift_mean]
        pruner: {threshold: {lower: 1000.0}}   # every held-out shift is below this: pruned at its first report
        trials: 1
    """, steps=3, every=1)
    results = tmp_path / "results"
    assert main(["search", str(path), "--results", str(results)]) == 1  # no trial completed
    [trial] = study_of(results, "pruned").trials
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
    _, _, [run] = runs_of(results, "pruned")
    assert run.info.status == "KILLED"
    assert run.data.tags[R.TAG_TRIAL_STATE] == "PRUNED" and "pruned by the threshold pruner at step 1" in \
        run.data.tags[R.TAG_STOPPED]
    assert "eval/margin_shift_mean" in run.data.metrics  # the intermediate value stays logged


def test_pareto_front_under_a_constraint(tmp_path):
    path = write(tmp_path, "pareto", """
        space: {train.learning_rate: {log: [1.0e-4, 1.0e-2]}}
        objectives:
          - {metric: eval/margin_shift_mean}
          - {metric: drift/kl_mean}
        constraint: {metric: drift/kl_mean, max: 1.0e+6}
        sampler: random
        trials: 2
    """)
    results = tmp_path / "results"
    assert main(["search", str(path), "--results", str(results), "--export", str(tmp_path / "front.yaml")]) == 0
    study = study_of(results, "pareto")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    best = S.best_trials(study, load_search(path))
    assert 1 <= len(best) <= 2 and all(t.user_attrs["constraint_value"] < 1e6 for t in best)
    assert len(yaml.safe_load((tmp_path / "front.yaml").read_text())["variants"]) == len(best)


def test_orphaned_trial_of_a_killed_search_is_failed(tmp_path):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    study = optuna.create_study(study_name="x", storage=storage)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask()
    trial.set_user_attr("host", __import__("socket").gethostname())
    trial.set_user_attr("pid", dead.pid)
    alive = study.ask()
    alive.set_user_attr("host", __import__("socket").gethostname())
    alive.set_user_attr("pid", os.getpid())
    import io

    assert S.fail_orphaned_trials(study, io.StringIO()) == 1
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.RUNNING]
