"""The preference-method family (issue 25): every offline-pair loss of TRL's DPOTrainer, alone or as a weighted list,
and SimPO, ORPO and KTO through LoRA, each trained on the tiny model and measured the same way; their settings
checked at validate with file + key path; what the method files rely on from TRL pinned by behaviour.

    python -m pytest tests/test_preference_methods.py
"""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.core.schema import DPO_LOSS_REFUSED, DPO_LOSS_TYPES
from harness.grid import GridError, load_grid

# every DPO loss that needs no setting of its own; robust, exo_pair and the weighted list are variants of their own
PLAIN_LOSSES = [loss for loss in DPO_LOSS_TYPES if loss not in ("robust", "exo_pair", "sft")]

PLAIN = "\n".join(f"  - {{name: {loss}, dpo: {{loss_type: {loss}}}}}" for loss in PLAIN_LOSSES)
GRID = f"""
name: pref_family
defaults:
  base_model: tiny-random-llama
  method: dpo_lora
  data: {{size: 4, max_length: 128}}
  train: {{max_steps: 1, batch_size: 2, learning_rate: 1e-3}}
  lora: {{rank: 2, alpha: 4}}
  eval: {{probe_length: 4}}
variants:
{PLAIN}
  - {{name: robust, dpo: {{loss_type: robust, label_smoothing: 0.1}}}}
  - {{name: exo_pair, dpo: {{loss_type: exo_pair, label_smoothing: 0.001}}}}
  - {{name: rpo, dpo: {{loss_type: [sigmoid, sft], loss_weights: [1.0, 0.5]}}}}
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    grid = root / "grid.yaml"
    grid.write_text(GRID)
    results = root / "results"
    rc = main(["run", str(grid), "--results", str(results)])
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pref_family")
    runs = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'variant'", max_results=1000)
    return {"rc": rc, "client": client, "runs": runs, "grid": load_grid(grid)}


def runs_by_name(family) -> dict:
    return {r.data.tags["mlflow.runName"].split("·")[0]: r for r in family["runs"]}


def test_every_loss_and_method_finishes_with_the_common_measurement(family):
    by_label = runs_by_name(family)
    expected = {*PLAIN_LOSSES, "robust", "exo_pair", "rpo"}
    assert set(by_label) == expected
    for label, run in by_label.items():
        assert run.info.status == "FINISHED", (label, run.data.tags.get("harness.failure_reason"))
        for key in ("eval/margin_shift_mean", "drift/kl_mean", "drift/ppl_change", "drift/weight_delta_norm",
                    "train/loss"):
            assert math.isfinite(run.data.metrics[key]), (label, key)
    assert family["rc"] == 0


def test_loss_settings_reach_trl(family):
    """What the run logged as its params is what the DPO trainer used: the weighted list and the smoothing."""
    by_label = runs_by_name(family)
    rpo = by_label["rpo"].data.params
    assert (rpo["dpo.loss_type"], rpo["dpo.loss_weights"]) == ('["sigmoid", "sft"]', "[1.0, 0.5]")
    assert by_label["robust"].data.params["dpo.label_smoothing"] == "0.1"
    assert by_label["sigmoid"].data.params["dpo.loss_type"] == "sigmoid"


# ---------------------------------------------------------------- validation (no torch)


def errors_of(path) -> list[str]:
    with pytest.raises(GridError) as info:
        load_grid(path)
    return info.value.errors


def test_bad_dpo_loss_settings_name_file_and_key(grid_file):
    path = grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama, method: dpo_lora}
        variants:
          - {name: a, dpo: {loss_type: [sigmoid, sft], loss_weights: [1.0, 0.5, 2.0]}}
          - {name: b, dpo: {loss_type: sigmod}}
          - {name: c, dpo: {loss_type: aot_unpaired}}
          - {name: d, dpo: {loss_type: robust}}
          - {name: e, dpo: {loss_type: sigmoid, label_smoothing: 0.1}}
          - {name: f, dpo: {loss_type: sft}}
          - {name: g, dpo: {loss_type: aot}, train: {batch_size: 1}}
          - {name: h, dpo: {loss_type: [ipo, ipo]}}
          - {name: i, dpo: {loss_type: [sigmoid, sft], loss_weights: [1.0, -0.5]}}
    """)
    errs = errors_of(path)
    text = "\n".join(errs)
    assert len(errs) == 9, text
    assert all(e.startswith(f"{path}: variants[") for e in errs), text
    assert ("variants[0].dpo.loss_weights: Got 3 weights for 2 loss types (loss_type ['sigmoid', 'sft'])"
            in text and "got [1.0, 0.5, 2.0]" in text)
    assert "variants[1].dpo.loss_type: unknown loss type 'sigmod' — did you mean 'sigmoid'? Available: " in text
    assert "variants[2].dpo.loss_type: loss type 'aot_unpaired' is not offered here" in text
    assert ("variants[3].dpo.loss_type: robust needs dpo.label_smoothing in (0, 0.5), the assumed fraction of "
            "flipped labels, e.g. 0.1 (at 0, robust is sigmoid); label_smoothing is 0, got 'robust'") in text
    assert "variants[4].dpo.label_smoothing: only robust, exo_pair, aot read it, and loss_type is 'sigmoid'" in text
    assert "variants[5].dpo.loss_type: sft alone is supervised fine-tuning on chosen (use method lora_sft)" in text
    assert "variants[6].train.batch_size: loss_type 'aot': aot sorts the margins across a batch" in text
    assert "variants[7].dpo.loss_type: loss type(s) ['ipo'] listed twice" in text
    assert "variants[8].dpo.loss_weights: Input should be greater than 0, got -0.5" in text


def test_loss_type_axis_names_the_axis_value(grid_file):
    path = grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama, method: dpo_lora}
        axes:
          dpo: {loss_type: [sigmoid, ipo, hinj]}
    """)
    [err] = errors_of(path)
    assert err.startswith(f"{path}: axes.dpo.loss_type[2]: unknown loss type 'hinj' — did you mean 'hinge'?")


def test_loss_type_is_part_of_the_id_and_one_item_lists_are_the_name(grid_file):
    def one(text: str, name: str):
        [variant] = load_grid(grid_file(text, name)).variants
        return variant

    head = "name: g\ndefaults: {base_model: tiny-random-llama, method: dpo_lora, "
    plain = one(head + "dpo: {loss_type: sigmoid}}\n", "a.yaml")
    listed = one(head + "dpo: {loss_type: [sigmoid]}}\n", "b.yaml")
    default = one(head + "dpo: {}}\n", "c.yaml")
    ipo = one(head + "dpo: {loss_type: ipo}}\n", "d.yaml")
    weighted = one(head + "dpo: {loss_type: [sigmoid, sft], loss_weights: [1, 0.5]}}\n", "e.yaml")
    other_weights = one(head + "dpo: {loss_type: [sigmoid, sft], loss_weights: [1, 0.25]}}\n", "f.yaml")
    assert plain.id == listed.id == default.id
    assert len({plain.id, ipo.id, weighted.id, other_weights.id}) == 4


def test_every_trl_dpo_loss_is_offered_or_refused_with_a_reason():
    """The schema's list follows the installed TRL: a loss TRL adds or drops fails here, not in a worker."""
    from trl import DPOConfig

    doc = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    trl_losses = {part.split("'")[1] for part in doc.split("`")[1::2] if part.startswith("'")}
    assert trl_losses == set(DPO_LOSS_TYPES) | set(DPO_LOSS_REFUSED)
