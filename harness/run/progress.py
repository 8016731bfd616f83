"""What a person watching a run sees: a live view of the running variants (step, loss, ETA), one line per
start and end, and the outcome table at the end. Redraws in place on a terminal; prints lines otherwise
(CI logs, files). Everything printed goes through `redact`.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Protocol, TextIO

from harness.core.tracking import redact


class _Running(Protocol):
    """What the view needs of a running variant (the executor's `Active`)."""

    index: int
    started: float
    state: dict

    @property
    def variant(self): ...


class Progress:
    """A live view of the grid: variant i/N, step, loss, ETA. Redraws on a terminal, prints lines otherwise."""

    def __init__(self, total: int, stream: TextIO | None = None, interval: float = 10.0):
        self.total = total
        self.stream = stream or sys.stderr  # looked up now, not at import, so redirection is honoured
        self.tty = self.stream.isatty()
        self.interval = interval
        self.drawn = 0
        self.last_line: dict[str, tuple[float, int | None]] = {}

    def _status(self, act: _Running) -> str:
        s = act.state
        step, max_steps = s.get("step", 0), s.get("max_steps")
        elapsed = time.monotonic() - act.started
        parts = [f"[{act.index}/{self.total}] {act.variant.run_name}"]
        if s.get("event") is None:
            parts.append("starting")
        elif max_steps:
            parts.append(f"step {step}/{max_steps}")
            if s.get("loss") is not None:
                parts.append(f"loss {s['loss']:.4f}")
            rate = s.get("elapsed", 0) / step if step else None
            if rate:
                parts.append(f"eta {hms(rate * (max_steps - step))}")
        else:
            parts.append(s.get("event", ""))
        parts.append(f"({hms(elapsed)})")
        return " ".join(parts)

    def line(self, text: str) -> None:
        self._clear()
        print(redact(text), file=self.stream, flush=True)

    def refresh(self, active: list[_Running]) -> None:
        if self.tty:
            self._clear()
            lines = [redact(self._status(a)) for a in active]
            for text in lines:
                print(text[: shutil.get_terminal_size().columns - 1], file=self.stream)
            self.stream.flush()
            self.drawn = len(lines)
            return
        now = time.monotonic()
        for a in active:
            if not a.state.get("max_steps"):
                continue
            last_time, last_step = self.last_line.get(a.variant.id, (0.0, None))
            moved = a.state.get("step") != last_step
            # a line per new step at most every `interval` seconds; a heartbeat each minute otherwise
            if (moved and now - last_time >= self.interval) or now - last_time >= 60:
                self.last_line[a.variant.id] = (now, a.state.get("step"))
                print(redact(self._status(a)), file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def outcome_line(i: int, n: int, o) -> str:
    text = f"[{i}/{n}] {o.status.lower()} {o.variant.run_name}"
    if o.status in ("FINISHED", "FAILED", "KILLED"):
        text += f" in {hms(o.seconds)}"
    if o.reason:
        text += f": {o.reason}"
    return text


def summary_table(outcomes: list) -> str:
    rows = [("status", "variant", "id", "steps", "time", "run id / reason")]
    for o in outcomes:
        detail = o.reason if o.status not in ("FINISHED", "SKIPPED") else (o.run_id or "")
        rows.append((o.status, o.variant.run_name, o.variant.id, "" if o.steps is None else str(o.steps),
                     hms(o.seconds) if o.seconds else "", detail))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(5)) + "  " + r[5] for r in rows]
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in counts.items()))
    return "\n".join(lines)
