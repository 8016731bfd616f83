"""`--executor ray` on a local Ray instance, tracked to a `python -m harness server` started here, on the tiny
model: a grid equals the local executor's results and a rerun skips it, a worker process lost mid-variant is
retried into the same run while a killed worker fails its variant (never RUNNING), a Ray node lost mid-variant
(Ray's multi-node `ray.cluster_utils.Cluster` on this machine) is retried on another node into the same run or,
past its retries, fails it with the reason, Ctrl-C ends the Ray tasks' runs KILLED, a short search runs its trials
as Ray tasks; and the inputs refused before anything starts.

The tests that need Ray share one `ray start --head` on 127.0.0.1 (2 CPUs, token auth) and one tracking server.
They skip where Ray is not installed, except under CI (CI=true), where Ray is a requirement (.ci/run installs
the [ray] extra)."""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.core import runs as R

ROOT = Path(__file__).resolve().parent.parent

GRID = """
name: {name}
defaults:
  base_model: tiny-random-llama
  method: dpo_lora
  data: {{size: 4, max_length: 128}}
  train: {{max_steps: {steps}, batch_size: 2, learning_rate: 1e-3}}
  eval: {{probe_length: 4}}
variants:
  - {{name: a, dpo: {{beta: 0.1}}}}
  - {{name: b, dpo: {{beta: 0.5}}}}
"""

# Timings and cache bookkeeping differ between any two runs; everything else must agree.
NOT_COMPARED = ("seconds", "runtime", "per_second", "cache/", "memory/peak_gb")  # measured per process


# A stage and its DPO child: the stage's trained model travels back here and on to the child's node.
STAGED = """
name: tiny_ray_equal
defaults:
  base_model: tiny-random-llama
  method: dpo_lora
  data: {size: 4, max_length: 128}
  train: {max_steps: 2, batch_size: 2, learning_rate: 1e-3}
  eval: {probe_length: 4}
variants:
  - {name: warm, method: sft, train: {max_steps: 1}}
  - {name: a, from: warm, dpo: {beta: 0.1}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_grid(folder: Path, name: str, steps: int = 2, variants: int = 2) -> Path:
    path = folder / f"{name}.yaml"
    text = GRID.format(name=name, steps=steps)
    path.write_text(text if variants == 2 else text.rsplit("\n  - {name: b", 1)[0] + "\n")
    return path


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop a process group this test started (its leader is `proc`): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def need_ray():
    # Looked up, not imported: Ray reads its authentication settings from the environment when first imported,
    # and the cluster fixture sets them first.
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Ray is not installed, and CI must run these tests: pip install -e '.[dev,ray]'")
        pytest.skip("Ray is not installed (pip install -e '.[ray]')")


class Started:
    """A process group this module started, its output collected, ready once a line says so."""

    def __init__(self, cmd: list[str], ready: str, env: dict | None = None):
        self.ready_text = ready
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not any(self.ready_text in line for line in list(self.lines)):
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, f"not {self.ready_text!r} after {timeout} s:\n" + "".join(self.lines)
            time.sleep(0.3)


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """The tracking server and (where Ray is installed) a Ray head, started together: both take a while."""
    results = tmp_path_factory.mktemp("served") / "results"
    port = free_port()
    server = Started([sys.executable, "-m", "harness", "server", "--port", str(port), "--results", str(results),
                      "--workers", "1"], ready="server: ready on")
    head, temp, saved = None, None, {}
    import importlib.util

    if importlib.util.find_spec("ray") is not None:
        # Ray reads its authentication settings from the environment when first imported: set before any import.
        saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED",
                                                "HARNESS_CACHE_DIR")}
        temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths live under it
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
        os.environ.setdefault("HARNESS_CACHE_DIR", str(temp / "harness-cache"))  # the node's reference cache
        ray_port = free_port()
        head = Started([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                        "--node-ip-address", "127.0.0.1", "--port", str(ray_port), "--num-cpus", "2", "--num-gpus",
                        "0", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp),
                        # free ports for what Ray would put on fixed ones (another Ray on this machine has them)
                        "--dashboard-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                        "--metrics-export-port", str(free_port())],
                       ready="Ray runtime started", env=dict(os.environ))
        head.address = f"127.0.0.1:{ray_port}"
    try:
        yield {"server": server, "url": f"http://127.0.0.1:{port}", "results": results, "head": head}
    finally:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)  # to its pid alone: it stops the MLflow tree itself
            try:
                server.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        stop_group(server.proc)
        if head is not None:
            stop_group(head.proc, grace=3)
            shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def server(started):
    """`python -m harness server` on a free port over a results folder of its own."""
    started["server"].wait_ready()
    return started


@pytest.fixture(scope="module")
def cluster(started):
    """A Ray head on 127.0.0.1 with 2 CPUs and token auth; drivers here reach it with the same token."""
    need_ray()
    started["head"].wait_ready(180)
    return started["head"].address


def ray_run(grid: Path, server, cluster, *extra: str) -> int:
    return main(["run", str(grid), "--results", str(server["results"]), "--executor", "ray", "--address", cluster,
                 "--tracking-uri", server["url"], *extra])


def variant_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`{R.TAG_KIND}` = '{R.KIND_VARIANT}'", max_results=100)


def by_name(runs) -> dict:
    return {r.data.tags[R.RUN_NAME_TAG].split("·")[0]: r for r in runs}


def compared(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(part in k for part in NOT_COMPARED)}


# ---------------------------------------------------------------- runs on the cluster


def test_grid_on_ray_equals_the_local_executor_and_a_rerun_skips_it(tmp_path, server, cluster, monkeypatch, capsys):
    # One torch thread each way: local workers and Ray's (both forked from a warm server) compute bit for bit alike.
    monkeypatch.setenv("HARNESS_THREADS", "1")
    grid = tmp_path / "tiny_ray_equal.yaml"
    grid.write_text(STAGED)
    local = tmp_path / "local"
    assert main(["run", str(grid), "--results", str(local)]) == 0
    assert ray_run(grid, server, cluster) == 0
    out = capsys.readouterr().err
    assert "ray: 1 node(s), 2 CPU, 0 GPU" in out and "tracking http://127.0.0.1:" in out

    here = by_name(variant_runs(MlflowClient(f"sqlite:///{local / 'mlflow.db'}"), "tiny_ray_equal"))
    # The server writes the results folder's own store: its sqlite file holds the Ray runs, as local tools read it.
    there = by_name(variant_runs(MlflowClient(f"sqlite:///{server['results'] / 'mlflow.db'}"), "tiny_ray_equal"))
    assert set(here) == set(there) == {"warm", "a"}
    assert there["a"].data.tags[R.TAG_STAGE] == there["warm"].data.tags[R.TAG_VARIANT]
    for name in ("warm", "a"):
        mine, theirs = here[name], there[name]
        assert theirs.info.status == "FINISHED"
        assert mine.data.tags[R.TAG_VARIANT] == theirs.data.tags[R.TAG_VARIANT]
        assert theirs.data.tags[R.TAG_EXECUTOR] == "ray" and mine.data.tags[R.TAG_EXECUTOR] == "local"
        assert theirs.data.tags[R.TAG_ATTEMPT] == "1" and theirs.data.tags[R.TAG_THREADS] == "1"
        # on the node, too, the worker was forked from a server that had imported torch & co, not exec'd
        assert theirs.data.tags[R.TAG_WORKER_START] == mine.data.tags[R.TAG_WORKER_START] == "fork"
        a, b = compared(mine.data.metrics), compared(theirs.data.metrics)
        assert set(a) == set(b) and len(a) > 30
        off = {k: (a[k], b[k]) for k in a if not math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-9)}
        assert not off, f"{name}: metrics differ between the executors: {off}"
        # Artifacts went through the server into this results folder, where the run says they are.
        vid = theirs.data.tags[R.TAG_VARIANT]
        artifacts = Path(theirs.info.artifact_uri.removeprefix("file://"))
        assert artifacts.is_relative_to(server["results"] / "artifacts")
        assert (artifacts / "result.json").is_file() and (artifacts / "variant.yaml").is_file()
        assert (artifacts / "eval" / "pairs.csv").is_file()
        # ... and the worker's outputs came back into runs/<id>/ as a local worker leaves them.
        outputs = server["results"] / "runs" / vid
        steps = json.loads((outputs / "result.json").read_text())["global_step"]
        assert steps == (1 if name == "warm" else 2)
        assert "ray: running on" in (outputs / "worker.log").read_text()
        if name != "warm":
            assert (artifacts / "adapter" / "adapter_model.safetensors").is_file()
    warm = server["results"] / "runs" / there["warm"].data.tags[R.TAG_VARIANT] / "model"
    assert (warm / "config.json").is_file() and (warm / "model.safetensors").is_file()  # the stage's weights

    assert ray_run(grid, server, cluster) == 0  # rerun: all already finished, nothing trains
    out = capsys.readouterr().err
    assert "2 variants, 2 already finished, 0 to run" in out
    assert len(variant_runs(MlflowClient(server["url"]), "tiny_ray_equal")) == 2


def _worker_of(variant: str, experiment_runs: set[str]) -> tuple[int, dict] | None:
    """(pid, job) of the first attempt's worker process a Ray task of this test started for `variant`: the process
    working in the task's temporary folder (forked workers carry their server's command line, not the job's)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            job = json.loads((cwd / "job.json").read_text()) if cwd.name.startswith("harness-ray-") else None
        except (OSError, ValueError):
            continue
        if job and job["variant"]["spec"]["name"] == variant and job["run_id"] in experiment_runs \
                and job["attempt"] == 1:
            return int(entry.name), job
    return None


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _ray_task_of(worker: int) -> int:
    """The Ray worker process running the task: the worker's parent, or, for a forked worker, its server's."""
    parent = _parent_of(worker)
    if b"forkserver" in Path(f"/proc/{parent}/cmdline").read_bytes():
        parent = _parent_of(parent)
    return parent


def test_a_lost_task_is_retried_into_its_run_and_a_killed_worker_fails_never_running(tmp_path, server, cluster,
                                                                                     monkeypatch):
    from analysis.load import latest_per_step, load_study

    monkeypatch.setenv("HARNESS_FAULT", "sleep:a:1,sleep:b:1")  # each step sleeps 1 s: time to strike mid-variant
    name = "tiny_ray_lost"
    grid = write_grid(tmp_path, name, steps=3)
    client = MlflowClient(server["url"])
    done: dict[str, object] = {}

    def strike(variant: str, target: str) -> None:
        """Once the variant's first step is logged: SIGKILL its Ray task's process (a lost node, for Ray) or the
        worker itself."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "error" not in done:
            exp = client.get_experiment_by_name(name)
            ids = {r.info.run_id for r in variant_runs(client, name)} if exp else set()
            found = _worker_of(variant, ids)
            if found and client.get_metric_history(found[1]["run_id"], "train/loss"):
                pid = found[0]
                victim = _ray_task_of(pid) if target == "task" else pid
                os.kill(victim, signal.SIGKILL)
                done[variant] = pid
                return
            time.sleep(0.3)

    strikers = [threading.Thread(target=strike, args=args, daemon=True) for args in (("a", "task"), ("b", "worker"))]
    for t in strikers:
        t.start()
    try:
        rc = ray_run(grid, server, cluster, "--max-retries", "1")
    finally:
        done["error"] = True
    assert "a" in done and "b" in done, "a worker was never found to kill"
    assert rc == 1  # b failed
    runs = variant_runs(client, name)
    assert sorted(r.data.tags[R.RUN_NAME_TAG].split("·")[0] for r in runs) == ["a", "b"]  # one run per variant
    assert not [r for r in runs if r.info.status == "RUNNING"]
    a, b = by_name(runs)["a"], by_name(runs)["b"]
    assert a.info.status == "FINISHED" and a.data.tags[R.TAG_ATTEMPT] == "2"
    assert b.info.status == "FAILED" and "worker killed by signal SIGKILL" in b.data.tags[R.TAG_FAILURE_REASON]
    # The first attempt's worker died with its task (it would otherwise go on logging into the run).
    assert not Path(f"/proc/{done['a']}").exists()
    # The retry logged its steps again into the same run; readers keep each step's latest value.
    raw = client.get_metric_history(a.info.run_id, "train/loss")
    assert len(raw) > 3 and sorted({m.step for m in raw}) == [1, 2, 3]
    assert [m.step for m in latest_per_step(raw)] == [1, 2, 3]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["url"])
    study = load_study(name, server["results"])
    history = study.history[study.history.run_id == a.info.run_id]
    assert not history.duplicated(["key", "step"]).any() and len(history[history.key == "train/loss"]) == 3


# A node dies as a crashed machine would (its raylet SIGKILLed); Ray hears of it within a second or two, not ~30 s.
QUICK_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
                    "health_check_timeout_ms": 300, "health_check_failure_threshold": 3}


def _node_of(pid: int, nodes) -> object | None:
    """The `ray.cluster_utils` node whose raylet `pid` descends from (a worker: raylet > Ray worker > forkserver)."""
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in nodes}
    while pid > 1:
        if pid in raylets:
            return raylets[pid]
        try:
            pid = _parent_of(pid)
        except OSError:
            return None
    return None


def test_a_lost_node_is_retried_on_another_into_its_run_and_one_past_its_retries_fails(tmp_path, server,
                                                                                        monkeypatch):
    """Ray's multi-node harness on this machine: a head (1 CPU) and a node (1 CPU) run a grid's two variants; the
    node is lost mid-variant, another joins, and its variant trains again there into its run while the head's goes
    on untouched. Then a variant alone on a node that is lost with no retry left: FAILED with the reason."""
    need_ray()
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # The test's cluster is not this machine's default Ray (`ray.init()` with no address must not find it).
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    # Every node on this machine's own address (Ray's default), not 127.0.0.1: a driver rewrites a 127.0.0.1 address
    # to it, where a cluster on 127.0.0.1 does not listen. One address for all: the server on 127.0.0.1 is theirs.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "temp_dir": str(temp), "include_dashboard": False, "_system_config": QUICK_NODE_DEATH})
    client = MlflowClient(server["url"])

    def start(grid: Path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
        env = {**os.environ, "HARNESS_FAULT": "sleep:a:1,sleep:b:1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(grid), "--results",
                                 str(server["results"]), "--executor", "ray", "--address", cluster.address,
                                 "--tracking-uri", server["url"], *extra],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        return proc, lines

    def struck(proc, lines, name: str, node) -> tuple[str, int]:
        """Once a variant's first attempt on `node` has logged a step: remove the node (its raylet SIGKILLed, as a
        machine that dies). Returns the variant's name and its worker's pid."""
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            ids = {r.info.run_id for r in variant_runs(client, name)} if client.get_experiment_by_name(name) else set()
            for variant in ("a", "b"):
                found = _worker_of(variant, ids)
                if found and _node_of(found[0], [node]) and client.get_metric_history(found[1]["run_id"], "train/loss"):
                    cluster.remove_node(node, allow_graceful=False)
                    return variant, found[0]
            time.sleep(0.3)

    try:
        # 1. Two variants at once, one on each node; the worker node is lost, another joins: retried there.
        name = "tiny_ray_node_lost"
        doomed = cluster.add_node(num_cpus=1)
        proc, lines = start(write_grid(tmp_path, name, steps=3), "--max-retries", "1")
        try:
            lost, pid = struck(proc, lines, name, doomed)
            cluster.add_node(num_cpus=1)
            assert proc.wait(timeout=150) == 0, "".join(lines)
        finally:
            stop_group(proc, grace=5)
        out = "".join(lines)
        runs = variant_runs(client, name)
        assert sorted(r.data.tags[R.RUN_NAME_TAG].split("·")[0] for r in runs) == ["a", "b"], out  # one run each
        assert {r.info.status for r in runs} == {"FINISHED"}, out
        other = "b" if lost == "a" else "a"
        assert by_name(runs)[lost].data.tags[R.TAG_ATTEMPT] == "2"  # the retry, into the lost attempt's run
        assert by_name(runs)[other].data.tags[R.TAG_ATTEMPT] == "1"  # the head's variant never noticed
        log = server["results"] / "runs" / by_name(runs)[lost].data.tags[R.TAG_VARIANT] / "worker.log"
        assert "ray: attempt 2 on" in log.read_text() and "an earlier attempt's process or node was lost" in \
            log.read_text()
        assert not Path(f"/proc/{pid}").exists()  # the lost node's worker died with it
        raw = client.get_metric_history(by_name(runs)[lost].info.run_id, "train/loss")
        assert sorted({m.step for m in raw}) == [1, 2, 3] and len(raw) > 3  # steps logged again, by the retry

        # 2. A variant that only a 2-CPU node can hold; that node is lost and none comes back, no retry left.
        name = "tiny_ray_node_gone"
        doomed = cluster.add_node(num_cpus=2)
        proc, lines = start(write_grid(tmp_path, name, steps=3, variants=1), "--max-retries", "0",
                            "--cpus-per-variant", "2")
        try:
            struck(proc, lines, name, doomed)
            assert proc.wait(timeout=120) == 1, "".join(lines)
        finally:
            stop_group(proc, grace=5)
        [run] = variant_runs(client, name)
        assert run.info.status == "FAILED", "".join(lines)
        reason = run.data.tags[R.TAG_FAILURE_REASON]
        assert "ray: the task was lost 1 time(s) (its process or node died; --max-retries 0)" in reason, reason
    finally:
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_ctrl_c_ends_the_ray_variants_and_their_parent_killed(tmp_path, server, cluster):
    grid = write_grid(tmp_path, "tiny_ray_interrupt", steps=30, variants=1)
    env = {**os.environ, "HARNESS_FAULT": "sleep:a:1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(grid), "--results", str(server["results"]),
                             "--executor", "ray", "--address", cluster, "--tracking-uri", server["url"]],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while sum("step " in line and "/30" in line for line in list(lines)) < 1:
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    client = MlflowClient(server["url"])
    runs = variant_runs(client, "tiny_ray_interrupt")
    assert [r.info.status for r in runs] == ["KILLED"], "".join(lines)
    exp = client.get_experiment_by_name("tiny_ray_interrupt")
    [parent] = client.search_runs([exp.experiment_id], f"tags.`{R.TAG_KIND}` = '{R.KIND_GRID}'")
    assert parent.info.status == "KILLED"
    assert "interrupted: stopping running variants" in "".join(lines)


def test_a_search_runs_its_trials_as_ray_tasks(tmp_path, server, cluster, capsys):
    path = tmp_path / "tiny_ray_search.yaml"
    path.write_text(textwrap.dedent("""
        name: tiny_ray_search
        defaults:
          base_model: tiny-random-llama
          method: dpo_lora
          data: {size: 4, max_length: 128}
          train: {max_steps: 1, batch_size: 2}
          eval: {probe_length: 4}
        search:
          space:
            dpo.beta: {log: [0.01, 1.0]}
          objectives: [{metric: eval/margin_shift_mean}]
          pruner: none
          trials: 2
          seed: 0
    """))
    rc = main(["search", str(path), "--workers", "2", "--results", str(server["results"]), "--executor", "ray",
               "--address", cluster, "--tracking-uri", server["url"]])
    assert rc == 0, capsys.readouterr().err
    client = MlflowClient(server["url"])
    runs = variant_runs(client, "tiny_ray_search")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags[R.TAG_TRIAL] for r in runs} == {"0", "1"}
    assert {r.data.tags[R.TAG_EXECUTOR] for r in runs} == {"ray"}
    assert all("search/objective_0" in r.data.metrics for r in runs)
    out = capsys.readouterr().err
    assert "trial 0: COMPLETE" in out and "trial 1: COMPLETE" in out and "best trial" in out


# ---------------------------------------------------------------- refused before anything runs


def test_ray_without_an_http_tracking_server_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    grid = write_grid(tmp_path, "tiny_ray_refused")
    assert main(["run", str(grid), "--results", str(tmp_path / "results"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert "workers on other nodes log over HTTP to one MLflow server" in err and "python -m harness server" in err
    assert not (tmp_path / "results" / "mlflow.db").exists()


def test_an_unreachable_tracking_server_is_said_at_once(tmp_path, capsys):
    grid = write_grid(tmp_path, "tiny_ray_unreachable")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    for executor in ("local", "ray"):
        rc = main(["run", str(grid), "--results", str(tmp_path / "r"), "--executor", executor, "--tracking-uri", url])
        assert rc == 2
        assert f"cannot reach the MLflow tracking server at {url}" in capsys.readouterr().err
    assert time.monotonic() - start < 30  # not MLflow's minutes of retries


def test_missing_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch, server):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    grid = write_grid(tmp_path, "tiny_ray_missing")
    rc = main(["run", str(grid), "--results", str(server["results"]), "--executor", "ray", "--tracking-uri",
               server["url"]])
    assert rc == 2
    assert 'needs Ray, which is not installed here: pip install -e ".[ray]"' in capsys.readouterr().err


def test_a_server_over_another_results_folder_is_refused(tmp_path, capsys, server):
    grid = write_grid(tmp_path, "tiny_ray_elsewhere")
    rc = main(["run", str(grid), "--results", str(tmp_path / "other"), "--executor", "ray", "--tracking-uri",
               server["url"]])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"does not store artifacts in {(tmp_path / 'other' / 'artifacts').resolve()}" in err
    assert not list((server["results"] / "artifacts").glob(".harness-probe/*"))  # the probe cleaned up after itself


def test_ray_flags_need_the_ray_executor_and_the_server_a_free_port(tmp_path, capsys, server):
    grid = write_grid(tmp_path, "tiny_ray_flags")
    assert main(["run", str(grid), "--address", "auto"]) == 2
    assert "--address: only with --executor ray" in capsys.readouterr().err
    port = server["url"].rsplit(":", 1)[1]
    assert main(["server", "--port", port, "--results", str(tmp_path / "r")]) == 2
    assert "the port is already in use" in capsys.readouterr().err
    # a host other machines can reach: refused without --allow-remote, before anything listens or is created
    assert main(["server", "--host", "0.0.0.0", "--port", port, "--results", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 would let other machines read and change every run" in err and "--allow-remote" in err
    assert not (tmp_path / "r2").exists()
