"""A search file: a grid file with one variant plus a `search:` block, read and checked before anything runs.

The grammar (space, objectives, constraint, sampler, pruner, trials, seed) is documented in `harness.search`
and docs/search.md. `load_search` returns a `SearchSpec` or raises `GridError` listing every problem with its
key path, as grid loading does (it reuses `harness.grid`'s steps for the variant itself). Nothing here imports
torch or Optuna.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import grid as G
from harness.core import metrics as catalogue
from harness.core.schema import deep_merge, field_names, unflatten

DISTRIBUTIONS = ("log", "float", "int", "choice")
SAMPLERS = ("tpe", "nsga2", "random")
PRUNERS = ("median", "none", "{threshold: {lower: x} or {upper: x}}")
SEARCH_KEYS = ("space", "objectives", "constraint", "sampler", "pruner", "trials", "seed")
INTERMEDIATE = "eval/margin_shift_mean"  # what pruning reads (logged every eval.every steps)


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted variant field
    kind: str  # log | float | int | choice
    values: tuple  # (low, high) or the choices


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # maximize | minimize


@dataclass
class SearchSpec:
    raw: G.RawGrid
    entry: dict  # the one variant entry (may be empty)
    space: list[Dimension]
    objectives: list[Objective]
    constraint: tuple[str, float] | None  # (metric, max allowed)
    sampler: str
    pruner: str
    trials: int
    seed: int
    text: str  # the file as written, logged to the parent run
    threshold: dict = field(default_factory=dict)  # pruner "threshold": {lower: x} and/or {upper: x}

    @property
    def name(self) -> str:
        return self.raw.name

    def values_of(self, run_metrics: dict) -> list[float] | None:
        values = [run_metrics.get(o.metric) for o in self.objectives]
        if any(v is None or not math.isfinite(v) for v in values):
            return None
        return values


def _suggest(word: str, choices: list[str]) -> str:
    return G._suggest(word, choices)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def load_search(path: str | Path) -> SearchSpec:
    """Read and validate a search file; raises GridError listing every problem (with key paths) before
    any trial runs. The bounds of every dimension are checked as real variants (schema, data, stages)."""
    path = Path(path)
    errors: list[str] = []
    raw = G.read(path, errors, extra_keys=("search",))
    file = str(path)
    block = raw.extra.get("search")
    if raw.axes:
        errors.append(f"{file}: axes: a search file has no axes; put the fields to vary under search.space")
    if raw.excludes:
        errors.append(f"{file}: exclude: a search file has no exclude (there is nothing to expand)")
    if len(raw.entries) > 1:
        errors.append(f"{file}: variants: a search varies one variant; give at most one entry "
                      f"(got {len(raw.entries)})")
    if not isinstance(block, dict):
        raise G.GridError(errors + [f"{file}: search: expected a mapping with space: and objectives:, got {block!r}"])
    for key in block:
        if key not in SEARCH_KEYS:
            errors.append(f"{file}: search.{key}: unknown key{_suggest(str(key), list(SEARCH_KEYS))} "
                          f"(valid: {', '.join(SEARCH_KEYS)})")
    entry = raw.entries[0] if raw.entries else {}
    base = G.RawGrid(**{**raw.__dict__, "entries": [entry]})
    candidates = G.expand(base, errors)
    method = candidates[0].spec.method_record if candidates else None

    space = _parse_space(block.get("space"), file, errors, method)
    objectives = _parse_objectives(block.get("objectives"), file, errors)
    constraint = None
    if block.get("constraint") is not None:
        c = block["constraint"]
        if not isinstance(c, dict) or set(c) != {"metric", "max"} or not _number(c.get("max")):
            errors.append(f"{file}: search.constraint: expected {{metric: <metric>, max: <number>}}, got {c!r}")
        elif catalogue.lookup(c["metric"]) is None:
            errors.append(f"{file}: search.constraint.metric: unknown metric {c['metric']!r}"
                          f"{_suggest(str(c['metric']), _metric_keys())}")
        else:
            constraint = (c["metric"], float(c["max"]))
    sampler = block.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        errors.append(f"{file}: search.sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    every = candidates[0].spec.eval.every if candidates else None
    pruner = block.get("pruner", "median" if every and len(objectives) == 1 else "none")
    threshold = pruner.get("threshold") if isinstance(pruner, dict) and len(pruner) == 1 else None
    if isinstance(threshold, dict) and threshold and set(threshold) <= {"lower", "upper"} and all(
            _number(v) for v in threshold.values()):
        pruner = "threshold"
    else:
        threshold = None
    if pruner not in ("median", "none", "threshold"):
        errors.append(f"{file}: search.pruner: expected one of {', '.join(PRUNERS)}, got {pruner!r}")
    elif pruner != "none" and not every:
        errors.append(f"{file}: search.pruner: {pruner} pruning needs intermediate values: set eval.every (e.g. "
                      f"defaults: {{eval: {{every: 2}}}}) or pruner: none")
    elif pruner != "none" and len(objectives) > 1:
        errors.append(f"{file}: search.pruner: Optuna cannot prune a multi-objective study; use pruner: none")
    trials, seed = block.get("trials", 8), block.get("seed", 0)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        errors.append(f"{file}: search.trials: expected a positive integer, got {trials!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        errors.append(f"{file}: search.seed: expected a non-negative integer, got {seed!r}")

    if candidates and space and not errors:  # every bound as a real variant: schema, data sizes, stages
        for dim in space:
            for i, value in enumerate(dim.values):
                probe = G.RawGrid(**{**base.__dict__, "defaults": deep_merge(base.defaults, unflatten({dim.key: value}))})
                found: list[str] = []
                cands = G.expand(probe, found)
                G.check(probe, cands, found)
                where = f"search.space.{dim.key}.{dim.kind}[{i}]"
                errors.extend(e.replace(f"{file}: ", f"{file}: {where}: ", 1) for e in found)
    if candidates and not errors:
        G.check(base, candidates, errors)
    errors = list(dict.fromkeys(errors))
    if errors:
        raise G.GridError(errors)
    return SearchSpec(raw=base, entry=entry, space=space, objectives=objectives, constraint=constraint,
                      sampler=sampler, pruner=pruner, trials=trials, seed=seed, text=path.read_text(),
                      threshold=threshold or {})


def _metric_keys() -> list[str]:
    return [k for m in catalogue.CATALOGUE for k in m.keys()]


def _parse_space(space: Any, file: str, errors: list[str], method) -> list[Dimension]:
    if not isinstance(space, dict) or not space:
        errors.append(f"{file}: search.space: expected a mapping of field: {{log|float|int|choice: ...}}, "
                      f"got {space!r}")
        return []
    out = []
    valid = field_names()
    for key, dist in flatten_space(space).items():
        where = f"{file}: search.space.{key}"
        if key not in valid:
            errors.append(f"{where}: unknown field{_suggest(key, valid)} (any variant field by its dotted key)")
            continue
        if key in ("name", "from"):
            errors.append(f"{where}: cannot be searched (a label or a stage, not a setting)")
            continue
        section = key.split(".")[0]
        if method is not None and "." in key and not method.uses(section):
            errors.append(f"{where}: method {method.name} does not use the {section} section (it uses "
                          f"{', '.join(method.sections)}): every trial would train the same variant")
            continue
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            errors.append(f"{where}: expected one of {{log: [low, high]}}, {{float: [low, high]}}, "
                          f"{{int: [low, high]}}, {{choice: [a, b, ...]}}, got {dist!r}")
            continue
        kind, values = next(iter(dist.items()))
        if kind == "choice":
            if not isinstance(values, list) or not values:
                errors.append(f"{where}.choice: expected a non-empty list, got {values!r}")
                continue
        elif (not isinstance(values, list) or len(values) != 2 or not all(_number(v) for v in values)
              or not values[0] < values[1]):
            errors.append(f"{where}.{kind}: expected [low, high] with low < high, got {values!r}")
            continue
        elif kind == "log" and values[0] <= 0:
            errors.append(f"{where}.log: a log scale needs low > 0, got {values!r}")
            continue
        elif kind == "int" and not all(isinstance(v, int) for v in values):
            errors.append(f"{where}.int: expected integer bounds, got {values!r}")
            continue
        out.append(Dimension(key, kind, tuple(values)))
    return out


def flatten_space(space: dict) -> dict:
    """{dpo: {beta: {log: [..]}}} or {dpo.beta: {log: [..]}} -> {"dpo.beta": {"log": [..]}}."""
    out = {}
    for key, value in space.items():
        if isinstance(value, dict) and not (set(value) & set(DISTRIBUTIONS)):
            out.update({f"{key}.{k}": v for k, v in flatten_space(value).items()})
        else:
            out[str(key)] = value
    return out


def _parse_objectives(objectives: Any, file: str, errors: list[str]) -> list[Objective]:
    if isinstance(objectives, dict | str):
        objectives = [objectives]
    if not isinstance(objectives, list) or not 1 <= len(objectives) <= 2:
        errors.append(f"{file}: search.objectives: expected one or two objectives like "
                      f"[{{metric: eval/margin_shift_mean}}], got {objectives!r}")
        return []
    out = []
    for i, obj in enumerate(objectives):
        where = f"{file}: search.objectives[{i}]"
        if isinstance(obj, str):
            obj = {"metric": obj}
        if not isinstance(obj, dict) or "metric" not in obj or set(obj) - {"metric", "direction"}:
            errors.append(f"{where}: expected {{metric: <key>, direction: maximize|minimize}}, got {obj!r}")
            continue
        metric = catalogue.lookup(obj["metric"])
        if metric is None:
            errors.append(f"{where}.metric: unknown metric {obj['metric']!r}{_suggest(str(obj['metric']), _metric_keys())}"
                          f" (see python -m harness metrics)")
            continue
        default = {"higher": "maximize", "lower": "minimize"}.get(metric.direction)
        direction = obj.get("direction", default)
        if direction not in ("maximize", "minimize"):
            errors.append(f"{where}.direction: expected maximize or minimize, got {direction!r}")
            continue
        out.append(Objective(obj["metric"], direction))
    return out
