"""Reliability round three (issue 23): results recorded under the wrong data, innocent names that broke reports,
inputs that ended in tracebacks, hangs or silence. One test per item; most need no training, the rest start
one tiny-model variant. The number above each test is the issue's item."""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from experiments import data as D
from harness.cli import main
from harness.core.tracking import redact, redact_document

TINY = """
name: {name}
defaults:
  base_model: tiny-random-llama
  method: dpo_lora
  data: {{size: 4, max_length: 128}}
  train: {{max_steps: 1, batch_size: 2, learning_rate: 1e-3}}
  lora: {{rank: 2, alpha: 4}}
  eval: {{probe_length: 4}}
"""


def grid_file(folder: Path, name: str, body: str = "") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(TINY.format(name=name) + textwrap.dedent(body))
    return path


def refused(capsys, *argv: str) -> str:
    """The command exits 2 and says why in a line or a few, never with a traceback."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip(), err
    return err


# 1 ------------------------------------------------------------------------------------------------


def test_a_data_file_edited_after_the_grid_was_loaded_is_never_recorded_under_the_old_id(tmp_path):
    """The id names the file's content when the grid was loaded; the worker parses the bytes it hashes and
    refuses others, so an edit while the grid runs fails the variant with the reason, and no run is FINISHED
    under an id whose data it did not train on (a rerun would then have skipped it as done)."""
    from mlflow.tracking import MlflowClient

    from harness.grid import load_grid
    from harness.run.session import run_grid

    shutil.copy(D.BUILTIN_DIR / "train.jsonl", tmp_path / "train.jsonl")
    path = grid_file(tmp_path, "edited")
    path.write_text(path.read_text().replace("data: {size: 4,", "data: {train: train.jsonl, size: 4,"))
    grid = load_grid(path)
    [variant] = grid.variants
    assert variant.data_fingerprints["train"] == D.fingerprint(tmp_path / "train.jsonl")
    text = (tmp_path / "train.jsonl").read_text()
    (tmp_path / "train.jsonl").write_text(text.replace("the", "a", 1))  # one word, after the ids were computed
    assert run_grid(grid, tmp_path / "results") == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("edited")
    [run] = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'variant'")
    assert run.info.status == "FAILED" and run.data.tags["harness.variant_id"] == variant.id
    reason = json.loads((tmp_path / "results" / "runs" / variant.id / "error.json").read_text())["reason"]
    assert "changed since the grid was loaded" in reason and "train.jsonl" in reason
    assert "train/loss" not in run.data.metrics  # nothing trained
    # the same bytes pass; a reader that names no fingerprint is unchanged
    assert D.read_rows(tmp_path / "train.jsonl", expect=D.fingerprint(tmp_path / "train.jsonl"))
    with pytest.raises(D.DataChanged):
        D.read_rows(tmp_path / "train.jsonl", expect=variant.data_fingerprints["train"])


# 2 ------------------------------------------------------------------------------------------------


def test_every_variants_data_size_is_checked_against_its_file(tmp_path, capsys):
    rows = D.read_rows(D.BUILTIN_DIR / "train.jsonl")[:6]
    (tmp_path / "six.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grid = grid_file(tmp_path, "sizes", """
        axes: {data: {size: [4, 50]}}
        """)
    grid.write_text(grid.read_text().replace("data: {size: 4, max_length: 128}",
                                             "data: {train: six.jsonl, max_length: 128}"))
    err = refused(capsys, "validate", str(grid))
    assert "data.size: 50 rows requested but six.jsonl has 6" in err and "axes{data.size=50}" in err
    assert "data.size: 4 " not in err


# 3, 4 ---------------------------------------------------------------------------------------------


def test_an_ordinary_name_that_starts_like_a_key_prefix_is_not_masked(tmp_path, capsys):
    """`sk-learn-baseline` is a name, not a key: plan shows it, and its variant.yaml would keep it."""
    for word in ("sk-learn-baseline", "sk-learn-baseline-with-a-long-tail", "hf_cache", "ghp_short"):
        assert redact(word) == word
    for key in ("sk-proj-" + "Ab3xY9" * 4, "sk-" + "q" * 48, "hf_" + "k" * 34, "ghp_" + "a1B2" * 9,
                "github_pat_" + "x1Y2_" * 12, "AKIA" + "ABCDEFGH23456789"):
        assert redact(f"name {key} end") == "name *** end", key
    grid = grid_file(tmp_path, "names", "variants:\n  - {name: sk-learn-baseline}\n")
    assert main(["plan", str(grid)]) == 0
    assert "sk-learn-baseline" in capsys.readouterr().out


def test_masking_never_makes_a_yaml_or_json_file_unreadable():
    key = "sk-proj-" + "Ab3xY9" * 4
    text = yaml.safe_dump({"name": key, "note": f"pasted {key} here", "lora": {"rank": 4}}, sort_keys=False)
    masked = redact_document(text, "variant.yaml")
    assert key not in masked
    assert yaml.safe_load(masked) == {"name": "***", "note": "pasted *** here", "lora": {"rank": 4}}
    assert "*** here" in redact(text) and redact(text).startswith("name: ***")  # the plain text mask: no YAML
    as_json = redact_document(json.dumps({"name": key}), "job.json")
    assert json.loads(as_json) == {"name": "***"}


@pytest.mark.parametrize("command", ["plan", "validate", "run"])
def test_a_grid_named_like_a_token_is_refused_by_every_command(tmp_path, capsys, command):
    """A grid's name becomes the MLflow experiment, a folder and job.json fields, kept in clear: a name with a
    key's shape is refused before anything is created (plan masked it, run stored it in clear)."""
    name = "hf_" + "abcdefghij" * 2
    grid = grid_file(tmp_path, "tokenish")
    grid.write_text(grid.read_text().replace("name: tokenish", f"name: {name}"))
    args = [command, str(grid)] + (["--results", str(tmp_path / "results")] if command == "run" else [])
    err = refused(capsys, *args)
    assert "has the shape of a Hugging Face token" in err and name not in err
    assert not (tmp_path / "results").exists()


# 5 ------------------------------------------------------------------------------------------------


def test_data_mistakes_are_one_line_at_validate(tmp_path, capsys):
    rows = D.read_rows(D.BUILTIN_DIR / "train.jsonl")[:6]
    # a conversational prompt with plain-string answers
    mixed = [{**r, "chosen": D.text_of(r["chosen"]), "rejected": D.text_of(r["rejected"])} for r in rows]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    grid = grid_file(tmp_path, "mixed", "variants:\n  - {data: {train: mixed.jsonl}}\n")
    err = refused(capsys, "validate", str(grid))
    assert "mixed plain strings and conversations" in err and "row(s) 1, 2, 3, 4, 5, 6" in err
    # a prompt/completion file as the evaluation pairs, also used (validly) as the SFT training file
    pc = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pc))
    grid = grid_file(tmp_path, "pc", "variants:\n  - {method: lora_sft, data: {train: pc.jsonl, eval: pc.jsonl}}\n")
    err = refused(capsys, "validate", str(grid))
    assert "data.eval:" in err and "expected prompt, chosen, rejected" in err and "data.train" not in err
    # a directory where a file should be
    (tmp_path / "folder.jsonl").mkdir()
    grid = grid_file(tmp_path, "dir", "variants:\n  - {data: {eval: folder.jsonl}}\n")
    err = refused(capsys, "validate", str(grid))
    assert "is a directory" in err and "no such file" not in err


# 6 ------------------------------------------------------------------------------------------------


def test_an_empty_variants_list_is_refused_not_run_as_the_defaults(tmp_path, capsys):
    grid = grid_file(tmp_path, "empty", "variants: []\n")
    assert "variants: an empty list" in refused(capsys, "run", str(grid), "--results", str(tmp_path / "results"))
    assert not (tmp_path / "results").exists()


def test_a_huge_product_is_counted_before_it_is_built(tmp_path, capsys):
    """19 two-valued axes (524,288 variants) took 259 s and 5.4 GB before `run` refused them for want of
    --yes; counting first refuses in well under a second of work."""
    sections = {"dpo": ["beta"], "lora": ["rank", "alpha", "dropout"], "eval": ["batch_size", "probe_length", "every"],
                "train": ["epochs", "batch_size", "grad_accum", "logging_steps", "learning_rate", "warmup_ratio",
                          "weight_decay", "max_steps"], "data": ["size", "shuffle_seed", "max_length"]}
    body = "axes:\n" + "".join(f"  {section}:\n" + "".join(f"    {k}: [1, 2]\n" for k in keys)
                               for section, keys in sections.items()) + "seeds: 2\n"
    assert sum(map(len, sections.values())) + 1 == 19  # 18 two-valued axes and two seeds: 2**19 variants
    grid = grid_file(tmp_path, "huge", body)
    started = time.monotonic()
    err = refused(capsys, "run", str(grid), "--results", str(tmp_path / "results"))
    assert time.monotonic() - started < 30
    assert "expands to 524,288 variants" in err and "at most 10,000" in err
    assert not (tmp_path / "results").exists()


def test_lora_targets_must_name_something(tmp_path, capsys):
    grid = grid_file(tmp_path, "targets", "variants:\n  - {lora: {targets: []}}\n")
    err = refused(capsys, "validate", str(grid))
    assert "lora.targets: expected a preset" in err and err.count("lora.targets") == 1


def test_a_probe_longer_than_the_models_positions_is_refused_by_the_deep_check(tmp_path, capsys):
    """eval.probe_length: 1000000000 passed `validate --deep` and the run hung at its first generation."""
    grid = grid_file(tmp_path, "probe", "variants:\n  - {eval: {probe_length: 1000000000}}\n")
    err = refused(capsys, "validate", "--deep", str(grid))
    assert "eval.probe_length: 1000000000 tokens after probe prompts of up to" in err
    assert "max_position_embeddings" in err and "use at most" in err


# left from earlier notes: the reference cache has a size cap --------------------------------------


def test_the_reference_cache_deletes_least_recently_used_entries_beyond_its_cap(tmp_path, monkeypatch):
    import os

    import torch
    from filelock import FileLock

    from experiments import refcache

    model = torch.nn.Linear(2, 2)
    cache = refcache.ReferenceCache(tmp_path, "recipe:test", model)
    keys = [cache.key("eval", n) for n in range(4)]
    for age, key in enumerate(keys):  # each entry ~40 kB of tensors; key 0 the oldest
        monkeypatch.setenv(refcache.SIZE_ENV, "1")  # 1 GB: nothing pruned while filling
        cache.put("eval", key, {"n": age}, {"t": torch.zeros(10_000)})
        os.utime(tmp_path / f"{key}.json", (1_000 + age, 1_000 + age))
    assert cache.get("eval", keys[0]) is not None  # a hit makes key 0 the most recently used
    held = FileLock(str(tmp_path / f"{keys[1]}.lock"))
    held.acquire()  # another worker is reading key 1
    try:
        deleted = refcache.prune(tmp_path, limit=125_000, keep=keys[3])  # four of ~40 kB: one must go
    finally:
        held.release()
    assert deleted == [keys[2]]  # the least recently used that is free: 1 is locked, 0 was just used
    left = sorted(p.stem for p in tmp_path.glob("*.json"))
    assert left == sorted([keys[0], keys[1], keys[3]])
    assert not (tmp_path / f"{keys[2]}.safetensors").exists()
    assert refcache.prune(tmp_path, limit=0, keep=keys[3]) == [keys[1], keys[0]]  # oldest first, `keep` kept
    monkeypatch.setenv(refcache.SIZE_ENV, "not a number")
    assert refcache.limit_bytes() == int(refcache.DEFAULT_GB * 1e9)


# 7 ------------------------------------------------------------------------------------------------


def _search_file(folder: Path) -> Path:
    path = folder / "s.yaml"
    path.write_text(TINY.format(name="srch") + textwrap.dedent("""
        search:
          space: {dpo.beta: {log: [0.05, 0.5]}}
          objectives: [{metric: eval/margin_shift_mean}]
          trials: 1
        """))
    return path


@pytest.mark.parametrize("flags, said", [
    (["--storage", "notaurl://x"], "--storage notaurl://x: cannot open it"),
    (["--storage", "sqlite:////nonexistent/dir/x.db"], "--storage sqlite:////nonexistent/dir/x.db: cannot open it"),
    (["--storage", "postgresql://u:hunter2@127.0.0.1:1/db"], "--storage postgresql://u:***@127.0.0.1:1/db: cannot"),
])
def test_search_arguments_are_refused_in_one_line_before_anything_runs(tmp_path, capsys, flags, said):
    results = tmp_path / "results"
    err = refused(capsys, "search", str(_search_file(tmp_path)), "--results", str(results), *flags)
    assert said in err and "hunter2" not in err
    assert not list(results.glob("**/*.journal")) and not (results / "runs").exists()


def test_a_negative_search_timeout_is_a_usage_error(tmp_path, capsys):
    """`--timeout -5` was accepted and left a FINISHED parent run with nothing in it."""
    results = tmp_path / "results"
    err = _usage_error(capsys, "search", str(_search_file(tmp_path)), "--results", str(results), "--timeout", "-5")
    assert "--timeout: expected a positive number of seconds, got '-5'" in err and not results.exists()


def test_a_journal_that_is_not_one_is_named_not_a_traceback(tmp_path, capsys):
    results = tmp_path / "results"
    (results / "search").mkdir(parents=True)
    (results / "search" / "srch.journal").write_text("garbage\n{not json\n")
    err = refused(capsys, "search", str(_search_file(tmp_path)), "--results", str(results))
    assert "srch.journal: not an Optuna journal" in err and "move the file away" in err


# 8 ------------------------------------------------------------------------------------------------


def test_reading_commands_say_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    assert "--port: expected a port from 1 to 65535, got '70000'" in _usage_error(capsys, "ui", "--port", "70000")
    assert "expected a port from 1 to 65535, got '0'" in _usage_error(capsys, "ui", "--port", "0")
    assert "--max-length: expected a positive number of tokens" in _usage_error(
        capsys, "evaluate", "tiny-random-llama", "--max-length", "0")
    (tmp_path / "dir").mkdir()
    err = refused(capsys, "evaluate", "tiny-random-llama", "--out", str(tmp_path / "dir"))
    assert "--out: " in err and "is a directory" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    started = time.monotonic()
    err = refused(capsys, "report", "anything", "--results", str(tmp_path / "results"))
    assert time.monotonic() - started < 30 and "cannot reach the MLflow tracking server" in err


def test_report_on_a_read_only_results_folder_is_one_line(tmp_path, capsys, monkeypatch):
    import analysis.report

    def read_only(target, results):
        raise PermissionError(13, "Permission denied", str(results / target))

    monkeypatch.setattr(analysis.report, "write_report", read_only)
    err = refused(capsys, "report", "g", "--results", str(tmp_path))
    assert "report: cannot write the report: Permission denied" in err


def _usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err
