"""Measurement and the report end to end on the tiny model, through the CLI: `run` logs margins and drift for
every variant, `report` turns them into report.md and figures whose numbers are the logged ones, and
`evaluate` measures a finished run again without training."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis.stats import fmt
from harness.cli import main

GRID = """
name: tiny_report
defaults:
  base_model: tiny-random-llama
  data: {size: 8, max_length: 256}
  train: {max_steps: 3, batch_size: 4, learning_rate: 1e-3}
  lora: {rank: 4, alpha: 8}
  eval: {every: 2, probe_length: 8}
variants:
  - {name: dpo, method: dpo_lora}
  - {name: full, method: sft}
axes:
  dpo.beta: [0.1, 0.5]
"""


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    grid = root / "grid.yaml"
    grid.write_text(GRID)
    results = root / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    assert main(["report", "tiny_report", "--results", str(results)]) == 0
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny_report")
    runs = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'variant'")
    parent = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'grid'")[0]
    return {"results": results, "client": client, "runs": runs, "parent": parent,
            "report": (results / "tiny_report" / "report.md").read_text()}


def test_every_method_logs_margins_and_drift(reported):
    runs = reported["runs"]
    assert sorted(r.data.params["method"] for r in runs) == ["dpo_lora", "dpo_lora", "sft"]  # sft once, not per beta
    for run in runs:
        m = run.data.metrics
        for key in ("eval/margin_shift_mean", "eval/accuracy_before", "eval/accuracy_after", "eval/displaced_frac",
                    "train_pairs/margin_shift_mean", "drift/kl_mean", "drift/ppl_before", "drift/ppl_after",
                    "drift/ppl_change", "drift/weight_delta_norm"):
            assert key in m, (run.data.params["method"], key)
        assert m["eval/pairs"] == 32 and m["train_pairs/pairs"] == 8
        assert 0 < m["drift/kl_tokens"] <= 16 * 8  # 16 probes x probe_length 8; an EOS may end one early
        assert ("eval/implicit_reward_margin_mean" in m) == (run.data.params["method"] == "dpo_lora")
        assert run.data.params["eval.probe_length"] == "8"


def test_per_pair_artifact_is_consistent(reported):
    client = reported["client"]
    for run in reported["runs"]:
        path = client.download_artifacts(run.info.run_id, "eval/pairs.csv")
        table = pd.read_csv(path)
        assert set(table["split"]) == {"eval", "train"}
        assert (table["margin_shift"] - (table["margin_after"] - table["margin_before"])).abs().max() < 1e-9
        margin_before = table["logp_chosen_before"] - table["logp_rejected_before"]
        assert (table["margin_before"] - margin_before).abs().max() < 1e-9
        ev = table[table["split"] == "eval"]
        assert ev["margin_shift"].mean() == pytest.approx(run.data.metrics["eval/margin_shift_mean"], rel=1e-9)
        assert (ev["margin_after"] > 0).mean() == run.data.metrics["eval/accuracy_after"]
        if run.data.params["method"] == "dpo_lora":
            beta = float(run.data.params["dpo.beta"])
            assert (table["implicit_reward_margin"] - beta * table["margin_shift"]).abs().max() < 1e-9
        train_pairs = sorted(table[table["split"] == "train"]["pair"])
        assert len(train_pairs) == 8 and len(set(train_pairs)) == 8


def test_intermediate_eval_logs_at_the_expected_steps(reported):
    client = reported["client"]
    for run in reported["runs"]:
        history = client.get_metric_history(run.info.run_id, "eval/margin_shift_mean")
        assert [h.step for h in history] == [2, 3]  # every 2 steps, then the final measurement at step 3


def test_report_sections_figures_and_numbers(reported):
    text, folder = reported["report"], reported["results"] / "tiny_report"
    for heading in ("## Summary", "## Variants", "## Comparisons", "### Beta", "### Method",
                    "## What this does and does not show", "## Figures", "## Runs"):
        assert heading in text, heading
    for png in ("margin_shift.png", "shift_vs_drift.png", "pairs_before_after.png", "training_curves.png",
                "dpo_beta_curve.png"):
        assert (folder / png).is_file() and (folder / png).stat().st_size > 1000, png
        assert f"]({png})" in text
    for run in reported["runs"]:
        m = run.data.metrics
        assert run.info.run_id in text
        assert fmt(m["eval/margin_shift_mean"]) in text  # every headline number is the logged one
        assert fmt(m["drift/kl_mean"], signed=False) in text
        assert fmt(m["drift/weight_delta_norm"], signed=False) in text
        n = int(m["eval/pairs"])
        assert f"{round(m['eval/accuracy_before'] * n)}/{n} before → {round(m['eval/accuracy_after'] * n)}/{n}" in text
    assert "One training seed per variant" in text
    assert re.search(r"(above zero|below zero|not distinguishable from zero)", text)


def test_report_is_logged_to_the_parent_run(reported):
    client, parent = reported["client"], reported["parent"]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/margin_shift.png"} <= logged


def test_report_by_parent_run_id_and_unknown_grid(reported, capsys):
    results = reported["results"]
    assert main(["report", reported["parent"].info.run_id, "--results", str(results)]) == 0
    assert main(["report", "no_such_grid", "--results", str(results)]) == 2
    assert "no grid named 'no_such_grid'" in capsys.readouterr().err


def test_evaluate_a_finished_run_reproduces_its_logged_margins(reported, tmp_path):
    client = reported["client"]
    run = next(r for r in reported["runs"] if r.data.params["method"] == "dpo_lora")
    out = tmp_path / "again.csv"
    assert main(["evaluate", run.info.run_id, "--results", str(reported["results"]), "--out", str(out)]) == 0
    again = pd.read_csv(out)
    logged = pd.read_csv(client.download_artifacts(run.info.run_id, "eval/pairs.csv"))
    logged = logged[logged["split"] == "eval"].sort_values("pair").reset_index(drop=True)
    again = again.sort_values("pair").reset_index(drop=True)
    assert list(again["pair"]) == list(logged["pair"])
    assert (again["margin_shift"] - logged["margin_shift"]).abs().max() < 1e-3


def test_evaluate_a_base_model_on_a_file(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I will not answer that."}\n'
                    '{"prompt": "Two plus two?", "chosen": "Four.", "rejected": "Ask someone else."}\n')
    out = tmp_path / "base.csv"
    assert main(["evaluate", "tiny-random-llama", "--data", str(data), "--out", str(out),
                 "--results", str(tmp_path / "results")]) == 0
    table = pd.read_csv(out)
    assert sorted(table["pair"]) == [0, 1]
    assert (table["margin"] - (table["logp_chosen"] - table["logp_rejected"])).abs().max() < 1e-9
    assert main(["evaluate", "tiny-random-llama", "--data", str(tmp_path / "missing.jsonl")]) == 2
