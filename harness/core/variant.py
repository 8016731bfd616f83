"""A variant: one fully resolved training run, its stable id and its readable run name.

The id is a hash of what defines the run (the fields its method uses, the data files' contents, its stage's
id), never of its label, so it names MLflow runs and output folders and is the join key for resume and
analysis. The group id is the same hash without the training seed: the seed replicates of one variant
(`seeds: 3` in a grid) share it, so the report can pool them while each stays its own run. Grids
(`harness.grid`) and searches produce variants; the executor runs them; the training code reads them.
Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from harness.core import methods
from harness.core.schema import ADDED_FIELDS, VariantSpec, flatten, relevant_config

SCHEMA_VERSION = 1


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
    data_fingerprints: dict[str, str] = field(default_factory=dict)  # the content the id names, per data_paths key
    grid_dir: str = "."  # relative model folders resolve from here
    group_id: str = ""  # the id without the seed: shared by the seed replicates of one variant
    replicate: str = ""  # "2/3": this variant's place among its group's replicates in the grid ("" if alone)

    @property
    def method(self) -> methods.Method:
        return methods.get(self.spec.method)

    def config(self) -> dict:
        """The fields that define the run (what the id hashes), plus the label."""
        out = relevant_config(self.spec)
        for section, key in ADDED_FIELDS:  # logged even at their default, so a sweep's 0 reads as 0
            if section in out:
                out[section][key] = getattr(getattr(self.spec, section), key)
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
            "data_fingerprints": self.data_fingerprints,
            "grid_dir": self.grid_dir,
            "group_id": self.group_id,
            "replicate": self.replicate,
        }

    @classmethod
    def from_json(cls, d: dict) -> Variant:
        return cls(**{**d, "spec": VariantSpec.model_validate(d["spec"])})


def variant_id(identity: dict) -> str:
    blob = json.dumps({"schema": SCHEMA_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def group_id(identity: dict) -> str:
    """The variant id of `identity` with its training seed left out: equal for the seed replicates of one
    variant, different for anything else that differs (a stage's id included, so the children of different
    stages never share a group). Prefixed `g` so it is never mistaken for a variant id."""
    return "g" + variant_id({k: v for k, v in identity.items() if k != "seed"})[:11]


# ---------------------------------------------------------------- run names

_SHORT_MODEL = {"smollm2-135m-instruct": "smollm2", "tiny-random-llama": "tiny", "gemma-3-270m": "gemma3"}
# Fields whose value is part of every run name, and short prefixes for others when they vary.
_ALWAYS_SHOWN = {"method", "base_model", "data.size", "train.epochs", "name"}
_SHORT_KEYS = {"train.learning_rate": "lr", "seed": "s", "lora.alpha": "a", "data.shuffle_seed": "ds",
               "dpo.loss_type": "", "dpo.label_smoothing": "ls", "dpo.loss_weights": "w"}


def short_model(name: str) -> str:
    base = name.rstrip("/").split("/")[-1]
    return _SHORT_MODEL.get(base.lower(), base)


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "+".join(str(x).replace("_proj", "") for x in v)
    return str(v)


def run_name(spec: VariantSpec, varying: set[str]) -> str:
    """`[name·]` then what differs between the grid's variants, then what they share: the parts are
    `method·model·n<size>·e<epochs>`, the method's own (`b0.1·r4·qv`) and any other field that varies across the
    grid (`lr0.0001`). Leading with what differs keeps it visible where a name is cut short (MLflow's runs
    table shows about 25 characters): `round2·n12·e2·dpo_lora·smollm2·b0.1·r4·qv`."""
    method = spec.method_record
    flat = flatten(spec.model_dump(by_alias=True))
    parts = [("method", spec.method), ("base_model", short_model(spec.base_model)),
             ("data.size", f"n{spec.data.size or 'all'}"), ("train.epochs", f"e{spec.train.epochs}")]
    parts += [(key, f"{prefix}{fmt_value(flat[key])}") for key, prefix in method.name_parts]
    shown = _ALWAYS_SHOWN | {key for m in methods.all_methods() for key, _ in m.name_parts}
    for key in sorted(varying - shown):
        section = key.split(".")[0]
        if section in methods.SECTIONS and not method.uses(section):  # another method's setting: not this run's
            continue
        if flat.get(key) is not None:  # unset here (no `from:`, no modules regex): nothing to tell apart by
            parts.append((key, f"{_SHORT_KEYS.get(key, key.split('.')[-1])}{fmt_value(flat[key])}"))
    ordered = [text for key, text in parts if key in varying] + [text for key, text in parts if key not in varying]
    label = "·".join(ordered)
    return f"{spec.name}·{label}" if spec.name else label
