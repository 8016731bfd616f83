"""The preference-method family (issue 25): every offline-pair loss of TRL's DPOTrainer, alone or as a weighted list,
and SimPO, ORPO and KTO through LoRA, each trained on the tiny model and measured the same way; their settings
checked at validate with file + key path; what the method files rely on from TRL pinned by behaviour.

    python -m pytest tests/test_preference_methods.py
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.core import methods
from harness.core.schema import DPO_LOSS_REFUSED, DPO_LOSS_TYPES
from harness.grid import GridError, load_grid

ROOT = Path(__file__).resolve().parent.parent

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
  - {{name: simpo, method: simpo_lora}}
  - {{name: cpo_simpo, method: simpo_lora, simpo: {{cpo_alpha: 1.0}}}}
  - {{name: orpo, method: orpo_lora}}
  - {{name: kto, method: kto_lora}}
  - {{name: kto_apo, method: kto_lora, kto: {{loss_type: apo_zero_unpaired}}}}
  - {{name: warm, method: lora_sft}}
  - {{name: kto_after_sft, method: kto_lora, from: warm}}
"""
NEW_METHODS = {"simpo", "cpo_simpo", "orpo", "kto", "kto_apo", "warm", "kto_after_sft"}


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
    expected = {*PLAIN_LOSSES, "robust", "exo_pair", "rpo", *NEW_METHODS}
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


def test_kto_trains_on_examples_not_pairs(family):
    """Each usable pair became one desirable and one undesirable example, and no example's KL partner shares its
    prompt; the logged counts are what a report counts."""
    for name in ("kto", "kto_apo", "kto_after_sft"):
        m = runs_by_name(family)[name].data.metrics
        assert m["data/usable"] == 4
        assert (m["data/examples"], m["data/desirable_examples"], m["data/undesirable_examples"]) == (8, 4, 4)
        assert m["data/kl_same_prompt"] == 0
    assert runs_by_name(family)["kto_after_sft"].data.tags["harness.stage_variant_id"] == \
        runs_by_name(family)["warm"].data.tags["harness.variant_id"]


def test_each_trainer_logs_its_own_reward_margin(family):
    """TRL's `rewards/margins` exists for every preference method (on each method's own scale), with each
    objective's own terms beside it: pure SimPO has no NLL term, CPO-SimPO and ORPO do, KTO logs its KL estimate."""
    runs = runs_by_name(family)
    client = family["client"]
    for name in ("sigmoid", "simpo", "orpo", "kto"):
        assert client.get_metric_history(runs[name].info.run_id, "rewards/margins"), name
    assert runs["simpo"].data.metrics["train/nll_loss"] == 0
    assert runs["cpo_simpo"].data.metrics["train/nll_loss"] > 0
    assert runs["orpo"].data.metrics["train/nll_loss"] > 0 and "train/log_odds_ratio" in runs["orpo"].data.metrics
    assert "train/kl" in runs["kto"].data.metrics


def test_simpo_and_orpo_rewards_are_per_token_means(family):
    """SimPO's and ORPO's log-probs are averaged over the completion's tokens (a random model's mean is about
    -log(vocabulary)); KTO's, like DPO's, are summed over them. Pins TRL's `average_log_prob` choice."""
    from experiments import models as M

    bound = 2 * math.log(len(M.load_padded_tokenizer(M.TINY)))
    runs = runs_by_name(family)
    for name in ("simpo", "orpo"):
        assert -bound < runs[name].data.metrics["logps/chosen"] < 0, name
    assert runs["kto"].data.metrics["logps/chosen"] < -10 * bound


def test_reference_free_methods_are_still_measured_against_the_starting_model(family):
    """The measurement is the same for every method: the adapter disabled is the reference, so before training
    the margins of SimPO, ORPO and DPO on the held-out pairs are the same numbers."""
    runs = runs_by_name(family)
    before = {name: runs[name].data.metrics["eval/margin_before_mean"] for name in ("sigmoid", "simpo", "orpo", "kto")}
    assert len(set(before.values())) == 1, before


# ---------------------------------------------------------------- what the method files rely on from TRL


def test_trl_cpo_simpo_loss_is_pinned():
    """SimPO as trl.experimental.cpo computes it: -log σ(beta × Δ - gamma) on the (already per-token) log-probs."""
    import torch
    import torch.nn.functional as F
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    fields = CPOConfig.__dataclass_fields__
    assert "simpo" in fields["loss_type"].metadata["choices"] and {"simpo_gamma", "cpo_alpha", "beta"} <= set(fields)
    fake = type("T", (), {"alpha": 0.0, "beta": 2.0, "simpo_gamma": 1.0, "label_smoothing": 0.0,
                          "loss_type": "simpo", "accelerator": type("A", (), {"device": "cpu"})()})()
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    losses, chosen_r, rejected_r = CPOTrainer.cpo_loss(fake, chosen, rejected)
    torch.testing.assert_close(losses, -F.logsigmoid(2.0 * (chosen - rejected) - 1.0))
    torch.testing.assert_close(chosen_r - rejected_r, 2.0 * (chosen - rejected))


def test_trl_orpo_odds_ratio_is_pinned():
    import torch
    import torch.nn.functional as F
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    assert "beta" in ORPOConfig.__dataclass_fields__
    fake = type("T", (), {"beta": 0.1, "accelerator": type("A", (), {"device": "cpu"})()})()
    chosen, rejected = torch.tensor([-0.5, -2.0]), torch.tensor([-1.5, -1.0])
    losses, *_ = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
    torch.testing.assert_close(losses, 0.1 * F.logsigmoid(log_odds))


def test_kto_pairs_split_into_mixed_batches_without_same_prompt_kl_partners():
    from experiments.kto_lora import same_prompt_partners, unpaired_examples

    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(6)]
    for batch_size in (2, 3, 4):
        examples, clashes = unpaired_examples(rows, batch_size, seed=0)
        assert clashes == 0 and len(examples) == 12
        assert sorted((e["prompt"], e["completion"], e["label"]) for e in examples) == sorted(
            [(f"p{i}", f"c{i}", True) for i in range(6)] + [(f"p{i}", f"r{i}", False) for i in range(6)])
    assert unpaired_examples(rows, 2, seed=0) == unpaired_examples(rows, 2, seed=0)  # seeded
    assert same_prompt_partners([0, 0, 1, 1], 2) == 4 and same_prompt_partners([0, 1, 0, 1], 2) == 0
    assert same_prompt_partners([0, 1, 1, 2], 4) == 1  # the third takes the second's completion


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


def test_new_method_sections_are_checked_like_dpo(grid_file):
    path = grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama}
        variants:
          - {name: a, method: simpo_lora, simpo: {gamma: -1}}
          - {name: b, method: orpo_lora, orpo: {lamda: 0.2}}
          - {name: c, method: kto_lora, kto: {loss_type: kto_pair}}
          - {name: d, method: kto_lora, train: {batch_size: 1}}
          - {name: e, method: kto_lora, kto: {loss_type: apo_zero_unpaired}, train: {batch_size: 1}}
          - {name: f, method: simpo_lorra}
    """)
    errs = errors_of(path)
    text = "\n".join(errs)
    assert len(errs) == 5, text
    assert f"{path}: variants[0].simpo.gamma: Input should be greater than or equal to 0, got -1" in text
    assert "variants[1].orpo.lamda: unknown key 'orpo.lamda' — did you mean 'orpo.beta'?" in text
    assert "variants[2].kto.loss_type: Input should be 'kto' or 'apo_zero_unpaired', got 'kto_pair'" in text
    assert ("variants[3].train.batch_size: kto_lora estimates KTO's KL term from the other completions of its "
            "batch and needs at least 2 examples per step" in text)
    assert "variants[5].method: unknown method 'simpo_lorra' — did you mean 'simpo_lora'?" in text


def test_a_methods_own_section_is_its_alone(grid_file):
    """simpo.*, orpo.*, kto.* are part of their method's id and params only, as dpo.* is of dpo_lora's."""
    grid = load_grid(grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama, simpo: {beta: 2.5}, kto: {beta: 0.3}, orpo: {beta: 0.2}}
        variants:
          - {name: s, method: simpo_lora}
          - {name: o, method: orpo_lora}
          - {name: k, method: kto_lora}
          - {name: d, method: dpo_lora}
    """))
    from harness.core.schema import relevant_config

    sections = {v.spec.name: {k for k in relevant_config(v.spec) if k in ("dpo", "simpo", "orpo", "kto")}
                for v in grid.variants}
    assert sections == {"s": {"simpo"}, "o": {"orpo"}, "k": {"kto"}, "d": {"dpo"}}


def test_plan_of_the_family_imports_no_torch(grid_file):
    path = grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama}
        variants:
          - {method: simpo_lora}
          - {method: orpo_lora}
          - {method: kto_lora}
          - {method: dpo_lora, dpo: {loss_type: [ipo, sft], loss_weights: [1, 0.1]}}
    """)
    code = (f"import sys; from harness.cli import main; rc = main(['plan', {str(path)!r}]); assert rc == 0; "
            "assert 'torch' not in sys.modules, 'plan imported torch'; "
            "trainers = [m for m in sys.modules if m.split('.')[0] == 'trl' or m.endswith(('_lora', '_ft', '.sft'))]; "
            "assert not trainers, trainers")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "simpo_lora" in out.stdout and "kto_lora" in out.stdout


def test_plan_counts_kto_steps_in_examples_two_per_pair(grid_file, capsys):
    """KTO trains on a desirable and an undesirable example per pair, so 6 pairs in batches of 4 are 12 examples,
    3 steps an epoch, where DPO takes the 6 pairs in 2; `plan` must say what the trainer will do."""
    path = grid_file("""
        name: steps
        defaults: {base_model: tiny-random-llama, data: {size: 6}, train: {batch_size: 4}}
        variants:
          - {name: d, method: dpo_lora}
          - {name: k, method: kto_lora}
          - {name: k2, method: kto_lora, train: {epochs: 2, grad_accum: 2}}
          - {name: kmax, method: kto_lora, train: {max_steps: 5}}
    """)
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    steps = {line.split()[2].split("·")[0]: int(line.split()[4]) for line in out.splitlines()
             if line[:1].isdigit()}
    assert steps == {"d": 2, "k": 3, "k2": 4, "kmax": 5}, out
    assert "14 optimiser steps in total" in out


def test_records_say_what_they_optimise_and_whether_they_see_a_reference():
    for method in methods.all_methods():
        assert method.optimises.endswith("."), method.name
    free = {m.name for m in methods.all_methods() if m.reference_free}
    assert {"simpo_lora", "orpo_lora"} <= free and not {"dpo_lora", "kto_lora"} & free
    assert methods.get("kto_lora").unit == "example" and methods.get("simpo_lora").unit == "pair"
    assert (methods.get("kto_lora").rows_per_pair, methods.get("dpo_lora").rows_per_pair) == (2, 1)
    assert "desirable" in methods.get("kto_lora").summary and "undesirable" in methods.get("kto_lora").summary
    for name in ("dpo_lora", "simpo_lora", "orpo_lora", "kto_lora"):
        assert methods.get(name).trainer_margin
        assert methods.Method.from_json(methods.get(name).to_json()) == methods.get(name)
