"""Command line: `python -m harness <command>`.

    python -m harness plan configs/two_round.yaml       # expanded variants, ids, steps (no torch import)
    python -m harness validate configs/two_round.yaml   # every config error at once; --deep loads models too
    python -m harness run configs/two_round.yaml        # train every variant, tracked in MLflow
    python -m harness run GRID --executor ray --tracking-uri http://127.0.0.1:5000   # variants as Ray tasks
    python -m harness search configs/search_beta_lr.yaml  # Optuna search over beta and learning rate
    python -m harness report two_round                  # results/two_round/report.md + figures, from MLflow
    python -m harness evaluate smollm2-135m-instruct    # margins of a model (or a finished run) on eval pairs
    python -m harness ui two_round                      # MLflow UI on 127.0.0.1, opened on the grid's variants
    python -m harness server                            # MLflow tracking server for workers on other machines
    python -m harness metrics                           # what every measured metric means (markdown table)
    python -m harness cache-model [NAME]                # materialise SmolLM2 (or gemma-3-270m, a .gguf) once

Exit codes: 0 ok, 1 some variant failed, 2 bad input (nothing was trained), 130 interrupted.
Precedence: command-line flags > grid YAML > schema defaults.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
LARGE_GRID = 100  # variants: a bigger `run` needs --yes (an axis too many multiplies the work)


def _results_dir(args) -> Path:
    return Path(args.results or os.environ.get("HARNESS_RESULTS_DIR") or "results")


def _say(*parts, file=None) -> None:
    """print, with secrets masked: names, descriptions and echoed values come from user files."""
    from harness.core.tracking import redact

    print(redact(" ".join(str(p) for p in parts)), file=file or sys.stdout)


def _load(path: str, *, check_data: bool = True):
    from harness.grid import GridError, load_grid

    try:
        grid = load_grid(path, check_data=check_data)
    except GridError as e:
        _say(f"{len(e.errors)} problem(s) in {path}:", file=sys.stderr)
        for line in e.errors:
            _say(f"  {line}", file=sys.stderr)
        return None
    for note in grid.notes:  # not errors, but nothing a user should learn only from the runs
        _say(f"note: {note}", file=sys.stderr)
    return grid


def _steps(v) -> int:
    """Optimiser steps as the trainer will count them: batches are of training rows, and a method may make
    several rows of one pair (KTO: a desirable and an undesirable example), so the pairs are multiplied first."""
    from experiments.data import read_rows

    t = v.spec.train
    if t.max_steps:
        return t.max_steps
    pairs = v.spec.data.size or len(read_rows(Path(v.data_paths["train"])))
    rows = pairs * v.spec.method_record.rows_per_pair
    return math.ceil(math.ceil(rows / t.batch_size) / t.grad_accum) * t.epochs


def cmd_plan(args) -> int:
    from harness.core.tracking import redact

    grid = _load(args.grid)
    if grid is None:
        return EXIT_BAD_INPUT
    header = ("#", "id", "variant", "method", "steps", "from", "source") + (("memory",) if args.memory else ())
    rows = [header]
    by_id = grid.by_id()
    estimates = _estimates(grid) if args.memory else {}
    for i, v in enumerate(grid.variants, 1):
        parent = by_id[v.parent_id].run_name if v.parent_id else ""
        rows.append((str(i), v.id, redact(v.run_name), v.spec.method, str(_steps(v)), redact(parent), v.source)
                    + ((estimates[v.id],) if args.memory else ()))
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    for r in rows:
        _say("  ".join(r[c].ljust(widths[c]) for c in range(len(header))).rstrip())
    extra = f"; {grid.collapsed} duplicate(s) collapsed by id" if grid.collapsed else ""
    groups = {v.group_id for v in grid.variants}
    if len(groups) < len(grid.variants):  # seed replicates: say what they pool into
        extra += f"; {len(groups)} group(s) of seed replicates (the report pools each group)"
    _say(f"\ngrid {grid.name}: {len(grid.variants)} variants, {sum(_steps(v) for v in grid.variants)} "
          f"optimiser steps in total{extra}")
    return 0


def _estimates(grid) -> dict[str, str]:
    """Each variant's estimated peak (GB, at data.max_length: an upper bound) on this machine's device."""
    from experiments import memory
    from experiments import models as M
    from experiments.device import pick_device

    device, out, skeletons = pick_device(), {}, {}
    limit = memory.capacity(device)
    for v in grid.variants:
        try:
            if v.spec.base_model not in skeletons:
                skeletons[v.spec.base_model] = M.skeleton(v.spec.base_model, Path(v.grid_dir))
            precision, base_dtype = memory.resolved(v.spec, device)
            est = memory.estimate(v.spec, skeletons[v.spec.base_model], device=device, precision=precision,
                                  base_dtype=base_dtype)
            out[v.id] = f"{est.gb():.1f} GB" + ("" if est.peak <= limit else f" > {limit / 1e9:.0f} GB")
        except Exception as e:  # noqa: BLE001 - `validate --deep` says what is wrong with the variant
            out[v.id] = f"n/a ({type(e).__name__})"
    _say(f"memory: estimated peaks on this machine's {device} ({limit / 1e9:.0f} GB), at data.max_length (an "
         f"upper bound; experiments/memory.py)", file=sys.stderr)
    return out


def cmd_validate(args) -> int:
    grid = _load(args.grid)
    if grid is None:
        return EXIT_BAD_INPUT
    if args.deep:
        errors = _preflight(grid)
        if errors:
            return EXIT_BAD_INPUT
    _say(f"{args.grid}: ok ({len(grid.variants)} variants)")
    return 0


def _preflight(grid, backend=None) -> list[str]:
    return _preflight_variants(grid.path, grid.variants, backend)


def _preflight_variants(path, variants, backend=None) -> list[str]:
    from experiments.device import pick_device
    from harness.run import preflight

    # On Ray the variants train on the cluster's devices: a CPU if no GPU is asked for, else one this machine
    # cannot check (the precision is then checked by each worker on its own device).
    device = pick_device() if backend is None else ("cpu" if not backend.gpus else None)
    errors = preflight.check_variants(path, variants, device)
    if errors:
        _say(f"{len(errors)} problem(s) found before training (nothing was trained):", file=sys.stderr)
        for line in errors:
            _say(f"  {line}", file=sys.stderr)
    return errors


def _warm_workers(backend) -> None:
    """Start the local workers' server now, so that its imports (torch & co, ~7 s of CPU) overlap with the
    checks and opening the store instead of delaying the first variant."""
    if backend is None:
        from harness.run import spawn

        spawn.warm_up()


def _bad_worker_environment(command: str) -> bool:
    """The environment variables that shape worker processes, checked before anything starts."""
    from harness.run import spawn
    from harness.run.worker import THREADS_ENV

    problems = []
    try:
        spawn.mode()
    except ValueError as e:
        problems.append(str(e))
    threads = os.environ.get(THREADS_ENV, "")
    if threads and not (threads.isdigit() and int(threads) >= 1):
        problems.append(f"{THREADS_ENV}={threads!r}: expected a whole number of torch threads per worker, 1 or more")
    for problem in problems:
        print(f"{command}: {problem} (nothing was run)", file=sys.stderr)
    return bool(problems)


def _tracking(args, command: str) -> bool:
    """--tracking-uri (else MLFLOW_TRACKING_URI, else the results folder's sqlite store); an HTTP server is asked
    whether it answers before anything starts. False (said on stderr) if it does not."""
    from harness.core.tracking import redact, server_health

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        problem = server_health(uri)
        if problem:
            print(f"{command}: cannot reach the MLflow tracking server at {redact(uri)}: {problem}; start one with "
                  f"`python -m harness server` (nothing was run)", file=sys.stderr)
            return False
    return True


def _executor_flags_misused(args, command: str) -> bool:
    if args.executor == "ray":
        if args.gpus_per_variant is not None and args.gpus_per_variant < 0 or args.cpus_per_variant <= 0 \
                or args.max_retries < 0:
            print(f"{command}: --gpus-per-variant takes 0 or more, --cpus-per-variant more than 0, --max-retries 0 "
                  f"or more (nothing was run)", file=sys.stderr)
            return True
        return False
    given = [flag for flag, value in (("--address", args.address), ("--gpus-per-variant", args.gpus_per_variant))
             if value is not None]
    if given:
        print(f"{command}: {', '.join(given)}: only with --executor ray (nothing was run)", file=sys.stderr)
        return True
    return False


def _open_backend(args, results: Path, command: str):
    """(backend, None) for --executor ray (None for local), or (None, exit code) when Ray cannot be used."""
    if args.executor != "ray":
        return None, None
    from harness.run.ray import BackendError, RayBackend

    try:
        backend = RayBackend(results, address=args.address, gpus_per_variant=args.gpus_per_variant,
                             cpus_per_variant=args.cpus_per_variant, max_retries=args.max_retries)
        return backend.open(), None
    except BackendError as e:
        print(f"{command}: {e} (nothing was run)", file=sys.stderr)
        return None, EXIT_BAD_INPUT


def cmd_run(args) -> int:
    rc = _cmd_run(args)
    if rc == EXIT_BAD_INPUT:
        from harness.run import spawn

        spawn.stop()  # started early below, in case the checks passed
    return rc


def _cmd_run(args) -> int:
    if isinstance(args.jobs, int) and args.jobs < 1:  # 0 or -1 would leave no slot to run in: a silent hang
        print(f"run: --jobs: expected a whole number of variants at once, 1 or more, got {args.jobs} "
              f"(or auto; leave it out for one per GPU, else 1)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.jobs == "auto" and args.executor == "ray":
        print("run: --jobs auto is for variants on this machine; on Ray the cluster's resources decide how many "
              "run at once (leave --jobs out)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if _bad_worker_environment("run") or _executor_flags_misused(args, "run"):
        return EXIT_BAD_INPUT
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri  # the Session, its workers and the checks read it
    grid = _load(args.grid)
    if grid is None:
        return EXIT_BAD_INPUT
    race = _race(grid, args) if args.race else None
    if race is False:
        return EXIT_BAD_INPUT
    if args.executor != "ray":
        _warm_workers(None)  # the grid file is sound: the workers' imports overlap the deeper checks from here
    if len(grid.variants) > LARGE_GRID and not args.yes:
        print(f"run: {args.grid} expands to {len(grid.variants)} variants (more than {LARGE_GRID}); check it with "
              f"`python -m harness plan {args.grid}` and pass --yes to run them all (nothing was run)", file=sys.stderr)
        return EXIT_BAD_INPUT
    results = _results_dir(args)
    if not _store_ready(args, "run"):
        return EXIT_BAD_INPUT
    backend, rc = _open_backend(args, results, "run")
    if rc is not None:
        return rc
    try:
        if _preflight(grid, backend):
            return EXIT_BAD_INPUT
        import logging

        from harness.run.session import run_grid

        # MLflow logs every database error with its SQLAlchemy traceback before raising it; the runner reports the
        # ones it handles (a full disk) in one line and lets any other propagate with its own traceback.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

        jobs, tags = args.jobs, {}
        if jobs == "auto":
            from experiments.device import pick_device
            from harness.core.runs import TAG_JOBS
            from harness.run.jobs import auto_jobs

            jobs, why = auto_jobs(grid.variants, pick_device())
            tags[TAG_JOBS] = f"auto: {why}"
            _say(f"--jobs auto: {why}", file=sys.stderr)
        return run_grid(grid, results, force=args.force, jobs=jobs, argv=sys.argv, backend=backend, race=race,
                        tags=tags)
    finally:
        if backend is not None:
            backend.close()


def _race(grid, args):
    """The race over this grid (`harness.run.race`), or False having said why it cannot be raced."""
    from harness.run.race import Race, looks_of

    problems = [f"{grid.path}: {v.source}: eval.every: --race compares variants every eval.every optimiser steps; "
                f"set it (e.g. defaults: {{eval: {{every: 2}}}})" for v in grid.variants if not v.spec.eval.every]
    measured_on = {(v.spec.data.eval, v.spec.data.max_length) for v in grid.variants}
    if len(measured_on) > 1:
        problems.append(f"{grid.path}: data.eval / data.max_length: --race compares held-out shifts on the same "
                        f"pairs, cut the same way; this grid measures on {len(measured_on)} different ones "
                        f"({', '.join(sorted(f'{e} at {n}' for e, n in measured_on))})")
    if problems:
        _say(f"{len(problems)} problem(s) with --race (nothing was run):", file=sys.stderr)
        for line in problems:
            _say(f"  {line}", file=sys.stderr)
        return False
    stages = frozenset(v.parent_id for v in grid.variants if v.parent_id)
    looks = sum(looks_of(_steps(v), v.spec.eval.every) for v in grid.variants if v.id not in stages)
    return Race(looks, alpha=args.race_alpha, keep=stages)


def _store_ready(args, command: str) -> bool:
    """What `run` and `search` check before anything is created: a writable results folder, no store lost
    beside finished outputs, a tracking server that answers, a store that is whole (said on stderr if not)."""
    from harness.core.runs import check_store

    results = _results_dir(args)
    problem = _unwritable(results) or _store_lost(results)
    if problem:
        print(f"{command}: --results: {problem}", file=sys.stderr)
        return False
    if not _tracking(args, command):
        return False
    # a damaged store is said before the models load (default_tracking_uri would create the folder)
    check_store(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(results / 'mlflow.db').absolute()}")
    return True


def _store_lost(results: Path) -> str | None:
    """A missing mlflow.db next to the outputs of finished runs is a store deleted by accident: going on would
    retrain every variant and overwrite those outputs (stage models live only there). Say so instead."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None  # the store is elsewhere; results/ holds only the outputs
    finished = sorted(p.parent.name for p in (results / "runs").glob("*/result.json"))
    if (results / "mlflow.db").exists() or not finished:
        return None
    return (f"{results / 'mlflow.db'} is missing, but {results / 'runs'} holds the outputs of {len(finished)} "
            f"finished run(s) ({', '.join(finished[:3])}{', ...' if len(finished) > 3 else ''}); restore the store "
            f"from a backup, or move {results / 'runs'} away to start afresh (nothing was run)")


def _unwritable(results: Path) -> str | None:
    """Why the results folder cannot take a run, or None. Asked before anything is tracked (a read-only folder
    would otherwise fail deep inside MLflow) and without creating anything: bad input leaves no trace."""
    import tempfile

    existing = results.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{results} is not a writable folder ({existing} is not a folder)"
    if existing != results.absolute():  # created by the run: its first existing parent must let us
        ok = os.access(existing, os.W_OK | os.X_OK)
        return None if ok else f"{results} is not a writable folder ({existing} is read-only)"
    try:
        with tempfile.TemporaryFile(dir=results):
            pass
    except OSError as e:
        return f"{results} is not a writable folder ({e.strerror or e})"
    return None


def cmd_search(args) -> int:
    from harness.grid import GridError
    from harness.search import Search, SearchError, export_grid
    from harness.searchfile import load_search

    if args.workers < 1 or (args.trials is not None and args.trials < 1):
        print("search: --workers and --trials take a positive integer", file=sys.stderr)
        return EXIT_BAD_INPUT
    if _bad_worker_environment("search") or _executor_flags_misused(args, "search"):
        return EXIT_BAD_INPUT
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    try:
        spec = load_search(args.file)
    except GridError as e:
        print(f"{len(e.errors)} problem(s) in {args.file}:", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not _store_ready(args, "search"):
        return EXIT_BAD_INPUT
    backend, rc = _open_backend(args, _results_dir(args), "search")
    if rc is not None:
        return rc
    try:
        if _preflight_variants(args.file, [spec_variant(spec)], backend):
            return EXIT_BAD_INPUT
        _warm_workers(backend)
        try:
            search = Search(spec, _results_dir(args), trials=args.trials, workers=args.workers,
                            timeout=args.timeout, storage_url=args.storage, argv=sys.argv, backend=backend)
        except SearchError as e:
            print(f"search: {e} (nothing was run)", file=sys.stderr)
            return EXIT_BAD_INPUT
        rc = search.run()
    finally:
        if backend is not None:
            backend.close()
    if args.export and rc != 130:
        try:
            print(f"exported the best trial(s) to {export_grid(search.study, spec, Path(args.export))}")
        except GridError as e:
            print(f"search: --export: {e}", file=sys.stderr)
            return rc or 1
    return rc


def spec_variant(spec):
    """The search's base variant (bounds are checked separately), for the pre-flight checks."""
    from harness.grid import check, expand, identify

    errors: list[str] = []
    candidates = expand(spec.raw, errors)
    return identify(spec.raw, candidates, check(spec.raw, candidates, errors)).variants[0]


def cmd_report(args) -> int:
    from analysis import study
    from analysis.load import StudyError
    from analysis.report import write_report

    results = _results_dir(args)
    if not _tracking(args, "report"):
        return EXIT_BAD_INPUT
    try:
        path = study.build(args.target, results) if study.is_search(args.target, results) else write_report(
            args.target, results)
    except StudyError as e:
        print(f"report: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # a read-only or full results folder: the report cannot be written there
        print(f"report: cannot write the report: {e.strerror or e}"
              f"{f' ({e.filename})' if getattr(e, 'filename', None) else ''}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(path)
    return 0


def cmd_evaluate(args) -> int:
    from experiments import data as D
    from experiments import evaluate as E
    from experiments import models as M
    from experiments import trained
    from harness.core import methods
    from harness.core.runs import RUN_ID

    results = _results_dir(args)
    if args.out and Path(args.out).is_dir():
        print(f"evaluate: --out: {args.out} is a directory; give a file name ending in .csv (a .json of the "
              f"metrics is written beside it)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not _tracking(args, "evaluate"):
        return EXIT_BAD_INPUT
    data = Path(args.data) if args.data else D.BUILTIN_DIR / D.BUILTIN_FILES["eval"]
    try:
        if not data.is_file():
            raise D.DataError(f"no such file: {data}")
        D.check_file(data, "preference")
    except D.DataError as e:
        print(f"evaluate: --data: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if RUN_ID.match(args.target):
            loaded = trained.load_run(args.target, results, args.base)
        else:
            problem = M.check_model_name(args.target, Path.cwd()) or (
                M.check_model_name(args.base, Path.cwd()) if args.base else None)
            if problem:
                raise trained.LoadError(problem)
            loaded = trained.load_models(args.target, args.base)
    except trained.LoadError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    config = loaded.config
    method = methods.get(config["method"]) if config.get("method") in methods.names() else None
    rows = D.read_rows(data)
    setup = E.Setup.standard(rows, max_length=config.get("data.max_length", args.max_length),
                             batch_size=config.get("eval.batch_size", 8),
                             probe_length=config.get("eval.probe_length", 32),
                             beta=config.get("dpo.beta") if method is not None and method.uses("dpo") else None)
    table, metrics = E.measure(loaded.model, loaded.tokenizer, setup, loaded.reference)
    default = f"{_file_name(loaded.label)}__{_file_name(data.stem)}.csv"
    out = Path(args.out) if args.out else results / "evaluations" / default
    try:
        E.write_table(table, out)
        out.with_suffix(".json").write_text(json.dumps(metrics, indent=1))
    except OSError as e:
        print(f"evaluate: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{loaded.label} on {data} ({len(rows)} pairs):")
    for key, value in metrics.items():
        print(f"  {key:36s} {value:.6g}")
    print(f"per-pair table: {out}")
    return 0


def _file_name(label: str) -> str:
    """A run or model label as one safe file name: run names are user text (a variant named `../../x` must
    not write outside results/), so anything but letters, digits, `.`, `_`, `-` becomes `_`, no leading dot,
    secrets masked first, at most 120 characters."""
    import re

    from harness.core.tracking import redact

    name = re.sub(r"[^A-Za-z0-9._-]+", "_", redact(label)).lstrip(".")[:120]
    return name or "unnamed"


def cmd_ui(args) -> int:
    from harness import ui

    return ui.serve(_results_dir(args), args.target, host=args.host, port=args.port, workers=args.workers,
                    allow_remote=args.allow_remote, job_runner=args.job_runner, open_browser=args.open)


def cmd_server(args) -> int:
    from harness.server import serve

    return serve(_results_dir(args), host=args.host, port=args.port, workers=args.workers,
                 allow_remote=args.allow_remote)


def cmd_metrics(args) -> int:
    from harness.core.metrics import markdown_table

    print(markdown_table())
    return 0


def cmd_cache_model(args) -> int:
    from experiments import models as M

    problem = M.check_model_name(args.name, Path.cwd())
    if problem or not (args.name in M.gguf.EMBEDDED or M.gguf.is_gguf(args.name)):
        print(f"cache-model: {problem or f'{args.name!r} is not an embedded model or a .gguf file'} (embedded: "
              f"{', '.join(M.gguf.EMBEDDED)})", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        print(M.materialise(args.name, Path.cwd()))
    except M.ModelError as e:
        print(f"cache-model: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def main(argv: list[str] | None = None) -> int:
    from harness.arguments import build_parser
    from harness.core.runs import DiskFullError, StoreError

    commands = {name.removeprefix("cmd_"): fn for name, fn in globals().items() if name.startswith("cmd_")}
    args = build_parser(commands, __doc__, LARGE_GRID).parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded file otherwise
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a "View run" link per run ended over HTTP
    try:
        return args.fn(args)
    except DiskFullError as e:  # not bad input: the same command works once there is space
        print(f"{args.command}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"{args.command}: disk full: {e}", file=sys.stderr)  # the runner recorded what it could
        return 1
    except StoreError as e:  # a damaged or unwritable store: said before anything trains, never a traceback
        print(f"{args.command}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # outside a run's loop (loading, pre-flight, after the summary): nothing to record
        print(f"{args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
