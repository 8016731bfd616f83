"""Preference consistency as an axis (`data.label_noise`): a seeded, nested fraction of the training pairs has
chosen and rejected swapped; the evaluation pairs never are. Most checks need no model; one trains the tiny one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from experiments import data as D
from harness.cli import main
from harness.grid import load_grid


def test_flips_are_seeded_and_nested_across_noise_levels():
    selected = D.select_indices(64, 24, 0)
    levels = {noise: D.flipped_indices(selected, noise, 0) for noise in (0.0, 0.1, 0.25, 0.5, 1.0)}
    assert [len(levels[n]) for n in (0.0, 0.1, 0.25, 0.5, 1.0)] == [0, 2, 6, 12, 24]
    assert levels[0.1] <= levels[0.25] <= levels[0.5] <= levels[1.0] == set(selected)
    # another shuffle seed flips other pairs; the same seed the same ones
    assert D.flipped_indices(selected, 0.5, 0) == D.flipped_indices(list(selected), 0.5, 0)
    assert D.flipped_indices(selected, 0.5, 1) != D.flipped_indices(selected, 0.5, 0)
    rows = D.read_rows(D.BUILTIN_DIR / "train.jsonl")
    noisy = D.with_label_noise([rows[i] for i in selected], selected, levels[0.25])
    for row, i in zip(noisy, selected, strict=True):
        want = (rows[i]["rejected"], rows[i]["chosen"]) if i in levels[0.25] else (rows[i]["chosen"], rows[i]["rejected"])
        assert (row["chosen"], row["rejected"]) == want


def _grid(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "noise.yaml"
    path.write_text("name: noise\ndefaults:\n  base_model: tiny-random-llama\n  method: dpo_lora\n"
                    "  data: {size: 8, max_length: 128}\n  train: {max_steps: 1, batch_size: 4, learning_rate: 1e-3}\n"
                    "  lora: {rank: 2, alpha: 4}\n  eval: {probe_length: 4}\n" + body)
    return path


def test_label_noise_is_part_of_the_id_and_refused_where_there_are_no_pairs(tmp_path, capsys):
    grid = load_grid(_grid(tmp_path, "axes: {data: {label_noise: [0.0, 0.25]}}\n"))
    assert len({v.id for v in grid.variants}) == 2
    assert {v.spec.data.label_noise for v in grid.variants} == {0.0, 0.25}
    pc = [{"prompt": D.text_of(r["prompt"]), "completion": D.text_of(r["chosen"])}
          for r in D.read_rows(D.BUILTIN_DIR / "train.jsonl")[:8]]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pc))
    bad = _grid(tmp_path, "variants:\n  - {method: lora_sft, data: {train: pc.jsonl, label_noise: 0.5}}\n")
    assert main(["validate", str(bad)]) == 2
    assert "data.label_noise: 0.5 swaps chosen and rejected, but pc.jsonl holds no preference pairs" in \
        capsys.readouterr().err
    over = _grid(tmp_path, "variants:\n  - {data: {label_noise: 1.5}}\n")
    assert main(["validate", str(over)]) == 2
    assert "data.label_noise" in capsys.readouterr().err


def test_a_noisy_variant_trains_on_flipped_pairs_and_is_measured_on_untouched_evaluation_pairs(tmp_path):
    grid = _grid(tmp_path, "variants:\n  - {name: clean}\n  - {name: noisy, data: {label_noise: 0.5}}\n")
    results = tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("noise")
    runs = {r.data.params["name"]: r for r in client.search_runs([exp.experiment_id],
                                                                 "tags.`harness.kind` = 'variant'")}
    audits = {}
    for name, run in runs.items():
        path = client.download_artifacts(run.info.run_id, "data_audit.json", str(tmp_path / name))
        audits[name] = json.loads(Path(path).read_text())
    assert audits["clean"]["flipped"] == 0 and audits["noisy"]["flipped"] == 4
    selected = D.select_indices(64, 8, 0)
    assert set(audits["noisy"]["flipped_rows"]) == D.flipped_indices(selected, 0.5, 0)
    assert runs["noisy"].data.metrics["data/flipped"] == 4.0
    # the held-out pairs are the same pairs, scored the same way, before training: flips never reach them
    for key in ("eval/margin_before_mean", "eval/pairs"):
        assert runs["noisy"].data.metrics[key] == pytest.approx(runs["clean"].data.metrics[key], rel=1e-6)
    # the training pairs are measured as trained: the flipped ones with their margin's sign reversed
    assert runs["noisy"].data.metrics["train_pairs/margin_before_mean"] != pytest.approx(
        runs["clean"].data.metrics["train_pairs/margin_before_mean"])
