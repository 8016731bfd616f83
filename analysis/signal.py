"""Training signal: what kind of shift a row is.

SFT-style methods train on prompt -> chosen only, so their margin shift is a by-product of imitating the
demonstrations; DPO trains chosen against rejected relative to a reference, and its shift is measured against
that same reference (the base, or a `from:` stage's model). These functions say which a row is, how much of its
shift is length, and, for a DPO row on a stage, what each step moved from the base.
"""

from __future__ import annotations

import pandas as pd

from analysis import stats
from analysis.groups import (Group, LengthSplit, _children_of, _is_sft_style, _per_pair, _present, _stage_of, _uses,
                             length_split)
from analysis.stats import Estimate, fmt, fmt_ci
from analysis.wording import _n, _table
from harness.core import methods


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
