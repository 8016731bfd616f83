"""Where a run came from: git commit, package versions, interpreter. Logged as tags on every run."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("harness", "torch", "transformers", "trl", "peft", "accelerate", "mlflow", "optuna")


@functools.cache
def git_sha() -> str:
    """HEAD of the checkout harness runs from, with -dirty if it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def tags() -> dict[str, str]:
    return {"harness.git_sha": git_sha(), "harness.python": platform.python_version(),
            **{f"harness.version.{k}": v for k, v in versions().items()}}
