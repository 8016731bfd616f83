"""How runs end in the store, a full disk included.

A session ends runs from several places (a variant's finish, a launch that failed, the parent at close). On a
full disk an end may not fit: the run is then remembered as left RUNNING (the next `harness run` marks it FAILED
and reruns its variant) and the first full-disk error is kept, after which nothing more starts.
"""

from __future__ import annotations

from pathlib import Path

from harness.core import runs as R
from harness.core.tracking import is_disk_full


class RunEnds:
    """Ends runs, and keeps what a full disk stopped: `disk_full` (the first such error) and `unmarked` (runs
    whose end could not be recorded)."""

    def __init__(self, store: R.Store, results_dir: Path):
        self.store = store
        self.results_dir = results_dir
        self.disk_full: R.DiskFullError | None = None  # set when a write found no space: nothing more starts
        self.unmarked: list[str] = []  # runs whose end could not be recorded (left RUNNING: disk full)

    def seen(self, e: BaseException) -> None:
        """A write found the disk full (the first one is what is said)."""
        if self.disk_full is None:
            self.disk_full = R.DiskFullError(self.results_dir, first_line(e))

    def end(self, run_id: str, status: str) -> None:
        """End a run; on a full disk, remember it as left RUNNING instead of raising."""
        try:
            self.store.end_run(run_id, status)
        except Exception as e:
            if not is_disk_full(e):
                raise
            self.seen(e)
            self.unmarked.append(run_id)

    def guard(self) -> None:
        """Raise the full disk seen, if any: nothing more starts; the loop stops the rest as after an interrupt."""
        if self.disk_full is not None:
            raise self.disk_full


def first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__
