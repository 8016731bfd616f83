"""The grid runner end to end on the in-process tiny model, through the CLI: all four methods, a stage
with a DPO child, a failing variant, MLflow contents, parameter changes, resume and --force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from experiments import models as M
from harness.cli import main

GRID = """
name: tiny_all
defaults:
  base_model: tiny-random-llama
  data: {size: 8, max_length: 256}
  train: {max_steps: 2, batch_size: 4, learning_rate: 1e-3}
  lora: {rank: 4, alpha: 8}
variants:
  - {name: full, method: sft, save_weights: true}
  - {name: lsft, method: lora_sft, lora: {targets: qkvo}}
  - {name: part, method: partial_ft, partial_ft: {layers: last:2}, save_weights: true}
  - {name: dpo, method: dpo_lora, dpo: {beta: 0.2}}
  - {name: broken, method: partial_ft, partial_ft: {modules: no_such_parameter}}
  - {name: warm, method: sft, train: {max_steps: 1}}
  - {name: chained, method: dpo_lora, from: warm}
"""


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    grid = root / "grid.yaml"
    grid.write_text(GRID)
    results = root / "results"
    rc = main(["run", str(grid), "--results", str(results)])
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny_all")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return {"rc": rc, "grid": grid, "results": results, "client": client, "exp": exp, "runs": runs}


def children(run_info) -> dict[str, object]:
    return {r.data.tags["mlflow.runName"].split("·")[0]: r for r in run_info["runs"]
            if r.data.tags.get("harness.kind") == "variant"}


def test_failure_does_not_stop_the_grid(grid_run):
    assert grid_run["rc"] == 1  # one variant failed
    runs = children(grid_run)
    statuses = {name: r.info.status for name, r in runs.items()}
    assert statuses == {"full": "FINISHED", "lsft": "FINISHED", "part": "FINISHED", "dpo": "FINISHED",
                        "broken": "FAILED", "warm": "FINISHED", "chained": "FINISHED"}
    broken = runs["broken"]
    assert "matches no parameter" in broken.data.tags["harness.failure_reason"]
    artifacts = {a.path for a in grid_run["client"].list_artifacts(broken.info.run_id)}
    assert "traceback.txt" in artifacts


def test_parent_and_nested_children(grid_run):
    parents = [r for r in grid_run["runs"] if r.data.tags.get("harness.kind") == "grid"]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    for run in children(grid_run).values():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["harness.grid"] == "tiny_all"
        assert len(run.data.tags["harness.variant_id"]) == 12
        assert run.data.tags["harness.git_sha"]
        assert run.data.tags["harness.version.torch"] == torch.__version__
        assert run.data.tags["harness.device"] == "cpu"


def test_params_metrics_artifacts(grid_run):
    client = grid_run["client"]
    dpo = children(grid_run)["dpo"]
    params = dpo.data.params
    assert params["method"] == "dpo_lora" and params["dpo.beta"] == "0.2" and params["lora.rank"] == "4"
    assert params["train.learning_rate"] == "0.001" and params["data.size"] == "8"
    assert "partial_ft.layers" not in params  # only the sections the method uses
    history = client.get_metric_history(dpo.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]
    assert client.get_metric_history(dpo.info.run_id, "rewards/margins")
    assert dpo.data.metrics["data/rows"] == 8 and dpo.data.metrics["data/usable"] == 8
    artifacts = {a.path for a in client.list_artifacts(dpo.info.run_id)}
    assert {"variant.yaml", "data_audit.json", "param_changes.json", "result.json", "adapter"} <= artifacts
    adapter = {a.path for a in client.list_artifacts(dpo.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter


def _param_changes(grid_run, name) -> dict:
    run = children(grid_run)[name]
    path = grid_run["client"].download_artifacts(run.info.run_id, "param_changes.json")
    return json.loads(Path(path).read_text())


@pytest.mark.parametrize("name", ["full", "lsft", "part", "dpo", "chained"])
def test_trainable_changed_frozen_did_not(grid_run, name):
    info = _param_changes(grid_run, name)
    summary = info["summary"]
    assert summary["trainable"] > 0
    assert summary["changed_trainable"] == summary["trainable"]
    assert summary["changed_frozen"] == 0
    trainable = [n for n, p in info["params"].items() if p["trainable"]]
    if name in ("lsft", "dpo", "chained"):
        assert all("lora_" in n for n in trainable)
    if name == "lsft":
        assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    if name == "part":
        assert {int(n.split(".layers.")[1].split(".")[0]) for n in trainable} == {2, 3}


def _saved_weights(grid_run, name) -> dict:
    run = children(grid_run)[name]
    folder = grid_run["client"].download_artifacts(run.info.run_id, "model")
    return load_file(str(Path(folder) / "model.safetensors"))


def test_saved_weights_against_base_independently(grid_run):
    """Compare the logged weights with a fresh base model, tensor by tensor (not via the runner's bookkeeping)."""
    base = M.load_model(M.TINY).state_dict()
    part = _saved_weights(grid_run, "part")
    for name, tensor in part.items():
        in_trained_layers = ".layers.2." in name or ".layers.3." in name
        same = torch.equal(tensor, base[name])
        assert same != in_trained_layers, name
    full = _saved_weights(grid_run, "full")
    assert all(not torch.equal(t, base[n]) for n, t in full.items())


def test_lora_adapter_moved_off_zero_init(grid_run):
    run = children(grid_run)["dpo"]
    folder = grid_run["client"].download_artifacts(run.info.run_id, "adapter")
    weights = load_file(str(Path(folder) / "adapter_model.safetensors"))
    lora_b = [t for n, t in weights.items() if "lora_B" in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # PEFT initialises B to zero


def test_stage_feeds_its_child(grid_run):
    runs = children(grid_run)
    warm, chained = runs["warm"], runs["chained"]
    assert chained.data.tags["harness.stage_variant_id"] == warm.data.tags["harness.variant_id"]
    stage_model = grid_run["results"] / "runs" / warm.data.tags["harness.variant_id"] / "model"
    assert (stage_model / "model.safetensors").is_file()


def test_rerun_skips_finished_and_retries_failed(grid_run, capsys):
    rc = main(["run", str(grid_run["grid"]), "--results", str(grid_run["results"])])
    assert rc == 1  # the broken variant fails again
    err = capsys.readouterr().err
    assert "6 already finished, 1 to run" in err
    client, exp = grid_run["client"], grid_run["exp"]
    runs = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'variant'", max_results=1000)
    by_id: dict[str, list] = {}
    for r in runs:
        by_id.setdefault(r.data.tags["harness.variant_id"], []).append(r.info.status)
    assert sorted(len(v) for v in by_id.values()) == [1, 1, 1, 1, 1, 1, 2]
    assert all(s.count("FINISHED") <= 1 for s in by_id.values())
