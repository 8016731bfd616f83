"""Reading a worker's output: its `@@harness {json}` event lines into the variant's state, the rest into its log.

The worker (harness/run/worker.py) writes progress events to stdout as `PREFIX + json` lines (step, loss,
a search's intermediate values); everything else the libraries print is the variant's log. One reader thread per
running variant drains the pipe to its end, so a worker never blocks on a full one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import TextIO

from harness.run.worker import PREFIX


def read_events(lines: Iterable[str], state: dict, log: TextIO) -> None:
    """Until the stream ends: events update `state` (every intermediate value is also kept, in order, under
    "intermediates"), other lines go to `log`."""
    for line in lines:
        if line.startswith(PREFIX):
            try:
                event = json.loads(line[len(PREFIX):])
                state.update(event)
                if "intermediate" in event:  # every point is kept: a watcher polling slower must not miss one
                    state.setdefault("intermediates", []).append(event["intermediate"])
                continue
            except json.JSONDecodeError:
                pass
        try:
            log.write(line)
        except OSError:  # a full disk: keep draining the pipe, or the worker blocks on a full one
            pass
    try:
        log.flush()
    except OSError:
        pass


def start_reader(lines: Iterable[str], state: dict, log: TextIO) -> threading.Thread:
    reader = threading.Thread(target=read_events, args=(lines, state, log), daemon=True)
    reader.start()
    return reader
