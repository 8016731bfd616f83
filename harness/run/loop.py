"""The loop of one `run_variants` / `run_stream` call: start variants in free slots, poll them, record outcomes.

Each pass: workers that exited are finished and their slots freed; pending variants start in order where a slot
is free (a stage's children wait for it and are BLOCKED if it did not finish; a variant with a FINISHED run is
SKIPPED; one another runner is training is waited for); in ask-and-tell mode the caller is asked for more while
slots are free. On Ctrl-C / SIGTERM (or a full disk) the running variants are stopped and end KILLED, the rest
NOT RUN.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import TextIO

from harness.core import runs as R
from harness.core.variant import Variant
from harness.run import spawn
from harness.run.claims import VariantClaims
from harness.run.finish import Finisher, Outcome, stop
from harness.run.launch import Active, Launcher
from harness.run.progress import Progress, outcome_line
from harness.run.signals import Signals


class Loop:
    """One call's variants, from pending through running to their outcomes (also written into `seen`, the
    session's outcomes). `stopped` is the interrupt or full disk that ended it early, if one did."""

    def __init__(self, pending: list[tuple[int, Variant]], *, claims: VariantClaims, launcher: Launcher,
                 finisher: Finisher, signals: Signals, child_tags: dict[str, dict], seen: dict[str, Outcome],
                 stream: TextIO, total: int | None,
                 next_variant: Callable[[], Variant | None] | None = None,
                 on_done: Callable[[Outcome], None] | None = None,
                 watch: Callable[[Active], str | None] | None = None):
        self.claims, self.launcher, self.finisher, self.signals = claims, launcher, finisher, signals
        self.child_tags = child_tags
        self.seen = seen
        self.stream = stream
        self.total = total
        self.next_variant, self.on_done, self.watch = next_variant, on_done, watch
        self.pending = pending  # (index, variant) not yet started, in order
        self.stages = {v.parent_id for _, v in pending if v.parent_id}  # variants whose children start from them
        self.counter = len(pending)  # variants seen so far: the total shown when the caller gives none
        self.outcomes: dict[str, Outcome] = {}
        self.stopped: BaseException | None = None
        self.progress: Progress | None = None

    def _record(self, index: int, o: Outcome) -> None:
        self.outcomes[o.variant.id] = self.seen[o.variant.id] = o
        self.progress.line(outcome_line(index, self.total or self.counter, o))
        if self.on_done is not None:
            self.on_done(o)

    def skip_finished(self) -> None:
        """Variants with a FINISHED run that stands for them are SKIPPED before anything starts."""
        for item in list(self.pending):
            done = self.claims.reusable(item[1], self.stages)
            if done:
                self.outcomes[item[1].id] = self.seen[item[1].id] = Outcome(item[1], "SKIPPED", done,
                                                                           reason="already FINISHED")
                self.pending.remove(item)

    def run(self, *, warm_up: bool) -> dict[str, Outcome]:
        pending, stages = self.pending, self.stages
        if warm_up and (pending or self.next_variant is not None):
            spawn.warm_up()  # the workers' server imports torch & co while the first variant's run is created
        free = list(range(len(self.launcher.slots)))
        active: dict[str, Active] = {}
        self.progress = progress = Progress(self.total or self.counter, self.stream)
        exhausted = self.next_variant is None
        self.signals.catch()
        try:
            while pending or active or not exhausted:
                self._poll(active, free)
                self._start_pending(pending, active, free, stages)
                while free and not pending and not exhausted:
                    v = self.next_variant()
                    if v is None:
                        exhausted = True
                        break
                    self.counter += 1
                    pending.append((self.counter, v))
                    if v.id in active:
                        break  # wait for the running copy, then answer this one from the store
                progress.refresh(list(active.values()))
                if active or pending:
                    time.sleep(0.25)
        except (KeyboardInterrupt, R.DiskFullError) as stopped:
            self.stopped = stopped
            self._stop_all(active, pending)
        finally:
            self.signals.release()
        return self.outcomes

    def _poll(self, active: dict[str, Active], free: list[int]) -> None:
        """Finish the variants whose workers exited; ask `watch` about the others (a reason stops one)."""
        for vid, act in list(active.items()):
            rc = act.proc.poll()
            if rc is None:
                reason = self.watch(act) if self.watch is not None and not act.stop_reason else None
                if reason:
                    act.stop_reason = reason
                    act.proc.send_signal(signal.SIGINT)
                continue
            free.append(act.slot)
            del active[vid]
            self._record(act.index, self.finisher.finish(act, rc, interrupted=False))

    def _start_pending(self, pending: list[tuple[int, Variant]], active: dict[str, Active], free: list[int],
                       stages: set[str]) -> None:
        for item in list(pending):
            i, v = item
            if v.parent_id:
                stage = self.outcomes.get(v.parent_id)
                if stage is None:
                    continue  # stage still pending or running
                if stage.status not in ("FINISHED", "SKIPPED"):
                    pending.remove(item)
                    self._record(i, Outcome(v, "BLOCKED", reason=f"its stage {stage.variant.run_name} "
                                                                 f"ended {stage.status}"))
                    continue
            if v.id in active:
                continue  # the same variant (a repeated search trial) is training: answer it after
            done = self.claims.reusable(v, stages)
            if done:
                pending.remove(item)
                self._record(i, Outcome(v, "SKIPPED", done, reason="already FINISHED"))
                continue
            if not free:
                break
            claim = self.claims.claim(v, stages, self.progress.line)
            if claim is False:
                continue  # another runner trains it: ask again on the next pass
            if claim is not True:
                pending.remove(item)
                self._record(i, Outcome(v, "SKIPPED", claim, reason="FINISHED by another runner"))
                continue
            slot = free.pop(0)
            self.progress.line(f"[{i}/{self.total or self.counter}] start {v.run_name} ({v.id})")
            active[v.id] = self.launcher.launch(v, i, slot, v.id in stages, self.child_tags.get(v.id, {}))
            pending.remove(item)

    def _stop_all(self, active: dict[str, Active], pending: list[tuple[int, Variant]]) -> None:
        """After an interrupt or a full disk: the running variants end KILLED, the pending ones NOT RUN."""
        interrupted = isinstance(self.stopped, KeyboardInterrupt)
        self.signals.shield(lambda: [act.proc for act in active.values()])  # a second Ctrl-C must not break this
        self.progress.line(f"{'interrupted' if interrupted else self.stopped}: stopping running variants (they end "
                           f"KILLED)...")
        for act in active.values():
            stop(act.proc)
        for act in active.values():
            o = self.finisher.finish(act, act.proc.wait(), interrupted=True)
            self.outcomes[o.variant.id] = self.seen[o.variant.id] = o
            self.progress.line(outcome_line(act.index, self.total or self.counter, o))
            if self.on_done is not None:
                self.on_done(o)
        for _, v in pending:
            self.outcomes[v.id] = self.seen[v.id] = o = Outcome(v, "NOT RUN", reason="interrupted" if
                                                                interrupted else "disk full")
            if self.on_done is not None:
                self.on_done(o)
