"""The report's words: every sentence is chosen by the numbers it states (`analysis.groups` computes them), never
written in advance. Number formatting, the description of one variant (how it was trained, what moved, its drift,
its seeds), of one comparison, the notes on tests, and the caveats. The training-signal wording (SFT-style vs a
shift against a reference, length, `from:` stages) is `analysis.signal`.
"""

from __future__ import annotations

import math

from analysis import stats
from analysis.groups import Comparison, Group, _axis_key, _present, _tests, _uses
from analysis.stats import Estimate, fmt, fmt_ci, fmt_p
from harness.core import methods

AXIS_WORDS = {"method": "method", "base_model": "base model", "data.size": "data size", "train.epochs": "epochs",
              "dpo.beta": "beta", "lora.rank": "LoRA rank", "lora.alpha": "LoRA alpha", "from": "starting stage",
              "lora.targets": "LoRA targets (scope)", "partial_ft.layers": "trained layers",
              "train.learning_rate": "learning rate"}


def _n(x) -> str:
    """An integer-valued number without a trailing .0."""
    return str(int(round(x))) if _present(x) else "n/a"


def _count(frac, n) -> str:
    return f"{_n(frac * n)}/{_n(n)}" if _present(frac) and _present(n) else "n/a"


def _params(n) -> str:
    if not _present(n):
        return "n/a"
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else _n(n)


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, int | float) and not isinstance(x, bool) else str(x)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


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
    optimises = methods.get(method).optimises if method in methods.names() else ""
    return (f"{what} of {c.get('base_model')}; {_params(m.get('params/trainable_numel'))} of "
            f"{_params(m.get('params/total_numel'))} parameters trainable. {data.capitalize()} from "
            f"`{c.get('data.train')}`, {_n(c.get('train.epochs'))} epoch(s) = {_n(steps)} optimiser steps of batch "
            f"{_n(c.get('train.batch_size'))}, learning rate {_num(c.get('train.learning_rate'))}; {seed_text}."
            + (f" {optimises}" if optimises else ""))


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
    else:
        record = methods.get(g.get("method")) if g.get("method") in methods.names() else None
        if record is not None and record.trainer_margin and _present(m.get("rewards/margins")):
            lines.append(f"TRL's own `rewards/margins` at the last step was {fmt(m.get('rewards/margins'))}: "
                         f"{record.trainer_margin}; on its own scale, not comparable to another method's.")
    return lines


def describe_seeds(g: Group) -> str:
    sp = stats.spread(g.table)
    e = g.est
    share = (f"makes up {sp.seed_share:.0%} of the variance of the mean shift, the choice of pairs the rest"
             if sp.seed_share >= 0.005 else "adds nothing measurable beyond what the pairs' own noise explains")
    return (f"Between seeds: the per-seed means are {', '.join(fmt(x) for x in sp.seed_means)} nats (seeds "
            f"{', '.join(map(str, g.table.index))}; SD {fmt(sp.seed_sd, signed=False)}). Training randomness "
            f"{share}; the interval above covers both (two-level bootstrap, t with {e.df:.3g} degrees of freedom).")


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
    out += study_factor_caveats(groups, axes)
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


def study_factor_caveats(groups: list[Group], axes: list[str]) -> list[str]:
    """What a row across base models, label-noise levels, reference-free objectives, methods' own reward
    margins, or shaped models can and cannot say (one line each, only where the grid has that kind of row)."""
    out = []
    bases = sorted({str(g.get("base_model")) for g in groups})
    if len(bases) > 1:
        templates = {str(g.get("base_model")): g.get("chat_template") for g in groups}
        shown = ", ".join(f"{b} ({'its own chat template' if not _present(templates[b]) else f'chat_template: {templates[b]}'})"
                          for b in bases)
        out.append(f"Base-model comparison: {shown}. Each base is its own reference, with its own tokenizer and turn "
                   f"format, so a row across bases compares two different starting points, not one setting. The "
                   f"margin shift in nats is comparable across them (summed log-probs of the same strings); per-token "
                   f"figures and the length split are not (another tokenizer cuts the same text into other tokens), "
                   f"so read those within one base only.")
    random_bases = [b for b in bases if b.startswith("random:")]
    if random_bases:
        out.append(f"{', '.join(random_bases)}: randomly initialised shapes, for memory and throughput: their margin "
                   f"shifts and drift mean nothing about preferences.")
    noise = sorted({float(g.get("data.label_noise")) for g in groups if _present(g.get("data.label_noise"))})
    if len(noise) > 1 or any(noise):
        rows = []
        for level in noise:
            at = [g for g in groups if _present(g.get("data.label_noise")) and float(g.get("data.label_noise")) == level]
            flipped = {_n(g.metrics.get("data/flipped")) for g in at}
            rows.append(f"{level:g} ({'/'.join(sorted(flipped))} pairs flipped): "
                        + ", ".join(f"{g.label} {fmt(g.est.mean)}" for g in at))
        out.append("Preference consistency: chosen and rejected were swapped on a seeded, nested fraction of the "
                   "training pairs (never the held-out pairs), so a noisier row trained partly against the preference "
                   "it is measured on. Held-out shift by noise level: " + "; ".join(rows) + ". With one seed and "
                   "a handful of flipped pairs, a difference between levels is within the intervals above unless they "
                   "say otherwise.")
    recs = {g.get("method"): methods.get(g.get("method")) for g in groups if g.get("method") in methods.names()}
    free = sorted(n for n, r in recs.items() if r.reference_free and r.data_kind == "preference")
    if free:
        out.append(f"{', '.join(free)} never saw a reference while training (reference-free objectives): their shift "
                   f"and drift are still measured against the starting model (the adapter disabled), which for them is "
                   f"only where training began, not a model the objective kept them near.")
    margins = sorted((n, r.trainer_margin) for n, r in recs.items() if r.trainer_margin)
    if len(margins) > 1:
        out.append("TRL's own `rewards/margins` means a different quantity per method ("
                   + "; ".join(f"{n}: {m}" for n, m in margins) + "); its scales differ, so it is never compared "
                   "across methods here: the held-out margin shift in nats is the common currency.")
    examples = [g for g in groups if recs.get(g.get("method")) is not None and recs[g.get("method")].unit == "example"
                and recs[g.get("method")].rows_per_pair > 1 and _present(g.metrics.get("data/examples"))]
    for g in examples:
        out.append(f"{g.label} trains on examples, not pairs: each pair became one desirable and one undesirable "
                   f"example ({_n(g.metrics.get('data/examples'))} examples), so its batch size and steps count "
                   f"examples.")
    return out


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
