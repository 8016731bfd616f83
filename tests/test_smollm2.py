"""The real default model: a few DPO steps on SmolLM2-135M-Instruct through the CLI (slow: minutes on CPU)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main


@pytest.mark.slow
def test_smollm2_dpo_lora_few_steps(grid_file, tmp_path):
    grid = grid_file("""
        name: smol_smoke
        defaults:
          method: dpo_lora
          data: {size: 4, max_length: 384}
          lora: {rank: 4, alpha: 8, targets: qv}
          train: {max_steps: 2, batch_size: 2, learning_rate: 5e-4}
    """)
    results = tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smol_smoke")
    (run,) = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'variant'")
    assert run.info.status == "FINISHED"
    assert run.data.params["base_model"] == "smollm2-135m-instruct"
    margins = client.get_metric_history(run.info.run_id, "rewards/margins")
    assert [m.step for m in margins] == [1, 2]
    assert run.data.metrics["params/changed_trainable"] == run.data.metrics["params/trainable"] == 120  # 30 layers x q,v x A,B
    assert run.data.metrics["params/changed_frozen"] == 0
    # measured around training: margins on the 32 held-out and 4 training pairs, and drift
    assert run.data.metrics["eval/pairs"] == 32 and run.data.metrics["train_pairs/pairs"] == 4
    assert run.data.metrics["drift/kl_mean"] >= 0 and run.data.metrics["drift/weight_delta_norm"] > 0
    assert run.data.metrics["eval/accuracy_before"] > 0  # the instruct model already prefers some chosen answers
