"""`harness run GRID --race`: stop a variant once its held-out shift is decisively below another's at the same step.

Every variant of a raced grid measures the held-out margin shift every `eval.every` optimiser steps (its
intermediate evaluation: the mean shift over the evaluation pairs, their standard deviation and their count). At
each such *look* the race forms a two-sided Student-t interval for that variant's mean shift at confidence
1 - alpha/K, where K is the number of looks the whole grid can make (every variant's, counted before it starts).
A variant is stopped at a step where its interval lies wholly below another variant's interval at the same step
(the *leader*: of those, the one with the highest lower bound). It ends KILLED, `harness.stopped` saying at which
step, with both intervals; the report lists it with that last interval instead of a final result.

The rule, and why it errs towards letting a variant run:
- Simultaneous coverage. K intervals at 1 - alpha/K each cover their true means all at once with probability at
  least 1 - alpha (Bonferroni, whatever their correlation). When they all do, two disjoint intervals order their
  true means, so every stop the race makes is right with probability at least 1 - alpha together, however many
  pairs of variants it compares.
- Disjoint intervals ask more than a test of the difference: for equal standard errors, two 95% intervals that do
  not overlap mean a difference significant at about p = 0.006; and the pairs are the same for both variants, so a
  paired test would be sharper still. A variant that is not stopped may well be worse.
- What it does not promise: an interval is about the shift *at that step*. A variant behind at step 4 could, in
  principle, overtake later; the race assumes the order of held-out shifts persists (as successive halving and
  ASHA do). Its benchmark checks whether the raced grid's top variant is the full grid's.

A stage (a variant another starts `from:`) is never stopped. Only variants trained in this invocation race: one
answered from the store (already FINISHED) has no intervals to compare. `harness.bench.race` times a grid with and
without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.05
PREFIX = "race: at step "  # how every reason the race gives begins


def verdict(reason: str) -> str | None:
    """What a run stopped for `reason` shows in the verdict column, if the race stopped it."""
    return f"stopped by --race at step {reason[len(PREFIX):].split()[0]}" if reason.startswith(PREFIX) else None


@dataclass(frozen=True)
class Look:
    """One variant's held-out shift at one step, with its interval."""

    step: int
    mean: float
    lo: float
    hi: float

    def text(self) -> str:
        return f"{self.mean:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}]"


def looks_of(steps: int, every: int | None) -> int:
    """How many intermediate evaluations a variant of `steps` optimiser steps makes (the last step is its final
    measurement, not a look)."""
    return (steps - 1) // every if every else 0


class Race:
    """The looks of every variant seen so far, and the rule. `watch(active)` is the session's watch hook."""

    def __init__(self, looks: int, *, alpha: float = ALPHA, keep: frozenset[str] = frozenset()):
        from scipy import stats  # here, not at import: `plan` and `validate` import the engine without it

        self.looks, self.alpha, self.keep = max(1, looks), alpha, keep
        self.confidence = 1 - alpha / self.looks
        self._t = lambda df: float(stats.t.ppf(1 - alpha / (2 * self.looks), df))
        self.points: dict[str, dict[int, Look]] = {}
        self.names: dict[str, str] = {}

    def look(self, point: dict) -> Look | None:
        n, sd, mean = point.get("n"), point.get("sd"), point.get("eval/margin_shift_mean")
        if not n or n < 2 or sd is None or mean is None or not math.isfinite(mean):
            return None
        half = self._t(n - 1) * sd / math.sqrt(n)
        return Look(int(point["step"]), mean, mean - half, mean + half)

    def watch(self, act) -> str | None:
        """Record the running variant's new looks; a reason to stop it if one is decisively behind."""
        vid = act.variant.id
        self.names[vid] = act.variant.run_name
        mine = self.points.setdefault(vid, {})
        for point in list(act.state.get("intermediates", [])):
            if int(point.get("step", 0)) not in mine:
                look = self.look(point)
                if look is not None:
                    mine[look.step] = look
        if vid in self.keep:
            return None
        for step in sorted(mine, reverse=True):
            leader = self.leader(step, vid)
            if leader is not None and mine[step].hi < leader[1].lo:
                return self.reason(mine[step], *leader)
        return None

    def leader(self, step: int, other_than: str) -> tuple[str, Look] | None:
        """The variant with the highest lower bound at `step`, other than `other_than`."""
        at = [(vid, pts[step]) for vid, pts in self.points.items() if vid != other_than and step in pts]
        return max(at, key=lambda item: item[1].lo) if at else None

    def reason(self, mine: Look, leader_id: str, theirs: Look) -> str:
        return (f"{PREFIX}{mine.step} its held-out margin shift {mine.text()} lies below "
                f"{self.names.get(leader_id, leader_id)}'s {theirs.text()} (Student-t intervals at "
                f"{100 * self.confidence:.3g}% confidence: alpha {self.alpha} shared by Bonferroni over the grid's "
                f"{self.looks} looks)")

    def describe(self) -> str:
        return (f"--race: alpha {self.alpha} over {self.looks} looks ({100 * self.confidence:.3g}% intervals); "
                f"a variant stops when its interval lies below another's at the same step")
