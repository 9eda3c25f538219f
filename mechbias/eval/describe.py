"""Descriptive helpers beside the crossed estimates of :mod:`.stats`: a bootstrap mean, the standardised mean
difference, Mann-Whitney and Spearman (each NaN-safe)."""

from __future__ import annotations

import numpy as np
from scipy.stats import mannwhitneyu, spearmanr

from .stats import DEFAULT_BOOT, percentile_ci, resample_counts


def bootstrap_mean(x, *, n_boot: int = DEFAULT_BOOT, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``x`` with a percentile bootstrap interval."""
    v = np.asarray(x, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    reps = (resample_counts(rng, len(v), n_boot) @ v) / len(v)
    lo, hi = percentile_ci(reps, level)
    return float(v.mean()), lo, hi


def smd(a, b) -> float:
    """Standardized mean difference (mean(a) - mean(b)) / sqrt((var a + var b) / 2), ddof=1."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    s = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    return float((a.mean() - b.mean()) / s) if s > 0 else 0.0


def mann_whitney(a, b) -> tuple[float, float]:
    """Mann-Whitney U statistic and two-sided p-value."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan")
    res = mannwhitneyu(a, b, alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def spearman(a, b) -> float:
    """Spearman's rank correlation of two sequences (NaN when either is constant)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)
