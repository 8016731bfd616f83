"""Which variants this runner trains: finished ones are answered from the store, the rest are claimed first.

Several runners may share one results folder (two terminals, a grid and a search): each variant is trained
once. Before training a variant a runner takes its claim (a lock file under results/runs, `harness.core.runs.
Claims`) and holds it while the worker runs; a variant another runner holds is waited for and then answered
from the store.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness.core import runs as R
from harness.core.variant import Variant
from harness.run.ends import RunEnds


class VariantClaims:
    """The finished runs this session may answer from, and the claims of the variants it trains.

    `reusable(v)` says whether a FINISHED run stands for `v` already; `claim(v)` takes it for this runner (or
    says another has it, or has finished it since); `release(v.id)` gives it back once its run has ended.
    """

    def __init__(self, store: R.Store, experiment_id: str, runs_dir: Path, ends: RunEnds, *, force: bool,
                 opened_ms: int):
        self.store = store
        self.exp = experiment_id
        self.runs_dir = runs_dir
        self.ends = ends
        self.force = force
        self.opened_ms = opened_ms  # with --force, only a run started after the session opened counts
        self.finished: dict[str, str] = {} if force else store.finished(experiment_id)  # variant id -> run id
        self.locks = R.Claims(runs_dir)  # several runners on one results folder train each variant once
        self._waiting: set[str] = set()  # variants another runner is training (said once each)

    def _stage_ready(self, v: Variant, stages: set[str]) -> bool:
        """A stage's run stands for it only with its weights on disk (its children start from them)."""
        return v.id not in stages or (self.runs_dir / v.id / "model" / "config.json").is_file()

    def reusable(self, v: Variant, stages: set[str]) -> str | None:
        """Run id of a FINISHED run of this variant that can stand for it (a stage also needs its weights)."""
        done = self.finished.get(v.id)
        return done if done and self._stage_ready(v, stages) else None

    def claim(self, v: Variant, stages: set[str], say: Callable[[str], None]) -> bool | str:
        """Claim `v` for this runner before training it. True: train it. False: another runner on this results
        folder is training it; wait (said once) and ask again. A run id: another runner finished it since,
        answer from the store (with --force, only a run started after this session opened counts)."""
        self.ends.guard()
        if not self.locks.take(v.id):
            if v.id not in self._waiting:
                self._waiting.add(v.id)
                say(f"waiting: {v.run_name} ({v.id}) is being trained by another runner "
                    f"({self.locks.holder(v.id)}); it will be answered from the store")
            return False
        done = self.store.finished_since(self.exp, v.id, self.opened_ms if self.force else 0)
        if done and self._stage_ready(v, stages):
            self.locks.release(v.id)
            self.finished[v.id] = done
            return done
        return True

    def fd(self, variant_id: str) -> int:
        """The claim's open file: a local worker holds a copy, so the claim lasts as long as the worker."""
        return self.locks.fd(variant_id)

    def release(self, variant_id: str) -> None:
        self.locks.release(variant_id)

    def finish(self, variant_id: str, run_id: str) -> None:
        """`variant_id` finished as `run_id` in this session: a later request for it is answered from there."""
        self.finished[variant_id] = run_id
