"""The writeup of a grid, generated from its logged runs only.

    python -m harness report two_round                 # latest finished run of every variant of the grid
    python -m harness report <parent run id>           # the variants one invocation ran or reused
    python -m harness report two_round --results DIR   # another results folder

Writes `<results>/<grid>/report.md` and its PNG figures next to it, the same page with the figures inside as
`report.html` (what MLflow's artifact viewer can show), and logs them (under `report/`) to the grid's parent run.
Every number comes from the runs' metrics and per-pair tables (`eval/pairs.csv`); the text around the numbers is
chosen by the numbers (an interval that covers zero is said to be "not distinguishable from zero"; when the
report makes several tests, a Holm-adjusted p-value of 0.05 or more is), never written in advance. Seed
replicates of a variant are pooled (see the section "seed replicates, many tests, power" at the end of this
module, and `analysis.stats`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from analysis import stats, webpage
from analysis.groups import (CURVE_AXES, Comparison, Group, LengthSplit, _axis_key, _children_of, _covary,
                             _is_sft_style, _per_pair, _present, _stage_of, _table_of, _tests, _uses, adjust_family,
                             build_groups, compare, length_split, summary_table, varying_axes)
from analysis.load import Study, load_study
from analysis.stats import Estimate, fmt, fmt_ci, fmt_p
from harness.core import methods
from harness.core import metrics as catalogue
from harness.core.tracking import MlflowTracker

AXIS_WORDS = {"method": "method", "base_model": "base model", "data.size": "data size", "train.epochs": "epochs",
              "dpo.beta": "beta", "lora.rank": "LoRA rank", "lora.alpha": "LoRA alpha", "from": "starting stage",
              "lora.targets": "LoRA targets (scope)", "partial_ft.layers": "trained layers",
              "train.learning_rate": "learning rate"}
FIGURE_NAMES = ("margin_shift.png", "shift_vs_drift.png", "pairs_before_after.png", "training_curves.png",
                "seeds.png")
# what the summary table's columns show, in order (meanings come from the metric catalogue)
SUMMARY_METRICS = ("eval/margin_shift_mean", "eval/accuracy_after", "eval/chosen_shift_mean",
                   "eval/rejected_shift_mean", "drift/kl_mean", "drift/ppl_change", "drift/weight_delta_norm")


# ---------------------------------------------------------------- words


def _n(x) -> str:
    """An integer-valued number without a trailing .0."""
    return str(int(round(x))) if _present(x) else "n/a"


def _count(frac, n) -> str:
    return f"{_n(frac * n)}/{_n(n)}" if _present(frac) and _present(n) else "n/a"


def _params(n) -> str:
    if not _present(n):
        return "n/a"
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else _n(n)


def describe_training(g: Group) -> str:
    c, m = g.config, g.metrics
    method = c.get("method")
    what = methods.get(method).describe_config(c) if method in methods.names() else str(method)
    if c.get("from"):
        what += f", starting from stage {c.get('from')}"
    size = c.get("data.size")
    data = f"{_n(size)} training rows" if size else "all training rows"
    steps = m.get("train/global_step")
    seeds = g.seeds
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"
    return (f"{what} of {c.get('base_model')}; {_params(m.get('params/trainable_numel'))} of "
            f"{_params(m.get('params/total_numel'))} parameters trainable. {data.capitalize()} from "
            f"`{c.get('data.train')}`, {_n(c.get('train.epochs'))} epoch(s) = {_n(steps)} optimiser steps of batch "
            f"{_n(c.get('train.batch_size'))}, learning rate {_num(c.get('train.learning_rate'))}; {seed_text}.")


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, int | float) and not isinstance(x, bool) else str(x)


def describe_movement(g: Group, *, length_told: bool = False) -> list[str]:
    """The shift, its accuracy, scale and sides. `length_told`: the row's *How much of it is length* split
    follows (`describe_length`), so the per-token line gives its number and leaves the explaining to it."""
    m, est = g.metrics, g.est
    n = m.get("eval/pairs")
    seeds = f" × {est.seeds} seeds" if est.seeds > 1 else ""
    lines = [f"**Held-out margin shift** (logp chosen − logp rejected, after − before, {_n(n)} pairs{seeds}): "
             f"{fmt_ci(est)} nats — {est.verdict()}{_test_note(est)}."]
    if len(g.seed_means) > 1:
        lines.append(describe_seeds(g))
    lines.append(f"Preference accuracy (margin > 0): {_count(m.get('eval/accuracy_before'), n)} before → "
                 f"{_count(m.get('eval/accuracy_after'), n)} after; "
                 + ("no pair's margin changed sign." if g.flips == (0, 0) else
                    f"{g.flips[0]} pair(s) turned toward chosen and {g.flips[1]} toward rejected."))
    if _present(g.scale) and g.scale > 0 and _present(est.mean):
        lines.append(f"For scale: the median held-out margin is {fmt(g.scale, signed=False)} nats in size, so the mean "
                     f"shift is {abs(est.mean) / g.scale:.1%} of a typical margin"
                     + (" — detectable, but small next to the preferences the model already had."
                        if abs(est.mean) < 0.05 * g.scale and est.significant else "."))
    c_shift, r_shift = m.get("eval/chosen_shift_mean"), m.get("eval/rejected_shift_mean")
    move = (f"Mean change in log-prob: chosen {fmt(c_shift)}, rejected {fmt(r_shift)} nats; both fell on "
            f"{_count(m.get('eval/displaced_frac'), n)} pairs.")
    if _present(c_shift) and _present(r_shift) and c_shift < 0 and r_shift < 0:
        move += (" On average both fell: **likelihood displacement** — "
                 + ("the margin grew because rejected fell faster, not because chosen became more likely."
                    if est.mean > 0 else "and chosen fell at least as fast as rejected."))
    elif _present(c_shift) and _present(r_shift) and c_shift > 0 and r_shift > 0:
        move += (" On average both rose: the model became likelier to produce either answer, and the margin "
                 + ("grew because chosen rose more." if c_shift > r_shift else "shrank because rejected rose more."))
    lines.append(move)
    norm = m.get("eval/norm_margin_shift_mean")
    text = f"Length-normalised (per-token) margin shift: {fmt(norm)} nats/token."
    if _present(norm) and est.significant and norm * est.mean < 0 and length_told:
        text += " Its sign is the opposite of the summed shift's: the length split below says why."
    elif _present(norm) and est.significant and norm * est.mean < 0:
        gainer = "rejected" if est.mean > 0 else "chosen"
        text += (f" It has the opposite sign to the summed shift: per token, the {gainer} completions gained more, "
                 f"and the summed margin moved because the completions differ "
                 f"in length ({fmt(g.lengths[0], signed=False)} chosen vs {fmt(g.lengths[1], signed=False)} rejected "
                 f"tokens on average), not because each token's preference moved that way.")
    lines.append(text)
    if g.train_est is not None and g.train_est.n:
        t = g.train_est
        text = f"**On its own {t.n} training pairs**: {fmt_ci(t)} nats — {t.verdict()}."
        if not t.covers_zero and t.mean > 0 and not est.significant:
            text += " It moved the pairs it trained on, but that did not carry over measurably to held-out pairs."
        elif not t.covers_zero and est.significant and t.mean > 0 and est.mean > 0:
            text += (f" Held-out pairs moved {fmt(est.mean / t.mean, signed=False)}× as far as the training pairs."
                     if t.mean else "")
        lines.append(text)
    if _uses(g, "dpo"):
        imp = m.get("eval/implicit_reward_margin_mean")
        lines.append(f"DPO implicit reward margin on held-out pairs (beta × shift): {fmt(imp)}; on its training "
                     f"pairs {fmt(m.get('train_pairs/implicit_reward_margin_mean'))}. TRL's own `rewards/margins` "
                     f"at the last step was {fmt(m.get('rewards/margins'))} (one training batch, as the trainer "
                     f"logs it).")
    return lines


def describe_drift(g: Group) -> str:
    m = g.metrics
    return (f"**Drift**: KL(policy ‖ reference) {fmt(m.get('drift/kl_mean'), signed=False)} nats/token over "
            f"{_n(m.get('drift/kl_tokens'))} tokens of the reference's own completions of the probe prompts; "
            f"neutral-text perplexity {fmt(m.get('drift/ppl_before'), signed=False)} → "
            f"{fmt(m.get('drift/ppl_after'), signed=False)} ({fmt(m.get('drift/ppl_change'))}); weight change norm "
            f"{fmt(m.get('drift/weight_delta_norm'), signed=False)}.")


def describe_comparison(cmp: Comparison) -> str:
    e = cmp.est
    changed = "; ".join(f"`{k}` {_num(va)} → {_num(vb)}" for k, (va, vb) in sorted(cmp.differs.items(),
                                                                                   key=lambda kv: _axis_key(kv[0])))
    paired = f"{e.n} pairs × {e.seeds} seeds" if e.seeds > 1 else f"{e.n} pairs"
    text = (f"- **{cmp.b.label}** − **{cmp.a.label}** ({changed}): difference in held-out margin shift "
            f"{fmt_ci(e)} nats (paired over {paired}, {fmt_p(e.p_value)}{_test_note(e, p=False)}) — ")
    if e.n < 2 or not e.significant:
        text += "not distinguishable: these runs cannot tell the two apart."
    else:
        text += f"{cmp.b.label} moved the margin {'more' if e.mean > 0 else 'less'} than {cmp.a.label}."
    return text + seed_by_seed(cmp)


def comparison_sections(comparisons: list[Comparison]) -> list[str]:
    """One section per set of fields that differ; a comparison appears once."""
    by_fields: dict[tuple, list[Comparison]] = {}
    for c in comparisons:
        by_fields.setdefault(tuple(sorted(c.differs, key=_axis_key)), []).append(c)
    lines = []
    for fields in sorted(by_fields, key=lambda f: (len(f), [_axis_key(k) for k in f])):
        words = " and ".join(AXIS_WORDS.get(k, k) for k in fields)
        lines += [f"### {words[0].upper() + words[1:]}" + (" together" if len(fields) > 1 else ""), ""]
        if len(fields) > 1:
            lines += [f"These variants differ in {len(fields)} fields at once ({', '.join(f'`{k}`' for k in fields)}): "
                      f"a difference below says which moved more, and cannot be put down to any one of them.", ""]
        lines += [describe_comparison(c) for c in sorted(by_fields[fields], key=lambda c: (c.a.label, c.b.label))]
        lines.append("")
    return lines


def caveats(groups: list[Group], comparisons: list[Comparison], axes: list[str]) -> list[str]:
    out = []
    ns = sorted({e.n for e in (g.est for g in groups) if e.n})
    widths = [(g.est.hi - g.est.lo) / 2 for g in groups if g.est.n > 1]
    if ns:
        out.append(f"Each variant's interval rests on {', '.join(map(str, ns))} held-out pairs; shifts smaller than "
                   f"about the typical CI half-width ({fmt(sorted(widths)[len(widths) // 2], signed=False)} nats) "
                   f"cannot be resolved here." if widths else f"Each variant rests on {ns} held-out pairs.")
    if all(len(g.seeds) == 1 for g in groups):
        out.append("One training seed per variant: the intervals cover the choice of evaluation pairs, not training "
                   "randomness (data order, adapter initialisation); another seed could move every estimate.")
    else:
        out.append(seed_caveat(groups))
    bases = {g.get("base_model") for g in groups}
    for base in sorted(bases, key=str):
        gs = [g for g in groups if g.get("base_model") == base]
        total = gs[0].metrics.get("params/total_numel")
        acc = [g.metrics.get("eval/accuracy_before") for g in gs if _present(g.metrics.get("eval/accuracy_before"))]
        text = f"Base model {base} ({_params(total)} parameters)."
        if acc:
            a = sum(acc) / len(acc)
            text += f" Before training it already preferred the chosen completion on {a:.0%} of held-out pairs"
            text += (": little room for accuracy to rise, so look at the margins." if a >= 0.8 else
                     ": about chance, so these pairs are not already solved by the base." if a <= 0.6 else ".")
        text += " Results on a model this size need not carry over to larger or stronger ones."
        out.append(text)
    if any(g.get("data.eval") == "builtin" for g in groups):
        out.append("The held-out pairs are the built-in set: the same four answer styles as the training pairs, on "
                   "other topics. A shift there shows generalisation to new prompts of those styles, not to "
                   "preferences in general.")
    displaced = [g.label for g in groups if _present(g.metrics.get("eval/chosen_shift_mean"))
                 and g.metrics["eval/chosen_shift_mean"] < 0 and g.metrics["eval/rejected_shift_mean"] < 0]
    if displaced:
        out.append(f"Likelihood displacement in {', '.join(displaced)}: a wider margin there does not mean the "
                   f"chosen answers became more likely.")
    if "data.size" in axes:
        by_size = sorted({(g.get("data.size"), _n(g.metrics.get("train/global_step"))) for g in groups
                          if g.get("data.size")}, key=lambda t: t[0])
        nested = len({g.get("data.shuffle_seed") for g in groups}) == 1
        out.append("Data size: " + ("the training sets are nested (the first N rows of one seeded shuffle), so a "
                                    "larger set adds pairs to the smaller one. " if nested else "")
                   + "Optimiser steps per size: " + ", ".join(f"{s} pairs → {st} steps" for s, st in by_size)
                   + "; more data here is also more updates, unless the steps were fixed.")
    if "lora.targets" in axes:
        scope = [f"{g.get('lora.targets')} {_params(g.metrics.get('params/trainable_numel'))}" for g in groups
                 if g.get("lora.targets")]
        out.append(f"LoRA scope: trainable parameters per target set: {', '.join(scope)}. A wider scope changes "
                   f"capacity and, at one learning rate, the size of the update too; the weight change norm "
                   f"and KL columns show how far each actually moved.")
    confounded = [c for c in comparisons if len(c.differs) > 1]
    if confounded:
        fields = sorted({k for c in confounded for k in c.differs}, key=str)
        out.append(f"{len(confounded)} of the {len(comparisons)} comparisons change several fields at once "
                   f"({', '.join(fields)}); they say which variant moved more, not why.")
    out += multiplicity_caveat(groups, comparisons)
    out.append("KL is measured on the reference's greedy completions of a fixed set of neutral probe prompts: it "
               "says how far next-token distributions moved on ordinary prompts, not whether outputs got better "
               "or worse. Perplexity is on a fixed neutral text.")
    return out


# ---------------------------------------------------------------- training signal: what kind of shift a row is
#
# SFT-style methods train on prompt -> chosen only, so their margin shift is a by-product of imitating the
# demonstrations; DPO trains chosen against rejected relative to a reference, and its shift is measured
# against that same reference (the base, or a `from:` stage's model). These functions say which a row is,
# how much of its shift is length, and, for a DPO row on a stage, what each step moved from the base.


def describe_length(split: LengthSplit | None, est: Estimate) -> str | None:
    """How much of the held-out margin shift is the chosen and rejected completions' length difference."""
    if split is None or not split.pairs:
        return None
    L, P = split.length, split.per_token
    longer = "chosen" if split.n_chosen > split.n_rejected else "rejected"
    text = (f"**How much of it is length**: chosen completions are {fmt(split.n_chosen, signed=False)} and "
            f"rejected {fmt(split.n_rejected, signed=False)} scored tokens on average (chosen longer on "
            f"{split.chosen_longer}/{split.pairs} pairs). Split pair by pair, the shift is a length part (the two "
            f"sides' mean per-token change × how much longer chosen is) of {fmt_ci(L)} nats plus a per-token part "
            f"(how much more each chosen token gained than each rejected one × their mean length) of {fmt_ci(P)} "
            f"nats. ")
    if not est.significant:  # the variant's verdict (Holm-adjusted when the report makes several tests)
        return text + "The shift itself is not distinguishable from zero, so neither share of it is said."
    l_with, p_with = L.mean * est.mean > 0, P.mean * est.mean > 0  # pushes the same way as the whole shift
    toward = "chosen" if est.mean > 0 else "rejected"
    if P.covers_zero and not L.covers_zero and l_with:
        text += (f"The shift is length: per token, chosen and rejected changed by amounts not distinguishable "
                 f"from each other; the summed margin moved because the {longer} completions have more tokens to "
                 f"change.")
    elif L.covers_zero and not P.covers_zero and p_with:
        text += ("Length accounts for little of it (not distinguishable from zero): per token, chosen gained "
                 + ("more" if P.mean > 0 else "less") + " than rejected.")
    elif l_with and p_with:
        text += f"Length accounts for {L.mean / est.mean:.0%} of the mean shift, the per-token part for the rest."
    elif l_with:
        other = "rejected" if toward == "chosen" else "chosen"
        text += (f"Length is more than all of it ({L.mean / est.mean:.0%} of the mean shift): per token, {other} "
                 f"gained more than {toward}" + (" (not distinguishable from zero)" if P.covers_zero else "")
                 + f", so the margin moved toward {toward} only because the {longer} completions are longer"
                 + ("." if P.covers_zero else "; at equal lengths it would have moved the other way."))
    else:
        text += (f"Per token the margin moved toward {toward} ({P.mean / est.mean:.0%} of the mean shift); the "
                 f"length difference pulled the other way, so the summed shift understates the per-token change.")
    return text


def describe_signal(g: Group, groups: list[Group], pairs: pd.DataFrame) -> list[str]:
    """What kind of shift this row is: demonstration imitation (SFT-style) or a shift against a reference
    (DPO), with the numbers that tell which; and, for every row, how much of it is length."""
    m, n = g.metrics, g.metrics.get("eval/pairs")
    c, r = m.get("eval/chosen_shift_mean"), m.get("eval/rejected_shift_mean")
    lines = []
    children = _children_of(g, groups)
    if _is_sft_style(g):
        per = _per_pair(g, pairs)
        both = int(((per["chosen_shift"] > 0) & (per["rejected_shift"] > 0)).sum()) if len(per) else None
        text = ("**Training signal: demonstrations.** It trained on prompt → chosen only; the rejected completions "
                "were never trained on, only measured. ")
        if _present(c) and _present(r) and c > 0 and r > 0:
            text += (f"Both rose — chosen {fmt(c)}, rejected {fmt(r)} nats on average"
                     + (f", both on {both}/{_n(n)} pairs" if both is not None else "")
                     + f": **demonstration imitation**. The model became likelier to produce answers like the "
                       f"training ones whichever side of a pair they are on; rejected rose "
                       f"{r / c:.0%} as much as chosen, and the margin shift is only the difference of the two.")
        elif _present(c) and _present(r) and c > 0 >= r:
            text += (f"Chosen rose ({fmt(c)} nats) and rejected did not ({fmt(r)}): the two sides moved apart rather "
                     f"than rising together, which plain imitation of the demonstrations would not require.")
        elif _present(c) and _present(r) and c <= 0 and r <= 0:
            text += (f"Both fell (chosen {fmt(c)}, rejected {fmt(r)} nats): imitating the demonstrations did not make "
                     f"either side of these held-out pairs likelier.")
        elif _present(c) and _present(r):
            text += f"Chosen fell ({fmt(c)} nats) while rejected rose ({fmt(r)}): the demonstrations moved it away."
        if children:
            text += (f" This row is the `from:` stage of {', '.join(x.label for x in children)}: its trained model is "
                     f"their starting point and their DPO reference.")
        lines.append(text)
    elif _uses(g, "dpo"):
        stage = _stage_of(g, groups)
        if g.get("from"):
            name = g.get("from")
            what = (methods.get(stage.get("method")).describe_config(stage.config)
                    if stage is not None and stage.get("method") in methods.names() else "its stage")
            ref = (f"the model trained by stage `{name}` ({what}), not the base model: this is what DPO moved on top "
                   f"of that stage" + (f"; what `{name}` moved from the base is its own row, and the two steps "
                                       f"add up in *From the base, step by step*" if stage is not None else ""))
        else:
            ref = f"the base model {g.get('base_model')} (the adapter disabled)"
        lines.append(f"**Relative to the reference.** DPO trains chosen up against rejected relative to a frozen "
                     f"reference, and this row's shift, accuracy and drift are measured against that same "
                     f"reference: {ref}.")
    length = describe_length(length_split(g, pairs), g.est)
    if length:
        lines.append(length)
    return lines


def signal_notes(groups: list[Group]) -> list[str]:
    """Under the summary table: which rows are demonstrations and which are shifts against a reference."""
    sft = [g for g in groups if _is_sft_style(g)]
    dpo = [g for g in groups if _uses(g, "dpo")]
    out = []
    if sft:
        names = sorted({str(g.get("method")) for g in sft})
        out.append(f"SFT-style rows ({', '.join(names)}) train on prompt → chosen only: their margin shift is a "
                   f"by-product of imitating the demonstrations, measured against the model they started from. "
                   f"Watch whether rejected rose too.")
    if dpo:
        staged = [g for g in dpo if g.get("from")]
        text = ("DPO rows (dpo_lora) train chosen against rejected, and their shift is relative to their reference: "
                "the starting model with the adapter disabled")
        if staged:
            refs = sorted({str(g.get("from")) for g in staged})
            text += (f" — for {', '.join(g.label for g in staged)}, the model of stage {', '.join(refs)}, so "
                     f"those rows show what DPO moved on top of the stage, not from the base")
        out.append(text + ".")
    return [" ".join(out), ""] if out else []


def _step_row(label: str, ref: str, g_est: Estimate, c: float, r: float) -> list[str]:
    return [label, ref, fmt_ci(g_est), g_est.verdict(), f"{fmt(c)} / {fmt(r)}"]


def stage_sections(groups: list[Group], pairs: pd.DataFrame) -> list[str]:
    """For every DPO row on a measured stage: the stage's step, DPO's step, and the two added up per pair."""
    lines = []
    for child in groups:
        stage = _stage_of(child, groups)
        if stage is None:
            continue
        s, d = _per_pair(stage, pairs), _per_pair(child, pairs)
        common = s.index.intersection(d.index) if len(s) and len(d) else []
        if not len(common):
            continue
        s, d = s.loc[common], d.loc[common]
        total = stats.bootstrap_mean((s["margin_shift"] + d["margin_shift"]).to_numpy())
        gap = float((d["margin_before"] - s["margin_after"]).abs().max())
        base = stage.get("base_model")
        if not lines:
            lines += ["## From the base, step by step", "",
                      "A DPO row on a `from:` stage is measured against the stage's model, and the stage against "
                      "the base; adding the two shifts pair by pair gives the shift from the base.", ""]
        lines += [f"### {stage.label} → {child.label}", ""]
        lines += _table(["step", "measured against", "held-out margin shift", "verdict", "Δlogp chosen / rejected"], [
            _step_row(f"{stage.label} ({stage.get('method')})", f"base {base}", stats.bootstrap_mean(
                s["margin_shift"].to_numpy()), s["chosen_shift"].mean(), s["rejected_shift"].mean()),
            _step_row(f"{child.label} ({child.get('method')})", f"stage {stage.label}", stats.bootstrap_mean(
                d["margin_shift"].to_numpy()), d["chosen_shift"].mean(), d["rejected_shift"].mean()),
            _step_row("both steps", f"base {base}", total, s["chosen_shift"].mean() + d["chosen_shift"].mean(),
                      s["rejected_shift"].mean() + d["rejected_shift"].mean())])
        lines.append("")
        sft_part, dpo_part = s["margin_shift"].mean(), d["margin_shift"].mean()
        text = f"Over the {len(common)} held-out pairs both were measured on, "
        if total.covers_zero:
            text += "the shift from the base is not distinguishable from zero."
        elif sft_part * total.mean > 0 and dpo_part * total.mean > 0:
            text += (f"{child.label} contributed {dpo_part / total.mean:.0%} of the shift from the base and "
                     f"{stage.label} {sft_part / total.mean:.0%}.")
        else:
            text += (f"the two steps moved the margin in opposite directions ({stage.label} {fmt(sft_part)}, "
                     f"{child.label} {fmt(dpo_part)} nats).")
        # the child's reference is the stage's trained model: its "before" must be the stage's "after", to
        # within float noise (1e-3 nats on summed log-probs) and well within a typical step of the child
        typical = float(d["margin_shift"].abs().median())
        share = (f", {gap / typical:.1%} of a typical per-pair step of {fmt(typical, signed=False)} nats"
                 if typical else "")
        if gap <= max(1e-3, 0.05 * typical):
            text += (f" Check: {child.label}'s reference margins equal {stage.label}'s after-training margins to "
                     f"within {fmt(gap, signed=False)} nats per pair{share} (the same model measured twice: as "
                     f"trained, and as the saved weights {child.label} started from), so the steps chain.")
        else:
            text += (f" Warning: {child.label}'s reference margins differ from {stage.label}'s after-training margins "
                     f"by up to {fmt(gap, signed=False)} nats per pair{share}, so its reference is not exactly the "
                     f"model {stage.label}'s row measured; the sum above is approximate.")
        lines += [text, ""]
    return lines


def signal_caveats(groups: list[Group]) -> list[str]:
    out = []
    if any(_is_sft_style(g) for g in groups) and any(_uses(g, "dpo") for g in groups):
        out.append("SFT-style and DPO rows are trained on different signals (demonstrations vs. the preference "
                   "between two answers): a difference between them says which moved the margin more, not which "
                   "way of updating (scope, capacity) did.")
    refs = {str(g.get("from")) for g in groups if g.get("from")}
    if refs and any(not g.get("from") for g in groups):
        chained = any(_stage_of(g, groups) is not None for g in groups)
        out.append(f"Rows starting from a stage ({', '.join(sorted(refs))}) are measured against that stage's model, "
                   f"the others against the base: comparisons between the two kinds compare the size of a step, "
                   f"not where the model ended up"
                   + (" (for that, see *From the base, step by step*)." if chained else "."))
    return out


# ---------------------------------------------------------------- the report


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def build(study: Study, out_dir: Path, *, target: str) -> Path:
    from analysis import figures

    out_dir.mkdir(parents=True, exist_ok=True)
    groups = build_groups(study)
    measured = [g for g in groups if g.est.n]
    unmeasured = [g for g in groups if not g.est.n]
    axes = varying_axes(measured) if measured else []
    comparisons = compare(measured)
    adjust_family(measured, comparisons)
    summary = summary_table(measured, axes)
    labels = {rid: g.label for g in groups for rid in g.runs["run_id"]}

    lines = [f"# {study.grid}: what moved, and what it cost", ""]
    devices = sorted({(r["device"] + (f" ({r['gpu']})" if r["gpu"] else "")) for _, r in study.runs.iterrows()})
    lines += [f"Generated by `python -m harness report {target}` from {len(study.runs)} finished run(s) of grid "
              f"`{study.grid}`" + (f" (parent run `{study.parent_run_id}`)" if study.parent_run_id else "")
              + f"; trained and measured on {', '.join(devices) or 'unknown'}. Every number is read from the logged "
              "runs (metrics and the per-pair tables `eval/pairs.csv`). Margins are in nats: summed log-prob of the "
              "chosen completion minus the rejected one, given the prompt. Intervals are 95% paired-bootstrap CIs "
              f"over evaluation pairs ({stats.N_RESAMPLES:,} resamples, seed {stats.SEED})"
              + interval_note(measured) + ".", ""]
    if not measured:
        lines += ["None of these runs logged margin measurements (`eval/pairs.csv`); nothing to compare.", ""]

    # summary
    if measured:
        lines += ["## Summary", ""]
        rows = []
        for g in measured:
            m = g.metrics
            n = m.get("eval/pairs")
            rows.append([g.label, str(g.get("method")), f"{_n(g.get('data.size')) if g.get('data.size') else 'all'} × "
                         f"{_n(g.get('train.epochs'))} ({_n(m.get('train/global_step'))} steps)", fmt_ci(g.est),
                         g.est.verdict() + _test_note(g.est, short=True),
                         f"{_count(m.get('eval/accuracy_before'), n)} → "
                         f"{_count(m.get('eval/accuracy_after'), n)}",
                         f"{fmt(m.get('eval/chosen_shift_mean'))} / {fmt(m.get('eval/rejected_shift_mean'))}",
                         fmt(m.get("drift/kl_mean"), signed=False), fmt(m.get("drift/ppl_change")),
                         fmt(m.get("drift/weight_delta_norm"), signed=False)])
        lines += _table(["variant", "method", "pairs × epochs", "held-out margin shift", "verdict",
                         "accuracy before → after", "Δlogp chosen / rejected", "KL", "Δppl", "‖ΔW‖"], rows)
        lines.append("")
        lines += ["Columns, from the metric catalogue (`python -m harness metrics`): "
                  + "; ".join(catalogue.describe(k) for k in SUMMARY_METRICS) + ".", ""]
        lines += signal_notes(measured)

    # figures
    figs: list[tuple[str, str]] = []
    if measured:
        figs.append((figures.shift_per_variant(summary, out_dir / "margin_shift.png").name,
                     "Held-out margin shift per variant, 95% CI"))
        figs.append((figures.shift_vs_drift(summary, out_dir / "shift_vs_drift.png").name,
                     "Margin shift against drift: the trade-off frontier"))
        ev = study.pairs[study.pairs["split"] == "eval"].copy()
        ev["label"] = ev["run_id"].map(labels)
        ev = ev.groupby(["label", "pair"], sort=False, as_index=False).agg(
            margin_before=("margin_before", "mean"), margin_after=("margin_after", "mean"),
            category=("category", "first"))
        figs.append((figures.pairs_before_after(ev, out_dir / "pairs_before_after.png").name,
                     "Per held-out pair: margin before vs after"))
        figs += seed_figure(measured, out_dir)
    hist = study.history.copy()
    if len(hist):
        hist["label"] = hist["run_id"].map(labels)
        curves = figures.training_curves(hist, out_dir / "training_curves.png")
        if curves is not None:
            figs.append((curves.name, "Logged step curves (TRL rewards/margins, loss, intermediate held-out shift)"))
    plotted: list[str] = []
    for axis in CURVE_AXES:
        if axis not in axes or summary[axis].notna().sum() < 2:
            continue
        together = [k for k in axes if k != axis and _covary(measured, axis, k)]
        if any(k in plotted for k in together):
            continue  # the same points as a curve already drawn
        name = f"{axis.replace('.', '_')}_curve.png"
        caption = f"Margin shift against {axis}" + (f" (changes together with {', '.join(together)})"
                                                    if together else "")
        figs.append((figures.axis_curve(summary, axis, out_dir / name, together).name, caption))
        plotted.append(axis)

    # per variant
    if measured:
        lines += ["## Variants", ""]
        for g in measured:
            lines += [f"### {g.label}", "", f"**Trained**: {describe_training(g)}", ""]
            lines += [f"- {x}" for x in describe_movement(g, length_told=length_split(g, study.pairs) is not None)]
            lines += [f"- {x}" for x in describe_signal(g, measured, study.pairs)]
            lines += [f"- {describe_drift(g)}", ""]
    if unmeasured:
        lines += ["Runs without margin measurements (trained before measurement existed, or it failed): "
                  + ", ".join(g.label for g in unmeasured) + ".", ""]
    lines += seed_section(measured)

    # comparisons
    if comparisons:
        lines += ["## Comparisons", "",
                  "Differences are (second − first) in held-out margin shift, paired on the same evaluation pairs"
                  + (" and seeds" if any(c.est.seeds > 1 for c in comparisons) else "") + ".", ""]
        lines += comparison_sections(comparisons)
    elif len(measured) > 1:
        lines += ["## Comparisons", "", "No two variants share evaluation pairs, so none are compared.", ""]
    lines += multiplicity_section(measured, comparisons) + power_section(measured, comparisons)

    lines += stage_sections(measured, study.pairs)
    lines += ["## What this does and does not show", ""] + [f"- {c}" for c in [*caveats(measured, comparisons, axes),
                                                                               *signal_caveats(measured)]]
    lines.append("")
    if figs:
        lines += ["## Figures", ""]
        for name, caption in figs:
            lines += [f"![{caption}]({name})", "", f"*{caption}.*", ""]

    lines += ["## Runs", ""]
    rows = []
    for g in groups:
        for _, r in g.runs.iterrows():
            m = study.metrics.loc[r["run_id"]]
            rows.append([g.label, f"`{r['run_id']}`", f"`{r['variant_id']}`", f"`{r.get('group_id') or '-'}`",
                         str(r.get("seed")),
                         _n(m.get("train/seconds")) + " s", _n(m.get("eval/seconds")) + " s"])
    lines += _table(["variant", "run id", "variant id", "group", "seed", "training", "measuring"], rows)
    lines.append("")
    produced = {name for name, _ in figs}
    for stale in [*FIGURE_NAMES, *(f.name for f in out_dir.glob("*_curve.png"))]:
        if stale not in produced and (out_dir / stale).is_file():
            (out_dir / stale).unlink()  # a figure an earlier report drew that this one does not
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    webpage.write_html(path)  # the same page with its figures inside, for MLflow's artifact viewer
    return path


def write_report(target: str, results_dir: Path) -> Path:
    """Load, write `<results>/<grid>/report.md` with its figures, log them to the parent run."""
    study = load_study(target, results_dir)
    out_dir = results_dir / study.grid
    path = build(study, out_dir, target=target)
    if study.parent_run_id:
        tracker = MlflowTracker(study.uri, study.parent_run_id)
        for f in sorted(out_dir.iterdir()):
            if f.suffix in (".md", ".html", ".png"):
                tracker.log_artifact(f, "report")
    return path


# ---------------------------------------------------------------- seed replicates, many tests, power
#
# A variant run under several training seeds (`seeds: N` in its grid) is one group: its held-out shifts form a
# seeds × pairs table, its interval covers both (`stats.replicated_mean`), and a comparison pairs two groups
# on the same pairs and seeds. Every p-value the report words a verdict from is one test of one family: each
# variant's shift against zero and each comparison; verdicts use Holm's adjustment over that family.


def seed_by_seed(cmp: Comparison) -> str:
    """A replicated comparison's difference seed by seed, against its own between-seed spread: is the
    difference larger than what one seed to the next does to it?"""
    if cmp.table is None or len(cmp.table) < 2:
        return ""
    sp = stats.spread(cmp.table.to_numpy())
    seeds = ", ".join(f"{fmt(x)} (seed {s})" for s, x in zip(cmp.table.index, sp.seed_means, strict=True))
    same_sign = all(x > 0 for x in sp.seed_means) or all(x < 0 for x in sp.seed_means)
    ratio = abs(cmp.est.mean) / sp.seed_sd if sp.seed_sd > 0 else math.inf
    text = (f" Seed by seed the difference is {seeds}: SD {fmt(sp.seed_sd, signed=False)} between seeds, "
            + ("every seed the same way" if same_sign else "the seeds disagree on its direction"))
    if same_sign and cmp.est.significant:
        text += (f"; the mean difference is {ratio:.3g}× that seed-to-seed SD" if math.isfinite(ratio) else "")
    return text + "."


def _several(e: Estimate) -> bool:
    return e.adjusted is not None and e.adjusted.tests > 1


def fmt_q(q: float) -> str:
    return f"BH q = {q:.2g}" if q >= 0.001 else "BH q < 0.001"


def _effect(e: Estimate) -> str:
    return f"d = {e.effect:.2g}" if _present(e.effect) else "d n/a"


def _test_note(e: Estimate, *, p: bool = True, short: bool = False) -> str:
    """What a verdict rests on: the Holm-adjusted p-value when the report makes several tests (with BH's
    q-value and the simultaneous interval), the plain p-value otherwise; and the effect size."""
    if short:
        return f" (Holm {fmt_p(e.adjusted.holm)})" if _several(e) else ""
    parts = [fmt_p(e.p_value)] if p else []
    if _several(e):
        a = e.adjusted
        parts += [f"Holm-adjusted {fmt_p(a.holm)} over the report's {a.tests} tests", fmt_q(a.bh),
                  f"simultaneous interval [{fmt(a.lo)}, {fmt(a.hi)}]"]
    parts.append(_effect(e))
    return ("; " if not p else " (") + "; ".join(parts) + ("" if not p else ")")


def interval_note(groups: list[Group]) -> str:
    """The header's addition when seeds were replicated or several tests are made."""
    out = ""
    seeds = sorted({g.est.seeds for g in groups if g.est.seeds > 1})
    if seeds:
        out += (f"; a variant run under {'/'.join(map(str, seeds))} training seeds gets an interval over seeds and "
                f"pairs together (two-level bootstrap, mean ± t × SE: see *Seed replicates*)")
    m = max((g.est.adjusted.tests for g in groups if g.est.adjusted is not None), default=1)
    if m > 1:
        out += (f"; verdicts use Holm-adjusted p-values over the report's {m} tests (see *Tests and their "
                f"adjustment*)")
    return out


def describe_seeds(g: Group) -> str:
    sp = stats.spread(g.table)
    e = g.est
    share = (f"makes up {sp.seed_share:.0%} of the variance of the mean shift, the choice of pairs the rest"
             if sp.seed_share >= 0.005 else "adds nothing measurable beyond what the pairs' own noise explains")
    return (f"Between seeds: the per-seed means are {', '.join(fmt(x) for x in sp.seed_means)} nats (seeds "
            f"{', '.join(map(str, g.table.index))}; SD {fmt(sp.seed_sd, signed=False)}). Training randomness "
            f"{share}; the interval above covers both (two-level bootstrap, t with {e.df:.3g} degrees of freedom).")


def seed_caveat(groups: list[Group]) -> str:
    many = [g for g in groups if len(g.seeds) > 1]
    single = [g.label for g in groups if len(g.seeds) == 1]
    ks = sorted({len(g.seeds) for g in many})
    text = (f"{'/'.join(map(str, ks))} training seeds per replicated variant: its interval covers training "
            f"randomness (adapter initialisation, batch order) as well as the choice of evaluation pairs, while the "
            f"training rows are the same for every seed (`data.shuffle_seed`). With so few seeds their spread is "
            f"itself a rough estimate, so those intervals are wide by design (Student's t at few degrees of "
            f"freedom).")
    if single:
        text += f" {', '.join(single)} ran under one seed: its interval covers the pairs only."
    staged = sorted({str(g.get('from')) for g in many if g.get("from")})
    if staged:
        text += (f" The `from:` stage ({', '.join(staged)}) trained once, under one seed: the replicates share it, "
                 f"so its own training randomness is not in any interval.")
    return text


def multiplicity_caveat(groups: list[Group], comparisons: list[Comparison]) -> list[str]:
    m = _tests(groups, comparisons)
    if m <= 1:
        return []
    raw = sum(e.p_value < stats.ALPHA for e in [*(g.est for g in groups), *(c.est for c in comparisons)]
              if not math.isnan(e.p_value))
    held = sum(e.significant for e in [*(g.est for g in groups), *(c.est for c in comparisons)])
    return [f"{_plural(m, 'test')} ({_plural(len(groups), 'variant')} against zero, "
            f"{_plural(len(comparisons), 'comparison')}): at an unadjusted 5%, {fmt(stats.ALPHA * m, signed=False)} of "
            f"them would cross by chance alone if nothing moved. {raw} cross unadjusted; {held} "
            f"{'does' if held == 1 else 'do'} after Holm's adjustment, which the verdicts use."]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def seed_figure(groups: list[Group], out_dir: Path) -> list[tuple[str, str]]:
    from analysis import figures

    if not any(len(g.seeds) > 1 for g in groups):
        return []
    rows = []
    for g in groups:
        for seed, values in g.table.iterrows():
            e = stats.bootstrap_mean(values.to_numpy())
            rows.append({"label": g.label, "kind": "seed", "seed": str(seed), "mean": e.mean, "lo": e.lo,
                         "hi": e.hi})
        a = g.est.adjusted
        rows.append({"label": g.label, "kind": "pooled", "seed": None, "mean": g.est.mean, "lo": g.est.lo,
                     "hi": g.est.hi, "adj_lo": a.lo if _several(g.est) else math.nan,
                     "adj_hi": a.hi if _several(g.est) else math.nan})
    path = figures.seed_points(pd.DataFrame(rows), out_dir / "seeds.png")
    return [(path.name, "Each training seed's mean held-out shift (grey, pairs-only 95% CI) beside the pooled "
                        "estimate over seeds and pairs (blue)")]


def seed_section(groups: list[Group]) -> list[str]:
    """The between-seed spread, variant by variant, apart from the pooled intervals."""
    many = [g for g in groups if len(g.seeds) > 1]
    if not many:
        return []
    lines = ["## Seed replicates", "",
             "Each replicated variant was trained once per seed on the same rows and measured on the same "
             "held-out pairs, so its shifts form a seeds × pairs table. The pooled interval comes from a two-level "
             f"bootstrap ({stats.N_RESAMPLES:,} draws): resample the seeds, then the pairs (the same pairs for every "
             "seed drawn), take the mean; it is the mean ± t × the draws' standard deviation, t at Satterthwaite's "
             "degrees of freedom, so that three seeds are not read as the whole population (on simulated 3-seed "
             "tables with no true shift, a plain percentile interval called one 14–26% of the time where seeds "
             "matter; this one, under 5%). 'Seed share' is the part of the mean's "
             "variance that training randomness makes up (two-way ANOVA); the rest is the choice of pairs.", ""]
    rows = []
    for g in many:
        sp = stats.spread(g.table)
        rows.append([g.label, ", ".join(map(str, g.table.index)), ", ".join(fmt(x) for x in sp.seed_means),
                     fmt(sp.seed_sd, signed=False), f"{sp.seed_share:.0%}", fmt_ci(g.est), f"{g.est.df:.3g}"])
    lines += _table(["variant", "seeds", "mean shift per seed", "SD between seeds", "seed share",
                     "pooled shift", "df"], rows)
    lines.append("")
    for g in many:
        sp = stats.spread(g.table)
        lo, hi = min(sp.seed_means), max(sp.seed_means)
        if lo > 0 or hi < 0:
            word = "every seed moved the margin the same way"
        else:
            word = "the seeds disagree on the direction"
        lines.append(f"- {g.label}: {word} (from {fmt(lo)} to {fmt(hi)} nats); pooled {g.est.verdict()}"
                     f"{_test_note(g.est, short=True)}.")
    lines.append("")
    return lines


def multiplicity_section(groups: list[Group], comparisons: list[Comparison]) -> list[str]:
    m = _tests(groups, comparisons)
    if m <= 1:
        return []
    lines = ["## Tests and their adjustment", "",
             f"This report makes {m} tests: {_plural(len(groups), 'variant')}' held-out shifts against zero and "
             f"{_plural(len(comparisons), 'comparison')} between variants. Verdicts use **Holm**'s step-down "
             f"adjustment (the chance of any false call among the {m} stays at 5%); **Benjamini–Hochberg** "
             f"q-values (the expected share of false calls stays at 5%) are shown beside them. The simultaneous "
             f"intervals are Bonferroni's, at level 1 − 0.05/{m} = {1 - stats.ALPHA / m:.4g}: they hold for all {m} "
             f"at once and are wider than Holm needs, so a Holm verdict can say 'above zero' while its simultaneous "
             f"interval touches zero. d is the effect size: the mean over the standard deviation of single "
             f"measurements (one seed on one pair; for a comparison, of the paired differences), about 0.2 small, "
             f"0.5 medium, 0.8 large by Cohen's rule of thumb.", ""]
    rows = []
    items = [(g.label, g.est) for g in groups] + [(f"{c.b.label} − {c.a.label}", c.est) for c in comparisons]
    for label, e in items:
        if math.isnan(e.p_value):
            continue
        a = e.adjusted
        rows.append([label, fmt_ci(e), f"[{fmt(a.lo)}, {fmt(a.hi)}]", fmt_p(e.p_value), fmt_p(a.holm),
                     fmt_q(a.bh).removeprefix("BH "), _effect(e).removeprefix("d = "), e.verdict()])
    lines += _table(["test", "estimate (nats)", "simultaneous interval", "p", "Holm p", "BH q", "d",
                     "verdict (Holm)"], rows)
    lines.append("")
    raw = [label for label, e in items if not math.isnan(e.p_value) and e.p_value < stats.ALPHA]
    holm_ok = [label for label, e in items if e.significant]
    bh_ok = [label for label, e in items if e.adjusted is not None and e.adjusted.bh < stats.ALPHA]
    lost = [x for x in raw if x not in holm_ok]
    text = (f"Unadjusted, {len(raw)} of the {m} cross 5%; after Holm, {len(holm_ok)}; after Benjamini–Hochberg, "
            f"{len(bh_ok)}.")
    if lost:
        text += f" No longer called after adjustment: {', '.join(lost)}."
    extra = [x for x in bh_ok if x not in holm_ok]
    if extra:
        text += (f" Called at a 5% false-discovery rate but not family-wise: {', '.join(extra)} (the verdicts above "
                 f"do not call them).")
    lines += [text, ""]
    return lines


def _halve_text(sp: stats.Spread) -> str:
    """What would halve the standard error (and so, roughly, the detectable shift), one kind at a time."""
    pairs, seeds = stats.to_halve(sp)
    if sp.seeds == 1:
        return f"about {pairs} pairs (now {sp.pairs}); seeds: unmeasured" if pairs is not None else "n/a"
    out = []
    if pairs is not None:
        out.append(f"about {pairs} pairs (now {sp.pairs})")
    if seeds is not None:
        out.append(f"about {seeds} seeds (now {sp.seeds})")
    if out:
        why = ("" if len(out) == 2 else " (more seeds alone cannot: the pairs are over a quarter of the variance)"
               if pairs is not None else " (more pairs alone cannot: the seeds are over a quarter of the variance)")
        return " or ".join(out) + why
    return (f"neither alone (seeds and pairs each hold over a quarter of the variance): 4× both, "
            f"{4 * sp.pairs} pairs and {4 * sp.seeds} seeds")


def power_section(groups: list[Group], comparisons: list[Comparison]) -> list[str]:
    """The smallest shift (and difference) this design could detect, so that 'not distinguishable' is not read
    as 'no effect'; and what would halve it."""
    items = [(g.label, g.est, _table_of(g)) for g in groups] + [
        (f"{c.b.label} − {c.a.label}", c.est, c.table.to_numpy()) for c in comparisons]
    items = [(label, e, t) for label, e, t in items if e.n > 1 and _present(e.se)]
    if not items:
        return []
    m = _tests(groups, comparisons)
    lines = ["## What this design could detect", "",
             f"From the observed spread: the smallest true shift each estimate would call with 80% power in a "
             f"two-sided test at 5% ((t₀.₉₇₅ + t₀.₈) × its standard error)"
             + (f", and at the adjusted level 0.05/{m} its verdict actually uses (Holm's first step)" if m > 1 else "")
             + "; and roughly how many pairs or seeds would halve it. A verdict of 'not distinguishable' means the "
               "shift is smaller than about this, or absent — not that it is zero.", ""]
    rows = []
    for label, e, table in items:
        sp = stats.spread(table)
        rows.append([label, fmt(e.mean), fmt(e.se, signed=False), fmt(stats.detectable(e), signed=False)]
                    + ([fmt(stats.detectable(e, alpha=stats.ALPHA / m), signed=False)] if m > 1 else [])
                    + [_halve_text(sp)])
    lines += _table(["estimate", "observed", "SE", "detectable (80%, 5%)"]
                    + ([f"detectable (80%, 5%/{m})"] if m > 1 else []) + ["to halve it"], rows)
    lines.append("")
    if all(stats.spread(t).seeds == 1 for _, _, t in items):
        lines += ["One training seed per variant: these sizes count the choice of pairs only. Seed-to-seed noise "
                  "would add to them by an amount one seed cannot measure; `seeds: 3` in the grid measures it.", ""]
    return lines
