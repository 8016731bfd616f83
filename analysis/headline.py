"""A finished variant's headline, and an invocation's table of them: what the MLflow UI shows first.

The report (`analysis.report`) is the full writeup; this is its first line per variant, computed from the same
logged numbers with the same statistics, so that a user who opens MLflow sees the answer before any click:

- `summary/` metrics (catalogue in `harness.core.metrics`): the held-out margin shift with its 95% CI bounds,
  accuracy before and after, KL, perplexity change and weight-change norm, rounded to 4 significant digits;
- a verdict ("above zero", "below zero", "not distinguishable from zero"), worded as in the report;
- a short markdown description for the run's page (what was trained, the shift with its CI, the verdict);
- for the parent run of an invocation, a markdown table of its variants' headlines.

The CI is `analysis.stats.bootstrap_mean` over the run's held-out pairs (`eval/pairs.csv`, split `eval`): for a
variant trained with one seed it is the interval the report prints.

    from analysis.headline import headline
    h = headline(run.data.metrics, pairs, run.data.params)   # h.values, h.verdict, h.description
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from analysis import stats
from analysis.stats import fmt, fmt_ci
from harness.core import methods
from harness.core.metrics import SUMMARY_KEYS, SUMMARY_OF, headline_round

MAX_NOTE = 7000  # characters: MLflow keeps a tag value of at most 8000


@dataclass(frozen=True)
class Headline:
    values: dict[str, float]  # summary/ key -> value (rounded), only those that were measured
    verdict: str
    description: str  # markdown for the run's page
    est: stats.Estimate


def held_out(pairs: pd.DataFrame | None) -> pd.DataFrame | None:
    """The held-out rows of a run's per-pair table (split `eval`), or None when it has none."""
    if pairs is None or "split" not in pairs or "margin_shift" not in pairs:
        return None
    rows = pairs[pairs["split"] == "eval"]
    return rows if len(rows) else None


def _present(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _count(frac, n) -> str:
    return f"{round(frac * n)}/{round(n)}" if _present(frac) and _present(n) else "n/a"


def headline(metrics: Mapping[str, float], pairs: pd.DataFrame | None, params: Mapping[str, Any]) -> Headline | None:
    """The headline of one finished run from what it logged; None when it measured no held-out pairs."""
    rows = held_out(pairs)
    if rows is None:
        return None
    est = stats.bootstrap_mean(rows["margin_shift"].to_numpy())
    values = {key: headline_round(metrics[src]) for key, src in SUMMARY_OF.items() if _present(metrics.get(src))}
    if est.n > 1:  # one pair gives no interval
        values["summary/shift_lo"], values["summary/shift_hi"] = headline_round(est.lo), headline_round(est.hi)
    verdict = est.verdict()
    n = metrics.get("eval/pairs", est.n)
    lines = [f"**Held-out margin shift {fmt_ci(est)} nats — {verdict}** ({est.n} held-out pairs; logp chosen − "
             f"logp rejected, after − before; paired bootstrap, {stats.N_RESAMPLES:,} resamples).", "",
             f"Accuracy {_count(metrics.get('eval/accuracy_before'), n)} → "
             f"{_count(metrics.get('eval/accuracy_after'), n)} · KL {fmt(metrics.get('drift/kl_mean'), signed=False)} "
             f"nats/token · Δppl {fmt(metrics.get('drift/ppl_change'))} · ‖ΔW‖ "
             f"{fmt(metrics.get('drift/weight_delta_norm'), signed=False)}", "",
             f"**Trained**: {trained(params, metrics)}", "",
             "Per pair: the Evaluation view (table `eval/heldout_pairs.json`, group by `pair`) or `eval/pairs.csv`. "
             "Every measured metric: `python -m harness metrics`."]
    return Headline(values=values, verdict=verdict, description="\n".join(lines), est=est)


def trained(params: Mapping[str, Any], metrics: Mapping[str, float]) -> str:
    """What was trained, in words, from the run's params (strings, as MLflow keeps them)."""
    method = params.get("method")
    what = methods.get(method).describe_config(params) if method in methods.names() else str(method)
    if params.get("from") not in (None, "None", ""):
        what += f", starting from stage {params.get('from')}"
    size = params.get("data.size")
    data = f"{size} training rows" if size not in (None, "None", "") else "all training rows"
    steps = metrics.get("train/global_step")
    return (f"{what} of {params.get('base_model')}; {data} × {params.get('train.epochs')} epoch(s) = "
            f"{round(steps) if _present(steps) else 'n/a'} optimiser steps, learning rate "
            f"{params.get('train.learning_rate')}.")


@dataclass(frozen=True)
class Row:
    """One variant of an invocation, as its run logged it."""

    name: str
    status: str  # FINISHED, SKIPPED (answered from the store), FAILED, ...
    metrics: Mapping[str, float]
    verdict: str = ""
    reason: str = ""


def invocation_note(title: str, rows: list[Row], *, report_hint: str) -> str:
    """Markdown for a parent run: one line per variant, the shift with its CI and verdict, then drift."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [f"**{title}**: {len(rows)} variant(s) — " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
             + ". Held-out margin shift (nats) with its 95% CI, and drift:", "",
             "| variant | shift [95% CI] | verdict | accuracy before → after | KL | Δppl | ‖ΔW‖ |",
             "|---|---|---|---|---|---|---|"]
    shown = 0
    for r in rows:
        m = r.metrics
        if "summary/shift" in m:
            ci = (f"{fmt(m['summary/shift'])} [{fmt(m.get('summary/shift_lo'))}, {fmt(m.get('summary/shift_hi'))}]")
            cells = [ci, r.verdict, f"{fmt(m.get('summary/acc_before'), signed=False)} → "
                                    f"{fmt(m.get('summary/acc_after'), signed=False)}",
                     fmt(m.get("summary/kl"), signed=False), fmt(m.get("summary/dppl")),
                     fmt(m.get("summary/dw"), signed=False)]
        else:
            cells = ["n/a", r.status.lower() + (f": {r.reason[:80]}" if r.reason else ""), "", "", "", ""]
        line = "| " + " | ".join([r.name.replace("|", "/"), *(c.replace("|", "/") for c in cells)]) + " |"
        if sum(len(x) + 1 for x in lines) + len(line) > MAX_NOTE - 300:
            break
        lines.append(line)
        shown += 1
    if shown < len(rows):
        lines += ["", f"... and {len(rows) - shown} more (the runs table lists them all)."]
    lines += ["", report_hint]
    return "\n".join(lines)


__all__ = ["Headline", "Row", "headline", "held_out", "invocation_note", "trained", "SUMMARY_KEYS"]
