"""Grid files: expansion into variants, validation with every error at once.

A grid file looks like this (only what differs from `harness.core.schema` defaults):

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
    seeds: 3             # optional: every variant under training seeds 0, 1, 2 (or a list: [0, 7, 42])

Expansion = variants × product(axes) × seeds, minus excluded, then de-duplicated by variant id (a grid that
varies dpo.beta next to an sft variant yields that sft variant once). A variant named by another's
`from:` is a stage: it is not expanded over axes or seeds, trains once and is shared by its children.
Seed replicates differ only in `seed` (adapter initialisation, batch order): the rows they train on are
chosen by `data.shuffle_seed`, which they share. They have one group id (`Variant.group_id`).

Loading is a pipeline of named steps, each a function you can call and test on its own:

    read(path) -> RawGrid                      YAML (`harness.gridfile`), top-level shape
    expand(raw, errors) -> [Candidate]         defaults × variants × axes, exclusion, schema validation
    check(raw, candidates, errors) -> paths    models, presets, layers, stages, data files
    identify(raw, candidates, paths) -> Grid   ids, run names, de-duplication, stages first

`load_grid` runs them in order and raises one GridError listing every problem found. Nothing here imports
torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from experiments import data as D
from experiments.models import check_model_name
from harness.core import methods
from harness.core.schema import (
    LORA_PRESETS,
    VariantSpec,
    deep_merge,
    field_names,
    flatten,
    normalise,
    relevant_config,
    unflatten,
)
from harness.core.tracking import token_shaped
from harness.core.variant import Variant, fmt_value, group_id, run_name, variant_id
from harness.gridfile import GridError, load_yaml

GRID_KEYS = ("name", "description", "defaults", "variants", "axes", "exclude", "seeds")
MAX_SEEDS = 100  # replicates per variant; more is a typo (`seeds: 1000`), not a design
MAX_VARIANTS = 10_000  # before exclusion; `run` asks for --yes above 100 already, this many is an axis too many


# ---------------------------------------------------------------- the pipeline's values


@dataclass
class Grid:
    name: str
    path: Path
    description: str
    variants: list[Variant]  # parents before children
    collapsed: int = 0  # duplicates removed by id
    notes: list[str] = field(default_factory=list)  # surprises that are not errors (a name that vanished, ...)

    def by_id(self) -> dict[str, Variant]:
        return {v.id: v for v in self.variants}

    @property
    def stage_ids(self) -> set[str]:
        return {v.parent_id for v in self.variants if v.parent_id}


@dataclass
class RawGrid:
    """A grid file read and shape-checked: its sections as written (dotted keys normalised)."""

    path: Path
    name: str
    description: str
    defaults: dict
    entries: list[dict]  # `variants:`, or one empty entry when the file has none
    explicit_entries: bool  # the file has a `variants:` list (sources read "variants[i]", else "defaults")
    axes: list[tuple[str, list]]  # (dotted key, values) per swept field
    excludes: list[dict]  # flat {dotted key: value} per exclude entry
    seeds: list[int] = field(default_factory=list)  # `seeds:` as training seeds; empty: no replication
    extra: dict = field(default_factory=dict)  # top-level sections a caller asked for (a search's `search:`)
    notes: list[str] = field(default_factory=list)  # filled by the steps, shown by plan/validate/run

    @property
    def file(self) -> str:
        return str(self.path)

    @property
    def dir(self) -> Path:
        return self.path.parent.resolve()

    @property
    def stage_names(self) -> set[str]:
        """Names some variant starts `from:`: these are stages (trained once, never expanded over axes)."""
        names = {e.get("from") for e in self.entries if e.get("from")}
        return names | ({self.defaults["from"]} if self.defaults.get("from") else set())


@dataclass
class Candidate:
    """One expanded, schema-valid variant before it has an id."""

    spec: VariantSpec
    source: str


# ---------------------------------------------------------------- step 1: read


def read(path: str | Path, errors: list[str], *, extra_keys: tuple[str, ...] = ()) -> RawGrid:
    """Load the YAML and check its shape. A wrong top level raises GridError (nothing later can run without
    it); problems inside the sections go to `errors`, so the later steps can still report theirs."""
    path = Path(path)
    raw = load_yaml(path)
    file = str(path)
    if not isinstance(raw, dict):
        raise GridError([f"{file}: expected a mapping at the top level (name:, defaults:, variants:, axes:)"])
    fatal: list[str] = []
    allowed = GRID_KEYS + extra_keys
    for key in raw:
        if key not in allowed:
            fatal.append(f"{file}: unknown top-level key '{key}'{_suggest(str(key), list(allowed))} "
                         f"(valid: {', '.join(allowed)})")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        fatal.append(f"{file}: name: expected a short identifier like 'two_round' (letters, digits, _ . -), "
                     f"got {name!r}")
    elif token_shaped(name):
        fatal.append(f"{file}: name: {name[:6]}… has the shape of {token_shaped(name)}; a grid's name is kept in "
                     f"clear (the MLflow experiment, folders under results/): choose a name that is not a key")
    defaults = raw.get("defaults") or {}
    axes = raw.get("axes") or {}
    entries = raw.get("variants")
    if entries == []:
        fatal.append(f"{file}: variants: an empty list; list at least one variant, or leave `variants:` out to run "
                     f"the defaults (times the axes) alone")
    entries = entries or [{}]
    excludes = raw.get("exclude") or []
    for key, val, typ in (("defaults", defaults, dict), ("axes", axes, dict),
                          ("variants", entries, list), ("exclude", excludes, list)):
        if not isinstance(val, typ):
            fatal.append(f"{file}: {key}: expected a {'mapping' if typ is dict else 'list'}, got {val!r}")
    if fatal:
        raise GridError(fatal)
    axis_leaves = _axis_leaves(axes, "", errors)
    errors.extend(f"{file}: {e}" for e in _given_twice(defaults, "defaults"))
    errors.extend(f"{file}: {e}" for e in _given_twice(axes, "axes"))
    entries_n: list[dict] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            errors.append(f"{file}: variants[{i}]: expected a mapping of fields, got {entry!r}")
            entries_n.append({})
        else:
            errors.extend(f"{file}: {e}" for e in _given_twice(entry, f"variants[{i}]"))
            entries_n.append(normalise(entry))
    names = [e.get("name") for e in entries_n]
    for n in {n for n in names if n and names.count(n) > 1}:
        errors.append(f"{file}: variants: name {n!r} is used more than once; names must be unique")
    flat_excludes = []
    for j, ex in enumerate(excludes):
        if not isinstance(ex, dict) or not ex:
            errors.append(f"{file}: exclude[{j}]: expected a mapping of field: value, got {ex!r}")
            continue
        errors.extend(f"{file}: {e}" for e in _given_twice(ex, f"exclude[{j}]"))
        flat = flatten(normalise(ex))
        for key in flat:
            if key not in field_names():
                errors.append(f"{file}: exclude[{j}].{key}: unknown key{_suggest(key, field_names())}")
        flat_excludes.append(flat)
    seeds = _seeds(raw, file, defaults, entries_n, axis_leaves, errors)
    return RawGrid(path=path, name=name, description=str(raw.get("description", "")), defaults=normalise(defaults),
                   entries=entries_n, explicit_entries=bool(raw.get("variants")), axes=axis_leaves,
                   excludes=flat_excludes, seeds=seeds, extra={k: raw[k] for k in extra_keys if k in raw})


def _seeds(raw: dict, file: str, defaults: dict, entries: list[dict], axes: list[tuple[str, list]],
           errors: list[str]) -> list[int]:
    """`seeds: N` -> training seeds 0..N-1; `seeds: [a, b, ...]` -> those. Refused next to a `seed` given
    elsewhere (which one would win is a guess), and beyond numpy's seed range."""
    if "seeds" not in raw:
        return []
    value = raw["seeds"]
    hint = "a number of replicates like 3 (seeds 0, 1, 2) or a list of distinct seeds like [0, 7, 42]"
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_SEEDS:
            errors.append(f"{file}: seeds: expected 1 to {MAX_SEEDS} replicates, got {value}")
            return []
        seeds = list(range(value))
    elif isinstance(value, list) and value:
        bad = [s for s in value if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= 2**32 - 1]
        if bad:
            errors.append(f"{file}: seeds: expected seeds from 0 to 2**32 - 1, got {bad[0]!r}")
            return []
        if len(set(value)) != len(value) or len(value) > MAX_SEEDS:
            errors.append(f"{file}: seeds: expected at most {MAX_SEEDS} distinct seeds, got {value!r}")
            return []
        seeds = list(value)
    else:
        errors.append(f"{file}: seeds: expected {hint}, got {value!r}")
        return []
    given = (["defaults.seed"] if "seed" in defaults else []) + [f"variants[{i}].seed" for i, e in
                                                                 enumerate(entries) if "seed" in e]
    given += ["axes.seed" for p, _ in axes if p == "seed"]
    for where in given:
        errors.append(f"{file}: {where}: the grid also has `seeds:`, which sets every variant's seed; keep one "
                      f"(`seeds: [..]` lists the seeds to use)")
    return seeds


def _given_twice(section: dict, where: str) -> list[str]:
    """A field written both dotted and nested (`lora.rank: 4` beside `lora: {rank: 8}`) would silently keep
    one of the two: refuse it, naming both spellings."""
    seen: dict[str, str] = {}
    out = []

    def walk(d: dict, prefix: str, spelled: str) -> None:
        for key, value in d.items():
            path, written = f"{prefix}{key}", f"{spelled}{key}"
            if isinstance(value, dict) and value:
                walk(value, path + ".", f"{written}: {{" if not spelled else f"{written}.")
                continue
            if path in seen:
                out.append(f"{where}.{path}: given twice ({seen[path]!r} and {_spelling(written)!r}); keep one")
            else:
                seen[path] = _spelling(written)

    walk(section, "", "")
    return out


def _spelling(written: str) -> str:
    return written + "}" * written.count("{")


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


# ---------------------------------------------------------------- step 2: expand


def expand(raw: RawGrid, errors: list[str]) -> list[Candidate]:
    """defaults × variants × product(axes), schema-validated, minus excluded. Schema errors go to `errors`
    (with the key path they came from) and the variants that did parse go on to the next steps, so every
    problem shows at once."""
    per_entry = math.prod(len(v) for _, v in raw.axes) * max(len(raw.seeds), 1)
    count = sum(1 if e.get("name") in raw.stage_names else per_entry for e in raw.entries)
    if count > MAX_VARIANTS:  # counted before anything is built: 2**19 combinations took minutes and gigabytes
        axes = " × ".join(f"{p} ({len(v)})" for p, v in raw.axes) or "no axes"
        raise GridError([f"{raw.file}: expands to {count:,} variants ({len(raw.entries)} variant entries × {axes}"
                         f"{f' × {len(raw.seeds)} seeds' if raw.seeds else ''}), before exclusion; a grid may "
                         f"have at most {MAX_VARIANTS:,}: split it, or sweep fewer values at once"])
    combos = [dict(zip([p for p, _ in raw.axes], values, strict=True))
              for values in itertools.product(*[v for _, v in raw.axes])] if raw.axes else [{}]
    axis_index = {p: vals for p, vals in raw.axes}
    seeds: list[int | None] = list(raw.seeds) or [None]
    stage_names = raw.stage_names
    out: list[Candidate] = []
    for i, entry in enumerate(raw.entries):
        is_stage = entry.get("name") in stage_names
        for combo, seed in ([({}, None)] if is_stage else itertools.product(combos, seeds)):
            merged = deep_merge(raw.defaults, entry)
            prov = {k: f"defaults.{k}" for k in flatten(raw.defaults)}
            if raw.explicit_entries:
                prov.update({k: f"variants[{i}].{k}" for k in flatten(entry)})
            for p, v in combo.items():
                merged = deep_merge(merged, unflatten({p: v}))
                prov[p] = f"axes.{p}[{axis_index[p].index(v)}]"
            if seed is not None:
                merged = {**merged, "seed": seed}
                prov["seed"] = f"seeds[{raw.seeds.index(seed)}]"
            try:
                spec = VariantSpec.model_validate(merged)
            except ValidationError as e:
                errors.extend(_format_pydantic(e, prov, raw.file))
                continue
            src = f"variants[{i}]" if raw.explicit_entries else "defaults"
            if combo:
                src += " × axes{" + ", ".join(f"{k}={fmt_value(v)}" for k, v in combo.items()) + "}"
            if seed is not None:
                src += f" × seed {seed}"
            out.append(Candidate(spec, src))
    for j, ex in enumerate(raw.excludes):
        if out and not any(_excluded(c.spec, [ex]) for c in out):
            raw.notes.append(f"{raw.file}: exclude[{j}]: matches no variant "
                             f"({', '.join(f'{k}={fmt_value(v)}' for k, v in ex.items())}); nothing was excluded by it")
    out = [c for c in out if not _excluded(c.spec, raw.excludes)]
    if not out and not errors:
        raise GridError([f"{raw.file}: the grid expands to no variants (everything excluded?)"])
    return out


def _excluded(spec: VariantSpec, excludes: list[dict]) -> bool:
    flat = flatten(spec.model_dump(by_alias=True))
    return any(all(flat.get(k) == v for k, v in ex.items()) for ex in excludes)


# ---------------------------------------------------------------- step 3: check


def check(raw: RawGrid, candidates: list[Candidate], errors: list[str], *,
          check_data: bool = True) -> dict[int, dict[str, str]]:
    """Checks that need the whole grid or the file system: model names, LoRA presets, layer specs, stages,
    data files. Appends to `errors`; returns each candidate's resolved data paths (by position)."""
    by_name = {c.spec.name: c.spec for c in candidates if c.spec.name}
    all_names = {e.get("name") for e in raw.entries}
    for c in candidates:
        errors.extend(f"{raw.file}: {c.source}: {e}" for e in _check_variant(c.spec, raw.dir))
        if c.spec.from_:
            errors.extend(f"{raw.file}: {c.source}: {e}" for e in _check_stage(c.spec, by_name, all_names))
    return _check_data(raw, candidates, errors, check_data)


def _template_file(declared: str | None, grid_dir: Path) -> Path | None:
    if declared is None or not declared.endswith(".jinja"):
        return None
    path = Path(declared).expanduser()
    return path if path.is_absolute() else grid_dir / path


def _check_variant(spec: VariantSpec, grid_dir: Path) -> list[str]:
    out = []
    problem = check_model_name(spec.base_model, grid_dir)
    if problem:
        out.append(f"base_model: {problem}")
    method = spec.method_record
    if spec.train.base_dtype == "bf16" and not method.uses_lora:
        out.append(f"train.base_dtype: bf16 stores a frozen base, and {spec.method} trains the base itself (which "
                   f"stays fp32); use base_dtype: auto or fp32, or a LoRA method")
    if spec.train.base_dtype == "bf16" and spec.train.precision == "fp32":
        out.append("train.base_dtype: a bf16 base needs bf16 compute, and train.precision is fp32; set "
                   "train.precision: bf16 (a CPU has it too) or base_dtype: fp32")
    template = _template_file(spec.chat_template, grid_dir)
    if template is not None and not template.is_file():
        out.append(f"chat_template: {spec.chat_template!r}: no such template file ({template})")
    method = spec.method_record
    if method.uses_lora and isinstance(spec.lora.targets, str) and spec.lora.targets not in LORA_PRESETS:
        out.append(f"lora.targets: unknown preset {spec.lora.targets!r}{_suggest(spec.lora.targets, list(LORA_PRESETS))}"
                   f" (presets: {', '.join(LORA_PRESETS)}; or give a list of module names)")
    if method.uses("partial_ft"):
        problem = _check_layers(spec.partial_ft.layers)
        if problem:
            out.append(f"partial_ft.layers: {problem}")
        if spec.partial_ft.modules:
            try:
                re.compile(spec.partial_ft.modules)
            except re.error as e:
                out.append(f"partial_ft.modules: invalid regex: {e}")
    return out


def _check_stage(spec: VariantSpec, by_name: dict[str, VariantSpec], all_names: set) -> list[str]:
    out = []
    parent = by_name.get(spec.from_)
    stages = methods.stage_methods()
    if parent is None and spec.from_ in all_names:
        pass  # the stage itself failed validation; its own error says why
    elif parent is None:
        out.append(f"from: no variant named {spec.from_!r} in this grid{_suggest(spec.from_, list(by_name))} "
                   f"(names: {', '.join(by_name) or 'none'})")
    elif not parent.method_record.can_be_stage:
        out.append(f"from: {spec.from_!r} is a {parent.method} variant; a stage must be one of {', '.join(stages)}")
    elif parent.from_:
        out.append(f"from: {spec.from_!r} itself has from:; chains are one stage deep")
    if not spec.method_record.can_start_from_stage:
        able = [m.name for m in methods.all_methods() if m.can_start_from_stage]
        out.append(f"from: only {', '.join(able)} variants can start from a stage, got method {spec.method}")
    if parent is not None and parent.base_model != spec.base_model:
        out.append(f"base_model: {spec.base_model!r} differs from its stage {spec.from_!r} ({parent.base_model!r}); "
                   f"a child inherits its stage's model")
    return out


def _check_data(raw: RawGrid, candidates: list[Candidate], errors: list[str],
                check_data: bool) -> dict[int, dict[str, str]]:
    """Resolve data paths; check each file's structure once per use (as training data of a kind, or as
    evaluation pairs) and every variant's `data.size` against the rows of its file."""
    paths_by_candidate: dict[int, dict[str, str]] = {}
    rows_of: dict[tuple[str, str], int | None] = {}  # (path, kind) -> row count; None: the file was refused
    for n, c in enumerate(candidates):
        spec, paths = c.spec, {}
        for key in ("train", "eval"):
            try:
                p = D.resolve_data_path(getattr(spec.data, key), raw.dir, key)
            except D.DataError as e:
                errors.append(f"{raw.file}: {c.source}: data.{key}: {e}")
                continue
            paths[key] = str(p)
            if not check_data:
                continue
            kind = "preference" if key == "eval" else spec.method_record.data_kind
            if (str(p), kind) not in rows_of:
                try:
                    rows_of[str(p), kind] = D.check_file(p, kind)
                except D.DataError as e:
                    rows_of[str(p), kind] = None
                    errors.append(f"{raw.file}: {c.source}: data.{key}: {e}")
            rows = rows_of[str(p), kind]
            if key == "train" and rows is not None and spec.data.size and spec.data.size > rows:
                errors.append(f"{raw.file}: {c.source}: data.size: {spec.data.size} rows requested but {p.name} "
                              f"has {rows}")
            if key == "train" and rows is not None and spec.data.label_noise \
                    and D.data_format(D.read_rows(p)[0]) != "preference":
                errors.append(f"{raw.file}: {c.source}: data.label_noise: {spec.data.label_noise} swaps chosen and "
                              f"rejected, but {p.name} holds no preference pairs (prompt, chosen, rejected)")
        paths_by_candidate[n] = paths
    return paths_by_candidate


# ---------------------------------------------------------------- step 4: identify


def identify(raw: RawGrid, candidates: list[Candidate], data_paths: dict[int, dict[str, str]]) -> Grid:
    """Ids (what defines the run: the method's fields, data by content, a stage by its own id), readable run
    names, de-duplication by id, stages first."""
    fingerprints = {p: D.fingerprint(Path(p)) for paths in data_paths.values() for p in paths.values()}

    def identity(n: int, parent_id: str | None) -> dict:
        ident = relevant_config(candidates[n].spec)
        paths = data_paths[n]
        ident["data"] = {**ident["data"], "train": fingerprints[paths["train"]], "eval": fingerprints[paths["eval"]]}
        template = _template_file(candidates[n].spec.chat_template, raw.dir)
        if template is not None:  # a template file is named by its content, like the data
            ident["chat_template"] = D.fingerprint(template)
        ident["from"] = parent_id
        return ident

    stage_names = raw.stage_names
    stage_ids = {c.spec.name: variant_id(identity(n, None)) for n, c in enumerate(candidates)
                 if c.spec.name in stage_names}
    flat_specs = [flatten(c.spec.model_dump(by_alias=True)) for c in candidates]
    varying = {k for k in flat_specs[0] if len({json.dumps(f.get(k)) for f in flat_specs}) > 1}

    variants: list[Variant] = []
    seen: dict[str, Candidate] = {}
    groups: dict[int, str] = {}
    for n, c in enumerate(candidates):
        parent_id = stage_ids.get(c.spec.from_) if c.spec.from_ else None
        vid = variant_id(identity(n, parent_id))
        groups[n] = group_id(identity(n, parent_id))
        if vid in seen:
            first = seen[vid]
            if c.spec.name and c.spec.name != first.spec.name:  # its name would vanish without a word
                raw.notes.append(f"{raw.file}: {c.source} (name {c.spec.name!r}) has the same config as "
                                 f"{first.source} (name {first.spec.name!r}): one variant, id {vid}, run once "
                                 f"under the first name")
            continue
        seen[vid] = c
        variants.append(Variant(spec=c.spec, id=vid, run_name=run_name(c.spec, varying), grid=raw.name,
                                source=c.source, parent_id=parent_id, data_paths=data_paths[n],
                                data_fingerprints={k: fingerprints[p] for k, p in data_paths[n].items()},
                                grid_dir=str(raw.dir), group_id=groups[n]))
    variants = _number_replicates(variants)
    variants.sort(key=lambda v: v.parent_id is not None)  # stages first; stable otherwise
    return Grid(name=raw.name, path=raw.path, description=raw.description, variants=variants,
                collapsed=len(candidates) - len(variants), notes=list(dict.fromkeys(raw.notes)))


def _number_replicates(variants: list[Variant]) -> list[Variant]:
    """Mark each member of a group of several (the seed replicates of one variant) "i/N", in seed order."""
    members: dict[str, list[Variant]] = {}
    for v in variants:
        members.setdefault(v.group_id, []).append(v)
    place = {v.id: f"{i}/{len(vs)}" for vs in members.values() if len(vs) > 1
             for i, v in enumerate(sorted(vs, key=lambda v: v.spec.seed), 1)}
    return [dataclasses.replace(v, replicate=place.get(v.id, "")) for v in variants]


def load_grid(path: str | Path, *, check_data: bool = True) -> Grid:
    """Read, expand, check and identify a grid file. Raises GridError listing every problem found."""
    errors: list[str] = []
    raw = read(path, errors)
    candidates = expand(raw, errors)
    data_paths = check(raw, candidates, errors, check_data=check_data)
    errors = list(dict.fromkeys(errors))
    if errors:
        raise GridError(errors)
    return identify(raw, candidates, data_paths)


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
        msg = err["msg"].removeprefix("Value error, ")
        out.append(f"{file}: {src}: {msg}, got {got!r}")
    return out


def _check_layers(layers: str | list[int]) -> str | None:
    if isinstance(layers, list):
        return None if layers else "empty list"
    if layers in ("all", "last_half", "first_half") or re.fullmatch(r"(last|first):[1-9][0-9]*", layers):
        return None
    return f"expected last_half, first_half, all, last:N, first:N or a list of layer indices, got {layers!r}"


__all__ = ["Grid", "GridError", "RawGrid", "Candidate", "Variant", "read", "expand", "check", "identify", "load_grid",
           "load_yaml", "variant_id"]
