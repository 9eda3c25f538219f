"""The IG² paper's verification: suppress / amplify the selected neurons against random and plain-IG neurons."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ...core.results import Result, make_meta
from ...core.runner import map_last_logits
from ...data.prompts import single_token, tokenize
from ...eval.factors import factor_estimate, weighted_mean
from ...interventions.base import maybe_apply
from ...interventions.units import NeuronIntervention
from ...viz.method_figures import plot_verification
from .attribution import gap_fn
from .inputs import Unit
from .thresholds import NeuronSelection

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

# ----------------------------------------------------------------------------
# verification: suppress / amplify vs random and plain-IG neurons
# ----------------------------------------------------------------------------

def unit_values(model: TransformerBridge, units: Sequence[Unit], *, kind: str = "prob", intervention=None
                ) -> Float[Tensor, " units"]:
    """The attributed quantity ``Σ_j w_j G(text_j)`` of every unit."""
    out = torch.zeros(len(units), dtype=torch.float64)
    by_target: dict[tuple[str, str], list[int]] = {}
    for k, u in enumerate(units):
        by_target.setdefault((u.d1, u.d2), []).append(k)
    for (w1, w2), ks in by_target.items():
        d1, d2 = single_token(model, w1), single_token(model, w2)
        gap = gap_fn(d1, d2, kind)
        tx = sorted({t for k in ks for t in units[k].texts})
        with maybe_apply(intervention, model):
            vals = map_last_logits(model, tokenize(model, tx), lambda lg, gap=gap: gap(lg[:, -1])).double()
        v = dict(zip(tx, vals.tolist(), strict=True))
        for k in ks:
            out[k] = sum(w * v[t] for t, w in zip(units[k].texts, units[k].weights, strict=True))
    return out


@dataclass
class VerificationResult(Result):
    """Change of the attributed gap under suppression / amplification of neuron sets (absolute first)."""

    rows: list[dict]
    meta: dict = field(default_factory=dict)
    result_type = "ig2_verification"

    def plot(self, ax=None):
        return plot_verification(self, ax=ax)


def unit_factors(units: Sequence[Unit]) -> dict[str, list[list]]:
    """The crossed factors a unit belongs to, from its ``info``: its template, and its group-A and
    group-B names (contrast units) or its outcome words (demographic units). Units without ``info`` are
    their own level (independent)."""
    keys = [k for k in ("template", "name_a", "name_b", "outcome") if all(k in u.info for u in units)]
    if not keys:
        return {"unit": [[k] for k in range(len(units))]}
    return {k: [[u.info[k]] for u in units] for k in keys}


def verify(
    model: TransformerBridge,
    selection: NeuronSelection,
    units: Sequence[Unit],
    *,
    ig_selection: NeuronSelection | None = None,
    kind: str = "prob",
    positions="all",
    n_random: int = 5,
    seed: int = 0,
    n_boot: int = 2000,
) -> VerificationResult:
    """The paper's verification: the change of the mean attributed gap over held-out units when the
    selected neurons are suppressed (×0) or amplified (×2), against the same number of random neurons
    from the same layers (``n_random`` draws, their scores averaged) and against plain-IG neurons.

    Per row, absolute first: ``change`` = mean gap after - mean gap before, with a t interval
    (``ci_low``, ``ci_high``, ``p_value``, ``min_detectable``) from :func:`~mechbias.eval.factors.factor_estimate`
    over the units' crossed factors (templates and names, or templates and outcome words); then
    ``relative_change`` = change / ``|gap before|`` with its interval, only where the gap before has a CI
    that excludes 0 (else None: not estimable); for IG² and IG, ``minus_random``: their change minus
    the random neurons' change on the same units, with its interval.
    """
    base = unit_values(model, units, kind=kind)
    sets = {"IG2": selection.as_pairs()}
    if ig_selection is not None and len(ig_selection):
        sets["IG"] = ig_selection.as_pairs()
    for r in range(n_random):
        sets[f"random{r}"] = selection.intervention().random_like(model, seed + 1000 + r).as_pairs()
    n = len(units)
    b0 = base.numpy()
    fac = unit_factors(units)
    est = lambda stat: factor_estimate(stat, fac, n_boot=n_boot, seed=seed)
    before = est(weighted_mean(b0))
    estimable = before.ci_low > 0 or before.ci_high < 0

    def ratio(v: np.ndarray):
        def stat(w: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore", divide="ignore"):
                return (w @ (v - b0)) / np.abs(w @ b0)
        return stat

    def row(op: str, name: str, v: np.ndarray, n_neurons: int, rnd: np.ndarray | None) -> dict:
        ch = est(weighted_mean(v - b0))
        out = {"neurons": name, "operation": op, "n_neurons": n_neurons, "gap_before": float(b0.mean()),
               "gap_before_ci": [before.ci_low, before.ci_high], "gap_after": float(v.mean()),
               "change": ch.estimate, "ci_low": ch.ci_low, "ci_high": ch.ci_high, "p_value": ch.p_value,
               "min_detectable": ch.min_detectable, "se": ch.se, "df": ch.df, "relative_change": None,
               "relative_ci_low": None, "relative_ci_high": None}
        if estimable:
            rel = est(ratio(v))
            out.update(relative_change=rel.estimate, relative_ci_low=rel.ci_low, relative_ci_high=rel.ci_high)
        if rnd is not None:
            d = est(weighted_mean(v - rnd))
            out["minus_random"] = {"estimate": d.estimate, "ci_low": d.ci_low, "ci_high": d.ci_high,
                                   "p_value": d.p_value, "min_detectable": d.min_detectable, "se": d.se, "df": d.df}
        return out

    rows = []
    for op, factor in (("suppress", 0.0), ("amplify", 2.0)):
        per_set = {}
        for name, pairs in sets.items():
            if not pairs:
                continue
            iv = NeuronIntervention(pairs, factor=factor, positions=positions)
            per_set[name] = unit_values(model, units, kind=kind, intervention=iv).numpy()
        rnd_keys = [k for k in per_set if k.startswith("random")]
        rnd = np.stack([per_set[k] for k in rnd_keys]).mean(0) if rnd_keys else None
        for name in ["IG2", "IG"]:
            if name in per_set:
                rows.append(row(op, name, per_set[name], len(sets[name]), rnd))
        if rnd is not None:
            rr = row(op, f"random (same layers, {len(rnd_keys)} draws)", rnd, len(sets["IG2"]), None)
            rr["random_draws"] = [float(per_set[k].mean() - b0.mean()) for k in rnd_keys]
            rows.append(rr)
    meta = make_meta(model, kind=kind, positions=positions, n_units=n, n_random=n_random, seed=seed,
                     factors={k: len({lv for lvs in v for lv in lvs}) for k, v in fac.items()})
    return VerificationResult(rows, meta)
