"""What the throughput work may not change: the reference measured once per content is the same reference, and
DPO training with the measurement's reference log-probs handed to TRL is the same training. Tiny model."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments import data as D
from experiments import evaluate as E
from experiments import models as M
from experiments import refcache
from harness.cli import main
from harness.run import spawn

GRID = """
name: sweep
defaults:
  base_model: tiny-random-llama
  method: dpo_lora
  data: {size: 8, max_length: 128, eval: eval.jsonl}
  train: {max_steps: 3, batch_size: 2, learning_rate: 1e-3}
  eval: {probe_length: 8}
variants:
  - {name: b1, dpo: {beta: 0.1}}
  - {name: b5, dpo: {beta: 0.5}}
"""


def _run(folder: Path, cache: str, *flags: str, env: dict[str, str] | None = None) -> dict[str, object]:
    folder.mkdir()
    shutil.copy(D.BUILTIN_DIR / "eval.jsonl", folder / "eval.jsonl")
    (folder / "grid.yaml").write_text(GRID)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(refcache.ENV_SWITCH, cache)
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            assert main(["run", str(folder / "grid.yaml"), "--results", str(folder / "results"), *flags]) == 0
    client = MlflowClient(f"sqlite:///{folder / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweep")
    runs = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'variant'")
    return {r.data.tags["mlflow.runName"].split("·")[0]: (client, r) for r in runs} | {"stderr": said.getvalue()}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    return {"on": _run(root / "on", "on"), "off": _run(root / "off", "off"),
            # one at a time, each worker a fresh interpreter on one thread ...
            "exec": _run(root / "exec", "on", env={spawn.START_ENV: "exec", "HARNESS_THREADS": "1"}),
            # ... and two at once, forked from the warm server, the two cores split between them
            "jobs2": _run(root / "jobs2", "on", "--jobs", "2")}


def test_reference_is_measured_once_per_content(sweeps):
    on = sweeps["on"]
    (_, b1), (_, b5) = on["b1"], on["b5"]
    assert b1.data.metrics["cache/reference_eval_hit"] == 0.0  # the first variant measures and stores it
    assert b5.data.metrics["cache/reference_eval_hit"] == 1.0  # the second reuses it
    for key in ("eval/margin_before_mean", "drift/ppl_before"):
        assert b1.data.metrics[key] == b5.data.metrics[key]
    # the reused reference is the reference a run without the cache measures
    (_, off_b5) = sweeps["off"]["b5"]
    assert "cache/reference_eval_hit" not in off_b5.data.metrics
    for key in ("eval/margin_before_mean", "train_pairs/margin_before_mean", "drift/ppl_before"):
        assert b5.data.metrics[key] == pytest.approx(off_b5.data.metrics[key], rel=1e-6)


@pytest.mark.parametrize("name", ["b1", "b5"])
def test_dpo_training_is_unchanged_by_reusing_reference_logps(sweeps, name):
    (client_on, on), (client_off, off) = sweeps["on"][name], sweeps["off"][name]
    assert on.data.metrics["cache/reference_logps_reused"] == 1.0
    assert off.data.metrics["cache/reference_logps_reused"] == 0.0
    # The reference log-probs come from the measurement's batches instead of TRL's: the same sums, added up
    # in other batches, so they agree to the fp32 rounding of sums of ~10^2 nats (a few 1e-5 nats), and so does
    # everything computed from them: rewards are beta × those differences, the loss a sigmoid of them.
    history = {}
    for key in ("train/loss", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected", "train/grad_norm"):
        a = [m.value for m in sorted(client_on.get_metric_history(on.info.run_id, key), key=lambda m: m.step)]
        b = [m.value for m in sorted(client_off.get_metric_history(off.info.run_id, key), key=lambda m: m.step)]
        assert len(a) == len(b) == 3, key
        history[key] = (a, b)
    # The tolerance scales with what is compared (an absolute 5e-5 on beta-scaled rewards held on an AVX2 CPU and
    # failed on AVX-512 by 6.1e-5 at beta 0.5): the log-ratio itself is compared, in nats, to a few float32 steps
    # of the summed log-probs it is the difference of (|sum| ~ 600 nats: a step is 6.1e-5), and the loss, whose
    # slope in the log-ratio is at most beta, to beta times that.
    beta = {"b1": 0.1, "b5": 0.5}[name]
    sums = [abs(v) for key in ("logps/chosen", "logps/rejected") for series in history[key] for v in series]
    nats = 8 * float(np.spacing(np.float32(max(sums))))
    assert history["train/loss"][0] == pytest.approx(history["train/loss"][1], abs=beta * nats), "loss curve"
    assert history["logps/chosen"][0] == pytest.approx(history["logps/chosen"][1], rel=1e-5)
    assert history["train/grad_norm"][0] == pytest.approx(history["train/grad_norm"][1], rel=1e-3)
    for key in ("rewards/margins", "rewards/chosen"):
        on_nats, off_nats = ([r / beta for r in series] for series in history[key])
        assert on_nats == pytest.approx(off_nats, abs=nats), key
    for key in ("eval/margin_shift_mean", "drift/kl_mean", "drift/weight_delta_norm"):
        assert on.data.metrics[key] == pytest.approx(off.data.metrics[key], rel=1e-3, abs=1e-9), key


def test_a_changed_byte_is_a_new_key(tmp_path):
    """Content keys: other weights, other data or another batch size never hit an existing entry."""
    tok = M.load_padded_tokenizer(M.TINY)
    model = M.load_model(M.TINY, vocab_size=len(tok))
    rows = D.read_rows(D.BUILTIN_DIR / "eval.jsonl")[:3]
    setup = E.Setup.standard(rows, max_length=128, probe_length=4)
    setup.probe_prompts, setup.neutral_text = setup.probe_prompts[:2], setup.neutral_text[:1]
    folder = tmp_path / "reference"
    cache = refcache.ReferenceCache(folder, refcache.weights_identity(None, M.recipe(M.TINY), None), model)
    first = E.before(model, tok, setup, cache=cache)
    assert cache.hits == {"eval": False}
    again = refcache.ReferenceCache(folder, refcache.weights_identity(None, M.recipe(M.TINY), None), model)
    second = E.before(model, tok, setup, cache=again)
    assert again.hits == {"eval": True}
    assert second.logps == first.logps and second.ppl == first.ppl
    assert all(torch.equal(a, b) for a, b in zip(first.probe_logprobs, second.probe_logprobs, strict=True))
    other_weights = refcache.ReferenceCache(folder, "sha256:another-model", model)
    E.before(model, tok, setup, cache=other_weights)
    assert other_weights.hits == {"eval": False}
    chosen = [{**m, "content": m["content"] + " Indeed."} for m in rows[0]["chosen"]]  # one word more
    edited = [dict(rows[0], chosen=chosen), *rows[1:]]
    other_data = refcache.ReferenceCache(folder, refcache.weights_identity(None, M.recipe(M.TINY), None), model)
    E.before(model, tok, E.Setup.standard(edited, max_length=128, probe_length=4), cache=other_data)
    assert other_data.hits == {"eval": False}
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"0" * 64)
    a = refcache.weights_identity(weights, "", tmp_path / "memo")
    (weights / "model.safetensors").write_bytes(b"1" * 64)
    assert refcache.weights_identity(weights, "", tmp_path / "memo") != a
    assert len(json.loads(json.dumps(sorted(p.name for p in folder.iterdir())))) >= 4  # entries on disk


def _values(client, run) -> dict[str, list[float]]:
    """Every logged series of a run, except wall times, cache bookkeeping and the measured memory peak (which
    differ by design: a forked worker shares its server's pages, an exec'd one loads its own)."""
    out = {}
    for key in run.data.metrics:
        if key.startswith("cache/") or key.endswith("seconds") or "runtime" in key or "per_second" in key \
                or key == "memory/peak_gb":
            continue
        out[key] = [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
    return out


def test_two_variants_at_once_from_the_warm_server_train_exactly_as_one_at_a_time(sweeps):
    """--jobs 2 with forked workers gives each worker half the cores and changes no number: bit for bit what
    fresh interpreters on one thread, one variant after the other, log."""
    for name in ("b1", "b5"):
        (c_exec, r_exec), (c_jobs, r_jobs) = sweeps["exec"][name], sweeps["jobs2"][name]
        assert r_exec.data.tags["harness.worker_start"] == "exec"
        assert r_jobs.data.tags["harness.worker_start"] == "fork"
        assert r_exec.data.tags["harness.threads"] == r_jobs.data.tags["harness.threads"] == "1"
        a, b = _values(c_exec, r_exec), _values(c_jobs, r_jobs)
        assert set(a) == set(b) and len(a) > 30
        assert a == b, {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    # the two really ran at once: each started before the other ended
    (_, r1), (_, r5) = sweeps["jobs2"]["b1"], sweeps["jobs2"]["b5"]
    assert r1.info.start_time < r5.info.end_time and r5.info.start_time < r1.info.end_time
    # ... and measured their shared reference once: one measured and stored it, the other waited and read it
    for part in ("eval", "train"):
        hits = sorted(r.data.metrics[f"cache/reference_{part}_hit"] for r in (r1, r5))
        assert hits == [0.0, 1.0], part
    # on two cores, one thread each: the command says this is no faster than one at a time
    assert "leave each one torch thread" in sweeps["jobs2"]["stderr"]
    assert "torch thread" not in sweeps["on"]["stderr"]
    # one at a time, a forked worker keeps torch's own thread count (the machine's cores)
    (_, on) = sweeps["on"]["b1"]
    assert on.data.tags["harness.worker_start"] == "fork" and on.data.tags["harness.threads"] == str(
        torch.get_num_threads())


@pytest.mark.parametrize("key, value, said", [(spawn.START_ENV, "threads", "expected one of fork, exec"),
                                               ("HARNESS_THREADS", "0", "1 or more")])
def test_a_bad_worker_setting_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys, key, value, said):
    (tmp_path / "grid.yaml").write_text(GRID)
    monkeypatch.setenv(key, value)
    assert main(["run", str(tmp_path / "grid.yaml"), "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert f"{key}={value!r}" in err and said in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()
