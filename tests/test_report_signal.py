"""The report says what kind of shift each row is: demonstration imitation for SFT-style rows (with how much of
the shift is length), a shift against the reference for DPO rows, and, for DPO on a `from:` stage, what each
step moved from the base. Built on synthetic logged studies whose answers are known by construction (no
torch, well under a second), and once on a real tiny-model stage chain through the CLI.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import report
from analysis.load import Study

N_PAIRS = 16


def _pairs(run_id: str, n_chosen, n_rejected, per_token_chosen, per_token_rejected, before) -> pd.DataFrame:
    """Eval rows of one run: each side's log-prob changes by `per_token_*` × its scored tokens."""
    n_c, n_r = np.asarray(n_chosen, float), np.asarray(n_rejected, float)
    c_shift, r_shift = per_token_chosen * n_c, per_token_rejected * n_r
    c_before = -2.0 * n_c
    r_before = c_before - np.asarray(before, float)
    frame = pd.DataFrame({
        "run_id": run_id, "split": "eval", "pair": np.arange(len(n_c)), "category": "",
        "n_prompt": 10, "n_chosen": n_c, "n_rejected": n_r,
        "logp_chosen_before": c_before, "logp_rejected_before": r_before,
        "logp_chosen_after": c_before + c_shift, "logp_rejected_after": r_before + r_shift,
        "chosen_shift": c_shift, "rejected_shift": r_shift})
    frame["margin_before"] = frame["logp_chosen_before"] - frame["logp_rejected_before"]
    frame["margin_after"] = frame["logp_chosen_after"] - frame["logp_rejected_after"]
    frame["margin_shift"] = frame["margin_after"] - frame["margin_before"]
    frame["norm_margin_shift"] = per_token_chosen - per_token_rejected
    frame["displaced"] = ((frame["chosen_shift"] < 0) & (frame["rejected_shift"] < 0)).astype(int)
    return frame


def _metrics(frame: pd.DataFrame) -> dict:
    return {"eval/pairs": len(frame), "eval/margin_shift_mean": frame["margin_shift"].mean(),
            "eval/chosen_shift_mean": frame["chosen_shift"].mean(),
            "eval/rejected_shift_mean": frame["rejected_shift"].mean(),
            "eval/accuracy_before": (frame["margin_before"] > 0).mean(),
            "eval/accuracy_after": (frame["margin_after"] > 0).mean(), "eval/displaced_frac": frame["displaced"].mean(),
            "eval/norm_margin_shift_mean": frame["norm_margin_shift"].mean()}


def _study(rows: list[tuple[dict, pd.DataFrame]]) -> Study:
    runs, metrics, pairs = [], [], []
    for i, (config, frame) in enumerate(rows):
        rid = f"{i:032x}"
        frame = frame.assign(run_id=rid)
        runs.append({"run_id": rid, "run_name": config["name"], "start_time": i, "end_time": i, "device": "cpu",
                     "gpu": "", "variant_id": f"{i:012x}", "seed": 0, "base_model": "tiny-random-llama",
                     "data.eval": "builtin", **config})
        metrics.append({"run_id": rid, **_metrics(frame)})
        pairs.append(frame)
    return Study(grid="g", uri="sqlite://", experiment_id="1", parent_run_id=None,
                 runs=pd.DataFrame(runs, dtype=object), metrics=pd.DataFrame(metrics).set_index("run_id"),
                 pairs=pd.concat(pairs, ignore_index=True), history=pd.DataFrame(columns=["run_id", "key", "step"]))


def _groups(study: Study) -> dict[str, report.Group]:
    return {g.label: g for g in report.build_groups(study)}


def _text(study: Study, label: str) -> str:
    groups = report.build_groups(study)
    g = next(x for x in groups if x.label == label)
    return "\n".join(report.describe_signal(g, groups, study.pairs))


RNG = np.random.default_rng(0)
LONG, SHORT = RNG.integers(40, 60, N_PAIRS), RNG.integers(10, 20, N_PAIRS)
BEFORE = RNG.normal(0, 5, N_PAIRS)


def test_sft_row_with_equal_per_token_gains_is_imitation_and_all_length():
    # chosen is longer on every pair and both sides gain 0.05 nats per token: the whole shift is length
    frame = _pairs("", LONG, SHORT, 0.05, 0.05, BEFORE)
    study = _study([({"name": "sft_run", "method": "lora_sft"}, frame)])
    split = report.length_split(_groups(study)["sft_run"], study.pairs)
    assert split.length.mean == pytest.approx(frame["margin_shift"].mean())
    assert split.per_token.mean == pytest.approx(0, abs=1e-12)
    assert split.chosen_longer == N_PAIRS
    text = _text(study, "sft_run")
    assert "**demonstration imitation**" in text and f"both on {N_PAIRS}/{N_PAIRS} pairs" in text
    assert "The shift is length" in text
    assert "Relative to the reference" not in text


def test_length_and_per_token_parts_add_up_to_the_shift_on_every_pair():
    frame = _pairs("", LONG, SHORT, RNG.normal(0.1, 0.05, N_PAIRS), RNG.normal(0.02, 0.05, N_PAIRS), BEFORE)
    study = _study([({"name": "mixed", "method": "sft"}, frame)])
    split = report.length_split(_groups(study)["mixed"], study.pairs)
    assert split.length.mean + split.per_token.mean == pytest.approx(frame["margin_shift"].mean())
    assert split.length.mean > 0 and split.per_token.mean > 0
    share = f"{split.length.mean / frame['margin_shift'].mean():.0%}"
    assert f"Length accounts for {share} of the mean shift" in _text(study, "mixed")


def test_a_shift_that_is_more_than_all_length_says_per_token_went_the_other_way():
    # what lora_sft did on SmolLM2: both sides rose, rejected a little more per token, chosen is longer
    frame = _pairs("", LONG, SHORT, RNG.normal(0.04, 0.002, N_PAIRS), RNG.normal(0.05, 0.002, N_PAIRS), BEFORE)
    study = _study([({"name": "over", "method": "lora_sft"}, frame)])
    split = report.length_split(_groups(study)["over"], study.pairs)
    assert frame["margin_shift"].mean() > 0 and split.per_token.hi < 0 < split.length.mean
    text = _text(study, "over")
    assert "Length is more than all of it" in text and "per token, rejected gained more than chosen" in text
    assert "at equal lengths it would have moved the other way" in text


def test_the_per_token_line_leaves_the_explaining_to_the_length_split():
    """A per-token shift opposite to the summed one is explained once: by the length split when the row has its
    per-pair table, by the per-token line itself when it has not (nothing else would say it)."""
    frame = _pairs("", LONG, SHORT, RNG.normal(0.04, 0.002, N_PAIRS), RNG.normal(0.05, 0.002, N_PAIRS), BEFORE)
    study = _study([({"name": "over", "method": "lora_sft"}, frame)])
    g = _groups(study)["over"]
    assert g.est.significant and g.metrics["eval/norm_margin_shift_mean"] < 0 < g.est.mean
    told = "\n".join(report.describe_movement(g, length_told=True)) + "\n" + _text(study, "over")
    assert "the length split below says why" in told and "because the completions differ in length" not in told
    assert told.count("rejected gained more") == 1
    alone = "\n".join(report.describe_movement(g))
    assert "because the completions differ in length" in alone and "per token, the rejected completions gained more" in alone


def test_equal_lengths_leave_nothing_to_length_and_a_dpo_like_sft_row_is_not_called_imitation():
    # chosen rises, rejected falls, same length: per-token preference only
    frame = _pairs("", LONG, LONG, 0.05, -0.05, BEFORE)
    study = _study([({"name": "apart", "method": "partial_ft"}, frame)])
    split = report.length_split(_groups(study)["apart"], study.pairs)
    assert split.length.mean == pytest.approx(0, abs=1e-12) and split.per_token.mean > 0
    text = _text(study, "apart")
    assert "imitation**" not in text and "the two sides moved apart" in text
    assert "Length accounts for little of it" in text


def test_dpo_on_a_stage_is_relative_to_the_stage_and_the_steps_add_up():
    stage = _pairs("", LONG, SHORT, 0.05, 0.04, BEFORE)
    child = _pairs("", LONG, SHORT, 0.01, -0.01, stage["margin_after"])  # its reference is the stage's model
    base_dpo = _pairs("", LONG, SHORT, 0.01, -0.01, BEFORE)
    study = _study([({"name": "sft_stage", "method": "lora_sft"}, stage),
                    ({"name": "dpo_on_stage", "method": "dpo_lora", "from": "sft_stage"}, child),
                    ({"name": "dpo_on_base", "method": "dpo_lora"}, base_dpo)])
    on_stage = _text(study, "dpo_on_stage")
    assert "the model trained by stage `sft_stage`" in on_stage and "not the base model" in on_stage
    assert "the base model tiny-random-llama (the adapter disabled)" in _text(study, "dpo_on_base")
    assert "from:` stage of dpo_on_stage" in _text(study, "sft_stage")

    groups = report.build_groups(study)
    section = "\n".join(report.stage_sections(groups, study.pairs))
    assert "### sft_stage → dpo_on_stage" in section and "dpo_on_base" not in section
    total = stage["margin_shift"] + child["margin_shift"]
    row = next(line for line in section.splitlines() if line.startswith("| both steps"))
    assert report.fmt(total.mean()) in row
    dpo_share = f"{child['margin_shift'].mean() / total.mean():.0%}"
    assert f"dpo_on_stage contributed {dpo_share} of the shift from the base" in section
    assert "so the steps chain" in section
    notes = " ".join(report.signal_notes(groups))
    assert "SFT-style rows (lora_sft)" in notes and "for dpo_on_stage, the model of stage sft_stage" in notes
    assert any("measured against that stage's model" in c for c in report.signal_caveats(groups))
    # a comparison across references says so: `from` differs even though only one side has the field
    across = next(c for c in report.compare(groups) if {c.a.label, c.b.label} == {"dpo_on_stage", "dpo_on_base"})
    assert set(across.differs) == {"from"} and "base" in across.differs["from"]
    assert "### Starting stage" in "\n".join(report.comparison_sections([across]))


def test_a_stage_chain_whose_reference_does_not_match_is_flagged():
    stage = _pairs("", LONG, SHORT, 0.05, 0.04, BEFORE)
    child = _pairs("", LONG, SHORT, 0.01, -0.01, stage["margin_after"] + 1.0)  # not the stage's model
    study = _study([({"name": "s", "method": "sft"}, stage), ({"name": "d", "method": "dpo_lora", "from": "s"}, child)])
    section = "\n".join(report.stage_sections(report.build_groups(study), study.pairs))
    assert "Warning: d's reference margins differ from s's" in section and "steps chain" not in section


STAGED = """
name: tiny_staged
defaults:
  base_model: tiny-random-llama
  data: {size: 4, max_length: 256, eval: eval.jsonl}   # 8 held-out pairs: measuring is most of the cost
  train: {max_steps: 2, batch_size: 2, learning_rate: 1e-3}
  lora: {rank: 4, alpha: 8}
  eval: {probe_length: 4}
variants:
  - {name: warm, method: lora_sft}
  - {name: dpo, method: dpo_lora, from: warm}
"""


def test_real_stage_chain_report_chains_and_says_what_each_step_is(tmp_path):
    """The DPO child's measured reference is the stage's saved model: its before-margins equal the stage's
    after-margins as measured through the adapter, so the report's step-by-step section chains."""
    from harness.cli import main

    from experiments import data as D

    grid = tmp_path / "grid.yaml"
    grid.write_text(STAGED)
    rows = (D.BUILTIN_DIR / "eval.jsonl").read_text().splitlines()[:8]
    (tmp_path / "eval.jsonl").write_text("\n".join(rows) + "\n")
    results = tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    assert main(["report", "tiny_staged", "--results", str(results)]) == 0
    text = (results / "tiny_staged" / "report.md").read_text()
    assert "## From the base, step by step" in text and "### warm → dpo" in text
    assert "so the steps chain" in text, text[text.index("### warm → dpo"):][:1500]
    assert "**Training signal: demonstrations.**" in text and "**Relative to the reference.**" in text
    assert "**How much of it is length**" in text
