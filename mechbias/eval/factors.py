"""Estimates over units that share factor levels (templates, names, draws): crossed moment estimates of one
variance component per factor (or the earlier factor bootstrap), and the weighted means they are usually asked
for. The crossed templates x names
grid has its own estimator, :func:`mechbias.eval.stats.crossed_estimate`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np

from .stats import DEFAULT_BOOT, Estimate, interval_of, resample_counts, t_interval


def factor_estimate(stat: Callable[[np.ndarray], np.ndarray], factors: Mapping[str, Sequence[Sequence]], *,
                    n_boot: int = DEFAULT_BOOT, seed: int = 0, level: float = 0.95,
                    estimator: Literal["moments", "bootstrap"] = "moments") -> Estimate:
    """A statistic of units that share crossed factors (e.g. name pairs: a template, a group-A name and a
    group-B name), with a t interval.

    ``stat(w)`` maps unit weights ``[B, n_units]`` to ``B`` values (a weighted mean, a ratio of weighted
    means); ``stat(ones)`` is the estimate. ``factors``: factor name -> per unit, the levels it belongs to
    (``[[t], ...]`` for templates, ``[[name_a], ...]``; a unit with two levels of one factor shares a level
    with every unit that has either). A factor with one level adds no variance (the interval is then
    conditional on it).

    ``estimator="moments"`` (the default): the statistic is linearised by its empirical influence values
    ``psi_u = n * d stat / d w_u`` (finite differences in each unit's weight; exact for a weighted mean, where
    ``psi_u`` is the unit's value minus the mean). Their variance components (one per factor and the total)
    are the method-of-moments solution of the crossed random-effects model from pairs of units: half the mean
    squared difference of two units estimates the total variance less what they share (the U-statistics of
    Gao and Owen, 2017), so the residual is counted once however many factors there are. The variance of the
    estimate is ``s2_total / n + sum_f s2_f * P_f / n^2`` (``P_f``: ordered pairs of units sharing a level of
    ``f``), with Welch-Satterthwaite degrees of freedom (``k_f - 1`` per factor; for the total, ``n - 1``
    less the factors' levels, at least the smallest factor's). Reported as ``var_templates`` (the factor named
    ``template``), ``var_names`` (the other factors) and ``var_residual`` (the total's part).

    ``estimator="bootstrap"``: the earlier estimator, one bootstrap per factor over its levels (the others
    fixed), corrected by k / (k - 1); each carries the residual, so their sum counts it once per factor
    (estimated / true variance 1.5-2.6 in simulations where it dominates; tests/test_stats.py).

    Args:
        stat: maps unit weights ``[B, n_units]`` to ``B`` values.
        factors: factor name -> per unit, the list of levels the unit belongs to.
        n_boot: bootstrap draws per factor (``estimator="bootstrap"`` only).
        seed: seed of the draws (``estimator="bootstrap"`` only).
        level: confidence level of the interval.
        estimator: ``"moments"`` (the default) or ``"bootstrap"`` (the earlier estimator).

    Returns:
        The :class:`~mechbias.eval.stats.Estimate` with its t interval, p-value and detectable difference.
    """
    if not factors:
        raise ValueError("factor_estimate needs at least one factor")
    n = len(next(iter(factors.values())))
    if n < 2 or any(len(v) != n for v in factors.values()):
        raise ValueError(f"every factor needs one entry per unit ({n} units, at least 2)")
    if estimator not in ("moments", "bootstrap"):
        raise ValueError(f"estimator must be 'moments' or 'bootstrap', not {estimator!r}")
    est = float(np.asarray(stat(np.ones((1, n))), dtype=np.float64).reshape(-1)[0])
    if estimator == "moments":
        return _moment_estimate(est, _influence(stat, est, n), factors, level)
    rng = np.random.default_rng(seed)
    comps: dict[str, tuple[float, float]] = {}
    for name, per_unit in factors.items():
        levels = sorted({lv for lvs in per_unit for lv in lvs}, key=str)
        k = len(levels)
        if k < 2:
            continue
        index = {lv: j for j, lv in enumerate(levels)}
        counts = resample_counts(rng, k, n_boot)  # [B, k]
        w = np.ones((n_boot, n))
        for u, lvs in enumerate(per_unit):
            for lv in lvs:
                w[:, u] *= counts[:, index[lv]]
        reps = np.asarray(stat(w), dtype=np.float64)
        reps = reps[np.isfinite(reps)]  # a draw that weights every unit 0 has no value
        comps[name] = (float(np.var(reps, ddof=1)) * k / (k - 1.0), k - 1.0)
    var_t, df_t = comps.pop("template", (0.0, 0.0))
    var_n = sum(v for v, _ in comps.values())
    denom_n = sum(v ** 2 / d for v, d in comps.values() if d > 0)
    df_n = var_n ** 2 / denom_n if denom_n > 0 else 0.0
    return t_interval(est, var_t, var_n, df_t, df_n, level)


def _influence(stat: Callable[[np.ndarray], np.ndarray], est: float, n: int, eps: float = 1e-6,
               chunk: int = 512) -> np.ndarray:
    """Empirical influence values ``n * d stat / d w_u`` by central differences in each unit's weight."""
    psi = np.empty(n)
    for s0 in range(0, n, chunk):
        idx = np.arange(s0, min(n, s0 + chunk))
        w = np.ones((2 * len(idx), n))
        w[np.arange(len(idx)), idx] += eps
        w[len(idx) + np.arange(len(idx)), idx] -= eps
        v = np.asarray(stat(w), dtype=np.float64).reshape(-1)
        psi[idx] = (v[:len(idx)] - v[len(idx):]) / (2 * eps) * n
    return psi


def _moment_estimate(est: float, psi: np.ndarray, factors: Mapping[str, Sequence[Sequence]],
                     level: float, chunk: int = 1024) -> Estimate:
    """Method-of-moments variance components of influence values ``psi`` under crossed random factors, and the
    t interval of ``est`` (see :func:`factor_estimate`)."""
    n = len(psi)
    if not np.isfinite(psi).all():
        return interval_of(est, float("nan"), 1.0, level, float("nan"), float("nan"), float("nan"))
    inc, k = [], []
    for per_unit in factors.values():
        levels = sorted({lv for lvs in per_unit for lv in lvs}, key=str)
        if len(levels) < 2:
            continue
        index = {lv: j for j, lv in enumerate(levels)}
        x = np.zeros((n, len(levels)))
        for u, lvs in enumerate(per_unit):
            for lv in lvs:
                x[u, index[lv]] = 1.0
        inc.append(x)
        k.append(len(levels))
    names = [f for f, pu in factors.items() if len({lv for lvs in pu for lv in lvs}) >= 2]
    F = len(inc)
    # pair sums over u != v: shared[f] = pairs sharing f; both[f, g] = pairs sharing f and g; half squared
    # differences over all pairs (a0) and over pairs sharing f (a[f])
    shared, both, a = np.zeros(F), np.zeros((F, F)), np.zeros(F)
    a0 = float(n * ((psi - psi.mean()) ** 2).sum())
    for s0 in range(0, n, chunk):
        rows = slice(s0, min(n, s0 + chunk))
        d = 0.5 * (psi[rows, None] - psi[None, :]) ** 2
        sh = [(x[rows] @ x.T > 0).astype(np.float64) for x in inc]
        for m in sh:
            m[np.arange(m.shape[0]), np.arange(s0, s0 + m.shape[0])] = 0.0
        for f in range(F):
            shared[f] += sh[f].sum()
            a[f] += float((sh[f] * d).sum())
            for g in range(F):
                both[f, g] += float((sh[f] * sh[g]).sum())
    # E[a0] = n(n-1) s2_tot - sum_g s2_g shared[g]; E[a[f]] = shared[f] s2_tot - sum_g s2_g both[f, g]
    lhs = np.zeros((F + 1, F + 1))
    lhs[0, 0], lhs[0, 1:] = n * (n - 1.0), -shared
    lhs[1:, 0], lhs[1:, 1:] = shared, -both
    sol = np.linalg.lstsq(lhs, np.concatenate([[a0], a]), rcond=None)[0]
    comps = np.maximum(sol[1:], 0.0)
    total = max(float(sol[0]), float(comps.sum()))
    parts = [(total / n, max(n - 1.0 - sum(kk - 1.0 for kk in k), min(k, default=n) - 1.0, 1.0))]
    parts += [(float(comps[f] * shared[f] / n ** 2), k[f] - 1.0) for f in range(F)]
    var = sum(v for v, _ in parts)
    denom = sum(v ** 2 / d for v, d in parts if v > 0)
    df = max(float(var ** 2 / denom), 1.0) if denom > 0 else float("inf")
    var_t = sum(parts[1 + f][0] for f in range(F) if names[f] == "template")
    return interval_of(est, var, df, level, var_t, var - var_t - parts[0][0], parts[0][0])


def factor_mean(values, factors: Mapping[str, Sequence[Sequence]], *, n_boot: int = DEFAULT_BOOT,
                seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-unit ``values`` with the :func:`factor_estimate` 95% interval; units whose value is not
    finite are left out (with their factor entries)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    ok = [int(i) for i in np.flatnonzero(np.isfinite(v))]
    if len(ok) < 2:
        return (float(v[ok].mean()) if len(ok) else float("nan")), float("nan"), float("nan")
    fac = {k: [f[i] for i in ok] for k, f in factors.items()}
    e = factor_estimate(weighted_mean(v[ok]), fac, n_boot=n_boot, seed=seed)
    return e.estimate, e.ci_low, e.ci_high


def weighted_mean(values) -> Callable[[np.ndarray], np.ndarray]:
    """``stat`` for :func:`factor_estimate`: the weighted mean of per-unit values."""
    v = np.asarray(values, dtype=np.float64)

    def stat(w: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w @ v) / w.sum(1)

    return stat
