"""The benchmarks' peers (issue 27): the measuring peer measures what the harness measures, and the race benchmark
runs end to end on the tiny model. Timings are not asserted: they are the benchmark's to record."""

from __future__ import annotations

import json
import os

import torch

from experiments import data as D
from experiments import evaluate as E
from experiments import models as M
from experiments import scoring as S
from harness.bench import race as bench_race
from harness.bench import throughput as T
from harness.bench.peer import MEASURING, SCORING


def test_the_measuring_peer_scores_each_pair_as_the_harness_does():
    """The peer's plain scoring (exec'd from the very text the benchmark writes) against the harness's TRL-exact
    tokenisation and shared-prompt forward: every held-out margin agrees to float32 noise."""
    assert SCORING in MEASURING
    scope = {"torch": torch}
    exec(SCORING, scope)  # noqa: S102 - the benchmark's own generated code
    model, tok = M.load_model("tiny-random-llama"), M.load_padded_tokenizer("tiny-random-llama")
    rows = D.read_rows(D.BUILTIN_DIR / D.BUILTIN_FILES["eval"])
    peer = scope["score"](model, tok, rows)
    pairs, dropped = E.encode_pairs(tok, rows, list(range(len(rows))), "eval", 512)
    harness = [c - r for c, r in S.pair_logps(model, pairs, tok.pad_token_id, 8)]
    assert dropped == 0 and len(peer) == len(harness) == len(rows)
    assert max(abs(p - h) for p, h in zip(peer, harness, strict=True)) < 1e-3  # margins of up to ~1000 nats
    assert max(abs(h) for h in harness) > 100  # so the agreement is not that of zeros


def test_the_measuring_peer_and_the_harness_find_the_same_shift(tmp_path, monkeypatch):
    """The peer script trains and measures in one process; the harness's run of the same settings finds the same
    held-out shift for each beta, and the benchmark pairs them by beta."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "tiny"
    M.load_model("tiny-random-llama").save_pretrained(folder, safe_serialization=True)
    M.load_tokenizer("tiny-random-llama").save_pretrained(folder)
    workload = {"size": 4, "epochs": 1, "betas": [0.1, 0.5], "jobs": [1]}
    peer = T._plain({"model": str(folder), "tokenizer": str(folder)}, workload, tmp_path, "fp32", measuring=True)
    harness = T._harness(str(folder), workload, tmp_path, "peer_check", "fp32")
    against = T._against_peer(peer, harness)
    assert [x["beta"] for x in against["shift_peer_vs_harness"]] == [0.1, 0.5]
    for x in against["shift_peer_vs_harness"]:
        assert abs(x["peer"]) > 1e-4 and abs(x["peer"] - x["harness"]) < 1e-4, x
    assert against["ratio_measuring"] == harness["wall_seconds"] / peer["wall_seconds"]
    assert all(v["measure_seconds"] > 0 and v["steps"] == 2 for v in peer["variants"])
    report = {"workloads": {"sweep": {"description": "d", "plain": peer, "harness": harness, "ratio": 1.0, **against}}}
    assert "measuring peer / harness" in T.markdown(report)


def test_the_race_benchmark_runs_both_sides_and_says_whether_the_top_variant_agrees(tmp_path):
    out = tmp_path / "race.json"
    env_before = dict(os.environ)
    assert bench_race.main(["--tiny", "--out", str(out)]) == 0
    assert dict(os.environ) == env_before
    report = json.loads(out.read_text())
    full, raced = report["full"], report["race"]
    assert [v["status"] for v in full["variants"]] == ["FINISHED"] * 4 and full["stopped"] == 0
    stopped = [v for v in raced["variants"] if v["status"] == "KILLED"]
    assert raced["stopped"] == len(stopped) >= 2  # the two that cannot move (learning rate 1e-9)
    assert all("lr1e-09" in v["variant"] and v["stopped"].startswith("race: at step ") for v in stopped)
    assert report["same_top"] and raced["top"] == full["top"] and "lr0.05" in full["top"]
    assert report["ratio"] == raced["wall_seconds"] / full["wall_seconds"]
    assert "same top variant: yes" in out.with_suffix(".md").read_text()
