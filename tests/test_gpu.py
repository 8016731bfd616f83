"""On a CUDA GPU (skipped elsewhere): bf16 training through autocast measured like fp32, and the stage path.

Run there with `python -m pytest -m gpu` (results/benchmarks/gpu.sh shows how the lent GPU machine is set up).
"""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness.cli import main

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GRID = """
name: tiny_gpu
defaults:
  method: dpo_lora
  base_model: tiny-random-llama
  data: {size: 8, max_length: 256}
  lora: {rank: 4, alpha: 8, targets: qv}
  train: {epochs: 1, batch_size: 2, learning_rate: 1e-2}
variants:
  - {name: bf16, train: {precision: bf16}}
  - {name: fp32, train: {precision: fp32}}
  - {name: warm, method: sft, train: {max_steps: 2, precision: bf16}}
  - {name: chained, from: warm, train: {precision: bf16}}
"""


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    (root / "grid.yaml").write_text(GRID)
    rc = main(["run", str(root / "grid.yaml"), "--results", str(root / "results")])
    client = MlflowClient(f"sqlite:///{root / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny_gpu")
    runs = {r.data.tags["mlflow.runName"].split("·")[0]: r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("harness.kind") == "variant"}
    return rc, runs, root / "results"


def test_every_variant_trains_on_the_gpu_in_the_precision_asked(gpu_run):
    rc, runs, _ = gpu_run
    assert rc == 0 and set(runs) == {"bf16", "fp32", "warm", "chained"}
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["harness.device"] == "cuda"
        assert run.data.tags["harness.gpu"] == torch.cuda.get_device_name()
        assert run.data.tags["harness.precision"] == ("fp32" if name == "fp32" else "bf16")


def test_bf16_training_is_measured_like_fp32(gpu_run):
    """Same variant in bf16 and fp32: the measurement runs in fp32 either way, so the shifts agree to what bf16
    training changes (a few %), not to bf16 measurement noise (which swamped a true shift on an H100)."""
    _, runs, results = gpu_run
    bf16, fp32 = (json.loads((results / "runs" / runs[n].data.tags["harness.variant_id"] / "result.json")
                             .read_text()) for n in ("bf16", "fp32"))
    assert abs(fp32["eval_margin_shift_mean"]) > 0.05  # training moved the margins: not 0 == 0
    assert bf16["eval_margin_shift_mean"] == pytest.approx(fp32["eval_margin_shift_mean"], rel=0.1)
    assert bf16["drift_kl_mean"] == pytest.approx(fp32["drift_kl_mean"], rel=0.2)


def test_a_dpo_child_of_a_bf16_stage_starts_from_its_model(gpu_run):
    _, runs, results = gpu_run
    child, stage = runs["chained"], runs["warm"]
    assert child.data.tags["harness.stage_variant_id"] == stage.data.tags["harness.variant_id"]
    assert (results / "runs" / stage.data.tags["harness.variant_id"] / "model" / "model.safetensors").is_file()
    assert abs(child.data.metrics["eval/margin_shift_mean"]) > 0.05  # DPO moved it, against the stage's model
