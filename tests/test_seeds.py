"""Seed replicates: `seeds:` in a grid file (expansion, ids, group ids, errors), the report's aggregation of
replicates on synthetic runs with known answers, and one tiny-model run of `seeds: 3` end to end (three runs
in one group, resume skips them, the report pools them).

    python -m pytest tests/test_seeds.py -q        # about 1 min on 2 CPU cores, most of it the tiny-model run
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis import report
from analysis.load import Study
from harness.cli import main
from harness.grid import GridError, load_grid

ROUNDS = """
    name: g
    defaults: {base_model: tiny-random-llama, method: dpo_lora}
    variants:
      - {name: round1, data: {size: 4}}
      - {name: round2, data: {size: 12}, train: {epochs: 2}}
"""


def errors_of(path) -> str:
    with pytest.raises(GridError) as info:
        load_grid(path)
    return "\n".join(info.value.errors)


# ---------------------------------------------------------------- the grid file


def test_seeds_replicate_every_variant_in_one_group(grid_file):
    plain = load_grid(grid_file(ROUNDS, "plain.yaml"))
    grid = load_grid(grid_file(ROUNDS + "    seeds: 3\n"))
    assert len(grid.variants) == 6 and len({v.id for v in grid.variants}) == 6
    by_name: dict[str, list] = {}
    for v in grid.variants:
        by_name.setdefault(v.spec.name, []).append(v)
    for name, reps in by_name.items():
        assert [v.spec.seed for v in reps] == [0, 1, 2]
        assert len({v.group_id for v in reps}) == 1, name  # one group id per variant
        assert [v.replicate for v in reps] == ["1/3", "2/3", "3/3"]
        assert {v.spec.data.shuffle_seed for v in reps} == {0}  # the training rows stay the same
        assert {v.spec.data.size for v in reps} == {reps[0].spec.data.size}
        assert [[part for part in v.run_name.split("·") if part.startswith("s")] for v in reps] == [
            ["s0"], ["s1"], ["s2"]], [v.run_name for v in reps]
    assert by_name["round1"][0].group_id != by_name["round2"][0].group_id
    # seed 0 is the unreplicated grid's variant: same id, same group
    assert {(v.id, v.group_id) for v in plain.variants} == {(r[0].id, r[0].group_id) for r in by_name.values()}
    assert plain.variants[0].replicate == ""


def test_seeds_as_a_list_and_as_an_axis_give_the_same_groups(grid_file):
    listed = load_grid(grid_file(ROUNDS + "    seeds: [3, 11]\n", "listed.yaml"))
    axis = load_grid(grid_file(ROUNDS + "    axes: {seed: [3, 11]}\n", "axis.yaml"))
    assert [v.spec.seed for v in listed.variants] == [3, 11, 3, 11]
    assert [(v.id, v.group_id) for v in listed.variants] == [(v.id, v.group_id) for v in axis.variants]
    assert listed.variants[0].source == "variants[0] × seed 3"


def test_a_stage_is_not_replicated(grid_file):
    grid = load_grid(grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama}
        variants:
          - {name: warm, method: sft}
          - {name: dpo, method: dpo_lora, from: warm}
        seeds: 2
    """))
    assert [(v.spec.name, v.spec.seed) for v in grid.variants] == [("warm", 0), ("dpo", 0), ("dpo", 1)]
    stage = grid.variants[0]
    assert stage.replicate == "" and {v.parent_id for v in grid.variants[1:]} == {stage.id}
    assert grid.variants[1].group_id == grid.variants[2].group_id != stage.group_id


@pytest.mark.parametrize("value, expected", [
    ("0", "seeds: expected 1 to 100 replicates, got 0"),
    ("true", "seeds: expected a number of replicates like 3"),
    ("'3'", "seeds: expected a number of replicates like 3"),
    ("[1, 1]", "seeds: expected at most 100 distinct seeds, got [1, 1]"),
    ("[-1]", "seeds: expected seeds from 0 to 2**32 - 1, got -1"),
])
def test_bad_seeds_are_refused_naming_the_key(grid_file, value, expected):
    assert expected in errors_of(grid_file(ROUNDS + f"    seeds: {value}\n"))


def test_seeds_next_to_a_seed_is_refused(grid_file):
    errs = errors_of(grid_file(ROUNDS.replace("method: dpo_lora}", "method: dpo_lora, seed: 4}") + "    seeds: 2\n"))
    assert "defaults.seed: the grid also has `seeds:`" in errs
    errs = errors_of(grid_file(ROUNDS + "    seeds: 2\n    axes: {seed: [1, 2]}\n"))
    assert "axes.seed: the grid also has `seeds:`" in errs


def test_plan_says_how_the_replicates_group(grid_file, capsys):
    assert main(["plan", str(grid_file(ROUNDS + "    seeds: 3\n"))]) == 0
    out = capsys.readouterr().out
    assert "6 variants" in out and "2 group(s) of seed replicates" in out


# ---------------------------------------------------------------- the report, on synthetic runs


def synthetic_study(variants: dict[str, np.ndarray], sizes: dict[str, int]) -> Study:
    """A Study as `analysis.load` builds it from the store: one run per (variant, seed), its per-pair table."""
    runs, metrics, pairs = [], [], []
    n = next(iter(variants.values())).shape[1]
    before = np.linspace(-20, 20, n)
    for name, table in variants.items():
        for seed, row in enumerate(table):
            rid = f"{name}{seed}".ljust(32, "0")
            runs.append({"run_id": rid, "run_name": f"{name}·dpo_lora·tiny·s{seed}", "start_time": len(runs),
                         "end_time": len(runs), "device": "cpu", "gpu": "", "name": name, "method": "dpo_lora",
                         "base_model": "tiny-random-llama", "seed": seed, "data.size": sizes[name],
                         "data.train": "builtin", "data.eval": "builtin", "train.epochs": 1, "train.batch_size": 2,
                         "variant_id": f"{name}{seed}", "group_id": f"g{name}"})
            metrics.append({"run_id": rid, "eval/pairs": n, "eval/margin_shift_mean": row.mean()})
            pairs.append(pd.DataFrame({"run_id": rid, "split": "eval", "pair": range(n), "category": "",
                                       "margin_before": before, "margin_after": before + row, "margin_shift": row,
                                       "n_chosen": 20, "n_rejected": 20}))
    return Study(grid="synthetic", uri="", experiment_id="0", parent_run_id=None,
                 runs=pd.DataFrame(runs, dtype=object), metrics=pd.DataFrame(metrics).set_index("run_id"),
                 pairs=pd.concat(pairs, ignore_index=True),
                 history=pd.DataFrame(columns=["run_id", "key", "step", "value"]))


def test_report_pools_seeds_pairs_comparisons_and_adjusts(tmp_path):
    rng = np.random.default_rng(0)
    k, n = 3, 32
    pair_effect = rng.normal(0, 0.05, (1, n))
    tables = {  # 'noisy' moved nothing on average, but each seed moved it its own way
        "flat": 0.02 * rng.normal(size=(k, n)),
        "noisy": np.array([[-0.3], [0.05], [0.25]]) + pair_effect + 0.02 * rng.normal(size=(k, n)),
        "strong": 0.5 + pair_effect + 0.02 * rng.normal(size=(k, n)),
    }
    study = synthetic_study(tables, {"flat": 4, "noisy": 8, "strong": 12})
    text = report.build(study, tmp_path, target="synthetic").read_text()
    assert "## Seed replicates" in text and (tmp_path / "seeds.png").stat().st_size > 1000
    assert "32 pairs × 3 seeds" in text
    assert "This report makes 6 tests: 3 variants' held-out shifts against zero and 3 comparisons" in text
    assert "**Holm**" in text and "**Benjamini–Hochberg**" in text
    assert "## What this design could detect" in text
    groups = {g.label: g for g in report.build_groups(study)}
    noisy = groups["noisy"]
    assert noisy.table.shape == (k, n) and list(noisy.table.index) == [0, 1, 2]
    # pooling seeds per pair would call 'noisy' (mean 0) nothing either, but its interval must carry the seeds'
    # spread: several times wider than the pairs-only interval of its seed-averaged shifts
    pairs_only = noisy.shifts.std(ddof=1) / np.sqrt(n)
    assert noisy.est.se > 5 * pairs_only
    summary = text.split("## Summary", 1)[1].split("## Variants", 1)[0]
    assert "| noisy |" in summary and "not distinguishable from zero (Holm p" in summary
    assert "| strong |" in summary and "above zero (Holm p" in summary
    comparisons = text.split("## Comparisons", 1)[1].split("## Tests", 1)[0]
    assert "**strong** − **flat**" in comparisons and "paired over 32 pairs × 3 seeds" in comparisons
    assert "strong moved the margin more than flat" in comparisons
    assert "Holm-adjusted p" in comparisons and "d = " in comparisons
    assert "Seed by seed the difference is" in comparisons and "every seed the same way" in comparisons


def test_every_sentence_about_a_variant_follows_its_adjusted_verdict(tmp_path):
    """A shift whose own 95% interval clears zero, but not after Holm's adjustment over the report's 6 tests:
    no sentence may call it detectable or say which share of it is length."""
    rng = np.random.default_rng(2)

    def standardised():
        z = rng.normal(size=32)
        return (z - z.mean()) / z.std(ddof=1)

    study = synthetic_study({"a": (0.39 + standardised())[None, :], "b": 0.01 * standardised()[None, :],
                             "c": 0.01 * standardised()[None, :]}, {"a": 4, "b": 8, "c": 12})
    groups = report.build_groups(study)
    a = next(g for g in groups if g.label == "a")
    assert not a.est.covers_zero  # alone, its interval excludes zero
    text = report.build(study, tmp_path, target="synthetic").read_text()
    section = text.split("### a\n", 1)[1].split("### ", 1)[0]
    assert "not distinguishable from zero (p = " in section and "Holm-adjusted" in section
    assert "detectable" not in section


def test_report_of_single_seed_runs_says_the_seed_noise_is_unmeasured(tmp_path):
    rng = np.random.default_rng(1)
    study = synthetic_study({"a": 0.1 + rng.normal(size=(1, 32)), "b": rng.normal(size=(1, 32))}, {"a": 4, "b": 8})
    text = report.build(study, tmp_path, target="synthetic").read_text()
    assert "## Seed replicates" not in text and not (tmp_path / "seeds.png").exists()
    assert "One training seed per variant" in text
    assert "about 128 pairs (now 32); seeds: unmeasured" in text  # the power statement is about pairs only
    assert "an amount one seed cannot measure" in text
    assert "3 tests" in text  # 2 variants and their comparison


# ---------------------------------------------------------------- end to end on the tiny model


def test_seeds_run_as_replicates_resume_and_report(tmp_path, capsys):
    eval_file = tmp_path / "held_out.jsonl"
    eval_file.write_text("".join(
        f'{{"prompt": "Question {i}?", "chosen": "A clear answer {i}.", "rejected": "No idea {i}."}}\n'
        for i in range(6)))
    grid = tmp_path / "grid.yaml"
    grid.write_text("""
name: tiny_seeds
defaults:
  base_model: tiny-random-llama
  method: dpo_lora
  data: {size: 4, max_length: 128, eval: held_out.jsonl}
  train: {max_steps: 1, batch_size: 2, learning_rate: 1e-3}
  lora: {rank: 2, alpha: 4}
  eval: {probe_length: 4}
seeds: 3
""")
    results = tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny_seeds")
    runs = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'variant'")
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["harness.group"] for r in runs}) == 1
    assert len({r.data.tags["harness.variant_id"] for r in runs}) == 3
    assert sorted(r.data.tags["harness.replicate"] for r in runs) == ["1/3", "2/3", "3/3"]
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2"]
    shifts = {r.data.metrics["eval/margin_shift_mean"] for r in runs}
    assert len(shifts) == 3  # the training seed changed what was learned
    capsys.readouterr()
    assert main(["run", str(grid), "--results", str(results)]) == 0  # resume: nothing left to train
    assert "3 already finished, 0 to run" in capsys.readouterr().err
    assert len(client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'variant'")) == 3
    assert main(["report", "tiny_seeds", "--results", str(results)]) == 0
    text = (results / "tiny_seeds" / "report.md").read_text()
    assert "6 pairs × 3 seeds" in text and "## Seed replicates" in text
    assert runs[0].data.tags["harness.group"] in text  # the runs table names the group
