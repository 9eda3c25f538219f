"""Scoring methods against a planted bias whose location is known.

For a planted model (:mod:`mechbias.groundtruth.planted`) the truth per context
is the set of planted units that carry its bias: the shared ones plus the
context's own, by kind (name-position neurons, prediction-position neurons,
heads: :func:`truth_units`). Each method is scored by

* **unit recovery** (:func:`rank_recovery`): precision and recall at k of the
  planted units among its top-k, overall and per kind, against chance;
* **transfer-matrix recovery** (:func:`matrix_recovery`): its transfer matrix
  against the **oracle** matrix (:func:`oracle_matrix`: zero exactly the truth
  units of the row's context, what a perfect method would achieve): Pearson r
  and mean absolute error of the cells' ``gap_removed`` with CIs, and whether
  its diagonal - off-diagonal test detects the planted difference;
* for GRADIEND, the share of the decoder update's norm on the planted neurons
  against the share those entries have of all parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
from jaxtyping import Float
from scipy.stats import binomtest

from ..core.results import Record, Result
from ..data.contexts import load_context
from ..data.pairs import make_pairs
from ..eval.cells import EvalSet, TransferConfig, evaluate
from ..eval.stats import grid_gap, percentile_ci, resample_counts
from ..eval.transfer import TransferMatrix, transfer_estimate, transfer_matrix
from ..interventions.base import Compose, Intervention
from ..interventions.units import HeadIntervention, NeuronIntervention
from ..methods.gradiend import decoder_share
from ..methods.ig2 import contrast_units, run_ig2
from ..methods.patching import attribution_patch
from ..methods.pruning import candidates
from ..viz.plotting import plot_ground_truth
from .planted import planted_units

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

KINDS = ("neuron@name", "neuron@last", "head@last")


def truth_units(cfg) -> dict[str, dict[str, set[tuple[int, int]]]]:
    """Per context and kind (``neuron@name``, ``neuron@last``, ``head@last``): the planted units carrying its
    bias (shared ones and its own). From a :class:`~mechbias.groundtruth.planted.PlantConfig` or a manifest."""
    contexts = cfg["contexts"] if isinstance(cfg, dict) else cfg.contexts
    out: dict[str, dict[str, set]] = {c: {k: set() for k in KINDS} for c in contexts}
    for u in planted_units(cfg):
        kind = f"{u['kind']}@{u['position']}"
        for c in (contexts if u["role"] == "shared" else [u["role"]]):
            out[c][kind].add((u["layer"], u["index"]))
    return out


def truth_sets(cfg) -> dict[str, set[tuple[int, int]]]:
    """Per context: the planted neurons carrying its bias (shared + its own, at any position)."""
    return {c: kinds["neuron@name"] | kinds["neuron@last"] for c, kinds in truth_units(cfg).items()}


def oracle_intervention(cfg, context: str) -> Intervention:
    """Zero exactly the units that carry ``context``'s planted bias (the ideal selection), at every position."""
    t = truth_units(cfg)[context]
    neurons = sorted(t["neuron@name"] | t["neuron@last"])
    parts: list[Intervention] = [NeuronIntervention(neurons, label=f"oracle {context}")] if neurons else []
    if t["head@last"]:
        parts.append(HeadIntervention(sorted(t["head@last"]), label=f"oracle heads {context}"))
    return parts[0] if len(parts) == 1 else Compose(parts)


def oracle_matrix(model: TransformerBridge, cfg, select_on: Sequence[str], axis: str, *, evaluate_on: Sequence[str] | None = None,
                  eval_sets=None, n_boot: int = 1000, seed: int = 0) -> TransferMatrix:
    """The transfer matrix of the oracle selection (what a perfect method would achieve), no controls."""
    return transfer_matrix(model, lambda m, c, a: oracle_intervention(cfg, c if isinstance(c, str) else c.name), list(select_on),
                           axis, method="oracle (planted units)", evaluate_on=evaluate_on, eval_sets=eval_sets,
                           config=TransferConfig(n_random=0, controls=(), capability=False, n_boot=n_boot, seed=seed))


class MatrixRecovery(TypedDict):
    """How well a method's transfer matrix recovers the oracle's (:func:`matrix_recovery`)."""

    method: str
    cells: int
    sensitivity: float
    sensitivity_ci: list[float]
    leakage: float
    leakage_ci: list[float]
    pearson: float
    pearson_ci: list[float]
    mae: float
    mae_ci: list[float]
    oracle_mean_removed: float
    within_minus_cross: float | None
    ci_low: float | None
    ci_high: float | None
    min_detectable: float | None
    detects: bool


@dataclass
class RankRecovery(Record):
    """Precision and recall at ``k`` of a ranking against the planted units (:func:`rank_recovery`).

    Args:
        k: how many of the top units were read.
        hits: planted units among them.
        precision, recall: hits / k and hits / planted units.
        precision_ci: Clopper-Pearson 95% interval of the precision (None for k = 0).
        chance_precision: planted units / all units.
        recall_by_kind: per kind of planted unit, its recall (``"recall <kind>"`` in :meth:`as_dict`).
        median_rank: the planted units' median rank (None without planted units).
    """

    k: int
    hits: int
    precision: float
    recall: float
    precision_ci: list[float] | None
    chance_precision: float
    recall_by_kind: dict[str, float]
    median_rank: float | None

    def as_dict(self) -> dict[str, Any]:
        """Flat, as the ground-truth tables read it (``recall <kind>`` columns)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("recall_by_kind", "median_rank")}
        return {**d, **{f"recall {kind}": v for kind, v in self.recall_by_kind.items()},
                "median_rank": self.median_rank}


class PrecisionRecall(TypedDict):
    """Hits, precision and recall of the top ``k`` units (:func:`precision_recall`)."""

    k: int
    hits: int
    precision: float
    recall: float


class ChanceLevel(TypedDict):
    """Expected precision and recall of units drawn at random (:func:`random_baseline`)."""

    precision: float
    recall: float


class GradiendRecovery(TypedDict):
    """The GRADIEND decoder's update on the planted neurons (:func:`score_gradiend`)."""

    method: str
    context: str
    share: float
    share_of_parameters: float
    enrichment: float
    feature_sign_accuracy: float | None
    feature_auc: float | None
    feature_pearson: float | None


def matrix_recovery(method: TransferMatrix, oracle: TransferMatrix, *, n_boot: int = 1000, seed: int = 0
                    ) -> MatrixRecovery:
    """How well a method's transfer matrix recovers the oracle's.

    Per cell the statistic is ``gap_removed`` (absolute, log-odds). Returns the
    Pearson correlation and the mean absolute error between the method's and the
    oracle's cells, each with a percentile CI from one bootstrap of the shared
    evaluation design (names resampled jointly across evaluation contexts,
    templates per context, the same draws for both matrices), and the method's
    diagonal - off-diagonal test with whether it detects the oracle's difference
    (its CI lies above 0). **Sensitivity** is the method's mean diagonal removal over the oracle's (1 = all of
    the planted gap in the selection's own context) and **leakage** its mean off-diagonal removal minus the
    oracle's (0 = it removes no more in the other contexts than the truth does), each with a percentile CI
    from the same replicates.
    """
    cells = [(r, c) for r in method.rows for c in method.cols]
    g = np.asarray(method.grids["col_group"])
    a, b = np.flatnonzero(g == 0), np.flatnonzero(g == 1)
    rng = np.random.default_rng(seed)
    # names are drawn jointly for every evaluation context; in an incomplete crossed design (NaN cells: names
    # that did not meet a template) within strata of the templates they met, as crossed_estimate draws them, so
    # every replicate keeps each block's share of each group. A full grid has one stratum per group.
    pattern = np.concatenate([np.isfinite(np.asarray(method.grids[f"before/{c}"], dtype=np.float64))
                              for c in method.cols], 0).T  # [names, every context's templates]
    strata: dict[bytes, list[int]] = {}
    for j in range(len(g)):
        strata.setdefault(pattern[j].tobytes(), []).append(j)
    wa, wb = np.zeros((n_boot, len(a))), np.zeros((n_boot, len(b)))
    pos_a, pos_b = {int(j): i for i, j in enumerate(a)}, {int(j): i for i, j in enumerate(b)}
    for cols in strata.values():
        for grp, w, pos in (([j for j in cols if g[j] == 0], wa, pos_a), ([j for j in cols if g[j] == 1], wb, pos_b)):
            if grp:
                w[:, [pos[j] for j in grp]] = resample_counts(rng, len(grp), n_boot)
    wt = {c: resample_counts(rng, np.asarray(method.grids[f"before/{c}"]).shape[0], n_boot) for c in method.cols}

    def gaps(mat, c):  # [n_boot] replicates and the point estimate of mean(A) - mean(B)
        m = np.asarray(mat, dtype=np.float64)
        mask = np.isfinite(m)
        if mask.all():
            ra = np.einsum("bt,tn,bn->b", wt[c], m[:, a], wa) / (wt[c].sum(1) * wa.sum(1))
            rb = np.einsum("bt,tn,bn->b", wt[c], m[:, b], wb) / (wt[c].sum(1) * wb.sum(1))
            return ra - rb, float(m[:, a].mean() - m[:, b].mean())
        # per-name means over the templates each name met (drawn), then the groups' weighted means of those:
        # grid_gap's estimate, which the cells report
        z = np.where(mask, m, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            nm = (wt[c] @ z) / (wt[c] @ mask)  # [n_boot, names]; NaN where none of a name's templates was drawn

        def group_mean(cols, w):
            x = nm[:, cols]
            w = np.where(np.isfinite(x), w, 0.0)
            return (np.nan_to_num(x) * w).sum(1) / w.sum(1)

        return group_mean(a, wa) - group_mean(b, wb), grid_gap(m, g)

    def removed(tm):
        reps, point = [], []
        for r, c in cells:
            before_r, before = gaps(tm.grids[f"before/{c}"], c)
            after_r, after = gaps(tm.grids[f"after/{r}/{c}"], c)
            sign = np.sign(before) or 1.0
            reps.append(-sign * (after_r - before_r))
            point.append(-sign * (after - before))
        return np.stack(reps, 1), np.array(point)

    m_reps, m_pt = removed(method)
    o_reps, o_pt = removed(oracle)

    def pearson(x, y):
        x = x - x.mean(-1, keepdims=True)
        y = y - y.mean(-1, keepdims=True)
        return (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1))

    r_reps, mae_reps = pearson(m_reps, o_reps), np.abs(m_reps - o_reps).mean(1)
    # sensitivity (diagonal removal over the oracle's) and leakage (off-diagonal removal beyond the oracle's),
    # separately, on the same replicates
    diag = np.array([r == c for r, c in cells])
    sens_reps = m_reps[:, diag].mean(1) / o_reps[:, diag].mean(1)
    leak_reps = m_reps[:, ~diag].mean(1) - o_reps[:, ~diag].mean(1)
    test = method.transfer_test or method.test_transfer()
    lo = test.get("ci_low")
    return {"method": method.method, "cells": len(cells),
            "sensitivity": float(m_pt[diag].mean() / o_pt[diag].mean()), "sensitivity_ci": list(percentile_ci(sens_reps)),
            "leakage": float(m_pt[~diag].mean() - o_pt[~diag].mean()) if (~diag).any() else float("nan"),
            "leakage_ci": list(percentile_ci(leak_reps)) if (~diag).any() else [float("nan")] * 2,
            "pearson": float(pearson(m_pt, o_pt)), "pearson_ci": list(percentile_ci(r_reps)),
            "mae": float(np.abs(m_pt - o_pt).mean()), "mae_ci": list(percentile_ci(mae_reps)),
            "oracle_mean_removed": float(np.abs(o_pt).mean()),
            "within_minus_cross": transfer_estimate(test),
            "ci_low": lo, "ci_high": test.get("ci_high"), "min_detectable": test.get("min_detectable"),
            "detects": bool(lo is not None and lo > 0)}


def rank_recovery(ranked: Sequence[tuple[int, int]], truth: dict[str, set], n_units: int, *,
                  k: int | None = None) -> RankRecovery:
    """Precision/recall at ``k`` (default: the number of true units) of a ranking, overall and per kind, with
    Clopper-Pearson intervals (binomial over the top ``k`` given the ranking), and the chance level k / n."""
    every = set().union(*truth.values())
    k = k or len(every)
    top = {tuple(x) for x in list(ranked)[:k]}
    hits = len(top & every)
    ci = binomtest(hits, k).proportion_ci() if k else None
    rank = {tuple(x): i for i, x in enumerate(ranked)}
    return RankRecovery(k, hits, hits / max(k, 1), hits / max(len(every), 1),
                        [float(ci.low), float(ci.high)] if ci else None, len(every) / n_units,
                        {kind: len(top & units) / len(units) for kind, units in truth.items() if units},
                        float(np.median([rank.get(u, len(ranked)) for u in every])) if every else None)


def precision_recall(ranked: Sequence[tuple[int, int]], truth: set, k: int | None = None) -> PrecisionRecall:
    """Hits, precision and recall of the top ``k`` ranked units against the planted ``truth``."""
    k = k or len(truth)
    top = {tuple(x) for x in list(ranked)[:k]}
    hit = len(top & truth)
    return {"k": k, "hits": hit, "precision": hit / max(k, 1), "recall": hit / max(len(truth), 1)}


def random_baseline(k: int, truth_size: int, n_neurons: int) -> ChanceLevel:
    """The expected precision and recall of ``k`` units drawn at random."""
    p = truth_size / n_neurons
    return {"precision": p, "recall": k / n_neurons}


def ranked_units(scores: Float[torch.Tensor, "layers units"]) -> list[tuple[int, int]]:
    """Units of a ``[layers, units]`` score tensor (neurons or heads), best first."""
    d = scores.shape[1]
    order = scores.flatten().argsort(descending=True)
    return [(int(i) // d, int(i) % d) for i in order[: 5000]]


@dataclass
class GroundTruthResult(Result):
    """Recovery of the planted neurons by each method, and oracle vs measured transfer."""

    rows: list[dict]
    transfer: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # v3: "matrices" (matrix_recovery per method), "oracle_test"
    result_type = "ground_truth"

    def plot(self):
        return plot_ground_truth(self)


def oracle_transfer(model: TransformerBridge, cfg, contexts: Sequence[str], axis: str, *, eval_sets=None, n_boot: int = 500,
                    seed: int = 0) -> list[dict]:
    """Reduction when exactly the truth set of each row context is zeroed (the ideal selection)."""
    truth = truth_sets(cfg)
    eval_sets = eval_sets if eval_sets is not None else {}
    tc = TransferConfig(n_random=0, n_boot=n_boot, seed=seed, capability=False)
    out = []
    for r in contexts:
        iv = NeuronIntervention(sorted(truth[r]), label=f"oracle {r}")
        for c in contexts:
            if c not in eval_sets:
                eval_sets[c] = EvalSet.build(model, load_context(c), axis, seed=seed)
            cell = evaluate(model, iv, eval_sets[c], None, tc, selected_on=r)
            out.append({"selected_on": r, "evaluated_on": c, "oracle_reduction": cell.reduction,
                        "oracle_ci_low": cell.reduction_ci_low, "oracle_ci_high": cell.reduction_ci_high,
                        "oracle_gap_change": cell.gap_change, "oracle_gap_change_ci_low": cell.ci_low,
                        "oracle_gap_change_ci_high": cell.ci_high})
    return out


def score_ig2(model: TransformerBridge, cfg, contexts: Sequence[str], axis: str, *, pairs_per_template: int = 4, steps: int = 20,
              kind: str = "logit", seed: int = 0, progress: bool = False, position: str = "last",
              internal_batch_size: int | None = None) -> list[dict]:
    """IG² (contrast units on each context's selection split): precision/recall@k of the planted neurons.

    ``position="all"`` uses the all-positions extension of IG² (see :func:`mechbias.methods.ig2.ig2_prompt`)."""
    truth = truth_sets(cfg)
    fav = 0  # the planted bias favours group A by construction
    rows = []
    for c in contexts:
        units = contrast_units(c, axis, favoured=fav, pairs_per_template=pairs_per_template, seed=seed)
        res = run_ig2(model, units, steps=steps, kind=kind, progress=progress, position=position,
                      internal_batch_size=internal_batch_size)
        ranked = ranked_units(res.aggregate())
        pr = precision_recall(ranked, truth[c])
        own = {tuple(n) for n in (cfg["only"] if isinstance(cfg, dict) else cfg.only).get(c, [])}
        others = set().union(*[{tuple(n) for n in v} for k, v in (cfg["only"] if isinstance(cfg, dict)
                                                                      else cfg.only).items() if k != c])
        top = set(ranked[: pr["k"]])
        rows.append({"method": "IG2" if position == "last" else "IG2 (all positions)", "context": c, **pr, "own_context_hits": len(top & own),
                     "other_context_hits": len(top & others),
                     **{f"random_{k}": v for k, v in random_baseline(pr["k"], len(truth[c]),
                                                                    model.cfg.n_layers * model.cfg.d_mlp).items()}})
    return rows


def score_atp(model: TransformerBridge, cfg, contexts: Sequence[str], axis: str, *, max_pairs: int = 12, seed: int = 0) -> list[dict]:
    """Attribution patching over all neurons (denoising): precision/recall@k of the planted neurons."""
    truth = truth_sets(cfg)
    rows = []
    for c in contexts:
        pairs = make_pairs(model, c, axis, templates="selection", names="selection", max_pairs=max_pairs, seed=seed)
        atp = attribution_patch(model, pairs, components=("neurons",))
        est = torch.nanmean(atp.estimates["neurons"], 0)
        ranked = ranked_units(est.abs())
        pr = precision_recall(ranked, truth[c])
        rows.append({"method": "AtP (neurons)", "context": c, **pr,
                     **{f"random_{k}": v for k, v in random_baseline(pr["k"], len(truth[c]),
                                                                    model.cfg.n_layers * model.cfg.d_mlp).items()}})
    return rows


def score_pruning(model: TransformerBridge, cfg, contexts: Sequence[str], axis: str, prune_cfg) -> list[dict]:
    """Neuron-pruning candidates on each context: precision/recall@k of the planted neurons."""
    truth = truth_sets(cfg)
    rows = []
    for c in contexts:
        cand = candidates(model, load_context(c), axis, prune_cfg)
        pr = precision_recall(cand.items, truth[c])
        rows.append({"method": f"pruning ({prune_cfg.score}, {prune_cfg.select or 'setdiff'})", "context": c, **pr,
                     **{f"random_{k}": v for k, v in random_baseline(pr["k"], len(truth[c]),
                                                                    model.cfg.n_layers * model.cfg.d_mlp).items()}})
    return rows


def score_gradiend(model: TransformerBridge, cfg, res) -> GradiendRecovery:
    """Share of the GRADIEND decoder update on the planted neurons vs their share of the parameters."""
    truth = truth_sets(cfg)
    neurons = sorted(set().union(*truth.values()))
    share = decoder_share(res, neurons)
    return {"method": "GRADIEND decoder", "context": res.context, "share": share.share,
            "share_of_parameters": share.share_of_parameters,
            "enrichment": share.share / max(share.share_of_parameters, 1e-12),
            "feature_sign_accuracy": res.evaluation.get("sign_accuracy"),
            "feature_auc": res.evaluation.get("auc"),
            "feature_pearson": res.evaluation.get("pearson")}
