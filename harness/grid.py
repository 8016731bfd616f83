"""Grid files: safe YAML loading, expansion into variants, validation with every error at once.

A grid file looks like this (only what differs from `harness.config` defaults):

    name: two_round
    defaults:            # applied to every variant
      lora: {rank: 4, alpha: 8, targets: qv}
    variants:            # explicit variants, each overriding defaults
      - {name: round1, data: {size: 4}, train: {epochs: 1}}
      - {name: round2, data: {size: 12}, train: {epochs: 2}}
    axes:                # cartesian product, applied to every entry of `variants` (or to defaults alone)
      dpo: {beta: [0.1, 0.5]}
    exclude:             # drop expanded variants matching all keys of any entry
      - {method: sft, dpo.beta: 0.5}

Expansion = variants × product(axes), minus excluded, then de-duplicated by variant id (a grid that
varies dpo.beta next to an sft variant yields that sft variant once). A variant named by another's
`from:` is a stage: it is not expanded over axes, trains once and is shared by its children.

Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from harness.config import (
    LORA_PRESETS,
    METHOD_SECTIONS,
    STAGE_METHODS,
    VariantSpec,
    field_names,
    flatten,
    relevant_config,
)

SCHEMA_VERSION = 1
GRID_KEYS = ("name", "description", "defaults", "variants", "axes", "exclude")


class GridError(Exception):
    """One or more problems with a grid file; `errors` holds one line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


# ---------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads 1e-4 as a float (YAML 1.1 wants 1.0e-4)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            first = seen[key].start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {line}; first defined on line {first})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise GridError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass
    except yaml.YAMLError as e:
        raise GridError([f"{path}: invalid YAML: {e}"]) from None


# ---------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One resolved variant of a grid: its spec, stable id and readable run name."""

    spec: VariantSpec
    id: str
    run_name: str
    grid: str
    source: str  # where in the grid file it came from, e.g. "variants[1] × axes{dpo.beta=0.5}"
    parent_id: str | None = None
    data_paths: dict[str, str] = field(default_factory=dict)  # data.train / data.eval -> absolute path
    grid_dir: str = "."  # relative model folders resolve from here

    def config(self) -> dict:
        """The fields that define the run (what the id hashes), plus the label."""
        out = relevant_config(self.spec)
        out["name"] = self.spec.name
        return out

    def params(self) -> dict[str, str]:
        """Flat, string-valued params for the tracker."""
        flat = flatten(self.config())
        return {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in flat.items()}

    def to_json(self) -> dict:
        return {
            "spec": self.spec.model_dump(by_alias=True),
            "id": self.id,
            "run_name": self.run_name,
            "grid": self.grid,
            "source": self.source,
            "parent_id": self.parent_id,
            "data_paths": self.data_paths,
            "grid_dir": self.grid_dir,
        }

    @classmethod
    def from_json(cls, d: dict) -> Variant:
        return cls(**{**d, "spec": VariantSpec.model_validate(d["spec"])})


@dataclass
class Grid:
    name: str
    path: Path
    description: str
    variants: list[Variant]  # parents before children
    collapsed: int = 0  # duplicates removed by id

    def by_id(self) -> dict[str, Variant]:
        return {v.id: v for v in self.variants}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _normalise(d: dict) -> dict:
    """Accept both nested ({lora: {rank: 4}}) and dotted ({lora.rank: 4}) keys."""
    return _unflatten(flatten(d))


def _provenance(d: dict, source: str) -> dict[str, str]:
    return {k: f"{source}.{k}" for k in flatten(d)}


def _axis_leaves(axes: dict, path: str, errors: list[str]) -> list[tuple[str, list]]:
    """Flatten axes down to the lists of values; a non-list leaf is an error."""
    out = []
    for key, value in axes.items():
        p = f"{path}.{key}" if path else key
        if isinstance(value, dict):
            out.extend(_axis_leaves(value, p, errors))
        elif isinstance(value, list) and value:
            out.append((p, value))
        else:
            errors.append(f"axes.{p}: expected a non-empty list of values to sweep, got {value!r}")
    return out


def variant_id(identity: dict) -> str:
    blob = json.dumps({"schema": SCHEMA_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


_SHORT_MODEL = {"smollm2-135m-instruct": "smollm2", "tiny-random-llama": "tiny"}


def _short_model(name: str) -> str:
    base = name.rstrip("/").split("/")[-1]
    return _SHORT_MODEL.get(base.lower(), base)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "+".join(str(x).replace("_proj", "") for x in v)
    return str(v)


def _auto_name(spec: VariantSpec, varying: set[str]) -> str:
    parts = [spec.method, _short_model(spec.base_model), f"n{spec.data.size or 'all'}", f"e{spec.train.epochs}"]
    if spec.method == "dpo_lora":
        parts.append(f"b{_fmt(spec.dpo.beta)}")
    if spec.method in ("lora_sft", "dpo_lora"):
        parts += [f"r{spec.lora.rank}", _fmt(spec.lora.targets)]
    if spec.method == "partial_ft":
        parts.append(f"L{_fmt(spec.partial_ft.layers)}")
    shown = {"method", "base_model", "data.size", "train.epochs", "dpo.beta", "lora.rank", "lora.targets",
             "partial_ft.layers", "name"}
    flat = flatten(spec.model_dump(by_alias=True))
    short = {"train.learning_rate": "lr", "seed": "s", "lora.alpha": "a", "data.shuffle_seed": "ds"}
    for key in sorted(varying - shown):
        if key in flat:
            parts.append(f"{short.get(key, key.split('.')[-1])}{_fmt(flat[key])}")
    label = "·".join(parts)
    return f"{spec.name}·{label}" if spec.name else label


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""


def _format_pydantic(e: ValidationError, prov: dict[str, str], file: str) -> list[str]:
    out = []
    valid = field_names()
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            src = prov.get(loc, loc)
            section = loc.rsplit(".", 1)[0] + "." if "." in loc else ""
            options = [n for n in valid if n.startswith(section)]
            out.append(f"{file}: {src}: unknown key '{loc}'{_suggest(loc, valid)} "
                       f"(valid here: {', '.join(n.removeprefix(section) for n in options)})")
            continue
        # a union error reports one loc per branch ("train.max_steps.int"); trim to a real key
        while loc and loc not in prov and "." in loc:
            loc = loc.rsplit(".", 1)[0]
        src = prov.get(loc, loc)
        got = err.get("input")
        out.append(f"{file}: {src}: {err['msg']}, got {got!r}")
    return out


def load_grid(path: str | Path, *, check_data: bool = True) -> Grid:
    """Read, expand and validate a grid file. Raises GridError listing every problem found."""
    path = Path(path)
    raw = load_yaml(path)
    file = str(path)
    if not isinstance(raw, dict):
        raise GridError([f"{file}: expected a mapping at the top level (name:, defaults:, variants:, axes:)"])
    errors: list[str] = []
    for key in raw:
        if key not in GRID_KEYS:
            errors.append(f"{file}: unknown top-level key '{key}'{_suggest(str(key), list(GRID_KEYS))} "
                          f"(valid: {', '.join(GRID_KEYS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        errors.append(f"{file}: name: expected a short identifier like 'two_round' (letters, digits, _ . -), "
                      f"got {name!r}")
    defaults = raw.get("defaults") or {}
    axes = raw.get("axes") or {}
    entries = raw.get("variants") or [{}]
    excludes = raw.get("exclude") or []
    for key, val, typ in (("defaults", defaults, dict), ("axes", axes, dict),
                          ("variants", entries, list), ("exclude", excludes, list)):
        if not isinstance(val, typ):
            errors.append(f"{file}: {key}: expected a {'mapping' if typ is dict else 'list'}, got {val!r}")
    if errors:
        raise GridError(errors)

    axis_leaves = _axis_leaves(axes, "", errors)
    defaults = _normalise(defaults)
    entries_n: list[dict] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            errors.append(f"{file}: variants[{i}]: expected a mapping of fields, got {entry!r}")
            entries_n.append({})
        else:
            entries_n.append(_normalise(entry))
    stage_names = {e.get("from") for e in entries_n if e.get("from")} | (
        {defaults["from"]} if defaults.get("from") else set())
    names = [e.get("name") for e in entries_n]
    for n in {n for n in names if n and names.count(n) > 1}:
        errors.append(f"{file}: variants: name {n!r} is used more than once; names must be unique")

    combos = [dict(zip([p for p, _ in axis_leaves], values, strict=True))
              for values in itertools.product(*[v for _, v in axis_leaves])] if axis_leaves else [{}]
    axis_index = {p: vals for p, vals in axis_leaves}

    pending: list[tuple[VariantSpec, str]] = []
    for i, entry in enumerate(entries_n):
        is_stage = entry.get("name") in stage_names
        for combo in ([{}] if is_stage else combos):
            merged = _deep_merge(defaults, entry)
            prov = _provenance(defaults, "defaults")
            prov.update(_provenance(entry, f"variants[{i}]") if raw.get("variants") else {})
            for p, v in combo.items():
                merged = _deep_merge(merged, _unflatten({p: v}))
                prov[p] = f"axes.{p}[{axis_index[p].index(v)}]"
            try:
                spec = VariantSpec.model_validate(merged)
            except ValidationError as e:
                errors.extend(_format_pydantic(e, prov, file))
                continue
            src = f"variants[{i}]" if raw.get("variants") else "defaults"
            if combo:
                src += " × axes{" + ", ".join(f"{k}={_fmt(v)}" for k, v in combo.items()) + "}"
            pending.append((spec, src))

    for j, ex in enumerate(excludes):
        if not isinstance(ex, dict) or not ex:
            errors.append(f"{file}: exclude[{j}]: expected a mapping of field: value, got {ex!r}")
        else:
            for key in flatten(_normalise(ex)):
                if key not in field_names():
                    errors.append(f"{file}: exclude[{j}].{key}: unknown key{_suggest(key, field_names())}")
    # keep going: the variants that did parse still get the semantic checks, so every error shows at once

    def excluded(spec: VariantSpec) -> bool:
        flat = flatten(spec.model_dump(by_alias=True))
        return any(all(flat.get(k) == v for k, v in flatten(_normalise(ex)).items()) for ex in excludes)

    pending = [(s, src) for s, src in pending if not excluded(s)]
    if not pending and not errors:
        raise GridError([f"{file}: the grid expands to no variants (everything excluded?)"])

    # semantic checks that need the whole grid or the file system
    grid_dir = path.parent.resolve()
    from experiments.models import check_model_name  # light: no torch at import

    by_name = {s.name: s for s, _ in pending if s.name}
    for spec, src in pending:
        where = f"{file}: {src}"
        problem = check_model_name(spec.base_model, grid_dir)
        if problem:
            errors.append(f"{where}: base_model: {problem}")
        if spec.method in ("lora_sft", "dpo_lora") and isinstance(spec.lora.targets, str):
            if spec.lora.targets not in LORA_PRESETS:
                errors.append(f"{where}: lora.targets: unknown preset {spec.lora.targets!r}"
                              f"{_suggest(spec.lora.targets, list(LORA_PRESETS))} "
                              f"(presets: {', '.join(LORA_PRESETS)}; or give a list of module names)")
        if spec.method == "partial_ft":
            problem = _check_layers(spec.partial_ft.layers)
            if problem:
                errors.append(f"{where}: partial_ft.layers: {problem}")
            if spec.partial_ft.modules:
                try:
                    re.compile(spec.partial_ft.modules)
                except re.error as e:
                    errors.append(f"{where}: partial_ft.modules: invalid regex: {e}")
        if spec.from_:
            parent = by_name.get(spec.from_)
            if parent is None and spec.from_ in names:
                pass  # the stage itself failed validation; its own error says why
            elif parent is None:
                errors.append(f"{where}: from: no variant named {spec.from_!r} in this grid"
                              f"{_suggest(spec.from_, list(by_name))} (names: {', '.join(by_name) or 'none'})")
            elif parent.method not in STAGE_METHODS:
                errors.append(f"{where}: from: {spec.from_!r} is a {parent.method} variant; a stage must be one "
                              f"of {', '.join(STAGE_METHODS)}")
            elif parent.from_:
                errors.append(f"{where}: from: {spec.from_!r} itself has from:; chains are one stage deep")
            if spec.method != "dpo_lora":
                errors.append(f"{where}: from: only dpo_lora variants can start from a stage, got method "
                              f"{spec.method}")
            if parent is not None and parent.base_model != spec.base_model:
                errors.append(f"{where}: base_model: {spec.base_model!r} differs from its stage "
                              f"{spec.from_!r} ({parent.base_model!r}); a child inherits its stage's model")

    # data: resolve paths, fingerprint contents, check structure
    from experiments.data import DataError, check_file, fingerprint, resolve_data_path

    data_paths: dict[tuple, dict[str, str]] = {}
    fingerprints: dict[str, str] = {}
    for spec, src in pending:
        paths = {}
        for key in ("train", "eval"):
            value = getattr(spec.data, key)
            try:
                p = resolve_data_path(value, grid_dir, key)
            except DataError as e:
                errors.append(f"{file}: {src}: data.{key}: {e}")
                continue
            paths[key] = str(p)
            if str(p) not in fingerprints:
                fingerprints[str(p)] = fingerprint(p)
                if check_data:
                    kind = "preference" if key == "eval" or spec.method == "dpo_lora" else "sft"
                    try:
                        n = check_file(p, kind)
                    except DataError as e:
                        errors.append(f"{file}: {src}: data.{key}: {e}")
                        continue
                    if key == "train" and spec.data.size and spec.data.size > n:
                        errors.append(f"{file}: {src}: data.size: {spec.data.size} rows requested but {p.name} "
                                      f"has {n}")
        data_paths[id(spec)] = paths
    errors = list(dict.fromkeys(errors))
    if errors:
        raise GridError(errors)

    # ids: hash what defines the run; data by content, parents by their own id
    def identity(spec: VariantSpec, parent_id: str | None) -> dict:
        ident = relevant_config(spec)
        paths = data_paths[id(spec)]
        ident["data"] = {**ident["data"], "train": fingerprints[paths["train"]], "eval": fingerprints[paths["eval"]]}
        ident["from"] = parent_id
        return ident

    stage_ids = {s.name: variant_id(identity(s, None)) for s, _ in pending if s.name in stage_names}
    flat_specs = [flatten(s.model_dump(by_alias=True)) for s, _ in pending]
    varying = {k for k in flat_specs[0] if len({json.dumps(f.get(k)) for f in flat_specs}) > 1}

    variants: list[Variant] = []
    seen: set[str] = set()
    for spec, src in pending:
        parent_id = stage_ids.get(spec.from_) if spec.from_ else None
        vid = variant_id(identity(spec, parent_id))
        if vid in seen:
            continue
        seen.add(vid)
        variants.append(Variant(spec=spec, id=vid, run_name=_auto_name(spec, varying), grid=name,
                                source=src, parent_id=parent_id, data_paths=data_paths[id(spec)],
                                grid_dir=str(grid_dir)))
    variants.sort(key=lambda v: v.parent_id is not None)  # stages first; stable otherwise
    return Grid(name=name, path=path, description=str(raw.get("description", "")), variants=variants,
                collapsed=len(pending) - len(variants))


def _check_layers(layers: str | list[int]) -> str | None:
    if isinstance(layers, list):
        return None if layers else "empty list"
    if layers in ("all", "last_half", "first_half") or re.fullmatch(r"(last|first):[1-9][0-9]*", layers):
        return None
    return f"expected last_half, first_half, all, last:N, first:N or a list of layer indices, got {layers!r}"


__all__ = ["Grid", "GridError", "Variant", "load_grid", "load_yaml", "variant_id", "METHOD_SECTIONS"]
