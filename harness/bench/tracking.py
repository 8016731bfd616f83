"""Benchmark: what tracking one training step's metrics costs on the default sqlite store.

    python -m harness.bench.tracking [--steps 50] [--metrics 12] [--out results/benchmarks/logging.json]

Compares one `log_metric` call per metric (what a naive callback does) with the single batched
`log_batch` call per step that `harness.core.tracking.MlflowTracker.log_metrics` makes. Prints and writes
per-step milliseconds (median and p90) for each, on a fresh sqlite store in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path


def _measure(fn, steps: int) -> list[float]:
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        fn(step)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.bench.tracking", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--metrics", type=int, default=12, help="metrics per step (TRL's DPO logs about 12)")
    p.add_argument("--out", default="results/benchmarks/logging.json")
    args = p.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from harness.core.tracking import MlflowTracker

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        client = MlflowClient(uri)
        exp = client.create_experiment("bench", artifact_location=Path(tmp, "a").as_uri())
        names = [f"m{i}" for i in range(args.metrics)]

        naive_run = client.create_run(exp).info.run_id

        def naive(step):
            for n in names:
                client.log_metric(naive_run, n, 0.5 * step, step=step)

        tracker = MlflowTracker(uri, client.create_run(exp).info.run_id)

        def batched(step):
            tracker.log_metrics({n: 0.5 * step for n in names}, step=step)

        result = {
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "mlflow": metadata.version("mlflow"),
            "steps": args.steps,
            "metrics_per_step": args.metrics,
        }
        for label, fn in (("one_call_per_metric", naive), ("one_batched_call_per_step", batched)):
            times = _measure(fn, args.steps)
            result[label] = {"median_ms_per_step": round(statistics.median(times), 2),
                             "p90_ms_per_step": round(sorted(times)[int(0.9 * len(times))], 2)}
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
