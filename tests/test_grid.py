"""Grid files: loading, validation errors, expansion and variant ids. No torch needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments import data as D
from harness.grid import GridError, load_grid

ROOT = Path(__file__).resolve().parent.parent


def errors_of(path) -> list[str]:
    with pytest.raises(GridError) as info:
        load_grid(path)
    return info.value.errors


def test_shipped_configs_validate():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs, "no shipped configs found"
    for path in configs:
        if "search" in yaml.safe_load(path.read_text()):  # a search file: a one-variant grid + search:
            from harness.searchfile import load_search

            assert load_search(path).space, path
            continue
        grid = load_grid(path)
        assert grid.variants, path


def test_two_round_is_the_study(tmp_path):
    grid = load_grid(ROOT / "configs" / "two_round.yaml")
    rounds = {v.spec.name: v.spec for v in grid.variants}
    assert set(rounds) == {"round1", "round2"}
    assert (rounds["round1"].data.size, rounds["round1"].train.epochs) == (4, 1)
    assert (rounds["round2"].data.size, rounds["round2"].train.epochs) == (12, 2)
    for spec in rounds.values():
        assert (spec.method, spec.lora.rank, spec.lora.alpha, spec.lora.targets) == ("dpo_lora", 4, 8, "qv")
        assert spec.base_model == "smollm2-135m-instruct"


def test_lora_scope_is_the_studys_supervised_ladder():
    grid = load_grid(ROOT / "configs" / "lora_scope.yaml")
    specs = [v.spec for v in grid.variants]
    lora = [s for s in specs if s.method == "lora_sft"]
    assert [s.lora.targets for s in lora] == ["qv", "qkvo", "all-linear", "all-linear-last-half"]
    assert {(s.lora.rank, s.lora.alpha) for s in lora} == {(4, 8)}
    assert [s.method for s in specs[len(lora):]] == ["partial_ft", "sft"]
    assert next(s for s in specs if s.method == "partial_ft").partial_ft.layers == "last_half"
    assert not any(s.method_record.uses("dpo") for s in specs)  # supervised on every rung: no DPO here
    assert len({(s.data.size, s.data.train, s.train.epochs) for s in specs}) == 1  # same data for every rung


def test_lora_scope_dpo_is_the_same_ladder_through_dpo():
    sft = load_grid(ROOT / "configs" / "lora_scope.yaml").variants
    dpo = load_grid(ROOT / "configs" / "lora_scope_dpo.yaml").variants
    assert [v.spec.lora.targets for v in dpo if v.spec.method == "dpo_lora"] == [
        v.spec.lora.targets for v in sft if v.spec.method == "lora_sft"]
    assert [v.spec.method for v in dpo] == ["dpo_lora"] * 4 + ["partial_ft", "sft"]
    # the full-rank rungs are the same variants in both ladders (same fields, same ids)
    assert [v.id for v in dpo[4:]] == [v.id for v in sft[4:]]


def test_sft_then_dpo_puts_two_dpo_rounds_on_an_sft_stage():
    grid = load_grid(ROOT / "configs" / "sft_then_dpo.yaml")
    by_name = {v.spec.name: v for v in grid.variants}
    stage = by_name["sft_qv"]
    assert stage.spec.method == "lora_sft" and stage.parent_id is None and stage.id in grid.stage_ids
    # the stage is the baseline rung of the supervised ladder: same fields, so the same variant id
    ladder = {v.spec.name: v for v in load_grid(ROOT / "configs" / "lora_scope.yaml").variants}
    assert stage.id == ladder["lora_qv"].id
    rounds = {n: by_name[n].spec for n in ("round1", "round2")}
    assert {(s.method, s.from_) for s in rounds.values()} == {("dpo_lora", "sft_qv")}
    assert {by_name[n].parent_id for n in rounds} == {stage.id}
    assert [(s.data.size, s.train.epochs) for s in rounds.values()] == [(4, 1), (12, 2)]
    assert "from" not in stage.run_name  # a variant with no stage gets no `fromNone` in its name


def test_unknown_key_suggests(grid_file):
    errs = errors_of(grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama, lora: {alfa: 8}}
    """))
    assert len(errs) == 1
    assert "defaults.lora.alfa" in errs[0] and "did you mean 'lora.alpha'" in errs[0]


def test_wrong_type_names_axis_path_and_all_errors_at_once(grid_file):
    path = grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama, train: {epochs: two}}
        axes:
          lora: {rank: [4, 8, "8x"]}
          dpo: {beta: [0.1, -1]}
    """)
    errs = errors_of(path)
    text = "\n".join(errs)
    assert f"{path}: axes.lora.rank[2]" in text and "'8x'" in text
    assert "axes.dpo.beta[1]" in text and "greater than 0" in text
    assert "defaults.train.epochs" in text
    assert len(errs) == 3  # each problem once, not once per combination


def test_duplicate_keys_rejected(grid_file):
    errs = errors_of(grid_file("""
        name: g
        defaults:
          method: sft
          method: dpo_lora
    """))
    assert "duplicate key 'method'" in errs[0]


def test_scientific_notation_is_a_float(grid_file):
    grid = load_grid(grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama, train: {learning_rate: 1e-4}}
    """))
    lr = grid.variants[0].spec.train.learning_rate
    assert isinstance(lr, float) and lr == 1e-4


def test_python_tags_do_not_execute(grid_file, tmp_path):
    marker = tmp_path / "pwned"
    errs = errors_of(grid_file(f"""
        name: !!python/object/apply:os.system ["touch {marker}"]
    """))
    assert "invalid YAML" in errs[0]
    assert not marker.exists()


def test_unknown_preset_method_and_model(grid_file):
    errs = "\n".join(errors_of(grid_file("""
        name: g
        variants:
          - {method: dpo_lora, base_model: tiny-random-lama, lora: {targets: qkv}}
          - {method: dpo}
    """)))
    assert "unknown preset 'qkv'" in errs and "did you mean 'qkvo'" in errs
    assert "Did you mean 'tiny-random-llama'" in errs
    assert "variants[1].method: unknown method 'dpo'" in errs and "Available: sft, lora_sft, partial_ft, dpo_lora" in errs


def test_bad_data_names_file_and_rows(grid_file, tmp_path):
    bad = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "a?", "chosen": "yes", "rejected": "no"},
            {"prompt": "b?", "chosen": "same", "rejected": "same"},
            {"prompt": "c?", "chosen": "", "rejected": "no"},
            {"prompt": "d?", "chosen": "ok"}]
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    errs = "\n".join(errors_of(grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama, data: {train: prefs.jsonl}}
    """)))
    assert str(bad) in errs
    assert "chosen == rejected (no preference signal) in row(s) 2" in errs
    assert "empty 'chosen' in row(s) 3" in errs
    assert "missing column 'rejected' in row(s) 4" in errs


def test_data_size_beyond_file(grid_file):
    errs = "\n".join(errors_of(grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama, data: {size: 65}}
    """)))
    assert "65 rows requested but train.jsonl has 64" in errs


def test_expansion_exclude_and_dedup(grid_file):
    grid = load_grid(grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama}
        variants:
          - {method: sft}
          - {method: dpo_lora}
        axes:
          dpo: {beta: [0.1, 0.5]}
          data: {size: [4, 12]}
        exclude:
          - {method: dpo_lora, dpo.beta: 0.5, data.size: 4}
    """))
    combos = sorted((v.spec.method, v.spec.data.size, v.spec.dpo.beta if v.spec.method == "dpo_lora" else None)
                    for v in grid.variants)
    # sft ignores beta: its 4 combinations collapse to 2; dpo loses one to exclude
    assert combos == [("dpo_lora", 4, 0.1), ("dpo_lora", 12, 0.1), ("dpo_lora", 12, 0.5),
                      ("sft", 4, None), ("sft", 12, None)]
    assert grid.collapsed == 2
    assert len({v.run_name for v in grid.variants}) == len(grid.variants)


def test_stage_trains_once_and_comes_first(grid_file):
    grid = load_grid(grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama}
        variants:
          - {name: dpo, method: dpo_lora, from: warmup}
          - {name: warmup, method: sft}
        axes:
          dpo: {beta: [0.1, 0.3, 1.0]}
    """))
    assert [v.spec.method for v in grid.variants] == ["sft", "dpo_lora", "dpo_lora", "dpo_lora"]
    stage = grid.variants[0]
    assert all(v.parent_id == stage.id for v in grid.variants[1:])


def test_from_errors(grid_file):
    errs = "\n".join(errors_of(grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama}
        variants:
          - {name: a, method: dpo_lora, from: warmp}
          - {name: warmup, method: sft}
          - {name: b, method: dpo_lora, from: a}
    """)))
    assert "no variant named 'warmp'" in errs and "did you mean 'warmup'" in errs
    assert "'a' is a dpo_lora variant" in errs


def test_ids_are_stable_and_ignore_formatting(grid_file):
    a = load_grid(grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama, lora: {rank: 4, alpha: 8}, train: {learning_rate: 1e-4}}
    """, "a.yaml"))
    b = load_grid(grid_file("""
        name: g
        defaults:
          train.learning_rate: 0.0001
          lora.alpha: 8.0
          lora.rank: 4
          base_model: tiny-random-llama
          name: relabelled        # labels are not part of the id
    """, "b.yaml"))
    c = load_grid(grid_file("""
        name: g
        defaults: {base_model: tiny-random-llama, lora: {rank: 8, alpha: 8}, train: {learning_rate: 1e-4}}
    """, "c.yaml"))
    assert a.variants[0].id == b.variants[0].id
    assert a.variants[0].id != c.variants[0].id
    # ids are a hash of the resolved config: a change to this value means every old run is orphaned
    assert load_grid(ROOT / "configs" / "two_round.yaml").by_id().keys() == {"0c44786f9a18", "c06e30715fe3"}


def test_data_sizes_are_nested():
    rows = D.read_rows(D.BUILTIN_DIR / "train.jsonl")
    assert len(rows) == 64
    small, mid, big = (D.select(rows, n, 0) for n in (4, 12, 48))
    assert small == mid[:4] and mid == big[:12]
    assert D.select(rows, 12, 1) != mid  # another shuffle seed, another subset


def test_builtin_data_shape():
    train = D.read_rows(D.BUILTIN_DIR / "train.jsonl")
    held_out = D.read_rows(D.BUILTIN_DIR / "eval.jsonl")
    assert len(train) >= 64 and len(held_out) >= 32
    assert not {json.dumps(r["prompt"]) for r in train} & {json.dumps(r["prompt"]) for r in held_out}
    assert D.check_file(D.BUILTIN_DIR / "train.jsonl", "preference") == len(train)


def test_plan_does_not_import_torch():
    code = ("import sys; from harness.cli import main; rc = main(['plan', 'configs/two_round.yaml']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'plan imported torch'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "round1·n4·e1·dpo_lora·smollm2·b0.1·r4·qv" in out.stdout  # what differs leads


def test_cli_exit_code_for_bad_grid(grid_file, capsys):
    from harness.cli import main

    assert main(["validate", str(grid_file("name: g\ndefaults: {lora: {rnk: 4}}\n"))]) == 2
    assert "did you mean 'lora.rank'" in capsys.readouterr().err
