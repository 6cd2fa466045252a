"""Paired comparison over seeds: one method's evaluation loss against another's.

Seed s of every method trains with the same training seed (and, for a method that
draws, its draw s), so the per-seed difference d_s = loss(ours, s) - loss(other, s)
removes what the seed does to both. Over the n seeds both ran, the report gives the
mean difference and its 95% t-interval, mean +- t(0.975, n - 1) * sd(d) / sqrt(n) with
the sample standard deviation (ddof 1). Negative is ours ahead (lower loss). The
verdict is "ahead" only when the whole interval is below zero, "behind" when it is above
zero, and "not separated" otherwise or with fewer than 2 seeds.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["paired_interval", "paired_differences", "AHEAD", "BEHIND", "NOT_SEPARATED",
           "CONFIDENCE"]

AHEAD, BEHIND, NOT_SEPARATED = "ahead", "behind", "not separated"
CONFIDENCE = 0.95


def paired_interval(diffs, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high) of the paired differences `diffs`: the mean and its two-sided
    t-interval at `confidence`; the interval is NaN with fewer than 2 differences."""
    from scipy import stats
    d = np.asarray(diffs, np.float64)
    if d.ndim != 1 or d.size == 0 or not np.isfinite(d).all():
        raise ValueError(f"diffs must be a non-empty 1-D array of finite numbers, got {d!r}")
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return NOT_SEPARATED
    if high < 0:
        return AHEAD
    if low > 0:
        return BEHIND
    return NOT_SEPARATED


def paired_differences(df: pd.DataFrame, ours: str, value: str = "eval_loss") -> pd.DataFrame:
    """One row per other method in `df` (columns method, seed, `value`): the seeds both
    ran, the mean paired difference ours - other, its 95% interval and the verdict."""
    wide = df.pivot_table(index="seed", columns="method", values=value, aggfunc="first")
    rows = []
    if ours in wide:
        for other in wide.columns:
            if other == ours:
                continue
            both = wide[[ours, other]].dropna()
            if both.empty:
                continue
            mean, low, high = paired_interval((both[ours] - both[other]).to_numpy())
            rows.append({"method": other, "seeds": len(both), "diff_mean": mean,
                         "diff_low": low, "diff_high": high, "verdict": verdict(low, high)})
    cols = ["seeds", "diff_mean", "diff_low", "diff_high", "verdict"]
    if not rows:
        return pd.DataFrame(columns=cols, index=pd.Index([], name="method"))
    return pd.DataFrame(rows).set_index("method")[cols].sort_values("diff_mean")
