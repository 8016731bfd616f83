"""Reliability round two (issue 10): hostile names and files, concurrent runners, repeated interrupts, bad
flags. One test per guarantee; most need no training, the rest train one step of the tiny model.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main

ROOT = Path(__file__).resolve().parent.parent

TINY = """
name: {name}
defaults:
  base_model: tiny-random-llama
  data: {{size: 4, max_length: 128}}
  train: {{max_steps: 1, batch_size: 4, learning_rate: 1e-3}}
  lora: {{rank: 2, alpha: 4}}
"""


def make_grid(folder: Path, name: str, variants: str, extra: str = "") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(TINY.format(name=name) + textwrap.dedent(extra) + "variants:\n" + textwrap.indent(
        textwrap.dedent(variants).strip() + "\n", "  "))
    return path


def harness(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def variant_runs(results: Path, grid: str) -> list:
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name(grid)
    return client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'variant'", max_results=1000)


# 3 ------------------------------------------------------------------------------------------------


def test_planted_secrets_reach_no_file_no_database_no_console(tmp_path):
    """A secret in the environment (HF_TOKEN, a password in MLFLOW_TRACKING_URI's place) and real-length
    token-shaped strings in a name and a description end up nowhere: not in any file under results/ (job
    files, logs, artifacts, the database), not in what plan, validate or run print."""
    env_token = "hf-env-" + "Z" * 12  # not token-shaped: only its variable's name says it is secret
    short_key = "sk-proj-x7Kq9Wd2Lm4Np8Rt"  # an OpenAI-style key at the shortest length a real one has
    gh_key = "ghp_" + "S3cr3t" * 6  # a GitHub token: ghp_ and 36 letters and digits
    grid = make_grid(tmp_path, "sec2", f"""
        - {{name: "v-{short_key}-{env_token}", method: lora_sft}}
    """, extra=f"""
        description: "keys {gh_key} and {short_key} pasted by mistake"
    """)
    results = tmp_path / "results"
    env = {"HF_TOKEN": env_token}
    printed = []
    for args in (["plan", str(grid)], ["validate", str(grid)], ["run", str(grid), "--results", str(results)]):
        proc = harness(*args, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        printed.append(proc.stdout + proc.stderr)
    secrets = [env_token, short_key, gh_key]
    assert not [s for s in secrets if any(s in text for text in printed)], printed
    leaks = [str(p) for p in results.rglob("*") if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets)]
    assert not leaks
    dump = "\n".join(sqlite3.connect(results / "mlflow.db").iterdump())
    assert not [s for s in secrets if s in dump]
    [run] = variant_runs(results, "sec2")
    assert run.info.status == "FINISHED" and run.data.params["name"].startswith("v-***")


# 2 ------------------------------------------------------------------------------------------------


def test_evaluate_output_stays_inside_results_whatever_the_run_name(tmp_path, monkeypatch, capsys):
    """The default output file of `evaluate <run id>` is named after the run: a variant named `../../x/y`
    (or one holding a key) must give one file directly in results/evaluations/, and nothing anywhere else."""
    from experiments import evaluate as E
    from experiments import trained

    label = "../../escaped/x·sk-abcd1234EFGH5678ijkl·lora_sft"
    monkeypatch.setattr(trained, "load_run", lambda run_id, results, base: trained.Loaded(
        model=None, reference=None, tokenizer=None, label=label, config={"data.max_length": 128}))
    monkeypatch.setattr(E, "measure", lambda *a, **k: ([{"pair": 0, "margin_shift": 0.5}], {"eval/pairs": 1.0}))
    work = tmp_path / "work"
    results = work / "results"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["evaluate", "0" * 32, "--results", str(results)]) == 0
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(written) == 2 and all(p.parent == Path("work/results/evaluations") for p in written), written
    assert not [p for p in written if "sk-abcd1234EFGH5678ijkl" in str(p)]
    assert not (tmp_path / "escaped").exists()
    out = tmp_path / "chosen.csv"  # --out is taken exactly as given
    assert main(["evaluate", "0" * 32, "--results", str(results), "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()


# 7 ------------------------------------------------------------------------------------------------


def test_jobs_below_one_is_refused_before_anything_runs(tmp_path, capsys):
    """`--jobs -1` used to print "1 to run" and wait forever for a free slot."""
    from harness.run.session import Session

    grid = make_grid(tmp_path, "jobs", "- {method: lora_sft}\n")
    for jobs in ("-1", "0"):
        assert main(["run", str(grid), "--jobs", jobs, "--results", str(tmp_path / "r")]) == 2
        assert f"--jobs: expected a whole number of variants at once, 1 or more, got {jobs}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="jobs must be 1 or more"):  # callers of the executor seam too
        Session("jobs", tmp_path / "r2", jobs=-1)


# 9 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("train: {learning_rate: .inf}", "inf", "train.learning_rate: Input should be a finite number"),
    ("dpo: {beta: .inf}", "inf", "dpo.beta: Input should be a finite number"),
    ("seed: -1", "-1", "seed: Input should be greater than or equal to 0"),
    ("seed: 1099511627776", "1099511627776", "seed: Input should be less than or equal to 4294967295"),
    ("lora: {rank: true}", "True", "lora.rank: Input should be a valid integer"),
    ("lora: {rank: \"8\"}", "'8'", "lora.rank: Input should be a valid integer"),
])
def test_values_that_would_fail_at_run_time_are_refused_by_validate(tmp_path, capsys, field, value, message):
    grid = make_grid(tmp_path, "vals", f"- {{method: dpo_lora, {field}}}\n")
    assert main(["validate", str(grid)]) == 2
    assert f"variants[0].{message}, got {value}" in capsys.readouterr().err


def test_ints_and_exponent_floats_stay_valid(tmp_path, capsys):
    """Strictness must not cost the spellings grids use: `alpha: 16` is a float, `1e-4` too."""
    grid = make_grid(tmp_path, "ok", "- {method: dpo_lora, lora: {alpha: 16}, train: {learning_rate: 1e-4}}\n")
    assert main(["validate", str(grid)]) == 0, capsys.readouterr().err


def test_rank_and_max_length_the_model_cannot_use_are_refused_by_deep_validation(tmp_path, capsys):
    """lora.rank: 1000000 tried to allocate gigabytes at run time; max_length: 1 left no row to train on.
    `validate --deep` (and so `run`, before anything is tracked) refuses both against the real model."""
    grid = make_grid(tmp_path, "deep", """
        - {name: huge, method: dpo_lora, lora: {rank: 1000000}}
        - {name: short, method: lora_sft, data: {max_length: 1}}
        - {name: fine, method: dpo_lora, lora: {rank: 8}}
    """)
    assert main(["validate", str(grid)]) == 0  # the YAML alone cannot know the model's dimensions
    capsys.readouterr()
    assert main(["validate", str(grid), "--deep"]) == 2
    err = capsys.readouterr().err
    assert "variants[0]: lora.rank: 1000000 is more than 32, the smallest dimension of the targeted modules" in err
    assert "variants[1]: data.max_length: 1 tokens: the prompt alone fills it for every selected training row" in err
    assert "variants[2]" not in err
    assert main(["run", str(grid), "--results", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


# 8 ------------------------------------------------------------------------------------------------


def test_unreadable_files_get_a_clear_error_not_a_traceback(tmp_path, capsys):
    """Files a user can get wrong: each is exit 2 naming the file and what is wrong with it."""
    builtin = (ROOT / "experiments/data/builtin/train.jsonl").read_text()
    bad_grid = tmp_path / "latin1.yaml"
    bad_grid.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert main(["validate", str(bad_grid)]) == 2
    err = capsys.readouterr().err
    assert "latin1.yaml: not UTF-8 text (byte 0xe9 on line 1); a grid file must be saved as UTF-8" in err

    cases = {
        "latin1.jsonl": (builtin.encode() + '{"prompt": "caf\xe9"}\n'.encode("latin-1"),
                         f"not UTF-8 text (byte 0xe9 on line {builtin.count(chr(10)) + 1})"),
        "latin1.csv": ("prompt,chosen,rejected\ncaf\xe9,a,b\n".encode("latin-1"),
                       "not UTF-8 text (byte 0xe9 on line 2)"),
        "text.parquet": (b"prompt,chosen,rejected\n", "cannot be read as parquet: "),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        grid = make_grid(tmp_path, "files", f"- {{method: dpo_lora, data: {{train: {name}}}}}\n")
        assert main(["validate", str(grid)]) == 2, name
        err = capsys.readouterr().err
        assert f"variants[0]: data.train: {tmp_path / name}: {message}" in err, err
        assert "Traceback" not in err

    # a valid file reached through a link whose target has no suffix (HF hub cache, DVC, git-annex layouts)
    (tmp_path / "blob").write_text(builtin)
    (tmp_path / "linked.jsonl").symlink_to(tmp_path / "blob")
    grid = make_grid(tmp_path, "linked", "- {method: dpo_lora, data: {train: linked.jsonl}}\n")
    assert main(["validate", str(grid)]) == 0, capsys.readouterr().err


def test_damaged_store_and_unwritable_results_are_refused_and_left_intact(tmp_path, capsys):
    """A truncated mlflow.db gave an 80-line SQLAlchemy traceback for run, report and evaluate; a results
    folder that cannot be written failed inside MLflow. Both are exit 2, nothing trained, the file intact."""
    import hashlib

    results = tmp_path / "results"
    results.mkdir()
    MlflowClient(f"sqlite:///{results / 'mlflow.db'}").create_experiment("old")
    db = results / "mlflow.db"
    db.write_bytes(db.read_bytes()[:60_000])  # truncated, as by a full disk or an interrupted copy
    digest = hashlib.md5(db.read_bytes()).hexdigest()
    grid = make_grid(tmp_path, "store", "- {method: lora_sft}\n")
    for args in (["run", str(grid)], ["report", "store"], ["evaluate", "0" * 32]):
        assert main([*args, "--results", str(results)]) == 2, args
        err = capsys.readouterr().err
        assert f"{args[0]}: {db}: the MLflow store is damaged (sqlite: " in err and "left as it is" in err, err
    assert hashlib.md5(db.read_bytes()).hexdigest() == digest
    assert not (results / "runs").exists()

    (tmp_path / "a_file").write_text("")
    assert main(["run", str(grid), "--results", str(tmp_path / "a_file" / "results")]) == 2
    assert "run: --results: " in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere: the permission case only means something for a user
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o555)
        assert main(["run", str(grid), "--results", str(readonly)]) == 2
        assert "is not a writable folder" in capsys.readouterr().err


def test_a_new_store_is_built_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    """MLflow builds a new store's schema in dozens of migrations; a Ctrl-C in the middle used to leave a
    half-built mlflow.db that every later command failed on with a traceback. Now the store is built in a
    temporary file and linked into place only when complete; one left half-built by other means is refused
    with exit 2, saying how many runs it holds."""
    import mlflow.store.db.utils as dbutils

    from harness.core import runs as R

    real_upgrade = dbutils._upgrade_db

    def interrupted(engine):
        """The migrations run, then the Ctrl-C lands before the last one is recorded: the schema version lags
        behind the tables, as a kill in the middle of the migrations leaves it."""
        from alembic.script import ScriptDirectory

        real_upgrade(engine)
        script = ScriptDirectory.from_config(dbutils._get_alembic_config(str(engine.url)))
        previous = script.get_revision(script.get_current_head()).down_revision
        con = sqlite3.connect(engine.url.database)
        con.execute("UPDATE alembic_version SET version_num = ?", (previous,))
        con.commit()
        con.close()
        raise KeyboardInterrupt

    # the check can fail: opened the plain way, the interrupted store is left half-built and unusable
    plain = tmp_path / "plain" / "mlflow.db"
    plain.parent.mkdir()
    with monkeypatch.context() as mp:
        mp.setattr(dbutils, "_upgrade_db", interrupted)
        with pytest.raises(KeyboardInterrupt):
            MlflowClient(f"sqlite:///{plain}").search_experiments()
    assert plain.exists()
    with pytest.raises(Exception, match="already exists|out-of-date|no such"):
        MlflowClient(f"sqlite:///{plain}").search_experiments()

    results = tmp_path / "results"
    uri = f"sqlite:///{results / 'mlflow.db'}"
    with monkeypatch.context() as mp:
        mp.setattr(dbutils, "_upgrade_db", interrupted)
        with pytest.raises(KeyboardInterrupt):
            R.Store(uri, results / "artifacts")
    assert sorted(p.name for p in results.iterdir()) == ["mlflow.db.lock"]  # no store, no half-built file
    store = R.Store(uri, results / "artifacts")  # the next command builds it whole
    assert [e.name for e in store.client.search_experiments()] == ["Default"]
    assert sorted(p.name for p in results.iterdir()) == ["mlflow.db", "mlflow.db.lock"]

    # a store left half-built by an older harness or another program: exit 2, with its run count
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mlflow.db").write_bytes(plain.read_bytes())
    grid = make_grid(tmp_path, "halfbuilt", "- {method: lora_sft}\n")
    assert main(["run", str(grid), "--results", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"run: {broken / 'mlflow.db'}: MLflow cannot open this store: " in err, err
    assert "this one holds 0: if none, delete it and run again" in err
    assert "Traceback" not in err and not (broken / "runs").exists()
    # every command that reads the store opens it the same way: refused alike, the file untouched
    kept = (broken / "mlflow.db").read_bytes()
    for command in (["report", "halfbuilt"], ["evaluate", "0123456789abcdef0123456789abcdef"],
                    ["ui", "halfbuilt", "--port", "5999"]):
        assert main([*command, "--results", str(broken)]) == 2, command
        err = capsys.readouterr().err
        assert f"{command[0]}: {broken / 'mlflow.db'}: MLflow cannot open this store: " in err, err
        assert "Traceback" not in err
    assert (broken / "mlflow.db").read_bytes() == kept


def test_a_sqlite_file_of_another_program_is_not_made_a_store(tmp_path, capsys):
    """An mlflow.db that some other program wrote (tables, none of MLflow's): MLflow would add its own tables
    to it. Every command refuses it, exit 2, and leaves it byte for byte as it was."""
    results = tmp_path / "results"
    results.mkdir()
    con = sqlite3.connect(results / "mlflow.db")
    con.execute("CREATE TABLE notes (body TEXT)")
    con.execute("INSERT INTO notes VALUES ('mine')")
    con.commit()
    con.close()
    kept = (results / "mlflow.db").read_bytes()
    grid = make_grid(tmp_path, "foreign", "- {method: lora_sft}\n")
    for command in (["run", str(grid)], ["report", "foreign"], ["ui", "foreign", "--port", "5999"]):
        assert main([*command, "--results", str(results)]) == 2, command
        err = capsys.readouterr().err
        assert f"{results / 'mlflow.db'}: this sqlite file is not an MLflow store (its tables: notes)" in err, err
        assert "Traceback" not in err
    assert (results / "mlflow.db").read_bytes() == kept and not (results / "runs").exists()


def two_variant_grid(folder: Path, name: str) -> Path:
    """A lora_sft and a dpo_lora variant measured on 4 held-out pairs (fast), for the multi-runner tests."""
    eval_rows = (ROOT / "experiments/data/builtin/eval.jsonl").read_text().splitlines()[:4]
    (folder / "eval4.jsonl").write_text("\n".join(eval_rows) + "\n")
    grid = make_grid(folder, name, """
        - {name: a, method: lora_sft}
        - {name: b, method: dpo_lora}
    """)
    grid.write_text(grid.read_text().replace("max_length: 128}", "max_length: 128, eval: eval4.jsonl}"))
    return grid


# 1 ------------------------------------------------------------------------------------------------


def test_two_runners_on_one_store_train_each_variant_once(tmp_path):
    """Two `harness run` of one grid at once on one results folder used to train the same variant twice in
    the same runs/<id>/ (one deleting the other's folder, the logs crossed). Now a variant is claimed before
    it trains: the other runner trains something else or waits, then answers it from the store."""
    grid = two_variant_grid(tmp_path, "two")
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "harness", "run", str(grid), "--results", str(results)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    runs = variant_runs(results, "two")
    assert sorted(r.data.params["name"] for r in runs) == ["a", "b"], [(r.data.params["name"], r.info.status)
                                                                    for r in runs]
    assert {r.info.status for r in runs} == {"FINISHED"}
    both = "\n".join(outs)
    # each variant was trained by one runner and answered from the store (or waited for) by the other
    assert both.count("FINISHED by another runner") + both.count("already FINISHED") == 2, both
    for run in runs:  # each run's folder is its own: the job file there names this run
        job = json.loads((results / "runs" / run.data.tags["harness.variant_id"] / "job.json").read_text())
        assert job["run_id"] == run.info.run_id


# 5 ------------------------------------------------------------------------------------------------


def _steps_logged(results: Path, grid: str) -> int:
    if not (results / "runs").is_dir():
        return 0  # the runner has not created the store yet: opening it here would race its creation
    try:
        client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
        return max((m.step for r in variant_runs(results, grid)
                    for m in client.get_metric_history(r.info.run_id, "train/loss")), default=0)
    except Exception:  # noqa: BLE001 - store or experiment not created yet
        return 0


def test_repeated_ctrl_c_ends_killed_not_running(tmp_path):
    """A second Ctrl-C 0.3 s after the first used to raise inside the shutdown (a traceback, and the grid and
    variant left RUNNING). Now every further interrupt only hurries the shutdown: all ends KILLED, exit 130."""
    import signal
    import time

    grid = make_grid(tmp_path, "twice", "- {name: slow, method: lora_sft, train: {max_steps: 40}}\n")
    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(grid), "--results", str(results)],
                            cwd=ROOT, env={**os.environ, "HARNESS_FAULT": "linger:slow:1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # the worker takes 3 s to stop
    deadline = time.monotonic() + 300
    while _steps_logged(results, "twice") < 1:
        assert time.monotonic() < deadline and proc.poll() is None, "the variant never started training"
        time.sleep(0.5)
    for _ in range(3):  # Ctrl-C, then twice more while it shuts down
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "interrupted again" in out, out
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("twice")
    runs = client.search_runs([exp.experiment_id])
    assert sorted((r.data.tags["harness.kind"], r.info.status) for r in runs) == [("grid", "KILLED"),
                                                                                 ("variant", "KILLED")]


def test_ctrl_c_while_the_worker_starts_ends_killed_and_nothing_trains(tmp_path):
    """The first worker of a run is forked from a server that is still importing torch & co: a Ctrl-C in that
    window used to leave the variant's run RUNNING, and a worker forked meanwhile would have trained into it."""
    import signal
    import time

    grid = make_grid(tmp_path, "early", "- {name: early, method: lora_sft, train: {max_steps: 3}}\n")
    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(grid), "--results", str(results)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(results.glob("runs/*/job.json")):  # written just before the worker is asked for
        assert time.monotonic() < deadline and proc.poll() is None, "the variant never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in out, out
    time.sleep(15)  # long enough for the server to finish importing and an orphan worker to get going
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    (run,) = variant_runs(results, "early")
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert client.get_metric_history(run.info.run_id, "train/loss") == []


# 4 ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_on_a_taken_port_exits_non_zero(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["ui", "--port", str(port), "--results", str(tmp_path / "r")]) == 2
    assert f"ui: cannot listen on 127.0.0.1:{port}: the port is already in use; pick another with --port" in \
        capsys.readouterr().err


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_ui_stops_its_whole_server_tree_on_a_signal_to_its_pid(tmp_path, sig):
    """SIGTERM or SIGINT to `harness ui`'s PID alone (not its group) used to leave the MLflow server and its
    uvicorn workers running, holding the port."""
    import signal
    import time

    import psutil

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness", "ui", "--port", str(port), "--results",
                             str(tmp_path / "r")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    tree: list = []
    try:
        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, "the UI never listened"
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                listening = [c for c in psutil.net_connections("inet")
                             if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
            except psutil.Error:
                listening = []
            if listening:
                break
            time.sleep(0.5)
        assert len(tree) >= 2  # harness ui and the server it started
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=30) == 130
        gone, alive = psutil.wait_procs(tree, timeout=15)
        assert not alive, [p.cmdline() for p in alive]
        assert _free_port_is(port)
    finally:
        for p in tree:  # never leave a server behind, even when the test fails
            try:
                p.kill()
            except psutil.Error:
                pass


def _free_port_is(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# 10 -----------------------------------------------------------------------------------------------


def test_dotted_and_nested_spelling_of_one_field_is_refused(tmp_path):
    from harness.grid import GridError, load_grid

    grid = make_grid(tmp_path, "twice", """
        - {name: a, method: lora_sft, lora.rank: 4, lora: {rank: 8}}
    """, extra="""
        exclude:
          - {lora.alpha: 2, lora: {alpha: 3}}
    """)
    with pytest.raises(GridError) as info:
        load_grid(grid)
    errors = info.value.errors
    assert f"{grid}: variants[0].lora.rank: given twice ('lora.rank' and 'lora: {{rank}}'); keep one" in errors
    assert f"{grid}: exclude[0].lora.alpha: given twice ('lora.alpha' and 'lora: {{alpha}}'); keep one" in \
        info.value.errors


def test_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    import time

    lines = ["name: bomb", "defaults: {base_model: tiny-random-llama}", "x:",
             "  - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    lines.append("description: *a8")  # 9**9 strings in a string field
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    assert main(["validate", str(path)]) == 2
    assert time.monotonic() - started < 5
    assert "expands to more than 100000 values once its YAML aliases (*name) are followed" in capsys.readouterr().err


def test_vanished_names_and_dead_excludes_are_said(tmp_path, capsys):
    """Two names for one config used to collapse into one variant without a word; an exclude matching
    nothing excluded nothing without a word."""
    grid = make_grid(tmp_path, "quiet", """
        - {name: first, method: lora_sft}
        - {name: second, method: lora_sft}
    """, extra="""
        exclude:
          - {lora.rank: 64}
    """)
    for command in ("plan", "validate"):
        assert main([command, str(grid)]) == 0
        err = capsys.readouterr().err
        assert ("note: " f"{grid}: variants[1] (name 'second') has the same config as variants[0] (name 'first'): "
                "one variant, id ") in err, err
        assert f"note: {grid}: exclude[0]: matches no variant (lora.rank=64); nothing was excluded by it" in err


def test_deleted_store_next_to_finished_outputs_is_refused(tmp_path, capsys):
    """Deleting mlflow.db used to retrain everything silently, overwriting runs/<id>/ of the old runs."""
    grid = make_grid(tmp_path, "lost", "- {method: lora_sft}\n")
    results = tmp_path / "results"
    old = results / "runs" / "0123456789ab"
    old.mkdir(parents=True)
    (old / "result.json").write_text('{"global_step": 2}')
    assert main(["run", str(grid), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert f"mlflow.db is missing, but {results / 'runs'} holds the outputs of 1 finished run(s) (0123456789ab)" in err
    assert (old / "result.json").read_text() == '{"global_step": 2}' and not (results / "mlflow.db").exists()


def test_a_very_large_run_needs_yes(tmp_path, capsys):
    grid = make_grid(tmp_path, "huge", "- {method: lora_sft}\n", extra="""
        axes:
          seed: [%s]
    """ % ", ".join(str(i) for i in range(101)))
    assert main(["run", str(grid), "--results", str(tmp_path / "r")]) == 2
    assert f"run: {grid} expands to 101 variants (more than 100); check it with" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# 6 ------------------------------------------------------------------------------------------------


def test_full_disk_is_said_clearly_and_leaves_nothing_running_that_could_be_marked(tmp_path):
    """Results on a 1.1 MB tmpfs (in a private mount namespace): the worker hits ENOSPC, then the runner used
    to crash with `sqlite3.OperationalError: database or disk is full`, leaving its runs RUNNING. Now: exit 1,
    one clear "disk full" line naming the folder, and every run the store could still record is ended; the
    ones it could not are counted in that line (the next run marks them FAILED as orphans)."""
    import shutil

    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unprivileged user and mount namespaces (unshare -rm) to mount a small tmpfs")
    grid = two_variant_grid(tmp_path, "full")
    mnt, kept = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=1100k tmpfs {mnt} && "
              f"{sys.executable} -m harness run {grid} --results {mnt / 'results'}; rc=$?; "
              f"cp -r {mnt / 'results'} {kept}; exit $rc")  # the tmpfs goes with the namespace: keep a copy
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert f"disk full: no space left in {mnt / 'results'}" in out, out
    assert "Traceback" not in out, out
    statuses = sqlite3.connect(kept / "mlflow.db").execute("select status from runs").fetchall()
    running = sum(1 for (s,) in statuses if s == "RUNNING")
    if running:
        assert f"{running} run(s) could not be marked and stay RUNNING" in out, out
    else:
        assert "every run was marked" in out, out
