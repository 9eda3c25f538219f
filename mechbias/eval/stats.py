"""Statistics: crossed bootstrap over templates and names, paired reductions, effect sizes.

Bias is a difference of means between two groups of names, measured over a
grid of templates x names. Both the names and the templates are samples from
larger populations, so the bootstrap resamples both: templates with
replacement, and names with replacement *within* each group. A 95% interval
from this crossed bootstrap is wider (more honest) than one over prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import mannwhitneyu, spearmanr
from torch import Tensor

DEFAULT_BOOT = 2000


def _weights(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """Bootstrap resampling counts ``[n_boot, n]`` (multinomial, each row sums to n)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


@dataclass
class Gap:
    """A group difference with its crossed-bootstrap 95% interval."""

    gap: float
    ci_low: float
    ci_high: float
    p_value: float
    mean_a: float
    mean_b: float
    effect_size: float
    n_templates: int
    n_names_a: int
    n_names_b: int

    @property
    def significant(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    def as_dict(self) -> dict:
        return dict(self.__dict__, significant=self.significant,
                    n_prompts=self.n_templates * (self.n_names_a + self.n_names_b))


class CrossedBootstrap:
    """Shared resampling weights for a templates x names grid, so paired statistics use the same draws."""

    def __init__(self, n_templates: int, col_group: Tensor, n_boot: int = DEFAULT_BOOT, seed: int = 0):
        rng = np.random.default_rng(seed)
        g = np.asarray(col_group)
        self.a_cols = np.flatnonzero(g == 0)
        self.b_cols = np.flatnonzero(g == 1)
        if len(self.a_cols) == 0 or len(self.b_cols) == 0:
            raise ValueError(f"both groups need names: group A has {len(self.a_cols)}, group B {len(self.b_cols)}")
        self.wt = _weights(rng, n_templates, n_boot)
        self.wa = _weights(rng, len(self.a_cols), n_boot)
        self.wb = _weights(rng, len(self.b_cols), n_boot)
        self.n_boot = n_boot

    def gaps(self, mat: np.ndarray) -> np.ndarray:
        """Bootstrap replicates of mean(A) - mean(B) for matrix ``[templates, names]``."""
        sa = mat[:, self.a_cols]
        sb = mat[:, self.b_cols]
        ma = np.einsum("bt,tn,bn->b", self.wt, sa, self.wa) / (self.wt.sum(1) * self.wa.sum(1))
        mb = np.einsum("bt,tn,bn->b", self.wt, sb, self.wb) / (self.wt.sum(1) * self.wb.sum(1))
        return ma - mb


def percentile_ci(x: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.nanpercentile(x, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def _p_two_sided(boots: np.ndarray) -> float:
    """Bootstrap p-value for 'the statistic is 0' (share of replicates on the far side, doubled)."""
    b = boots[np.isfinite(boots)]
    if len(b) == 0:
        return float("nan")
    frac = min((b <= 0).mean(), (b >= 0).mean())
    return float(min(1.0, 2 * frac + 1.0 / len(b)))


def group_gap(mat: Tensor | np.ndarray, col_group: Tensor, *, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> Gap:
    """Mean(group A) - mean(group B) over a ``[templates, names]`` score matrix, with a crossed bootstrap CI."""
    m = np.asarray(mat, dtype=np.float64)
    g = np.asarray(col_group)
    boot = CrossedBootstrap(m.shape[0], torch.as_tensor(g), n_boot, seed)
    a, b = m[:, g == 0], m[:, g == 1]
    gap = a.mean() - b.mean()
    reps = boot.gaps(m)
    lo, hi = percentile_ci(reps)
    name_means = m.mean(0)
    pooled = np.sqrt((name_means[g == 0].var(ddof=1) + name_means[g == 1].var(ddof=1)) / 2) if min(
        (g == 0).sum(), (g == 1).sum()) > 1 else float("nan")
    return Gap(float(gap), lo, hi, _p_two_sided(reps), float(a.mean()), float(b.mean()),
               float(gap / pooled) if pooled and np.isfinite(pooled) and pooled > 0 else float("nan"),
               m.shape[0], int((g == 0).sum()), int((g == 1).sum()))


@dataclass
class Reduction:
    """A paired change of the group gap: absolute (after - before) and relative
    (1 - gap_after / gap_before), each with a paired bootstrap CI."""

    reduction: float
    ci_low: float
    ci_high: float
    gap_before: float
    gap_after: float
    gap_before_ci: tuple[float, float]
    gap_after_ci: tuple[float, float]
    gap_change: float = float("nan")
    gap_change_ci: tuple[float, float] = (float("nan"), float("nan"))

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def paired_reduction(before: Tensor | np.ndarray, after: Tensor | np.ndarray, col_group: Tensor, *,
                     n_boot: int = DEFAULT_BOOT, seed: int = 0) -> Reduction:
    """Relative reduction of the group gap between two score matrices on the same grid.

    The same bootstrap draws are applied to both matrices. A reduction of 1
    means the gap vanished, 0 no change, negative values a larger gap; when
    the gap before is close to 0 the ratio is unstable and the CI says so.
    """
    mb, ma = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if mb.shape != ma.shape:
        raise ValueError(f"before {mb.shape} and after {ma.shape} grids differ")
    g = np.asarray(col_group)
    boot = CrossedBootstrap(mb.shape[0], torch.as_tensor(g), n_boot, seed)
    gb = mb[:, g == 0].mean() - mb[:, g == 1].mean()
    ga = ma[:, g == 0].mean() - ma[:, g == 1].mean()
    rb, ra = boot.gaps(mb), boot.gaps(ma)
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = 1.0 - ra / rb
    lo, hi = percentile_ci(reps)
    return Reduction(float(1 - ga / gb) if gb != 0 else float("nan"), lo, hi, float(gb), float(ga),
                     percentile_ci(rb), percentile_ci(ra), float(ga - gb), percentile_ci(ra - rb))


def relative_mean_change(before, after, *, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """``(mean(after) - mean(before)) / |mean(before)|`` over paired units, with a bootstrap CI that
    resamples units (the same draws for both means)."""
    b0, v = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    n = len(b0)
    W = _weights(np.random.default_rng(seed), n, n_boot) / n
    rel = (v.mean() - b0.mean()) / abs(b0.mean())
    lo, hi = percentile_ci((W @ v - W @ b0) / np.abs(W @ b0))
    return float(rel), lo, hi


def bootstrap_mean(x, *, n_boot: int = DEFAULT_BOOT, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``x`` with a percentile bootstrap interval."""
    v = np.asarray(x, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    reps = (_weights(rng, len(v), n_boot) @ v) / len(v)
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

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).statistic)
