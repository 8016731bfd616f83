"""The reference side of the measurement, computed once and shared by every variant that has the same reference.

Every variant of a sweep over beta, learning rate or seed measures the same reference: the same starting
weights, the same evaluation pairs, probe prompts and neutral text. This cache stores what `evaluate.before`
computes under the reference (log-probs of the evaluation pairs, the greedy probe completions and their
next-token distributions, the neutral-text perplexity; and, separately, the log-probs of a variant's training
pairs) under a key made of *content*, never names:

- the reference weights: a SHA-256 of their safetensors files (memoised by path, size and mtime), or the
  recipe of the in-process test model;
- the token ids actually scored (which covers the data files, the tokenizer, its chat template, `max_length`
  truncation and the probe prompts), `probe_length`, the measurement batch size;
- the model's dtype and device, and the torch and transformers versions.

A changed byte in any of these makes a new key, so a stale entry is never used. Entries live in
`results/cache/reference/` as safetensors (tensors) plus JSON (numbers), written atomically, so concurrent
workers can share the folder; a worker about to measure an entry holds a lock on its key (`measuring`), so
variants running at once (`--jobs N`) measure a shared reference once: the others wait for it and read it.
`HARNESS_REFERENCE_CACHE=off` turns the cache (and the reuse of the training pairs' reference log-probs by TRL,
see `experiments/dpo_lora.py`) off.

The folder is capped: after each store, the least recently used entries (a hit counts as a use) are deleted
until the folder holds at most `HARNESS_REFERENCE_CACHE_GB` gigabytes (default 5; a Gemma-sized vocabulary makes
an entry of ~0.5 GB). An entry some worker holds the lock of is never deleted, nor the one just stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ENV_SWITCH = "HARNESS_REFERENCE_CACHE"
SIZE_ENV = "HARNESS_REFERENCE_CACHE_GB"
DEFAULT_GB = 5.0


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "on").lower() not in ("off", "0", "false", "no")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path, memo_dir: Path | None) -> str:
    """SHA-256 of a file, memoised under `memo_dir` by (path, size, mtime) so a 500 MB model is hashed once."""
    stat = path.stat()
    memo = None
    if memo_dir is not None:
        memo = memo_dir / (_sha([str(path.resolve()), stat.st_size, stat.st_mtime_ns])[:32] + ".sha256")
        if memo.is_file():
            return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(memo, digest.encode())
        except OSError:  # only a memo: hashing again next time is the cost
            pass
    return digest


def weights_identity(folder: Path | None, recipe: str, memo_dir: Path | None) -> str:
    """Content identity of a model's weights: the digests of its safetensors files, or a recipe string for a
    model built in-process (deterministic by construction)."""
    if folder is None:
        return f"recipe:{recipe}"
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return f"unhashable:{folder}"  # no cache for weights we cannot fingerprint
    return "sha256:" + _sha([file_digest(f, memo_dir) for f in files])


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class ReferenceCache:
    """get/put of one part of a reference measurement ("eval" or "train") by content key."""

    def __init__(self, folder: Path | None, weights: str, model):
        self.folder = folder if (folder is not None and enabled() and not weights.startswith("unhashable")) else None
        param = next(model.parameters())
        self.context = {"weights": weights, "dtype": str(param.dtype), "device": param.device.type,
                        "torch": torch.__version__, "transformers": _version("transformers"), "format": 1}
        self.hits: dict[str, bool] = {}

    def key(self, part: str, content: Any) -> str:
        return _sha({**self.context, "part": part, "content": content})

    @contextlib.contextmanager
    def measuring(self, key: str):
        """Hold the lock of `key` while looking it up and, on a miss, measuring and storing it: another worker
        with the same key waits here (saying so on stderr, its log) and then finds the entry. The lock is an
        OS file lock, released if its holder dies; without a cache folder it does nothing."""
        if self.folder is None:
            yield
            return
        from filelock import FileLock, Timeout

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.folder / f"{key}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                print("reference cache: another variant is measuring this reference; waiting for it",
                      file=sys.stderr, flush=True)
                lock.acquire()
        except OSError:  # an unwritable cache folder: measure without the lock (put() says it cannot store)
            yield
            return
        try:
            yield
        finally:
            lock.release()

    def get(self, part: str, key: str) -> dict | None:
        if self.folder is None:
            return None
        meta_path = self.folder / f"{key}.json"
        if not meta_path.is_file():
            self.hits[part] = False
            return None
        try:
            meta = json.loads(meta_path.read_text())
            tensors = {}
            if meta.get("tensors"):
                from safetensors.torch import load_file

                tensors = load_file(str(self.folder / f"{key}.safetensors"))
        except (OSError, ValueError):  # a torn or foreign file: recompute (and overwrite it)
            self.hits[part] = False
            return None
        self.hits[part] = True
        with contextlib.suppress(OSError):
            os.utime(meta_path)  # a use: the size cap deletes the least recently used entries first
        return {**meta["values"], **{"tensors": tensors}}

    def put(self, part: str, key: str, values: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Store an entry. Best effort: the cache only saves time, so a write that fails (a full disk, a
        read-only folder) leaves no entry and never fails the variant."""
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if tensors:
                from safetensors.torch import save

                _atomic_write(self.folder / f"{key}.safetensors",
                              save({k: v.contiguous() for k, v in tensors.items()}))
            # the JSON goes last: its presence is what makes the entry visible
            _atomic_write(self.folder / f"{key}.json",
                          json.dumps({"part": part, "values": values, "tensors": bool(tensors)}).encode())
            prune(self.folder, limit_bytes(), keep=key)
        except OSError as e:
            print(f"reference cache: not stored ({e.strerror or e}); the next variant measures it again",
                  file=sys.stderr)
            for suffix in (".safetensors", ".json"):
                (self.folder / f"{key}{suffix}").unlink(missing_ok=True)


def limit_bytes() -> int:
    """The cache folder's cap from HARNESS_REFERENCE_CACHE_GB (the default when unset or not a number >= 0)."""
    try:
        gb = float(os.environ.get(SIZE_ENV, DEFAULT_GB))
    except ValueError:
        gb = DEFAULT_GB
    return int(gb * 1e9) if gb >= 0 else int(DEFAULT_GB * 1e9)


def prune(folder: Path, limit: int, keep: str | None = None) -> list[str]:
    """Delete whole entries, least recently used first, until the folder's entries take at most `limit`
    bytes. Skips `keep` and any entry whose lock another worker holds. Returns the deleted keys."""
    from filelock import FileLock, Timeout

    entries = []
    for meta in folder.glob("*.json"):
        key = meta.stem
        files = [meta, folder / f"{key}.safetensors"]
        try:
            size = sum(f.stat().st_size for f in files if f.exists())
            entries.append((meta.stat().st_mtime, key, size, files))
        except OSError:  # deleted by another worker meanwhile
            continue
    total = sum(size for _, _, size, _ in entries)
    deleted = []
    for _, key, size, files in sorted(entries):
        if total <= limit:
            break
        if key == keep:
            continue
        lock = FileLock(str(folder / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # being measured or read right now
        try:
            for f in files:  # the JSON first: without it the entry is invisible, a torn pair is never read
                f.unlink(missing_ok=True)
        finally:
            lock.release()  # the lock file stays: deleting it would let two workers lock two files of one name
        total -= size
        deleted.append(key)
    return deleted


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"
