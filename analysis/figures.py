"""Figures for the report (PNG, seaborn on matplotlib's Agg backend: no display needed).

Each function takes the report's tables and a path, writes one PNG and returns its path.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")
DPI = 120


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _errors(df: pd.DataFrame) -> np.ndarray:
    return np.vstack([df["mean"] - df["lo"], df["hi"] - df["mean"]]).clip(min=0)


def shift_per_variant(summary: pd.DataFrame, path: Path) -> Path:
    """Mean held-out margin shift per variant with its 95% bootstrap CI; the zero line is "no change"."""
    df = summary.iloc[::-1]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(df)))
    palette = dict(zip(sorted(df["method"].unique()), sns.color_palette(n_colors=df["method"].nunique()),
                       strict=True))
    for method, part in df.groupby("method", sort=False):
        ax.errorbar(part["mean"], part["label"], xerr=_errors(part), fmt="o", capsize=4, color=palette[method],
                    label=method)
    ax.axvline(0, color="black", lw=1)
    ax.set_xlabel("held-out margin shift, nats (mean, 95% CI)")
    ax.set_ylabel("")
    ax.legend(loc="best", fontsize="small")
    ax.set_title("How far each variant moved logp(chosen) - logp(rejected)")
    return _save(fig, path)


def shift_vs_drift(summary: pd.DataFrame, path: Path) -> Path:
    """The trade-off: margin shift against KL drift on the probes and against the weight-change norm."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    summary = summary.reset_index(drop=True)
    for ax, col, label in ((axes[0], "kl_mean", "KL(policy || reference) per probe token, nats"),
                           (axes[1], "weight_delta_norm", "weight change norm ||ΔW||")):
        df = summary.dropna(subset=[col])
        for method, part in df.groupby("method", sort=False):
            ax.errorbar(part[col], part["mean"], yerr=_errors(part), fmt="o", capsize=4, label=method)
        for i, row in df.iterrows():  # numbers, keyed below the plot: labels of close points would overlap
            ax.annotate(str(i + 1), (row[col], row["mean"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
        if len(df) and (df[col] > 0).all() and df[col].max() / max(df[col].min(), 1e-300) > 50:
            ax.set_xscale("log")
        ax.axhline(0, color="black", lw=1)
        ax.set_xlabel(label)
    axes[0].set_ylabel("held-out margin shift, nats")
    axes[0].legend(fontsize="small")
    fig.suptitle("Margin shift against drift (up and to the left is cheaper)")
    key = "   ".join(f"{i + 1}: {label}" for i, label in enumerate(summary["label"]))
    fig.text(0.5, 0.01, "\n".join(textwrap.wrap(key, 160)), ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * (len(key) // 160), 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def pairs_before_after(pairs: pd.DataFrame, path: Path) -> Path:
    """Per held-out pair: margin before (x) and after (y); points above the diagonal moved toward chosen."""
    labels = list(dict.fromkeys(pairs["label"]))
    cols = min(3, len(labels))
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    hue = "category" if pairs["category"].astype(str).str.len().gt(0).any() else None
    for ax, label in zip(axes.flat, labels, strict=False):
        part = pairs[pairs["label"] == label]
        sns.scatterplot(data=part, x="margin_before", y="margin_after", hue=hue, ax=ax, s=25,
                        legend=ax is axes.flat[0])
        lo = float(min(part["margin_before"].min(), part["margin_after"].min()))
        hi = float(max(part["margin_before"].max(), part["margin_after"].max()))
        ax.plot([lo, hi], [lo, hi], color="black", lw=1)
        ax.set_title(label, fontsize=9)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    if hue and axes.flat[0].get_legend() is not None:
        axes.flat[0].legend(fontsize="x-small")
    fig.suptitle("Held-out pairs: margin before vs after (diagonal = unchanged)")
    return _save(fig, path)


def training_curves(history: pd.DataFrame, path: Path) -> Path | None:
    """Logged step curves: TRL's rewards/margins (DPO), training loss, and the intermediate held-out shift."""
    def has_curve(key: str) -> bool:  # at least one run with two or more points
        return bool((history[history["key"] == key].groupby("run_id").size() > 1).any())

    keys = [k for k in ("rewards/margins", "train/loss", "eval/margin_shift_mean") if has_curve(k)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        part = history[history["key"] == key]
        sns.lineplot(data=part, x="step", y="value", hue="label", style="label", markers=True, dashes=False, ax=ax,
                     errorbar=None)
        ax.set_title(key)
        ax.set_ylabel("")
        if ax.get_legend() is not None:
            ax.legend(fontsize="x-small")
    return _save(fig, path)


def axis_curve(summary: pd.DataFrame, axis: str, path: Path, together_with: list[str] | None = None) -> Path:
    """Margin shift (with CI) against a numeric axis such as dpo.beta or data.size; one line per setting of
    the other varying fields. `together_with`: fields that change along with this axis (said in the title)."""
    df = summary.dropna(subset=[axis]).sort_values(axis)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for context, part in df.groupby("context", sort=False):
        ax.errorbar(part[axis].astype(float), part["mean"], yerr=_errors(part), fmt="o-", capsize=4,
                    label=context or "all")
    ax.axhline(0, color="black", lw=1)
    ax.set_xlabel(axis)
    ax.set_ylabel("held-out margin shift, nats")
    if df[axis].nunique() > 2 and (df[axis].astype(float) > 0).all():
        ax.set_xscale("log")
    if df["context"].nunique() > 1:
        ax.legend(fontsize="x-small")
    ax.set_title(f"Margin shift against {axis}"
                 + (f"\n(changes together with {', '.join(together_with)})" if together_with else ""))
    return _save(fig, path)


def seed_points(points: pd.DataFrame, path: Path) -> Path:
    """Each training seed's mean held-out shift (with its pair-only 95% CI) beside the variant's pooled mean
    (its interval over seeds and pairs, and the simultaneous one when the report adjusts for many tests).
    `points`: label, kind ("seed" or "pooled"), seed, mean, lo, hi, and adj_lo, adj_hi on pooled rows."""
    labels = list(dict.fromkeys(points["label"]))
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.8 * len(labels)))
    y_of = {label: len(labels) - 1 - i for i, label in enumerate(labels)}
    for label in labels:
        part = points[points["label"] == label]
        seeds = part[part["kind"] == "seed"].reset_index(drop=True)
        offsets = np.linspace(-0.05, -0.35, len(seeds)) if len(seeds) > 1 else np.array([-0.18])  # first seed on top
        for off, (_, row) in zip(offsets, seeds.iterrows(), strict=True):
            y = y_of[label] + off
            ax.errorbar(row["mean"], y, xerr=_errors(pd.DataFrame([row])), fmt="o", ms=4, capsize=2, color="grey",
                        alpha=0.8, label="one seed (pairs only)" if label == labels[0] and off == offsets[0] else None)
            ax.annotate(f"seed {row['seed']}", (row["hi"], y), fontsize=7, xytext=(4, -3), textcoords="offset points",
                        color="dimgrey")
        pooled = part[part["kind"] == "pooled"]
        if len(pooled):
            row = pooled.iloc[0]
            y = y_of[label] + 0.2
            if pd.notna(row.get("adj_lo")):
                ax.plot([row["adj_lo"], row["adj_hi"]], [y, y], color="tab:blue", lw=1, alpha=0.5,
                        label="simultaneous (adjusted)" if label == labels[0] else None)
            ax.errorbar(row["mean"], y, xerr=_errors(pd.DataFrame([row])), fmt="D", ms=7, capsize=5, lw=2.5,
                        color="tab:blue", label="all seeds (seeds and pairs)" if label == labels[0] else None)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(list(y_of.values()), list(y_of.keys()))
    ax.set_xlabel("held-out margin shift, nats (mean, 95% CI)")
    ax.legend(loc="best", fontsize="x-small")
    ax.set_title("Each training seed beside the pooled estimate")
    return _save(fig, path)
