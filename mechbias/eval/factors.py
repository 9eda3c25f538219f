"""Estimates over units that share factor levels (templates, names, draws): a factor bootstrap with one
variance component per factor, and the weighted means it is usually asked for. The crossed templates x names
grid has its own estimator, :func:`mechbias.eval.stats.crossed_estimate`."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from .stats import DEFAULT_BOOT, Estimate, t_interval, resample_counts


def factor_estimate(stat: Callable[[np.ndarray], np.ndarray], factors: Mapping[str, Sequence[Sequence]], *,
                    n_boot: int = DEFAULT_BOOT, seed: int = 0, level: float = 0.95) -> Estimate:
    """A statistic of units that share crossed factors (e.g. name pairs: a template, a group-A name and a
    group-B name), with the t interval of :func:`crossed_estimate`.

    ``stat(w)`` maps unit weights ``[B, n_units]`` to ``B`` values (a weighted mean, a ratio of weighted
    means); ``stat(ones)`` is the estimate. ``factors``: factor name -> per unit, the levels it belongs to
    (``[[t], ...]`` for templates, ``[[name_a], ...]``; a unit with two levels of one factor gets the
    product of their counts). Each factor's variance comes from a bootstrap over its levels alone (the
    others fixed), corrected by k / (k - 1) for its k levels; a factor with one level adds none (the
    interval is then conditional on it). Degrees of freedom: Welch-Satterthwaite over the factors, k - 1
    each. Reported as ``var_templates`` (the factor named ``template``) and ``var_names`` (the rest).
    """
    if not factors:
        raise ValueError("factor_estimate needs at least one factor")
    n = len(next(iter(factors.values())))
    if n < 2 or any(len(v) != n for v in factors.values()):
        raise ValueError(f"every factor needs one entry per unit ({n} units, at least 2)")
    rng = np.random.default_rng(seed)
    est = float(np.asarray(stat(np.ones((1, n))), dtype=np.float64).reshape(-1)[0])
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
