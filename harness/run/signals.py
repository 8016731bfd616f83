"""Signals while variants run: SIGTERM is taken as Ctrl-C, and a second one cannot break the shutdown.

While the loop runs, SIGTERM raises KeyboardInterrupt as Ctrl-C does: the running variants are stopped and end
KILLED. From that first interrupt until the session has recorded everything, a further Ctrl-C or SIGTERM no
longer raises (it would leave runs RUNNING): it kills the running workers at once instead of waiting for them
to stop, and they still end KILLED. After an interrupted session closes, both stay ignored: the process is on
its way out, and people press Ctrl-C several times.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import TextIO

from harness.run import spawn


class Signals:
    """`catch()` as the loop starts, `release()` as it ends; `shield(...)` at the first interrupt; `lift(...)`
    once everything is recorded."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._old_term = None  # SIGTERM's handler before the loop
        self._unshielded: dict[int, object] = {}  # handlers to restore once an interrupted session closes

    def catch(self) -> None:
        self._old_term = signal.signal(signal.SIGTERM, _raise_interrupt)

    def release(self) -> None:
        if not self._unshielded:
            signal.signal(signal.SIGTERM, self._old_term)

    def shield(self, running: Callable[[], Iterable[spawn.Worker]]) -> None:
        """From here until `lift`, a further Ctrl-C or SIGTERM kills the `running()` workers instead of raising."""
        def again(signum, frame):
            print("interrupted again: killing the running variants now (they still end KILLED)", file=self.stream,
                  flush=True)
            for proc in list(running()):
                if proc.poll() is None:
                    proc.kill()

        self._unshielded = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: self._old_term}
        signal.signal(signal.SIGINT, again)
        signal.signal(signal.SIGTERM, again)

    def lift(self, interrupted: bool) -> None:
        """After an interrupt everything is recorded and the process is on its way out: a further Ctrl-C there
        must not turn exit code 130 into a traceback, so both stay ignored. A caller that carries on after an
        interrupted session installs its own handlers again. Without an interrupt, the old handlers return."""
        for signum, handler in self._unshielded.items():
            signal.signal(signum, signal.SIG_IGN if interrupted else handler)
        self._unshielded = {}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
