"""What a report says, computed before any of it is worded: a grid's runs as groups (a variant, its seeds
pooled), the comparisons between them, the one family of tests they make together, and the per-pair tables
(seeds × pairs, b − a, the length split) the words are chosen from. `compute` does all of it once;
`analysis.sections` words it.

Seed replicates: a variant run under several training seeds (`seeds: N` in its grid) is one group: its held-out
shifts form a seeds × pairs table, its interval covers both (`stats.replicated_mean`), and a comparison pairs two
groups on the same pairs and seeds. Every p-value the report words a verdict from is one test of one family: each
variant's shift against zero and each comparison; verdicts use Holm's adjustment over that family
(`adjust_family`).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import stats
from analysis.load import Study
from analysis.stats import Estimate
from harness.core import methods

META = {"run_id", "run_name", "start_time", "end_time", "device", "gpu", "variant_id", "group_id"}
NOT_CONFIG = {"seed", "name", "variant_id"}
AXES_ORDER = ("method", "base_model", "data.size", "train.epochs", "dpo.beta", "lora.rank", "lora.alpha",
              "lora.targets", "partial_ft.layers", "partial_ft.modules", "train.learning_rate", "data.train",
              "data.eval")
CURVE_AXES = ("dpo.beta", "data.size", "train.epochs", "lora.rank")
MAX_ALL_PAIRS = 8  # above this many variants, compare only those differing in exactly one field


@dataclass
class Group:
    """One variant, its seeds pooled: the unit the report talks about."""

    label: str
    config: dict
    runs: pd.DataFrame
    metrics: dict  # logged metrics averaged over seeds
    shifts: pd.Series  # held-out margin shift per pair (index: pair), averaged over seeds
    scale: float  # median |margin before| over the held-out pairs: what a shift is small or large against
    flips: tuple[int, int]  # held-out pairs whose margin changed sign: (to chosen, to rejected)
    lengths: tuple[float, float]  # mean scored tokens of chosen and of rejected completions (held-out)
    est: Estimate
    train_est: Estimate | None
    seed_means: list[float] = field(default_factory=list)
    table: pd.DataFrame | None = None  # held-out margin shift, one row per seed, one column per pair

    @property
    def seeds(self) -> list:
        return list(self.runs["seed"])

    def get(self, key, default=None):
        v = self.config.get(key, default)
        return default if v is None else v


@dataclass
class Comparison:
    a: Group
    b: Group
    differs: dict  # key -> (value in a, value in b), over fields both have
    est: Estimate
    table: pd.DataFrame | None = None  # b − a per seed pairing (rows) and pair (columns)


@dataclass
class Computed:
    """Everything a report's sections word, computed once by `compute`; the sections only read it."""

    study: Study
    out_dir: Path  # where the report and its figures are written
    target: str  # what `harness report` was given: a grid name or a parent run id
    groups: list[Group]  # every variant, measured or not
    measured: list[Group]  # those with held-out margin measurements: what the report talks about
    axes: list[str]  # the fields that vary over the measured variants, in AXES_ORDER
    comparisons: list[Comparison]  # between measured variants; adjusted with them as one family of tests
    summary: pd.DataFrame  # one row per measured variant (`summary_table`): what the figures plot
    labels: dict[str, str]  # run id -> its group's label

    @property
    def unmeasured(self) -> list[Group]:
        return [g for g in self.groups if not g.est.n]

    @property
    def pairs(self) -> pd.DataFrame:
        return self.study.pairs


def compute(study: Study, out_dir: Path, *, target: str) -> Computed:
    """Group the runs, compare the measured groups, adjust them as one family of tests."""
    groups = build_groups(study)
    measured = [g for g in groups if g.est.n]
    axes = varying_axes(measured) if measured else []
    comparisons = compare(measured)
    adjust_family(measured, comparisons)
    return Computed(study=study, out_dir=out_dir, target=target, groups=groups, measured=measured, axes=axes,
                    comparisons=comparisons, summary=summary_table(measured, axes),
                    labels={rid: g.label for g in groups for rid in g.runs["run_id"]})


# ---------------------------------------------------------------- building the tables


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _config(row: pd.Series) -> dict:
    return {k: row[k] for k in row.index if k not in META | NOT_CONFIG and _present(row[k])}


def _strip_seed(run_name: str, seed) -> str:
    return "·".join(p for p in run_name.split("·") if p != f"s{seed}")


def build_groups(study: Study) -> list[Group]:
    runs = study.runs.copy()
    if "seed" not in runs:
        runs["seed"] = 0
    keys = [json.dumps(_config(r), sort_keys=True, default=str) for _, r in runs.iterrows()]
    pairs = study.pairs
    groups = []
    for key in dict.fromkeys(keys):
        part = runs[[k == key for k in keys]]
        ids = list(part["run_id"])
        metrics = study.metrics.loc[ids].mean(numeric_only=True).to_dict()
        ev = pairs[(pairs["run_id"].isin(ids)) & (pairs.get("split") == "eval")] if len(pairs) else pairs
        scale, flips, lengths = math.nan, (0, 0), (math.nan, math.nan)
        table = None
        if len(ev) and "margin_shift" in ev:
            per_run = ev.pivot_table(index="pair", columns="run_id", values="margin_shift")
            shifts = per_run.mean(axis=1)
            seed_means = [float(per_run[c].mean()) for c in per_run.columns]
            table = seed_table(per_run, part)
            per_pair = ev.groupby("pair")[["margin_before", "margin_after"]].mean()
            scale = float(per_pair["margin_before"].abs().median())
            flips = (int(((per_pair["margin_before"] <= 0) & (per_pair["margin_after"] > 0)).sum()),
                     int(((per_pair["margin_before"] > 0) & (per_pair["margin_after"] <= 0)).sum()))
            lengths = (float(ev["n_chosen"].mean()), float(ev["n_rejected"].mean()))
        else:
            shifts, seed_means = pd.Series(dtype=float), []
        tr = pairs[(pairs["run_id"].isin(ids)) & (pairs.get("split") == "train")] if len(pairs) else pairs
        train_est = None
        if len(tr) and "margin_shift" in tr:
            train_est = stats.bootstrap_mean(tr.groupby("pair")["margin_shift"].mean().to_numpy())
        first = part.iloc[0]
        name = first.get("name")
        groups.append(Group(label=name if _present(name) else _strip_seed(first["run_name"], first["seed"]),
                            config=_config(first), runs=part, metrics=metrics, shifts=shifts, scale=scale, flips=flips,
                            lengths=lengths,
                            est=stats.replicated_mean(table.to_numpy()) if table is not None else
                            stats.bootstrap_mean(shifts.to_numpy()), train_est=train_est,
                            seed_means=seed_means, table=table))
    labels = [g.label for g in groups]
    for g in groups:  # a name shared by several variants (axes applied to it): use the full run name
        if labels.count(g.label) > 1:
            g.label = _strip_seed(g.runs.iloc[0]["run_name"], g.runs.iloc[0]["seed"])
    return _shorten(groups)


def _shorten(groups: list[Group]) -> list[Group]:
    """Drop the run-name parts every variant shares (`smollm2`, `n12`, ...): they tell no variant apart."""
    parts = [g.label.split("·") for g in groups]
    if len(groups) < 2 or any(len(p) < 2 for p in parts):
        return groups
    shared = set.intersection(*(set(p[1:]) for p in parts))  # never the first part: a name or the method
    short = ["·".join(x for i, x in enumerate(p) if i == 0 or x not in shared) for p in parts]
    if len(set(short)) == len(short):
        for g, label in zip(groups, short, strict=True):
            g.label = label
    return groups


def varying_axes(groups: list[Group]) -> list[str]:
    keys = {k for g in groups for k in g.config}
    out = [k for k in keys if len({json.dumps(g.config[k], default=str) for g in groups if k in g.config}) > 1]
    return sorted(out, key=lambda k: (AXES_ORDER.index(k) if k in AXES_ORDER else len(AXES_ORDER), k))


def _axis_key(k: str):
    return (AXES_ORDER.index(k) if k in AXES_ORDER else len(AXES_ORDER), k)


def compare(groups: list[Group]) -> list[Comparison]:
    out = []
    for a, b in itertools.combinations(groups, 2):
        if a.get("data.eval") != b.get("data.eval"):
            continue  # different evaluation pairs: nothing to pair on
        differs = {k: (a.config[k], b.config[k]) for k in a.config.keys() & b.config.keys()
                   if json.dumps(a.config[k], default=str) != json.dumps(b.config[k], default=str)}
        if a.get("from") != b.get("from"):  # different references: the shifts start from different models
            differs["from"] = (a.get("from", "base"), b.get("from", "base"))
        if not differs or (len(groups) > MAX_ALL_PAIRS and len(differs) != 1):
            continue
        table = difference_table(a, b)
        if table is None:
            continue
        out.append(Comparison(a, b, differs, stats.replicated_mean(table.to_numpy()), table))
    return out


def _covary(groups: list[Group], a: str, b: str) -> bool:
    """Whether fields a and b change together: a one-to-one map between their values over the variants."""
    pairs = {(json.dumps(g.config.get(a), default=str), json.dumps(g.config.get(b), default=str)) for g in groups
             if a in g.config}
    return len(pairs) > 1 and len({x for x, _ in pairs}) == len(pairs) == len({y for _, y in pairs})


def summary_table(groups: list[Group], axes: list[str]) -> pd.DataFrame:
    rows = []
    for g in groups:
        m = g.metrics
        context = " ".join(f"{k}={g.config.get(k)}" for k in axes if k not in CURVE_AXES and k in g.config)
        rows.append({"label": g.label, "method": g.get("method", "?"), "mean": g.est.mean, "lo": g.est.lo,
                     "hi": g.est.hi, "kl_mean": m.get("drift/kl_mean"),
                     "weight_delta_norm": m.get("drift/weight_delta_norm"), "context": context,
                     **{k: g.config.get(k) for k in CURVE_AXES}})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- seed replicates and the family of tests


def seed_table(per_run: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Held-out shifts of one group, one row per seed (sorted) and one column per pair, from the pair × run
    pivot; two runs of one seed (not made by a grid) are averaged."""
    seed_of = dict(zip(runs["run_id"], runs["seed"], strict=True))
    table = per_run.T
    table.index = [seed_of[r] for r in table.index]
    return table.groupby(level=0).mean().sort_index()


def difference_table(a: Group, b: Group) -> pd.DataFrame | None:
    """b − a on their common pairs, seed by seed (`stats.seed_matched`), or None with nothing to pair."""
    if a.table is None or b.table is None:
        return None
    pairs = a.table.columns.intersection(b.table.columns)
    if len(pairs) == 0:
        return None
    seeds_a, seeds_b = stats.seed_matched(a.table.index, b.table.index)
    diff = b.table.loc[seeds_b, pairs].to_numpy() - a.table.loc[seeds_a, pairs].to_numpy()
    index = [s if sa == s else f"{sa}/{s}" for sa, s in zip(seeds_a, seeds_b, strict=True)]
    return pd.DataFrame(diff, index=index, columns=pairs)


def _table_of(g: Group):
    return g.table.to_numpy() if g.table is not None else g.shifts.to_numpy()


def adjust_family(groups: list[Group], comparisons: list[Comparison]) -> int:
    """Adjust every variant's and every comparison's estimate as one family of tests; returns its size."""
    ests = stats.adjust([g.est for g in groups] + [c.est for c in comparisons],
                        [_table_of(g) for g in groups] + [c.table.to_numpy() for c in comparisons])
    for g, e in zip(groups, ests[:len(groups)], strict=True):
        g.est = e
    for c, e in zip(comparisons, ests[len(groups):], strict=True):
        c.est = e
    return _tests(groups, comparisons)


def _tests(groups: list[Group], comparisons: list[Comparison]) -> int:
    return sum(not math.isnan(e.p_value) for e in [*(g.est for g in groups), *(c.est for c in comparisons)])


def _uses(g: Group, section: str) -> bool:
    """Whether the group's method reads this config section (its registry record says)."""
    method = g.get("method")
    return method in methods.names() and methods.get(method).uses(section)


# ---------------------------------------------------------------- training signal: what kind of shift a row is


@dataclass(frozen=True)
class LengthSplit:
    """A variant's held-out margin shift split pair by pair: shift = length + per_token, exactly.

    With a = logp change per scored token of a completion (a_c chosen, a_r rejected), n its scored tokens:
    n_c·a_c − n_r·a_r = ((a_c + a_r)/2)·(n_c − n_r) + ((n_c + n_r)/2)·(a_c − a_r). The first term is what
    the pair's length difference adds when both sides gain the same per token (the length part); the second
    is the shift the pair would have if both sides had its mean length (the per-token part).
    """

    length: Estimate
    per_token: Estimate
    n_chosen: float  # mean scored tokens, chosen
    n_rejected: float  # mean scored tokens, rejected
    chosen_longer: int  # pairs whose chosen completion is longer
    pairs: int


def _per_pair(g: Group, pairs: pd.DataFrame, split: str = "eval") -> pd.DataFrame:
    """The group's per-pair rows of one split, averaged over its seeds (one row per pair)."""
    if not len(pairs) or "chosen_shift" not in pairs:
        return pd.DataFrame()
    rows = pairs[(pairs["run_id"].isin(list(g.runs["run_id"]))) & (pairs["split"] == split)]
    cols = [c for c in ("n_chosen", "n_rejected", "chosen_shift", "rejected_shift", "margin_before",
                        "margin_after", "margin_shift") if c in rows]
    return rows.groupby("pair")[cols].mean() if len(rows) else pd.DataFrame()


def length_split(g: Group, pairs: pd.DataFrame) -> LengthSplit | None:
    per = _per_pair(g, pairs)
    if not len(per) or not {"n_chosen", "n_rejected"} <= set(per.columns):
        return None
    per = per[(per["n_chosen"] > 0) & (per["n_rejected"] > 0)]
    if not len(per):
        return None
    a_c, a_r = per["chosen_shift"] / per["n_chosen"], per["rejected_shift"] / per["n_rejected"]
    length = (a_c + a_r) / 2 * (per["n_chosen"] - per["n_rejected"])
    per_token = (per["n_chosen"] + per["n_rejected"]) / 2 * (a_c - a_r)
    return LengthSplit(length=stats.bootstrap_mean(length.to_numpy()),
                       per_token=stats.bootstrap_mean(per_token.to_numpy()),
                       n_chosen=float(per["n_chosen"].mean()), n_rejected=float(per["n_rejected"].mean()),
                       chosen_longer=int((per["n_chosen"] > per["n_rejected"]).sum()), pairs=len(per))


def _is_sft_style(g: Group) -> bool:
    """Trained on demonstrations (prompt → chosen), not on the preference between the two sides."""
    method = g.get("method")
    return method in methods.names() and methods.get(method).data_kind == "sft"


def _stage_of(g: Group, groups: list[Group]) -> Group | None:
    """The measured group whose variant this one starts `from:` (by its name), if it is in the report."""
    name = g.get("from")
    if not name:
        return None
    return next((s for s in groups if s is not g and "name" in s.runs and name in set(s.runs["name"])), None)


def _children_of(stage: Group, groups: list[Group]) -> list[Group]:
    return [g for g in groups if _stage_of(g, groups) is stage]
