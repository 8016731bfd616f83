"""Optuna search over any variant field: one objective or a Pareto front, pruned, resumable, parallel, tracked.

    python -m harness search configs/search_beta_lr.yaml [--trials N] [--workers K] [--timeout S]
                             [--export best.yaml] [--storage URL]

A search file is a grid file with one variant (its `defaults:` and at most one `variants:` entry, no axes)
plus a `search:` block:

    search:
      space:                                  # any variant field, by its dotted key
        dpo.beta: {log: [0.01, 1.0]}          # log-uniform float
        train.learning_rate: {log: [1.0e-6, 1.0e-3]}
        lora.rank: {choice: [4, 8, 16]}       # categorical
        data.size: {int: [4, 48]}             # uniform integer (also {float: [a, b]})
      objectives:                             # one, or two for a Pareto front
        - {metric: eval/margin_shift_mean}    # direction from the metric catalogue (maximize here)
        - {metric: drift/kl_mean, direction: minimize}
      constraint: {metric: drift/kl_mean, max: 1.0e-4}   # optional: feasible trials only win
      sampler: tpe                            # tpe (default), nsga2, random
      pruner: median                          # median or none (default: median when eval.every is set)
      trials: 8                               # trials the study should hold (a rerun continues to this many)
      seed: 0                                 # sampler seed

Every trial is an ordinary variant, run through the executor's ask-and-tell seam (`Session.run_stream`): its
own process, id, metrics and artifacts, a nested MLflow run under the study's one parent run, tagged with the
study and trial number. A trial whose variant already finished (same id) is answered from the store. The
study lives in Optuna's JournalStorage (`results/search/<name>.journal`), which survives Ctrl-C and kill -9
and is safe for several processes on one machine; `--storage postgresql://...` shares a study between
machines. Pruning reads the held-out margin shift measured every `eval.every` steps.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from harness import grid as G
from harness.core import runs as R
from harness.core.schema import deep_merge, unflatten
from harness.core.tracking import MlflowTracker, redact
from harness.core.variant import Variant, run_name
from harness.run.session import Active, Outcome, Session
from harness.searchfile import INTERMEDIATE, Dimension, SearchSpec

# ---------------------------------------------------------------- the study


class SearchError(Exception):
    """A search that cannot start (a bad --timeout, a --storage URL that cannot be opened, a file that is not a
    journal): one line for the user, said before any trial or run is created."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return redact(text.splitlines()[0] if text else type(e).__name__)


def storage_for(spec: SearchSpec, results_dir: Path, url: str | None):
    """(Optuna storage, description logged with the study). A journal file under results/ by default.
    Raises SearchError, naming the URL (password masked) or the file, for a storage that cannot be opened."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url:
        try:
            return optuna.storages.RDBStorage(url), redact(url)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy raises a type per dialect and failure
            raise SearchError(f"--storage {redact(url)}: cannot open it ({_first_line(e)}); expected a database "
                               f"URL SQLAlchemy can reach, e.g. sqlite:////abs/path/study.db (its folder must exist) "
                               f"or postgresql://user@host/db (needs a driver such as psycopg2)") from None
    folder = results_dir / "search"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.name}.journal"
    # an open()-based lock: works on file systems without symlinks, and stale locks time out
    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path) + ".lock"))
    try:
        return JournalStorage(backend), f"journal:{path.relative_to(results_dir)}"
    except ValueError as e:  # json.JSONDecodeError, or a record Optuna does not know: the log is replayed here
        raise SearchError(f"{path}: not an Optuna journal ({_first_line(e)}); the search keeps its study there: "
                           f"move the file away, or give another --storage") from None


def _sampler(spec: SearchSpec):
    import optuna

    constraints = None
    if spec.constraint is not None:
        limit = spec.constraint[1]
        # pruned or failed trials have no value: count them as infeasible
        constraints = lambda t: [t.user_attrs.get("constraint_value", math.inf) - limit]  # noqa: E731
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed, constraints_func=constraints,
                                             population_size=max(4, min(50, spec.trials // 2)))
    # few trials here: start modelling after a third of them (Optuna's default waits for 10)
    return optuna.samplers.TPESampler(seed=spec.seed, constraints_func=constraints,
                                      n_startup_trials=max(2, min(10, spec.trials // 3)))


def _pruner(spec: SearchSpec):
    import optuna

    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if spec.pruner == "threshold":  # a trial whose held-out shift is below `lower` (or above `upper`) stops
        return optuna.pruners.ThresholdPruner(**spec.threshold)
    return optuna.pruners.NopPruner()


def open_study(spec: SearchSpec, storage):
    import optuna

    return optuna.create_study(study_name=spec.name, storage=storage, load_if_exists=True,
                               directions=[o.direction for o in spec.objectives], sampler=_sampler(spec),
                               pruner=_pruner(spec))


def fail_orphaned_trials(study, stream: TextIO) -> int:
    """RUNNING trials whose process on this host is gone (kill -9, a crash): told FAIL so the study goes on."""
    from optuna.trial import TrialState

    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and not R.alive(int(t.user_attrs.get("pid", 0))):
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)  # noqa: SLF001
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            n += 1
    if n:
        print(f"marked {n} trial(s) FAIL whose search process died mid-trial", file=stream)
    return n


def counted(study) -> int:
    """Trials that count toward `trials`: ended, and not cut short by an interruption."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if not t.user_attrs.get("interrupted"))


def trial_variant(spec: SearchSpec, params: dict, number: int) -> Variant:
    """The variant a trial's parameters make: the grid pipeline on the base with the values put in."""
    raw = G.RawGrid(**{**spec.raw.__dict__, "defaults": deep_merge(spec.raw.defaults, unflatten(params))})
    errors: list[str] = []
    candidates = G.expand(raw, errors)
    paths = G.check(raw, candidates, errors, check_data=False)
    if errors:  # bounds were validated up front; a value inside them should not fail
        raise G.GridError(errors)
    variant = G.identify(raw, candidates, paths).variants[0]
    label = run_name(variant.spec, {d.key for d in spec.space})
    return dataclasses.replace(variant, run_name=f"t{number}·{label}")


def _suggest_params(trial, space: list[Dimension]) -> dict:
    out = {}
    for d in space:
        if d.kind == "choice":
            out[d.key] = trial.suggest_categorical(d.key, list(d.values))
        elif d.kind == "int":
            out[d.key] = trial.suggest_int(d.key, int(d.values[0]), int(d.values[1]))
        else:
            out[d.key] = trial.suggest_float(d.key, float(d.values[0]), float(d.values[1]), log=d.kind == "log")
    return out


@dataclass
class _Running:
    trial: Any  # optuna.trial.Trial
    reported: set[int] = field(default_factory=set)


class Search:
    """Drives one invocation: asks Optuna for trials, hands their variants to a `Session`, tells the results."""

    def __init__(self, spec: SearchSpec, results_dir: Path, *, trials: int | None = None, workers: int = 1,
                 timeout: float | None = None, storage_url: str | None = None, force: bool = False,
                 stream: TextIO | None = None, argv: list[str] | None = None, backend=None):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.spec = spec
        self.results_dir = results_dir
        self.target = trials or spec.trials
        self.workers = workers
        self.timeout = timeout
        self.stream = stream or sys.stderr
        if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
            raise SearchError(f"--timeout: expected a positive number of seconds, got {timeout:g}")
        self.storage, self.storage_text = storage_for(spec, results_dir, storage_url)
        self.study = open_study(spec, self.storage)
        self.force = force
        self.argv = argv or []
        self.backend = backend  # None: trials run as processes here; else a Session backend (Ray)
        self.running: dict[str, list[_Running]] = {}  # variant id -> trials waiting for it, oldest first
        self.asked = 0
        self.started = 0.0

    def _next(self) -> Variant | None:
        import time

        if counted(self.study) + self.asked >= self.target:
            return None
        if self.timeout is not None and time.monotonic() - self.started > self.timeout:
            print(f"search: --timeout {self.timeout:g}s reached; no new trials", file=self.stream)
            return None
        trial = self.study.ask()
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = _suggest_params(trial, self.spec.space)
        variant = trial_variant(self.spec, params, trial.number)
        trial.set_user_attr("variant_id", variant.id)
        self.session.child_tags[variant.id] = {R.TAG_STUDY: self.spec.name, R.TAG_TRIAL: trial.number}
        self.running.setdefault(variant.id, []).append(_Running(trial))
        self.asked += 1
        return variant

    def _watch(self, act: Active) -> str | None:
        """Report each new intermediate held-out shift to the trial, in step order; a reason to stop if pruned."""
        waiting = self.running.get(act.variant.id)
        if not waiting or self.spec.pruner == "none":
            return None
        run = waiting[0]
        for point in list(act.state.get("intermediates", [])):
            step = int(point["step"])
            if step in run.reported:
                continue
            run.reported.add(step)
            value = point[INTERMEDIATE]
            run.trial.report(value, step)
            if run.trial.should_prune():
                return f"pruned by the {self.spec.pruner} pruner at step {step} (held-out margin shift {value:+.3g})"
        return None

    def _done(self, outcome: Outcome) -> None:
        from optuna.trial import TrialState

        waiting = self.running.get(outcome.variant.id)
        if not waiting:
            return
        run = waiting.pop(0)
        trial, number = run.trial, run.trial.number
        self.asked -= 1
        state, values = TrialState.FAIL, None
        if outcome.status in ("FINISHED", "SKIPPED") and outcome.run_id:
            metrics = self.session.store.client.get_run(outcome.run_id).data.metrics
            values = self.spec.values_of(metrics)
            if self.spec.constraint is not None and metrics.get(self.spec.constraint[0]) is not None:
                trial.set_user_attr("constraint_value", metrics[self.spec.constraint[0]])
            state = TrialState.COMPLETE if values is not None else TrialState.FAIL
            if values is None:
                trial.set_user_attr("failure", "an objective metric is missing or not finite")
        elif outcome.status == "PRUNED":
            state = TrialState.PRUNED
        else:
            trial.set_user_attr("failure", f"{outcome.status}: {outcome.reason}"[:1000])
            if outcome.status in ("KILLED", "NOT RUN"):
                trial.set_user_attr("interrupted", True)
        if outcome.run_id:
            trial.set_user_attr("run_id", outcome.run_id)
            trial.set_user_attr("reused", outcome.status == "SKIPPED")
        self.study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
        if outcome.run_id and outcome.status != "SKIPPED":
            tracker = MlflowTracker(self.session.uri, outcome.run_id)
            tracker.set_tags({R.TAG_TRIAL_STATE: state.name})
            if values is not None:
                tracker.log_metrics({f"search/objective_{i}": v for i, v in enumerate(values)})
        shown = ", ".join(f"{o.metric} {v:+.4g}" for o, v in zip(self.spec.objectives, values or [], strict=False))
        print(f"trial {number}: {state.name}" + (f" ({shown})" if shown else "")
              + (" — answered from the store" if outcome.status == "SKIPPED" else ""), file=self.stream, flush=True)

    def run(self) -> int:
        import time

        fail_orphaned_trials(self.study, self.stream)
        parent_id = self.study.user_attrs.get("mlflow_parent_run")
        space = {d.key: {d.kind: list(d.values)} for d in self.spec.space}
        self.session = Session(
            self.spec.name, self.results_dir, kind=R.KIND_SEARCH, jobs=self.workers, stream=self.stream,
            backend=self.backend,
            force=self.force, parent_name=f"{self.spec.name} (search)", reuse_parent=parent_id,
            parent_tags={R.TAG_STUDY: self.spec.name, R.TAG_STORAGE: self.storage_text, R.TAG_ARGV: " ".join(self.argv)},
            parent_params={"study": self.spec.name, "sampler": self.spec.sampler, "pruner": self.spec.pruner,
                           "objectives": ", ".join(f"{o.direction} {o.metric}" for o in self.spec.objectives),
                           "trials": self.target},
            parent_files={f"search/{self.spec.raw.path.name}": self.spec.text,
                          "search/space.yaml": yaml.safe_dump(space, sort_keys=False)})
        self.session.child_tags = {}
        before = counted(self.study)
        print(f"search {self.spec.name}: {before} trial(s) in the study, {max(0, self.target - before)} to run "
              f"({self.workers} at a time) — study in {self.storage_text}", file=self.stream, flush=True)
        self.started = time.monotonic()
        with self.session:
            if parent_id is None:
                self.study.set_user_attr("mlflow_parent_run", self.session.parent_run)
            self.session.run_stream(self._next, on_done=self._done, watch=self._watch,
                                    total=max(1, self.target - before))
            best = best_table(self.study, self.spec)
            print("\n" + best, file=self.stream, flush=True)
            assert self.session.parent is not None
            self.session.parent.log_text(best, "search/best.txt")
        if self.session.interrupted:
            return self.session.exit_code
        return 0 if best_trials(self.study, self.spec) else 1  # failed trials are results; no result is not


# ---------------------------------------------------------------- results


def best_trials(study, spec: SearchSpec) -> list:
    """The best trial (one objective) or the Pareto set (two), feasible ones only when there is a constraint."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    if spec.constraint is not None:
        feasible = [t for t in complete if t.user_attrs.get("constraint_value", math.inf) <= spec.constraint[1]]
        if not feasible:
            return []
    return sorted(study.best_trials, key=lambda t: t.number)


def best_table(study, spec: SearchSpec) -> str:
    best = best_trials(study, spec)
    if not best:
        return "no trial completed" + (" within the constraint" if spec.constraint else "") + " yet"
    header = ["trial", *[o.metric for o in spec.objectives], *[d.key for d in spec.space], "run id"]
    rows = [header] + [[str(t.number), *[f"{v:+.4g}" for v in t.values],
                        *[_fmt(t.params.get(d.key)) for d in spec.space], t.user_attrs.get("run_id", "")]
                       for t in best]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    title = "best trial" if len(spec.objectives) == 1 else f"Pareto set ({len(best)} trials)"
    return title + ":\n" + "\n".join("  ".join(r[c].ljust(widths[c]) for c in range(len(header))).rstrip()
                                     for r in rows)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def export_grid(study, spec: SearchSpec, path: Path) -> Path:
    """A grid that `harness run` accepts and that reproduces the best trial(s): same fields, same variant ids."""
    best = best_trials(study, spec)
    if not best:
        raise G.GridError([f"{spec.name}: no completed trial to export"])
    base_name = spec.entry.get("name")
    variants = []
    for t in best:
        entry = deep_merge(spec.entry, unflatten(dict(t.params)))
        entry["name"] = f"{base_name or 'trial'}_t{t.number}"
        variants.append(entry)
    doc = {"name": f"{spec.name}_best",
           "description": f"best trial(s) of search {spec.name}: "
                          + ", ".join(f"{o.direction} {o.metric}" for o in spec.objectives),
           "defaults": spec.raw.defaults, "variants": variants}
    header = (f"# Exported by `python -m harness search {spec.raw.path} --export {path}` from study {spec.name}.\n"
              f"#   python -m harness run {path}\n")
    grid_dir = spec.raw.dir
    doc = _relocate_paths(doc, grid_dir, path.parent.resolve())
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return path


def _relocate_paths(doc: dict, src: Path, dst: Path) -> dict:
    """Data paths in the search file are relative to it; keep them pointing at the same files from `dst`."""
    def fix(section: dict) -> dict:
        data = section.get("data")
        if not isinstance(data, dict):
            return section
        out = dict(data)
        for key in ("train", "eval"):
            value = data.get(key)
            if isinstance(value, str) and value != "builtin" and not Path(value).is_absolute():
                out[key] = os.path.relpath(src / value, dst)
        return {**section, "data": out}

    return {**doc, "defaults": fix(doc["defaults"]), "variants": [fix(v) for v in doc["variants"]]}

