"""Training and evaluation data: the built-in preference set, user files, nested subsets, the audit.

Formats (TRL's standard ones), in .jsonl, .csv or .parquet:
- preference: `prompt`, `chosen`, `rejected` — each a string, or a list of {role, content} messages
  (conversational). Every method accepts it; SFT methods train on prompt -> chosen.
- prompt-completion: `prompt`, `completion` (SFT methods only).
- messages: `messages`, a whole conversation (SFT methods only).
In CSV, a conversational cell holds the JSON list as text.

Checks that need no tokenizer run at `harness validate` time (missing columns, empty strings,
chosen == rejected), naming the file and rows. The token-level audit (truncation) runs per variant
and is logged with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

BUILTIN_DIR = Path(__file__).parent / "data" / "builtin"
BUILTIN_FILES = {"train": "train.jsonl", "eval": "eval.jsonl"}
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    pass


def resolve_data_path(value: str, base_dir: Path, split: str = "train") -> Path:
    if value == "builtin":
        return BUILTIN_DIR / BUILTIN_FILES[split]
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if path.suffix not in SUFFIXES:
        raise DataError(f"{value!r}: expected 'builtin' or a file ending in {', '.join(SUFFIXES)}")
    if path.is_dir():
        raise DataError(f"{value!r}: is a directory ({path}); give a data file ending in {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"{value!r}: no such file ({path})")
    # Absolute, but not through symlinks: the file is read by the name given (its suffix says the format),
    # and HF hub caches, DVC and git-annex link names like train.jsonl to suffix-less blobs.
    return Path(os.path.abspath(path))


def fingerprint(path: Path) -> str:
    return _fingerprint(path.read_bytes())


def _fingerprint(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


class DataChanged(DataError):
    """The file's content is not the content a variant's id was computed from."""


def read_rows(path: Path, *, expect: str | None = None) -> list[dict]:
    """Rows of a data file as dicts; conversational CSV cells are decoded from JSON.

    `expect`: the fingerprint the caller's variant id names. The rows are parsed from the very bytes that are
    hashed, so a file edited after the grid was loaded is refused, never trained on under the old id."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    if expect is not None and _fingerprint(data) != expect:
        raise DataChanged(f"{path}: changed since the grid was loaded (content {_fingerprint(data)}, the variant's "
                          f"id was computed from {expect}); nothing was trained on it: run the grid again to "
                          f"train on the new content under a new id")
    try:
        return _read_rows(path, data)
    except UnicodeDecodeError:
        raise DataError(f"{path}: {not_utf8(data)}; save it as UTF-8") from None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pandas and pyarrow raise many types for a file that is not what it says
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot be read as {path.suffix.lstrip('.')}: {first}") from None


def not_utf8(data: bytes) -> str:
    """Where bytes stop being UTF-8, for an error message ("" when they are UTF-8)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return f"not UTF-8 text (byte 0x{data[e.start]:02x} on line {line})"
    return ""


def _read_rows(path: Path, data: bytes) -> list[dict]:
    if path.suffix in (".jsonl", ".json"):
        rows = []
        # split on "\n" only, as reading the file by lines does: str.splitlines() would also split inside a
        # JSON string holding a raw U+2028, which JSON allows
        for n, line in enumerate(data.decode("utf-8").split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows
    import pandas as pd

    frame = (pd.read_csv(io.BytesIO(data), keep_default_na=False) if path.suffix == ".csv"
             else pd.read_parquet(io.BytesIO(data)))
    rows = frame.to_dict(orient="records")
    for row in rows:
        for key, value in row.items():
            if isinstance(value, str) and value.startswith("[{"):
                try:
                    row[key] = json.loads(value)
                except json.JSONDecodeError:
                    pass
            elif hasattr(value, "tolist"):  # parquet lists arrive as numpy arrays
                row[key] = value.tolist()
    return rows


def text_of(value: Any) -> str:
    """The text content of a field, whether a string or a list of messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return ""


def _is_field(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def data_format(row: dict) -> str | None:
    if {"prompt", "chosen", "rejected"} <= row.keys():
        return "preference"
    if {"prompt", "completion"} <= row.keys():
        return "prompt-completion"
    if "messages" in row:
        return "messages"
    return None


def _rows_list(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:10])
    return shown + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")


def check_file(path: Path, kind: str) -> int:
    """Structural check of a whole file; `kind` is 'preference' or 'sft'. Returns the row count.

    Row numbers in messages are 1-based data rows (the line number in a JSONL file without blank lines).
    """
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    fmt = data_format(rows[0])
    allowed = ("preference",) if kind == "preference" else ("preference", "prompt-completion", "messages")
    if fmt not in allowed:
        want = ("prompt, chosen, rejected" if kind == "preference"
                else "prompt+chosen+rejected, prompt+completion, or messages")
        raise DataError(f"{path}: row 1 has columns {sorted(rows[0])}; expected {want}")
    fields = {"preference": ("prompt", "chosen", "rejected"), "prompt-completion": ("prompt", "completion"),
              "messages": ("messages",)}[fmt]
    problems: dict[str, list[int]] = {}
    for i, row in enumerate(rows, 1):
        for key in fields:
            if key not in row:
                problems.setdefault(f"missing column '{key}'", []).append(i)
            elif not _is_field(row[key]):
                problems.setdefault(f"'{key}' is neither a string nor a list of {{role, content}} messages",
                                    []).append(i)
            elif not text_of(row[key]).strip():
                problems.setdefault(f"empty '{key}'", []).append(i)
        if fmt == "preference" and all(k in row for k in fields) and row["chosen"] == row["rejected"]:
            problems.setdefault("chosen == rejected (no preference signal)", []).append(i)
        kinds = {key: type(row[key]) for key in fields if key in row and _is_field(row[key])}
        if len(set(kinds.values())) > 1:
            told = ", ".join(f"'{k}' {'messages' if t is list else 'a string'}" for k, t in kinds.items())
            problems.setdefault(f"mixed plain strings and conversations ({told}); a row's fields are all plain "
                                f"strings or all lists of {{role, content}} messages", []).append(i)
    if problems:
        lines = [f"{what} in row(s) {_rows_list(rows_)}" for what, rows_ in problems.items()]
        raise DataError(f"{path}: unusable rows: " + "; ".join(lines))
    return len(rows)


def select_indices(n: int, size: int | None, shuffle_seed: int) -> list[int]:
    """Row numbers of `select`: the first `size` of one seeded shuffle of range(n)."""
    order = list(range(n))
    random.Random(shuffle_seed).shuffle(order)
    return order if size is None else order[:size]


def select(rows: list[dict], size: int | None, shuffle_seed: int) -> list[dict]:
    """The first `size` rows of one seeded shuffle: sizes are nested (4 ⊂ 12 ⊂ 48) for a fixed seed."""
    return [rows[i] for i in select_indices(len(rows), size, shuffle_seed)]


def flipped_indices(selected: list[int], noise: float, shuffle_seed: int) -> set[int]:
    """The file rows among `selected` whose chosen and rejected swap at `noise`: the first round(noise × n) of
    `selected` in one seeded order of the file's rows, so a higher noise flips a superset (0.1 ⊂ 0.25 ⊂ 0.5)."""
    if not noise or not selected:
        return set()

    def rank(row: int) -> str:  # a seeded random key per file row, whatever else is selected
        return hashlib.sha256(f"label-noise:{shuffle_seed}:{row}".encode()).hexdigest()

    return set(sorted(selected, key=rank)[:round(noise * len(selected))])


def with_label_noise(rows: list[dict], indices: list[int], flipped: set[int]) -> list[dict]:
    """`rows` (the file rows `indices`, in order) with chosen and rejected swapped where the index is flipped."""
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i in flipped else r
            for r, i in zip(rows, indices, strict=True)]


def builtin_texts() -> list[str]:
    """All text of the built-in set (the tiny test tokenizer is trained on it)."""
    out = []
    for split in BUILTIN_FILES.values():
        for row in read_rows(BUILTIN_DIR / split):
            out.extend(text_of(row[k]) for k in ("prompt", "chosen", "rejected"))
    return out


# ---------------------------------------------------------------- per-method datasets


def _pref(row: dict) -> dict:
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def sft_rows(rows: list[dict]) -> list[dict]:
    """SFT examples: preference rows become prompt -> chosen; other formats pass through."""
    fmt = data_format(rows[0])
    if fmt == "preference":
        return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    if fmt == "prompt-completion":
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    return [{"messages": r["messages"]} for r in rows]


def preference_rows(rows: list[dict]) -> list[dict]:
    return [_pref(r) for r in rows]


# ---------------------------------------------------------------- tokenisation and audit


def tokenize_pair(tokenizer, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) exactly as TRL's DPO/SFT preprocessing splits them.

    Conversational: the prompt is rendered with the generation prompt, prompt+completion without, and
    the completion starts where the two token sequences diverge. Plain strings are concatenated.
    """
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the data is conversational but the tokenizer has no chat template; use a chat "
                            "model or plain-string prompt/chosen/rejected data")
        p = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)
        p, full = list(p["input_ids"]), list(full["input_ids"])
    else:
        p = list(tokenizer(text=prompt)["input_ids"])
        full = list(tokenizer(text=prompt + completion)["input_ids"])
    k = 0
    while k < min(len(p), len(full)) and p[k] == full[k]:
        k += 1
    return full[:k], full[k:]


def audit(rows: list[dict], tokenizer, max_length: int, kind: str) -> dict:
    """Counts of what truncation and the data itself will do to this variant's training set.

    - truncated: prompt + completion (either side, for pairs) longer than max_length
    - fully_truncated: the prompt alone fills max_length, so no completion token is left (TRL drops these)
    - chosen_eq_rejected, empty, duplicated: rows carrying no or repeated signal
    """
    counts = Counter()
    lengths = []
    unusable: list[int] = []
    keys = Counter(json.dumps(r, sort_keys=True) for r in rows)
    for i, row in enumerate(rows):
        bad = False
        if keys[json.dumps(row, sort_keys=True)] > 1:
            counts["duplicated"] += 1
        if kind == "preference":
            completions = [row["chosen"], row["rejected"]]
            if row["chosen"] == row["rejected"]:
                counts["chosen_eq_rejected"] += 1
                bad = True
        elif "messages" in row:
            completions = []
        else:
            completions = [row["completion"]]
        texts = [text_of(row.get("prompt", row.get("messages")))] + [text_of(c) for c in completions]
        if any(not t.strip() for t in texts):
            counts["empty"] += 1
            bad = True
        if not completions:  # messages: length of the whole conversation
            ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
            lengths.append(len(ids))
            counts["truncated"] += len(ids) > max_length
            if bad:
                unusable.append(i)
            continue
        split = [tokenize_pair(tokenizer, row["prompt"], c) for c in completions]
        total = max(len(p) + len(c) for p, c in split)
        lengths.append(total)
        if total > max_length:
            counts["truncated"] += 1
        if len(split[0][0]) >= max_length:
            counts["fully_truncated"] += 1
            bad = True
        if bad:
            unusable.append(i)
    n = len(rows)
    return {
        "rows": n,
        "usable": n - len(unusable),
        "truncated": counts["truncated"],
        "fully_truncated": counts["fully_truncated"],
        "chosen_eq_rejected": counts["chosen_eq_rejected"],
        "empty": counts["empty"],
        "duplicated": counts["duplicated"],
        "max_length": max_length,
        "tokens_max": max(lengths) if lengths else 0,
        "tokens_mean": round(sum(lengths) / len(lengths), 1) if lengths else 0.0,
        "unusable_rows": unusable,
    }
