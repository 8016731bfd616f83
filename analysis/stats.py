"""Statistics for the report: paired bootstrap confidence intervals over evaluation pairs.

The unit of evidence is the evaluation pair. A variant's effect is the mean margin shift over the pairs;
its 95% CI is a percentile bootstrap over pairs (10,000 resamples, fixed seed, so a report is
reproducible). Two variants measured on the same pairs are compared by bootstrapping the mean of their
per-pair differences (paired). With several training seeds, each pair's shift is first averaged over
the seeds, so the CI reflects the choice of evaluation pairs, not seed-to-seed variation (the report
shows the per-seed spread separately).

    from analysis.stats import bootstrap_mean
    est = bootstrap_mean(shifts); print(est.describe())
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap CI and a two-sided bootstrap p-value for "the mean is zero"."""

    mean: float
    lo: float
    hi: float
    n: int
    p_value: float

    @property
    def covers_zero(self) -> bool:
        return not (self.lo > 0 or self.hi < 0)

    def verdict(self, what: str = "the mean") -> str:
        if self.n < 2:
            return f"{what} rests on {self.n} pair(s): no interval can be given"
        if self.covers_zero:
            return "not distinguishable from zero"
        return "above zero" if self.lo > 0 else "below zero"


def bootstrap_mean(values, *, n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Estimate:
    """Percentile bootstrap CI of the mean of `values` (NaNs dropped).

    p-value: twice the smaller share of resampled means on either side of zero (floored at 1/(n_resamples+1)),
    the usual percentile-bootstrap test; it agrees with "the CI covers zero" at the matching level.
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Estimate(mean, mean, mean, 1, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(n_resamples, n))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    below, above = (means <= 0).sum(), (means >= 0).sum()
    p = min(1.0, 2 * (min(below, above) + 1) / (n_resamples + 1))
    return Estimate(mean, float(lo), float(hi), n, p)


def paired_difference(a, b, **kwargs) -> Estimate:
    """Bootstrap estimate of mean(a - b) where a[i] and b[i] were measured on the same pair i."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs values on the same pairs, got {a.shape} and {b.shape}")
    return bootstrap_mean(a - b, **kwargs)


def fmt(x: float, signed: bool = True) -> str:
    """Three significant digits, as every number in the report is written."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.3g}" if signed else f"{x:.3g}"


def fmt_ci(est: Estimate) -> str:
    return f"{fmt(est.mean)} [95% CI {fmt(est.lo)}, {fmt(est.hi)}]"


def fmt_p(p: float) -> str:
    if math.isnan(p):
        return "p n/a"
    return f"p = {p:.2g}" if p >= 0.001 else "p < 0.001"
