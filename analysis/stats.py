"""Statistics for the report: bootstrap intervals over evaluation pairs, and over training seeds too.

The unit of evidence is the evaluation pair. A variant's effect is the mean margin shift over the pairs.

- **One training seed**: the 95% CI is a percentile bootstrap over pairs (10,000 resamples, fixed seed, so a
  report is reproducible); two variants measured on the same pairs are compared by bootstrapping the mean of
  their per-pair differences (paired).
- **Several seeds** (seed replicates): every seed was measured on the same pairs, so a variant is a
  seeds × pairs table of shifts. `replicated_mean` draws a two-level bootstrap from it: resample the seeds,
  then the pairs (the same resampled pairs for every seed drawn: the seeds share their pairs), and take the
  mean. With 3 seeds a plain percentile interval from those draws would claim 95% and cover about 80% (the
  three seeds' spread is itself a guess from three numbers), so the interval is mean ± t × SE: SE is the
  draws' standard deviation, with the seed effects scaled by sqrt(k/(k-1)) first (a bootstrap of k values
  underestimates their variance by (k-1)/k), and t is Student's quantile at Satterthwaite's degrees of
  freedom for the seed and pair mean squares. `tests/test_stats.py` checks on simulated tables that a true
  zero is called significant at about the nominal 5%, from pair-dominated to seed-dominated noise.
  Comparisons pair on the same pairs *and* seeds: the table of differences goes through the same function.
- **Many tests**: `adjust` gives Holm's and Benjamini-Hochberg's adjusted p-values for a family of tests, and
  simultaneous (Bonferroni) intervals at level 1 - 0.05/m.
- **Power**: `Spread` splits a table's variance into seed, pair and residual parts (two-way ANOVA, method of
  moments); `detectable` is the shift this design finds with 80% power at alpha 0.05, and `to_halve` how
  many pairs or seeds would halve it.

    from analysis.stats import bootstrap_mean, replicated_mean
    est = bootstrap_mean(shifts); print(est.describe())
    est = replicated_mean(table)   # table: seeds x pairs
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as sps

N_RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
ALPHA = 1 - LEVEL  # the significance level every verdict uses (after adjustment, when there are several)
POWER = 0.8  # the power the "smallest detectable shift" is stated at


@dataclass(frozen=True)
class Adjusted:
    """An estimate's place in a family of `tests` tests: its adjusted p-values and simultaneous interval."""

    tests: int
    holm: float  # Holm's step-down adjusted p-value (controls the chance of any false call in the family)
    bh: float  # Benjamini-Hochberg adjusted p-value (q-value: controls the share of false calls)
    lo: float  # Bonferroni simultaneous interval: level 1 - ALPHA / tests
    hi: float


@dataclass(frozen=True)
class Estimate:
    """A mean with its CI and a two-sided p-value for "the mean is zero"; with seed replicates, also its
    standard error and degrees of freedom; once adjusted for a family of tests, `adjusted`."""

    mean: float
    lo: float
    hi: float
    n: int  # evaluation pairs
    p_value: float
    seeds: int = 1
    se: float = math.nan  # standard error of the mean (bootstrap)
    df: float = math.nan  # degrees of freedom behind the interval (pairs - 1 with one seed)
    effect: float = math.nan  # standardised effect d: mean / SD of single measurements (one seed on one pair)
    adjusted: Adjusted | None = None

    @property
    def covers_zero(self) -> bool:
        """The (unadjusted) interval includes zero."""
        return not (self.lo > 0 or self.hi < 0)

    @property
    def significant(self) -> bool:
        """Told apart from zero: by the Holm-adjusted p-value when this is one of several tests, else by the
        interval."""
        if self.n < 2:
            return False
        if self.adjusted is not None and not math.isnan(self.adjusted.holm):
            return self.adjusted.holm < ALPHA
        return not self.covers_zero

    def verdict(self, what: str = "the mean") -> str:
        if self.n < 2:
            return f"{what} rests on {self.n} pair(s): no interval can be given"
        if not self.significant:
            return "not distinguishable from zero"
        return "above zero" if self.mean > 0 else "below zero"


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


# ---------------------------------------------------------------- seed replicates: seeds x pairs tables


def _mean_squares(tables: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-way (seeds x pairs) ANOVA mean squares of tables shaped (..., k, n), k >= 2: seeds, pairs, residual."""
    k, n = tables.shape[-2:]
    grand = tables.mean(axis=(-2, -1), keepdims=True)
    rows = tables.mean(axis=-1, keepdims=True)
    cols = tables.mean(axis=-2, keepdims=True)
    ms_seed = n * ((rows - grand) ** 2).sum(axis=(-2, -1)) / (k - 1)
    ms_pair = k * ((cols - grand) ** 2).sum(axis=(-2, -1)) / (n - 1)
    ms_resid = ((tables - rows - cols + grand) ** 2).sum(axis=(-2, -1)) / ((k - 1) * (n - 1))
    return ms_seed, ms_pair, ms_resid


def two_level(tables, *, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> tuple[np.ndarray, np.ndarray,
                                                                                        np.ndarray]:
    """(mean, standard error, degrees of freedom) of the grand mean of each seeds x pairs table in `tables`
    (shape (..., k, n), k >= 2, n >= 2), vectorised over the leading axes.

    The SE is the standard deviation of a two-level bootstrap: draw k seeds with replacement, then n pairs with
    replacement, the same pairs for every drawn seed (each seed was measured on the same pairs), and take the
    mean. The seed effects are first scaled by sqrt(k/(k-1)): resampling k values gives (k-1)/k of their
    variance, a third too little with 3 seeds. The degrees of freedom are Satterthwaite's for the unbiased
    variance of the mean, (MS_seed + MS_pair - MS_resid) / (k n), at least 1."""
    t = np.asarray(tables, dtype=float)
    k, n = t.shape[-2:]
    if k < 2 or n < 2:
        raise ValueError(f"two_level needs at least 2 seeds and 2 pairs, got a {k} x {n} table")
    rng = np.random.default_rng(seed)
    grand = t.mean(axis=(-2, -1), keepdims=True)
    rows = t.mean(axis=-1, keepdims=True)
    spread = grand + math.sqrt(k / (k - 1)) * (rows - grand) + (t - rows)
    batch = t.shape[:-2]
    w_seed = rng.multinomial(k, np.full(k, 1 / k), size=(*batch, n_resamples)).astype(float)
    w_pair = rng.multinomial(n, np.full(n, 1 / n), size=(*batch, n_resamples)).astype(float)
    draws = np.einsum("...bk,...kn,...bn->...b", w_seed, spread, w_pair) / (k * n)
    se = draws.std(axis=-1, ddof=1)
    ms_seed, ms_pair, ms_resid = _mean_squares(t)
    var = np.maximum(ms_seed + ms_pair - ms_resid, 1e-300)
    denom = ms_seed ** 2 / (k - 1) + ms_pair ** 2 / (n - 1) + ms_resid ** 2 / ((k - 1) * (n - 1))
    df = np.clip(var ** 2 / np.maximum(denom, 1e-300), 1.0, k * n - 1)
    return grand[..., 0, 0], se, df


def t_p_value(mean, se, df):
    """Two-sided p-value of mean / se against Student's t with df degrees of freedom (vectorised)."""
    mean, se = np.asarray(mean, dtype=float), np.asarray(se, dtype=float)
    z = np.where(se > 0, np.abs(mean) / np.where(se > 0, se, 1.0), np.where(mean == 0, 0.0, np.inf))
    return 2 * sps.t.sf(z, df)


def _clean(table) -> np.ndarray:
    """A 2-D seeds x pairs table without the pairs some seed lacks (NaN)."""
    t = np.atleast_2d(np.asarray(table, dtype=float))
    return t[:, ~np.isnan(t).any(axis=0)]


def replicated_mean(table, *, n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Estimate:
    """The mean of a seeds x pairs table of shifts with an interval covering both seeds and pairs.

    One seed (a 1 x n table): the pair bootstrap of `bootstrap_mean`. Several: `two_level`, interval
    mean ± t(df) × SE, p-value from the same t. Pairs missing from any seed are dropped."""
    t = _clean(table)
    k, n = t.shape
    effect = effect_size(t)
    if k == 1 or n < 2:
        per_pair = t.mean(axis=0)
        est = bootstrap_mean(per_pair, n_resamples=n_resamples, seed=seed, level=level)
        se = float(per_pair.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
        return replace(est, seeds=k, se=se, df=float(n - 1), effect=effect)
    mean, se, df = (float(x) for x in two_level(t, n_resamples=n_resamples, seed=seed))
    half = float(sps.t.ppf(1 - (1 - level) / 2, df)) * se
    return Estimate(mean, mean - half, mean + half, n, float(t_p_value(mean, se, df)), seeds=k, se=se, df=df,
                    effect=effect)


def effect_size(table) -> float:
    """Standardised effect d of a seeds x pairs table: its mean over the standard deviation of single
    measurements (one seed on one pair), so that seed noise counts as noise. With one seed this is Cohen's d_z
    of the per-pair values (for a difference: of the per-pair differences)."""
    t = _clean(table)
    if t.size < 2:
        return math.nan
    sd = float(t.std(ddof=1))
    return float(t.mean() / sd) if sd > 0 else math.nan


def seed_matched(seeds_a, seeds_b) -> tuple[list, list]:
    """Which seeds of two variants to pair: the seeds both ran when there are any, else the k smallest of
    each matched in order (replicates are exchangeable, so any fixed matching is a valid pairing; equal seeds
    also share their batch order and, for equal adapter shapes, their initialisation)."""
    common = sorted(set(seeds_a) & set(seeds_b))
    if common:
        return common, common
    k = min(len(seeds_a), len(seeds_b))
    return sorted(seeds_a)[:k], sorted(seeds_b)[:k]


# ---------------------------------------------------------------- many tests


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaNs stay NaN and do not count as tests)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    order = np.argsort(p[ok])
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[ok][order]))
    vals = np.empty(m)
    vals[order] = adj
    out[ok] = vals
    return out


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values; NaNs stay NaN and do not count as tests)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    order = np.argsort(p[ok])
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    adj = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    vals = np.empty(m)
    vals[order] = adj
    out[ok] = vals
    return out


def adjust(estimates: list[Estimate], tables: list) -> list[Estimate]:
    """The estimates as one family: each gets its Holm and BH adjusted p-values and its simultaneous
    (Bonferroni, level 1 - ALPHA/m) interval recomputed from its table. Estimates without a p-value (one pair)
    are not tests and are returned as they are."""
    p = [e.p_value for e in estimates]
    m = int(np.sum(~np.isnan(p)))
    h, q = holm(p), benjamini_hochberg(p)
    out = []
    for e, table, hv, qv in zip(estimates, tables, h, q, strict=True):
        if math.isnan(e.p_value):
            out.append(e)
            continue
        wide = replicated_mean(table, level=1 - ALPHA / m) if m > 1 else e
        out.append(replace(e, adjusted=Adjusted(tests=m, holm=float(hv), bh=float(qv), lo=wide.lo, hi=wide.hi)))
    return out


# ---------------------------------------------------------------- spread and power


@dataclass(frozen=True)
class Spread:
    """Where a seeds x pairs table's uncertainty comes from (two-way ANOVA, method of moments, each part at
    least 0). With one seed, the seed part cannot be measured (NaN) and the pairs' variance is all of it."""

    seeds: int
    pairs: int
    seed_var: float  # variance of a seed's true mean shift around the variant's (training randomness)
    pair_var: float  # variance of a pair's true shift around the mean (which pairs were chosen)
    resid_var: float  # what neither explains (the seed's effect on a particular pair)
    seed_means: tuple[float, ...]

    def var_of_mean(self, seeds: int | None = None, pairs: int | None = None) -> float:
        """Variance of the mean shift with this many seeds and pairs (the measured design by default)."""
        k, n = seeds or self.seeds, pairs or self.pairs
        seed_part = 0.0 if math.isnan(self.seed_var) else self.seed_var / k
        return seed_part + self.pair_var / n + self.resid_var / (k * n)

    @property
    def seed_share(self) -> float:
        """Share of the mean's variance that comes from training seeds (NaN with one seed)."""
        if math.isnan(self.seed_var):
            return math.nan
        total = self.var_of_mean()
        return self.seed_var / self.seeds / total if total > 0 else math.nan

    @property
    def seed_sd(self) -> float:
        """Standard deviation of the per-seed mean shifts as measured (NaN with one seed)."""
        return float(np.std(self.seed_means, ddof=1)) if len(self.seed_means) > 1 else math.nan


def spread(table) -> Spread:
    t = _clean(table)
    k, n = t.shape
    seed_means = tuple(float(x) for x in t.mean(axis=1))
    if k == 1:
        return Spread(1, n, math.nan, float(t[0].var(ddof=1)) if n > 1 else math.nan, 0.0, seed_means)
    ms_seed, ms_pair, ms_resid = (float(x) for x in _mean_squares(t))
    return Spread(k, n, max(0.0, (ms_seed - ms_resid) / n), max(0.0, (ms_pair - ms_resid) / k), ms_resid,
                  seed_means)


def detectable(est: Estimate, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean this design finds with probability `power` in a two-sided test at `alpha`:
    (t(1 - alpha/2) + t(power)) × SE, at the estimate's degrees of freedom."""
    if math.isnan(est.se) or math.isnan(est.df):
        return math.nan
    return float((sps.t.ppf(1 - alpha / 2, est.df) + sps.t.ppf(power, est.df)) * est.se)


def to_halve(s: Spread) -> tuple[int | None, int | None]:
    """(pairs, seeds) that would halve the standard error, and so roughly the detectable shift, changing one
    and keeping the other; None when no number of that kind can (the other part alone is over a quarter of
    the variance) or, for seeds, when a single seed measured no seed spread."""
    target = s.var_of_mean() / 4
    if not target > 0:
        return None, None
    seed_part = 0.0 if math.isnan(s.seed_var) else s.seed_var / s.seeds
    pairs = None
    if target > seed_part:
        pairs = math.ceil((s.pair_var + s.resid_var / s.seeds) / (target - seed_part) - 1e-9)
    seeds = None
    if not math.isnan(s.seed_var) and target > s.pair_var / s.pairs:
        seeds = math.ceil((s.seed_var + s.resid_var / s.pairs) / (target - s.pair_var / s.pairs) - 1e-9)
    return pairs, seeds


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
