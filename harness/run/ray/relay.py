"""What passes between the driver and a Ray node: a variant's output lines and stop requests (the `Relay`
actor), and its output folder (a tar). Also the error.json either side writes for a variant that failed there.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from harness.core.tracking import redact


class Relay:
    """One actor per session, on the cluster: tasks push their workers' output lines, the driver takes them;
    the driver's stop request goes back the same way. Also counts each variant's attempts (a retried task
    asks again)."""

    def __init__(self):
        self.lines: dict[str, list[str]] = {}
        self.attempts: dict[str, int] = {}
        self.stops: set[str] = set()

    def begin(self, key: str) -> tuple[int, bool]:
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return self.attempts[key], key in self.stops

    def push(self, key: str, lines: list[str]) -> bool:
        if lines:
            self.lines.setdefault(key, []).extend(lines)
        return key in self.stops

    def take(self, key: str) -> list[str]:
        return self.lines.pop(key, [])

    def stop(self, key: str) -> None:
        self.stops.add(key)

    def forget(self, key: str) -> None:
        self.lines.pop(key, None)
        self.attempts.pop(key, None)
        self.stops.discard(key)


def pack(folder: Path, skip: tuple[str, ...] = ()) -> bytes:
    """A folder as an uncompressed tar (weights do not compress), top-level entries in `skip` left out."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for entry in sorted(folder.iterdir()):
            if entry.name not in skip:
                tar.add(entry, arcname=entry.name)
    return buffer.getvalue()


def unpack(blob: bytes, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        tar.extractall(folder, filter="data")  # no absolute paths, links out or devices


def write_error(out_dir: Path, reason: str, rc: int) -> int:
    """The variant's error.json (the reason its finish reads), as a worker that failed would have written it;
    returns `rc`, the exit code to report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "error.json").write_text(json.dumps({"reason": redact(reason), "step": None}))
    return rc
