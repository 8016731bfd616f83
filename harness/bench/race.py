"""Benchmark: a grid raced (`run --race`) against the same grid run in full, side by side in one run.

    python -m harness.bench.race [--model smollm2-135m-instruct] [--out results/benchmarks/race.json]
    python -m harness.bench.race --tiny --out /tmp/race.json        # the tiny random model: seconds, for the tests

The grid: DPO through LoRA (r=4, alpha=8, q/v), 12 pairs x 2 epochs (12 optimiser steps at batch 2), the
held-out shift measured every 3 steps (3 looks a variant), over learning rate x beta, 8 variants, written as
someone sweeping around a current best guess would write it: that guess first (lr 2e-4, beta 0.1), then the
rest of the product. Both sides run `python -m harness run` in a fresh results folder (the reference cache starts
cold), one variant at a time; the full side without `--race`. Recorded: each side's wall time, every variant's
outcome (its final held-out shift, or where the race stopped it and why), the top variant of each side (the
finished variant with the largest held-out shift) and whether they are the same, and the time ratio.

What limits it: with one variant at a time the first variant always runs to the end (it is the yardstick), and a
variant is stopped only against variants that reached the same step before it, so the order the grid is written
in matters: a weak variant first stops nothing. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from harness.bench.throughput import child, machine

GRID = """
name: {name}
defaults:
  method: dpo_lora
  base_model: {model}
  lora: {{rank: 4, alpha: 8, targets: qv}}
  train: {{batch_size: 2, epochs: 2, precision: {precision}{extra_train}}}
  data: {{size: 12{extra_data}}}
  eval: {{every: {every}}}
variants:
{variants}
"""
FULL = {"lrs": ["2e-4", "1e-6", "1e-5", "5e-5"], "betas": [0.1, 0.5], "every": 3, "extra_train": "",
        "extra_data": ""}
TINY = {"lrs": ["5e-2", "1e-9"], "betas": [0.1, 0.5], "every": 2, "extra_train": ", max_steps: 8",
        "extra_data": ", max_length: 128, eval: {train}"}


def grid_text(model: str, precision: str, plan: dict, name: str) -> str:
    """The raced grid: the first learning rate and beta first, then the rest of lr x beta in order."""
    combos = [(lr, b) for lr in plan["lrs"] for b in plan["betas"]]
    variants = "\n".join(f"  - {{name: v{i}, train: {{learning_rate: {lr}}}, dpo: {{beta: {b}}}}}"
                         for i, (lr, b) in enumerate(combos))
    from experiments import data as D

    extra_data = plan["extra_data"].format(train=D.BUILTIN_DIR / D.BUILTIN_FILES["train"])
    return GRID.format(name=name, model=model, precision=precision, every=plan["every"],
                       extra_train=plan["extra_train"], extra_data=extra_data, variants=variants)


def outcomes(results: Path, name: str) -> list[dict]:
    """Every variant run of the grid, in start order: its name, status, steps and final shift or why it stopped."""
    from mlflow.tracking import MlflowClient

    from harness.core import runs as R

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000) if R.is_variant_run(r)]
    return [{"variant": r.data.tags.get(R.RUN_NAME_TAG, ""), "status": r.info.status,
             "steps": r.data.metrics.get("train/global_step"),
             "margin_shift": r.data.metrics.get("eval/margin_shift_mean") if r.info.status == "FINISHED" else None,
             "stopped": r.data.tags.get(R.TAG_STOPPED),
             "seconds": ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000}
            for r in sorted(runs, key=lambda r: r.info.start_time)]


def side(grid: Path, results: Path, name: str, extra: list[str]) -> dict:
    t0 = time.monotonic()
    code, _, stderr = child([sys.executable, "-m", "harness", "run", str(grid), "--results", str(results), *extra])
    wall = time.monotonic() - t0
    if code != 0:
        raise SystemExit(f"harness run {' '.join(extra)} failed:\n{stderr[-3000:]}")
    runs = outcomes(results, name)
    finished = [r for r in runs if r["margin_shift"] is not None]
    top = max(finished, key=lambda r: r["margin_shift"]) if finished else None
    return {"wall_seconds": wall, "variants": runs, "top": top["variant"] if top else None,
            "stopped": sum(r["status"] == "KILLED" for r in runs)}


def markdown(report: dict) -> str:
    full, raced = report["full"], report["race"]
    lines = ["| side | wall | variants finished / stopped | top variant (held-out shift) |", "|---|---|---|---|"]
    for label, s in (("full grid", full), ("`--race`", raced)):
        top = next((v for v in s["variants"] if v["variant"] == s["top"]), None)
        lines.append(f"| {label} | {s['wall_seconds']:.0f} s | {len(s['variants']) - s['stopped']} / {s['stopped']} | "
                     f"{s['top']} ({top['margin_shift']:+.4f}) |" if top else f"| {label} | - | - | - |")
    lines += ["", f"Time ratio (race / full): {report['ratio']:.2f}×; same top variant: "
              f"{'yes' if report['same_top'] else 'no'}.", "",
              "| variant | full: shift | its run | race: outcome | its run |", "|---|---|---|---|---|"]
    raced_by = {v["variant"]: v for v in raced["variants"]}
    for v in full["variants"]:
        r = raced_by.get(v["variant"], {})
        outcome = (f"{r['margin_shift']:+.4f}" if r.get("margin_shift") is not None
                   else f"stopped: {r.get('stopped') or r.get('status', '-')}")
        shift = f"{v['margin_shift']:+.4f}" if v["margin_shift"] is not None else v["status"]
        lines.append(f"| {v['variant']} | {shift} | {v.get('seconds', 0):.0f} s | {outcome} | "
                     f"{r.get('seconds', 0):.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.bench.race", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tiny", action="store_true", help="tiny-random-llama, 4 variants of 8 steps (a test)")
    p.add_argument("--out", help="default results/benchmarks/race.json")
    args = p.parse_args(argv)
    from experiments import device as dev

    device = dev.pick_device()
    precision = dev.resolve_precision("auto", device)
    model, plan = ("tiny-random-llama", TINY) if args.tiny else (args.model, FULL)
    report = {"command": "python -m harness.bench.race " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "model": model,
              "device": device, "precision": precision}
    with tempfile.TemporaryDirectory(prefix="harness-race-") as tmp:
        work = Path(tmp)
        name = "bench_race"
        grid = work / f"{name}.yaml"
        grid.write_text(grid_text(model, precision, plan, name))
        report["grid"] = grid.read_text()
        for key, extra in (("full", []), ("race", ["--race"])):
            print(f"{key} ...", file=sys.stderr, flush=True)
            report[key] = side(grid, work / f"results-{key}", name, extra)
    report["ratio"] = report["race"]["wall_seconds"] / report["full"]["wall_seconds"]
    report["same_top"] = report["race"]["top"] == report["full"]["top"]
    out = Path(args.out or "results/benchmarks/race.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    where = report["machine"]["gpu"] or f"{report['machine']['cpu']} ({report['machine']['cores']} cores)"
    out.with_suffix(".md").write_text(f"Recorded {report['date']} on {where}, {precision}, `{report['command']}`\n\n"
                                      + markdown(report) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
