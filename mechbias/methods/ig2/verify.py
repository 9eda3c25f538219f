"""The IG² paper's verification: suppress / amplify the selected neurons against random and plain-IG neurons."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ...core.results import Result, make_meta
from ...core.runner import map_last_logits
from ...data.prompts import single_token, tokenize
from ...eval.stats import relative_mean_change
from ...interventions.base import maybe_apply
from ...interventions.units import NeuronIntervention
from ...viz.method_figures import plot_verification
from .attribution import gap_fn
from .selection import NeuronSelection
from .units import Unit

# ----------------------------------------------------------------------------
# verification: suppress / amplify vs random and plain-IG neurons
# ----------------------------------------------------------------------------

def unit_values(model, units: Sequence[Unit], *, kind: str = "prob", intervention=None) -> Tensor:
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
            vals = map_last_logits(model, tokenize(model, tx), lambda lg: gap(lg[:, -1])).double()
        v = dict(zip(tx, vals.tolist()))
        for k in ks:
            out[k] = sum(w * v[t] for t, w in zip(units[k].texts, units[k].weights))
    return out


@dataclass
class VerificationResult(Result):
    """Change of the attributed gap under suppression / amplification of neuron sets."""

    rows: list[dict]
    meta: dict = field(default_factory=dict)
    result_type = "ig2_verification"

    def plot(self, ax=None):
        return plot_verification(self, ax=ax)


def verify(
    model,
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
    """The paper's verification: relative change of the mean gap over held-out units when the
    selected neurons are suppressed (×0) or amplified (×2), against the same number of random
    neurons from the same layers (``n_random`` draws) and against plain-IG neurons.

    Change = (mean gap after - mean gap before) / |mean gap before|, with a
    paired bootstrap 95% CI over units.
    """
    base = unit_values(model, units, kind=kind)
    sets = {"IG2": selection.as_pairs()}
    if ig_selection is not None and len(ig_selection):
        sets["IG"] = ig_selection.as_pairs()
    for r in range(n_random):
        sets[f"random{r}"] = selection.intervention().random_like(model, seed + 1000 + r).as_pairs()
    n = len(units)
    b0 = base.numpy()
    rows = []
    for op, factor in (("suppress", 0.0), ("amplify", 2.0)):
        per_set = {}
        for name, pairs in sets.items():
            if not pairs:
                continue
            iv = NeuronIntervention(pairs, factor=factor, positions=positions)
            per_set[name] = unit_values(model, units, kind=kind, intervention=iv).numpy()
        for name in ["IG2", "IG"]:
            if name not in per_set:
                continue
            v = per_set[name]
            rel, lo, hi = relative_mean_change(b0, v, n_boot=n_boot, seed=seed)
            rows.append({"neurons": name, "operation": op, "n_neurons": len(sets[name]),
                         "relative_change": float(rel), "ci_low": lo, "ci_high": hi,
                         "gap_before": float(b0.mean()), "gap_after": float(v.mean())})
        rnd = [k for k in per_set if k.startswith("random")]
        if rnd:
            vals = np.stack([per_set[k] for k in rnd])  # [draws, units]
            v = vals.mean(0)
            rel, lo, hi = relative_mean_change(b0, v, n_boot=n_boot, seed=seed)
            draws = [(x.mean() - b0.mean()) / abs(b0.mean()) for x in vals]
            rows.append({"neurons": f"random (same layers, {len(rnd)} draws)", "operation": op,
                         "n_neurons": len(sets["IG2"]), "relative_change": float(rel), "ci_low": lo,
                         "ci_high": hi, "gap_before": float(b0.mean()), "gap_after": float(v.mean()),
                         "random_draws": [float(x) for x in draws]})
    meta = make_meta(model, kind=kind, positions=positions, n_units=n, n_random=n_random, seed=seed)
    return VerificationResult(rows, meta)


