"""The metric catalogue: every metric the measurement logs, what it means and which way is better.

One source for these facts: the report reads meanings and directions from here, and the metric table of
docs/measurement.md is generated from here (`python -m harness metrics` prints it; a test checks the page matches).
`<s>` stands for a split prefix: `eval` (the held-out pairs of data.eval) or `train_pairs` (the variant's
own training pairs). `summary/` repeats a finished variant's headline numbers, rounded, for the MLflow UI.

    from harness.core.metrics import CATALOGUE, lookup
    lookup("eval/margin_shift_mean").direction   # "higher"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SPLIT_PREFIXES = ("eval", "train_pairs")


@dataclass(frozen=True)
class Metric:
    key: str  # `<s>/...` for per-split metrics
    meaning: str
    direction: Literal["higher", "lower", "neither"]  # which way a training recipe would want it to move
    unit: str = ""

    @property
    def per_split(self) -> bool:
        return self.key.startswith("<s>/")

    def keys(self) -> list[str]:
        """The concrete metric keys (both splits for a per-split metric)."""
        if self.per_split:
            return [self.key.replace("<s>", s) for s in SPLIT_PREFIXES]
        return [self.key]


CATALOGUE: tuple[Metric, ...] = (
    Metric("<s>/pairs", "pairs scored", "neither", "pairs"),
    Metric("<s>/dropped", "pairs dropped because the prompt alone fills data.max_length", "lower", "pairs"),
    Metric("<s>/margin_before_mean", "mean margin logp(chosen) - logp(rejected) under the reference", "neither",
           "nats"),
    Metric("<s>/margin_after_mean", "mean margin under the trained model", "higher", "nats"),
    Metric("<s>/margin_shift_mean", "mean margin shift, after - before: how far preferences moved", "higher",
           "nats"),
    Metric("<s>/margin_shift_std", "standard deviation of the per-pair margin shift", "neither", "nats"),
    Metric("<s>/norm_margin_before_mean", "per-token margin (logp/n_chosen - logp/n_rejected), before", "neither",
           "nats/token"),
    Metric("<s>/norm_margin_after_mean", "per-token margin, after", "higher", "nats/token"),
    Metric("<s>/norm_margin_shift_mean", "per-token margin shift: the shift with length taken out", "higher",
           "nats/token"),
    Metric("<s>/accuracy_before", "fraction of pairs with margin > 0 under the reference", "neither"),
    Metric("<s>/accuracy_after", "fraction of pairs with margin > 0 after training", "higher"),
    Metric("<s>/chosen_shift_mean", "mean change in logp(chosen)", "higher", "nats"),
    Metric("<s>/rejected_shift_mean", "mean change in logp(rejected)", "lower", "nats"),
    Metric("<s>/displaced_frac", "fraction of pairs where both log-probs fell (likelihood displacement)", "lower"),
    Metric("<s>/implicit_reward_margin_mean", "dpo_lora only: beta × margin shift (TRL's rewards/margins)",
           "higher"),
    Metric("drift/kl_mean", "mean per-token KL(policy ‖ reference) on the reference's greedy probe completions",
           "lower", "nats/token"),
    Metric("drift/kl_tokens", "probe completion tokens the KL is averaged over", "neither", "tokens"),
    Metric("drift/ppl_before", "perplexity of the reference on the neutral text", "neither"),
    Metric("drift/ppl_after", "perplexity of the trained model on the neutral text", "lower"),
    Metric("drift/ppl_change", "ppl_after - ppl_before", "lower"),
    Metric("drift/weight_delta_norm", "LoRA: sqrt(Σ‖scale·B@A‖²); full methods: ‖θ_after − θ_before‖", "neither"),
    Metric("eval/seconds", "time spent measuring (before + after)", "lower", "s"),
    Metric("cache/reference_eval_hit", "1 if the reference's held-out pairs, probes and neutral text were "
           "read from the reference cache, 0 if measured (and stored)", "neither"),
    Metric("cache/reference_train_hit", "the same for the reference log-probs of the variant's training pairs",
           "neither"),
    Metric("cache/reference_logps_reused", "dpo_lora: 1 if TRL was given those reference log-probs instead of "
           "running a reference forward pass every step", "neither"),
    # The headline of a finished variant, logged once at step 0 (MLflow draws a metric whose only step is 0 as a
    # bar, not as a lone point) and rounded to 4 significant digits, so that MLflow's runs table, compare view and
    # Chart tab show the answer first. The unrounded values are the metrics above (SUMMARY_OF says which).
    Metric("summary/shift", "held-out margin shift (eval/margin_shift_mean)", "higher", "nats"),
    Metric("summary/shift_lo", "lower bound of its 95% paired-bootstrap CI over the held-out pairs (as in the "
           "report)", "higher", "nats"),
    Metric("summary/shift_hi", "upper bound of that CI", "higher", "nats"),
    Metric("summary/acc_before", "held-out preference accuracy before (eval/accuracy_before)", "neither"),
    Metric("summary/acc_after", "held-out preference accuracy after (eval/accuracy_after)", "higher"),
    Metric("summary/kl", "drift: KL(policy ‖ reference) (drift/kl_mean)", "lower", "nats/token"),
    Metric("summary/dppl", "drift: neutral-text perplexity change (drift/ppl_change)", "lower"),
    Metric("summary/dw", "drift: norm of the weight change (drift/weight_delta_norm)", "neither"),
    # a model measured on its own (`harness evaluate` without a reference)
    Metric("<s>/margin_mean", "a model alone: mean margin logp(chosen) - logp(rejected)", "higher", "nats"),
    Metric("<s>/norm_margin_mean", "a model alone: mean per-token margin", "higher", "nats/token"),
    Metric("<s>/accuracy", "a model alone: fraction of pairs with margin > 0", "higher"),
    Metric("drift/ppl", "a model alone: perplexity on the neutral text", "lower"),
)

_BY_KEY = {key: m for m in CATALOGUE for key in m.keys()}

# summary/ key -> the measured metric it rounds (the CI bounds come from the per-pair table instead)
SUMMARY_OF = {"summary/shift": "eval/margin_shift_mean", "summary/acc_before": "eval/accuracy_before",
              "summary/acc_after": "eval/accuracy_after", "summary/kl": "drift/kl_mean",
              "summary/dppl": "drift/ppl_change", "summary/dw": "drift/weight_delta_norm"}
SUMMARY_CI = ("summary/shift_lo", "summary/shift_hi")
SUMMARY_KEYS = ("summary/shift", *SUMMARY_CI, "summary/acc_before", "summary/acc_after", "summary/kl",
                "summary/dppl", "summary/dw")  # the order a table or chart shows them in


def headline_round(x: float) -> float:
    """4 significant digits: what a summary/ metric holds, short enough for a table cell (6.012e-07)."""
    return float(f"{x:.4g}")


def lookup(key: str) -> Metric | None:
    return _BY_KEY.get(key)


def describe(key: str) -> str:
    """`key`: meaning (unit; which way is better), for the report's glossary."""
    m = lookup(key)
    if m is None:
        return f"`{key}`"
    unit = f"{m.unit}; " if m.unit else ""
    better = {"higher": "higher is better", "lower": "lower is better", "neither": "no better direction"}
    return f"`{key}`: {m.meaning} ({unit}{better[m.direction]})"


def markdown_table() -> str:
    """The metric table of docs/measurement.md (paste it between the page's markers)."""
    lines = ["| metric | meaning | better | unit |", "|---|---|---|---|"]
    for m in CATALOGUE:
        lines.append(f"| `{m.key}` | {m.meaning} | {m.direction} | {m.unit} |")
    return "\n".join(lines)
