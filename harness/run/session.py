"""Runs variants: each in its own process, tracked in MLflow, resumable, failure-isolated.

    python -m harness run configs/two_round.yaml [--force] [--jobs N]

The seam is `Session`: open the store and a parent run, `run_variants(variants) -> outcomes` as many times
as the caller likes, close. A grid (`run_grid`) calls it once with every variant; a search calls it with one
trial's variant at a time. Within a session:

- A parent MLflow run per invocation, a nested child run per variant (named by its readable name,
  tagged with its id). Variants with a FINISHED run of the same id are skipped unless --force (also those
  finished earlier in the same session).
- RUNNING runs left by an executor that died on this host are marked FAILED (tagged recovered).
- A variant that fails ends FAILED with its reason and traceback; the rest go on. Children of a
  failed stage are not run. Ctrl-C / SIGTERM end the running variants as KILLED.
- One variant per GPU when there are several; one at a time otherwise (`jobs` for more, the CPU's cores split
  between them). Workers are forked from a warm server that imported torch & co once (harness.run.spawn).
- Or, given a `backend` (harness.run.ray: `--executor ray`), each variant is a task on a Ray cluster; the
  backend decides how many run at once and hands back the same kind of worker object, so everything above
  holds there too.

The parts, each in its own module: which variants to train (claims), starting one (launch), reading its output
(events), what its exit comes to (finish), the loop that drives them (loop), signals while they run (signals),
runs that must end even on a full disk (ends), and what the runs carry for the MLflow UI (describe).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from harness.core import provenance
from harness.core import runs as R
from harness.core.tracking import MlflowTracker, default_tracking_uri, is_disk_full, redact
from harness.core.variant import Variant
from harness.run import describe
from harness.run.claims import VariantClaims
from harness.run.ends import RunEnds, first_line
from harness.run.finish import Finisher, Outcome
from harness.run.launch import Active, Backend, Launcher, slots, threads_per_slot
from harness.run.loop import Loop
from harness.run.progress import summary_table
from harness.run.race import Race
from harness.run.signals import Signals

EXIT_OK, EXIT_FAILURES, EXIT_INTERRUPT = 0, 1, 130
__all__ = ["Active", "Backend", "Outcome", "Session", "run_grid"]  # what the grid, the search and Ray use


class Session:
    """One invocation against the store: an experiment, a parent run, and the variants run under it.

        with Session("two_round", results_dir, parent_name=..., kind="grid") as session:
            outcomes = session.run_variants(grid.variants)
        return session.exit_code
    """

    def __init__(self, experiment: str, results_dir: Path, *, parent_name: str | None = None,
                 kind: str = R.KIND_GRID, parent_tags: dict | None = None, parent_params: dict | None = None,
                 parent_files: dict[str, str] | None = None, force: bool = False, jobs: int | None = None,
                 stream: TextIO | None = None, reuse_parent: str | None = None, backend: Backend | None = None):
        self.experiment_name = experiment
        self.results_dir = results_dir.resolve()
        self.runs_dir = self.results_dir / "runs"
        self.force = force
        self.jobs = jobs
        self.stream = stream or sys.stderr  # looked up now, not at import, so redirection is honoured
        self.uri = default_tracking_uri(self.results_dir)
        self.store = R.Store(self.uri, self.results_dir / "artifacts")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.parent_name = parent_name or f"{experiment}@{stamp}"
        self.kind = kind
        self.parent_tags = parent_tags or {}
        self.parent_params = parent_params or {}
        self.parent_files = parent_files or {}
        self.outcomes: dict[str, Outcome] = {}  # every variant this session saw, in order
        self.interrupted = False
        self.exp = ""
        self.parent_run = ""
        self.parent: MlflowTracker | None = None
        self.reuse_parent = reuse_parent  # continue this parent run (a resumed search) instead of a new one
        self.child_tags: dict[str, dict] = {}  # variant id -> extra tags for its run (a search's trial number)
        self.backend = backend  # None: worker processes on this machine (harness.run.spawn)
        self._slots = backend.slots(jobs) if backend is not None else slots(jobs)
        self._threads = None if backend is not None else threads_per_slot(self._slots)
        self.ends = RunEnds(self.store, self.results_dir)  # a full disk: what it stopped
        self.signals = Signals(self.stream)
        self.claims: VariantClaims | None = None  # the parts that need the experiment are made as it opens
        self.launcher: Launcher | None = None
        self.finisher: Finisher | None = None

    # -------------------------------------------------------- open / close

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.parent is not None:  # opened: never leave the parent run RUNNING, even on a crash
            self.close(crashed=exc_type is not None)

    def _base_tags(self) -> dict:
        executor = self.backend.name if self.backend is not None else "local"
        return {R.TAG_GRID: self.experiment_name, R.TAG_EXECUTOR: executor, **provenance.tags()}

    def open(self) -> Session:
        try:
            return self._open()
        except Exception as e:
            if not is_disk_full(e):
                raise
            if self.parent_run:
                self.ends.end(self.parent_run, "FAILED")
            raise R.DiskFullError(self.results_dir, first_line(e)) from None

    def _open(self) -> Session:
        opened_ms = int(time.time() * 1000)
        if self.store.reanchored:
            print(f"note: {self.store.reanchored}", file=self.stream)
        self.exp = self.store.experiment(self.experiment_name)
        recovered = self.store.recover_orphans(self.exp)
        if recovered:
            print(f"marked {len(recovered)} orphaned RUNNING run(s) FAILED (their executor died)", file=self.stream)
        self.claims = VariantClaims(self.store, self.exp, self.runs_dir, self.ends, force=self.force,
                                    opened_ms=opened_ms)
        tags = {**self._base_tags(), R.TAG_KIND: self.kind, **self.parent_tags}
        if self.reuse_parent and self.store.reopen_run(self.reuse_parent, tags):
            self.parent_run = self.reuse_parent
        else:
            self.parent_run = self.store.start_run(self.exp, self.parent_name, tags)
        self.parent = MlflowTracker(self.uri, self.parent_run)
        for name, text in self.parent_files.items():
            self.parent.log_text(text, name)
        if self.parent_run != self.reuse_parent:  # params are immutable: a reopened run keeps its first ones
            self.parent.log_params({**self.parent_params, "force": self.force})
        self.launcher = Launcher(uri=self.uri, store=self.store, experiment_id=self.exp, parent_run=self.parent_run,
                                 results_dir=self.results_dir, base_tags=self._base_tags(), slots=self._slots,
                                 threads=self._threads, backend=self.backend, claims=self.claims, ends=self.ends)
        self.finisher = Finisher(self.uri, self.stream, self.claims, self.ends)
        return self

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPT
        return EXIT_FAILURES if self.failed() or self.ends.disk_full else EXIT_OK

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.status in ("FAILED", "BLOCKED")]

    def close(self, *, crashed: bool = False) -> None:
        """Log the outcome table to the parent run and end it (KILLED, FAILED or FINISHED)."""
        ordered = list(self.outcomes.values())
        summary = summary_table(ordered)
        print("\n" + redact(summary), file=self.stream, flush=True)
        assert self.parent is not None
        try:
            status = "KILLED" if self.interrupted else (
                "FAILED" if self.failed() or crashed or self.ends.disk_full else "FINISHED")
            try:
                self.parent.log_text(summary, R.SUMMARY_ARTIFACT)
            except Exception as e:
                if not is_disk_full(e):
                    raise
                self.ends.seen(e)
            if not self.ends.disk_full:
                self._describe(ordered)
            self.ends.end(self.parent_run, status)
            if self.ends.disk_full:
                left = (f"{len(self.ends.unmarked)} run(s) could not be marked and stay RUNNING: once there is "
                        f"space, the next `harness run` marks them FAILED and reruns their variants"
                        if self.ends.unmarked else "every run was marked")
                print(f"{self.ends.disk_full}; {left}", file=self.stream, flush=True)
        finally:
            self.signals.lift(self.interrupted)

    def _describe(self, ordered: list[Outcome]) -> None:
        """The parent run's table of its variants and the experiment's saved view (`describe`)."""
        members = [describe.Member(o.variant.run_name, o.status, o.run_id, o.reason) for o in ordered]
        hint = (f"The writeup with figures: `python -m harness report {self.experiment_name}` writes it and logs "
                f"`report/report.html` to this run.")
        try:
            describe.after_invocation(self.uri, self.exp, self.parent_run, self.experiment_name, members, hint)
        except Exception as e:  # noqa: BLE001
            if is_disk_full(e):
                self.ends.seen(e)
            else:
                print(f"note: could not describe the parent run ({first_line(e)})", file=self.stream, flush=True)

    # -------------------------------------------------------- running variants

    def run_variants(self, variants: list[Variant], *,
                     watch: Callable[[Active], str | None] | None = None) -> list[Outcome]:
        """Run these variants (stages before their children), skipping finished ones; returns their outcomes
        in the order given. On Ctrl-C / SIGTERM the running ones end KILLED, the rest NOT RUN, and
        `self.interrupted` is set. `watch` as in `run_stream` (a race stops the variants it leaves behind)."""
        loop = self._loop(list(enumerate(variants, 1)), total=len(variants), watch=watch)
        loop.skip_finished()
        n = len(loop.pending) + len(loop.outcomes)
        print(f"{self.experiment_name}: {n} variant{'s' if n != 1 else ''}, {len(loop.outcomes)} already finished, "
              f"{len(loop.pending)} to run — tracking {self.store.uri_for_display()} "
              f"(experiment {self.experiment_name!r})", file=self.stream, flush=True)
        if self._threads == 1 and len(loop.pending) > 1:
            print(f"note: {len(self._slots)} variants at once on the CPU leave each one torch thread; "
                  "training and measuring are compute, so on a small CPU this is no faster than one at a time "
                  "(results/benchmarks/README.md)", file=self.stream, flush=True)
        outcomes = self._run(loop)
        return [outcomes[v.id] for v in variants]

    def run_stream(self, next_variant: Callable[[], Variant | None], *,
                   on_done: Callable[[Outcome], None] | None = None,
                   watch: Callable[[Active], str | None] | None = None, total: int | None = None) -> list[Outcome]:
        """Ask-and-tell: whenever a slot is free, `next_variant()` gives the next variant to run (None: no
        more); `on_done(outcome)` hears each as it ends (a finished variant is answered from the store as
        SKIPPED, without training). `watch(active)` is called while a variant runs; a reason it returns stops
        that variant, which ends PRUNED (KILLED in MLflow, the reason in its tags)."""
        loop = self._loop([], total=total, next_variant=next_variant, on_done=on_done, watch=watch)
        return list(self._run(loop).values())

    def _loop(self, pending: list[tuple[int, Variant]], **how) -> Loop:
        assert self.launcher is not None, "open the session first"
        return Loop(pending, claims=self.claims, launcher=self.launcher, finisher=self.finisher,
                    signals=self.signals, child_tags=self.child_tags, seen=self.outcomes, stream=self.stream, **how)

    def _run(self, loop: Loop) -> dict[str, Outcome]:
        outcomes = loop.run(warm_up=self.backend is None)
        if loop.stopped is not None:
            self.interrupted = isinstance(loop.stopped, KeyboardInterrupt)
        return outcomes


def run_grid(grid, results_dir: Path, *, force: bool = False, jobs: int | None = None,
             stream: TextIO | None = None, argv: list[str] | None = None, backend: Backend | None = None,
             race: Race | None = None, tags: dict[str, str] | None = None) -> int:
    """Every variant of a grid under one parent run (raced when `race` is given). Returns the exit code."""
    extra = {**(tags or {}), **({R.TAG_RACE: race.describe()} if race is not None else {})}
    session = Session(grid.name, results_dir, force=force, jobs=jobs, stream=stream, backend=backend,
                      parent_tags={R.TAG_VARIANT_COUNT: len(grid.variants), R.TAG_ARGV: " ".join(argv or []), **extra},
                      parent_params={"grid": grid.name, "variants": len(grid.variants)},
                      parent_files={f"grid/{grid.path.name}": grid.path.read_text()})
    with session:
        if race is not None:
            print(race.describe(), file=session.stream, flush=True)
        session.run_variants(grid.variants, watch=race.watch if race is not None else None)
    return session.exit_code
