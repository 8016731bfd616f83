"""Faults and bad input, one test per guarantee: each injects the fault and checks what survives.

Faults inside a variant are injected with HARNESS_FAULT (see experiments/faults.py); the runner is killed
or signalled as a real process. Everything runs on the in-process tiny model.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.grid import load_grid

ROOT = Path(__file__).resolve().parent.parent

TINY = """
name: {name}
defaults:
  base_model: tiny-random-llama
  data: {{size: 8, max_length: 256}}
  train: {{max_steps: 2, batch_size: 4, learning_rate: 1e-3}}
  lora: {{rank: 4, alpha: 8}}
"""


def make_grid(folder: Path, name: str, variants: str, extra: str = "") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(TINY.format(name=name) + textwrap.dedent(extra) + "variants:\n" + textwrap.indent(
        textwrap.dedent(variants).strip() + "\n", "  "))
    return path


def client_for(results: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{results / 'mlflow.db'}")


def variant_runs(results: Path, grid: str) -> list:
    client = client_for(results)
    exp = client.get_experiment_by_name(grid)
    return client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'variant'", max_results=1000)


def statuses_by_name(results: Path, grid: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for run in sorted(variant_runs(results, grid), key=lambda r: r.info.start_time):
        out.setdefault(run.data.params["name"], []).append(run.info.status)
    return out


def _interruptible() -> None:
    # A suite started as a background job of a non-interactive shell inherits SIGINT ignored, and Python keeps an
    # ignored SIGINT ignored: the runner under test gets Ctrl-C's default back, as a terminal would give it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def runner(grid: Path, results: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", "run", str(grid), "--results", str(results)],
                            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_interruptible)


def wait_for(predicate, timeout: float = 300.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(results: Path, grid: str, name: str) -> int:
    """Highest training step the running variant `name` has logged so far (0 if none)."""
    if not (results / "runs").is_dir():
        return 0  # the runner has not created the store yet: opening it here would race its creation
    try:
        runs = [r for r in variant_runs(results, grid) if r.data.params.get("name") == name]
    except Exception:  # noqa: BLE001 - store not created yet
        return 0
    steps = [m.step for r in runs for m in client_for(results).get_metric_history(r.info.run_id, "train/loss")]
    return max(steps, default=0)


# 1 ------------------------------------------------------------------------------------------------


def test_kill_9_runner_then_rerun(tmp_path):
    grid = make_grid(tmp_path, "k9", """
        - {name: first, method: lora_sft}
        - {name: slow, method: dpo_lora, train: {max_steps: 40}}
    """)
    results = tmp_path / "results"
    proc = runner(grid, results, {"HARNESS_FAULT": "sleep:slow:1"})
    wait_for(lambda: logged_steps(results, "k9", "slow") >= 2, what="slow variant mid-training")
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    slow_dir = results / "runs" / {v.spec.name: v.id for v in load_grid(grid).variants}["slow"]
    # the orphaned worker notices its executor is gone at the next step and stops
    wait_for(lambda: (slow_dir / "error.json").is_file(), timeout=60, what="orphaned worker to stop")
    assert statuses_by_name(results, "k9") == {"first": ["FINISHED"], "slow": ["RUNNING"]}

    rerun = runner(grid, results)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    # the grid run and the variant run were both left RUNNING by the killed runner
    assert "marked 2 orphaned RUNNING run(s) FAILED" in out and "1 already finished, 1 to run" in out
    assert statuses_by_name(results, "k9") == {"first": ["FINISHED"], "slow": ["FAILED", "FINISHED"]}
    recovered = [r for r in variant_runs(results, "k9") if r.info.status == "FAILED"]
    assert recovered[0].data.tags["harness.recovered"]
    ids = [r.data.tags["harness.variant_id"] for r in variant_runs(results, "k9") if r.info.status == "FINISHED"]
    assert len(ids) == len(set(ids)) == 2  # exactly one FINISHED run per variant id


# 2 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_variant_killed_and_next_invocation_continues(tmp_path, sig):
    grid = make_grid(tmp_path, "sig", """
        - {name: slow, method: dpo_lora, train: {max_steps: 40}}
    """)
    results = tmp_path / "results"
    proc = runner(grid, results, {"HARNESS_FAULT": "sleep:slow:1"})
    wait_for(lambda: logged_steps(results, "sig", "slow") >= 2, what="variant mid-training")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert statuses_by_name(results, "sig") == {"slow": ["KILLED"]}
    client = client_for(results)
    exp = client.get_experiment_by_name("sig")
    parents = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'grid'")
    assert [p.info.status for p in parents] == ["KILLED"]

    assert main(["run", str(grid), "--results", str(results)]) == 0
    assert statuses_by_name(results, "sig") == {"slow": ["KILLED", "FINISHED"]}


# 3, 4, 5, 9 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    rows = [json.loads(line) for line in (ROOT / "experiments/data/builtin/train.jsonl").read_text().splitlines()]
    long_prompt = [{"role": "user", "content": "Please read all of this. " * 60}]
    mixed = rows[:6] + [rows[0], rows[1]] + [{**rows[2], "prompt": long_prompt}, {**rows[3], "prompt": long_prompt}]
    (folder / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in mixed))
    hopeless = [{**r, "prompt": long_prompt} for r in rows[:4]]
    (folder / "hopeless.jsonl").write_text("\n".join(json.dumps(r) for r in hopeless))
    grid = make_grid(folder, "faulty", """
        - {name: ok, method: lora_sft}
        - {name: raises, method: lora_sft, lora: {rank: 2}}  # a config of its own: names are not in the id
        - {name: nan, method: dpo_lora, train: {max_steps: 4}}
        - {name: oom, method: sft}
        - {name: after_oom, method: partial_ft}
        - {name: messy, method: dpo_lora, data: {train: mixed.jsonl, size: null}}
    """)
    results = folder / "results"
    os.environ["HARNESS_FAULT"] = "raise:raises:2,nan:nan:2,oom:oom:1"
    try:
        rc = main(["run", str(grid), "--results", str(results)])
    finally:
        del os.environ["HARNESS_FAULT"]
    runs = {r.data.params["name"]: r for r in variant_runs(results, "faulty")}
    return {"rc": rc, "runs": runs, "results": results, "folder": folder}


def test_exception_fails_only_its_variant(faulty):
    assert faulty["rc"] == 1
    status = {n: r.info.status for n, r in faulty["runs"].items()}
    assert status == {"ok": "FINISHED", "raises": "FAILED", "nan": "FAILED", "oom": "FAILED",
                      "after_oom": "FINISHED", "messy": "FINISHED"}
    run = faulty["runs"]["raises"]
    assert "RuntimeError: injected failure at step 2" in run.data.tags["harness.failure_reason"]
    client = client_for(faulty["results"])
    tb = Path(client.download_artifacts(run.info.run_id, "traceback.txt")).read_text()
    assert "Traceback" in tb and "injected failure" in tb


def test_nan_loss_stops_within_a_step(faulty):
    run = faulty["runs"]["nan"]
    assert "loss became nan at step 2" in run.data.tags["harness.failure_reason"]
    history = client_for(faulty["results"]).get_metric_history(run.info.run_id, "train/loss")
    assert max(m.step for m in history) <= 2  # never reached step 3 of 4


def test_oom_fails_with_reason_and_next_variant_runs(faulty):
    run = faulty["runs"]["oom"]
    assert run.data.tags["harness.failure_reason"].startswith("out of memory")
    assert faulty["runs"]["after_oom"].info.status == "FINISHED"  # a fresh process, unaffected


def test_data_audit_counts_and_unusable_data(faulty, capsys):
    messy = faulty["runs"]["messy"].data.metrics
    assert messy["data/rows"] == 10 and messy["data/duplicated"] == 4  # two rows appear twice
    assert messy["data/fully_truncated"] == 2 and messy["data/usable"] == 8
    # data whose every row the prompt alone truncates away is refused before anything trains (pre-flight)
    grid = make_grid(faulty["folder"], "hopeless", "- {name: unusable, method: dpo_lora, "
                     "data: {train: hopeless.jsonl, size: null}}\n")
    assert main(["run", str(grid), "--results", str(faulty["folder"] / "hopeless-results")]) == 2
    err = capsys.readouterr().err
    assert "hopeless.jsonl" in err and "the prompt alone fills it for every selected training row" in err


# 6 ------------------------------------------------------------------------------------------------


def test_changed_field_gets_new_id_and_run(tmp_path):
    results = tmp_path / "results"
    grid = make_grid(tmp_path, "change", "- {name: v, method: lora_sft}\n")
    assert main(["run", str(grid), "--results", str(results)]) == 0
    first = variant_runs(results, "change")[0]
    grid.write_text(grid.read_text().replace("learning_rate: 1e-3", "learning_rate: 2e-3"))
    assert main(["run", str(grid), "--results", str(results)]) == 0
    runs = variant_runs(results, "change")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["harness.variant_id"] for r in runs}) == 2
    old = client_for(results).get_run(first.info.run_id)
    assert old.data.params["train.learning_rate"] == "0.001"  # the old run is untouched
    assert [m.step for m in client_for(results).get_metric_history(first.info.run_id, "train/loss")] == [1, 2]


# 7 (mixed valid/invalid targets are in test_models.py) --------------------------------------------------


def test_absent_targets_alone_rejected_before_training(tmp_path, capsys):
    grid = make_grid(tmp_path, "t", "- {method: dpo_lora, lora: {targets: [c_attn]}}\n")
    assert main(["run", str(grid), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "variants[0]: lora.targets: module(s) 'c_attn' not in this model; its linear modules are: down_proj" in err
    assert not (tmp_path / "r").exists()


# 8 ------------------------------------------------------------------------------------------------


def _save_tiny(folder: Path, *, chat_template: bool, pad: bool) -> Path:
    from experiments import models as M

    tok = M.tiny_tokenizer()
    if not chat_template:
        tok.chat_template = None
    if not pad:
        tok.pad_token = None
    model = M.load_model(M.TINY, vocab_size=len(tok))
    folder.mkdir()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def test_tokenizer_without_chat_template_or_pad(tmp_path, capsys):
    no_template = _save_tiny(tmp_path / "no_template", chat_template=False, pad=True)
    no_pad = _save_tiny(tmp_path / "no_pad", chat_template=True, pad=False)
    grid = make_grid(tmp_path, "tok", f"- {{method: lora_sft, base_model: {no_template}}}\n")
    assert main(["run", str(grid), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "is conversational but" in err and "tokenizer has no chat template" in err
    # documented handling: a tokenizer without a pad token pads with its EOS token
    grid = make_grid(tmp_path, "pad", f"- {{method: dpo_lora, base_model: {no_pad}}}\n")
    assert main(["run", str(grid), "--results", str(tmp_path / "r")]) == 0


# 10 -----------------------------------------------------------------------------------------------


def test_unsupported_precision_rejected_before_training(tmp_path, capsys):
    grid = make_grid(tmp_path, "prec", """
        - {method: sft, train: {precision: fp16}}
        - {method: sft, train: {precision: auto}}
    """)
    assert main(["run", str(grid), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "variants[0]: train.precision: fp16 mixed precision needs a CUDA GPU, this is cpu" in err
    assert "variants[1]" not in err  # auto picks what the device supports
    assert not (tmp_path / "r").exists()


# 12 -----------------------------------------------------------------------------------------------


def test_four_runners_share_one_new_store(tmp_path):
    results = tmp_path / "results"
    grids = [make_grid(tmp_path, f"par{i}", f"- {{name: v{i}, method: lora_sft, train: {{max_steps: 1}}}}\n")
             for i in range(4)]
    procs = [runner(g, results) for g in grids]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
        assert "locked" not in out.lower()
    for i in range(4):
        assert statuses_by_name(results, f"par{i}") == {f"v{i}": ["FINISHED"]}


# 13 -----------------------------------------------------------------------------------------------


def test_secrets_are_redacted_everywhere(tmp_path):
    token = "hf_" + "Q" * 30
    env_secret = "s3cr3t-from-the-environment"
    grid = make_grid(tmp_path, "sec", f"""
        - {{name: "leak-{env_secret}", method: lora_sft}}
    """, extra=f"""
        description: "pairs scraped from https://bob:hunter2@data.example.org/prefs with {token}"
    """)
    results = tmp_path / "results"
    proc = runner(grid, results, {"MY_API_TOKEN": env_secret})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    secrets = [token, "hunter2", env_secret]
    assert not [s for s in secrets if s in out]
    client = client_for(results)
    exp = client.get_experiment_by_name("sec")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    for run in runs:
        blob = json.dumps([run.data.params, run.data.tags, run.info.run_name])
        assert not [s for s in secrets if s in blob]
    for path in (results / "artifacts").rglob("*"):
        if path.is_file() and path.suffix in (".txt", ".yaml", ".json", ".log"):
            text = path.read_text(errors="replace")
            assert not [s for s in secrets if s in text], path
    db = sqlite3.connect(results / "mlflow.db")
    dump = "\n".join(db.iterdump())
    assert not [s for s in secrets if s in dump]


# 14 -----------------------------------------------------------------------------------------------


def test_ui_binds_to_loopback(tmp_path):
    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "harness", "ui", "--port", str(port), "--results",
                             str(tmp_path / "r")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        def listening():
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                return None
            addrs = []
            for p in tree:  # the server's own helper processes come and go while we look
                try:
                    addrs += [c.laddr for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
                except (psutil.NoSuchProcess, FileNotFoundError):
                    continue
            return [a for a in addrs if a.port == port]

        addrs = wait_for(listening, timeout=90, what="the UI to listen")
        assert {a.ip for a in addrs} == {"127.0.0.1"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# 15 -----------------------------------------------------------------------------------------------


def test_pickle_weights_refused(tmp_path, capsys):
    import torch

    from experiments import models as M

    folder = tmp_path / "pickled"
    folder.mkdir()
    tok = M.tiny_tokenizer()
    model = M.load_model(M.TINY)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # a pickle checkpoint, as old repos ship
    tok.save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    grid = make_grid(tmp_path, "pk", f"- {{method: sft, base_model: {folder}}}\n")
    assert main(["run", str(grid), "--results", str(tmp_path / "r")]) == 2
    assert "has no .safetensors weights" in capsys.readouterr().err


def test_stage_output_from_another_config_is_refused(tmp_path):
    grid = make_grid(tmp_path, "stage", """
        - {name: warm, method: sft, train: {max_steps: 1}}
        - {name: child, method: dpo_lora, from: warm}
    """)
    results = tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 0
    ids = {v.spec.name: v.id for v in load_grid(grid).variants}
    recorded = results / "runs" / ids["warm"] / "model" / "harness_variant.json"
    recorded.write_text(json.dumps({"variant_id": "0123456789ab"}))  # as if another config wrote it
    assert main(["run", str(grid), "--results", str(results), "--force"]) == 0  # --force rebuilds the stage
    assert json.loads(recorded.read_text())["variant_id"] == ids["warm"]
    recorded.write_text(json.dumps({"variant_id": "0123456789ab"}))
    child = load_grid(grid).by_id()[ids["child"]]
    from experiments import common
    from harness.core.tracking import NullTracker

    ctx = common.RunContext(variant=child, tracker=NullTracker(), out_dir=tmp_path / "o",
                            stage_dir=results / "runs" / ids["warm"])
    with pytest.raises(common.VariantError, match="was written by variant 0123456789ab"):
        common.load_model(ctx, common.load_tokenizer(ctx))


def test_no_remote_code_no_pickle_loading_in_source():
    offenders = []
    for path in [*ROOT.glob("harness/**/*.py"), *ROOT.glob("experiments/*.py"), *ROOT.glob("analysis/*.py")]:
        text = path.read_text()
        for bad in ("trust_remote_code=True", "torch.load(", "pickle.load", "yaml.load(text)", "use_safetensors=False"):
            if bad in text:
                offenders.append(f"{path.name}: {bad}")
    assert not offenders
