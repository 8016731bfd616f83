"""`run --race` (stop a variant decisively behind another at the same step) and `run --jobs auto` (issue 27)."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.core import runs as R
from harness.run.jobs import GB, choose
from harness.run.race import Race, looks_of

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "experiments" / "data" / "builtin" / "train.jsonl"


def _act(vid: str, points: list[tuple[int, float, float, int]]):
    """A running variant as the session's watch sees it: its id, name and intermediate points."""
    return SimpleNamespace(variant=SimpleNamespace(id=vid, run_name=f"name-{vid}"),
                           state={"intermediates": [{"step": s, "eval/margin_shift_mean": m, "sd": sd, "n": n}
                                                    for s, m, sd, n in points]})


def test_a_variant_stops_only_when_its_interval_lies_below_anothers_at_the_same_step():
    race = Race(looks=4, alpha=0.05)
    assert race.confidence == pytest.approx(1 - 0.05 / 4)
    assert race.watch(_act("lead", [(2, 1.0, 0.5, 32)])) is None  # alone: nothing to compare
    # overlapping intervals at step 2 (1.0 ± ~0.25 against 0.8 ± ~0.25): it goes on
    assert race.watch(_act("close", [(2, 0.8, 0.5, 32)])) is None
    # a step the leader has not reached is no comparison at all
    assert race.watch(_act("ahead", [(4, -5.0, 0.5, 32)])) is None
    why = race.watch(_act("behind", [(2, 0.0, 0.5, 32)]))
    assert why is not None and why.startswith("race: at step 2 ")
    lead, behind = race.points["lead"][2], race.points["behind"][2]
    assert behind.hi < lead.lo and f"{behind.text()} lies below name-lead's {lead.text()}" in why
    assert "98.8% confidence" in why and "4 looks" in why
    # the half-width is Student-t's at 1 - alpha/(2K), n - 1 degrees of freedom
    from scipy import stats

    assert lead.hi - lead.mean == pytest.approx(stats.t.ppf(1 - 0.05 / 8, 31) * 0.5 / 32**0.5)


def test_a_stage_is_never_stopped_and_a_point_without_spread_is_no_look():
    race = Race(looks=2, keep=frozenset({"stage"}))
    race.watch(_act("lead", [(1, 1.0, 0.1, 16)]))
    assert race.watch(_act("stage", [(1, -1.0, 0.1, 16)])) is None  # its children start from it
    assert race.watch(_act("old", [(1, -1.0, None, None)])) is None  # a worker that sent only the mean
    assert "old" in race.points and not race.points["old"]
    assert looks_of(8, 2) == 3 and looks_of(8, None) == 0 and looks_of(1, 1) == 0


def _simulate(race_alpha: float, behind_by: float, seed: int, variants: int = 4, looks: int = 4,
              pairs: int = 32) -> tuple[int, int]:
    """Race `variants` simulated variants with per-pair shifts ~ N(mean, 1) at every look; the last one's mean is
    `behind_by` below the others'. Returns (variants wrongly stopped, 1 if the last one was stopped)."""
    rnd = random.Random(seed)
    race = Race(looks=variants * looks, alpha=race_alpha)
    wrong = last = 0
    for v in range(variants):
        mean = -behind_by if v == variants - 1 else 0.0
        points = []
        for step in range(1, looks + 1):
            xs = [rnd.gauss(mean, 1.0) for _ in range(pairs)]
            m = sum(xs) / pairs
            points.append((step, m, (sum((x - m) ** 2 for x in xs) / (pairs - 1)) ** 0.5, pairs))
            if race.watch(_act(str(v), points)):
                if v == variants - 1 and behind_by > 0:
                    last = 1
                else:
                    wrong += 1
                break
    return wrong, last


def test_equal_variants_are_almost_never_stopped_and_one_far_behind_is():
    """The guarantee in numbers: with every variant's true shift equal, the share of grids in which the race
    stops any variant stays below alpha (it is far below: the rule is conservative); a variant one standard
    deviation of a pair behind is stopped nearly always."""
    grids = 300
    wrong_grids = sum(_simulate(0.05, 0.0, seed)[0] > 0 for seed in range(grids))
    assert wrong_grids / grids <= 0.05
    stopped = sum(_simulate(0.05, 1.0, 1000 + seed)[1] for seed in range(100))
    assert stopped >= 95


def test_jobs_auto_picks_by_cores_on_a_cpu_and_by_the_estimate_on_a_gpu():
    cpu = {"device": "cpu", "gpus": 0, "free_bytes": 20 * GB, "peak_bytes": 1 * GB, "variants": 6}
    assert choose(cores=2, **cpu)[0] == 1  # two at once measured slower than one on 2 cores
    jobs, why = choose(cores=32, **cpu)
    assert jobs == 4 and "32 core(s)" in why and "room for 4" in why
    assert choose(cores=64, **{**cpu, "peak_bytes": 8 * GB})[0] == 2  # memory: 16 GB planned on / 8 GB each
    assert choose(device="cuda", gpus=1, cores=16, free_bytes=80 * GB, peak_bytes=10 * GB, variants=6)[0] == 6
    assert choose(device="cuda", gpus=1, cores=16, free_bytes=80 * GB, peak_bytes=10 * GB, variants=20)[0] == 7
    assert choose(device="cuda", gpus=1, cores=16, free_bytes=8 * GB, peak_bytes=10 * GB, variants=6)[0] == 1
    assert choose(device="cuda", gpus=4, cores=16, free_bytes=80 * GB, peak_bytes=1 * GB, variants=6) == (
        None, "one variant per GPU (4 GPUs)")


def _grid(folder: Path, body: str) -> Path:
    path = folder / "race.yaml"
    path.write_text(textwrap.dedent(f"""
        name: race_tiny
        defaults:
          base_model: tiny-random-llama
          method: dpo_lora
          data: {{size: 8, max_length: 128, eval: {TRAIN}}}
          train: {{max_steps: 8, batch_size: 4, learning_rate: 5.0e-2}}
          lora: {{rank: 4, alpha: 8}}
        """) + textwrap.dedent(body))
    return path


def test_a_raced_grid_stops_the_variant_left_behind_and_the_report_lists_it(tmp_path, capsys):
    """The variant that cannot move (learning rate 1e-9) is stopped as soon as the one that moves is decisively
    ahead at the same step: KILLED, `harness.stopped` saying where and the two intervals; the grid exits 0,
    its run says it was raced and how many jobs `auto` chose; the report lists the stopped variant apart."""
    grid = _grid(tmp_path, """
          eval: {every: 2}
        variants:
          - {name: moves}
          - {name: still, train: {learning_rate: 1.0e-9}}
        """)
    results = tmp_path / "r"
    assert main(["run", str(grid), "--race", "--jobs", "auto", "--results", str(results)]) == 0
    err = capsys.readouterr().err
    assert "--race: alpha 0.05 over 6 looks" in err and "--jobs auto: 1 at once on the CPU" in err
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("race_tiny").experiment_id
    runs = {r.data.tags.get(R.RUN_NAME_TAG, "").split("·")[0]: r for r in client.search_runs([exp])}
    assert runs["moves"].info.status == "FINISHED"
    still = runs["still"]
    assert still.info.status == "KILLED"
    why = still.data.tags[R.TAG_STOPPED]
    assert why.startswith("race: at step ") and "lies below moves·" in why
    stopped_at = int(why.split()[3])
    assert still.data.tags[R.TAG_VERDICT] == f"stopped by --race at step {stopped_at}"  # the UI's verdict column
    assert 2 <= stopped_at < 8 and still.data.metrics.get("train/global_step", 0) < 8
    parent = next(r for r in client.search_runs([exp]) if R.is_grid_run(r))
    assert parent.data.tags[R.TAG_RACE].startswith("--race: alpha 0.05 over 6 looks")
    assert parent.data.tags[R.TAG_JOBS].startswith("auto: 1 at once on the CPU")
    assert main(["report", "race_tiny", "--results", str(results)]) == 0
    report = (results / "race_tiny" / "report.md").read_text()
    stopped = report.split("## Stopped early", 1)[1].split("\n## ", 1)[0]
    assert still.info.run_id in stopped and why in stopped
    summary = report.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "still·" not in summary  # not reported as if it finished


def test_a_grid_that_cannot_be_raced_is_refused_before_anything_runs(tmp_path, capsys):
    grid = _grid(tmp_path, """
        variants:
          - {name: a}
          - {name: b, data: {eval: builtin}, eval: {every: 2}}
        """)
    results = tmp_path / "r"
    assert main(["run", str(grid), "--race", "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert f"{grid}: variants[0]" in err and "eval.every: --race compares variants every eval.every" in err
    assert "data.eval / data.max_length: --race compares held-out shifts on the same pairs" in err
    assert "Traceback" not in err and not results.exists()
    assert main(["run", str(grid), "--jobs", "auto", "--executor", "ray", "--results", str(results)]) == 2
    assert "--jobs auto is for variants on this machine" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["run", str(grid), "--jobs", "many"])
    assert info.value.code == 2 and "or auto; got 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(grid), "--race", "--race-alpha", "1.5"])
    assert "expected a number between 0 and 1" in capsys.readouterr().err
