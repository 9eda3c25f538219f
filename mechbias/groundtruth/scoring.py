"""Scoring methods against a planted bias whose location is known.

For a planted model (:mod:`mechbias.planted`) the truth per context is the set
of planted neurons that carry its bias: the shared ones plus the context's own.
Each method is scored by

* **precision@k / recall@k** of the planted neurons among its top-k neurons
  (k = number of planted neurons for that context), against the random
  baseline (k / number of neurons);
* for selection methods, the **transfer matrix** it produces against the
  **oracle** matrix: the reduction obtained by zeroing exactly the truth set
  of the row's context (what a perfect method would achieve);
* for GRADIEND, the share of the decoder update's norm on the planted neurons
  against the share those entries have of all parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..core.results import Result
from ..data.contexts import load_context, make_pairs
from ..eval.transfer import EvalSet, TransferConfig, evaluate
from ..interventions.units import NeuronIntervention
from ..methods.gradiend import decoder_share
from ..methods.ig2 import contrast_units, run_ig2
from ..methods.patching import attribution_patch
from ..methods.pruning import candidates
from ..viz.plotting import plot_ground_truth


def truth_sets(cfg) -> dict[str, set[tuple[int, int]]]:
    """Per context: the planted neurons carrying its bias (shared + its own)."""
    shared = {tuple(n) for n in cfg["shared"]} if isinstance(cfg, dict) else set(map(tuple, cfg.shared))
    only = cfg["only"] if isinstance(cfg, dict) else cfg.only
    contexts = cfg["contexts"] if isinstance(cfg, dict) else cfg.contexts
    return {c: shared | {tuple(n) for n in only.get(c, [])} for c in contexts}


def precision_recall(ranked: Sequence[tuple[int, int]], truth: set, k: int | None = None) -> dict:
    k = k or len(truth)
    top = {tuple(x) for x in list(ranked)[:k]}
    hit = len(top & truth)
    return {"k": k, "hits": hit, "precision": hit / max(k, 1), "recall": hit / max(len(truth), 1)}


def random_baseline(k: int, truth_size: int, n_neurons: int) -> dict:
    p = truth_size / n_neurons
    return {"precision": p, "recall": k / n_neurons}


def ranked_neurons(scores: torch.Tensor) -> list[tuple[int, int]]:
    """Neurons of a ``[layers, d_mlp]`` score tensor, best first."""
    d = scores.shape[1]
    order = scores.flatten().argsort(descending=True)
    return [(int(i) // d, int(i) % d) for i in order[: 5000]]


@dataclass
class GroundTruthResult(Result):
    """Recovery of the planted neurons by each method, and oracle vs measured transfer."""

    rows: list[dict]
    transfer: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    result_type = "ground_truth"

    def plot(self):
        return plot_ground_truth(self)


def oracle_transfer(model, cfg, contexts: Sequence[str], axis: str, *, eval_sets=None, n_boot: int = 500,
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


def score_ig2(model, cfg, contexts: Sequence[str], axis: str, *, pairs_per_template: int = 4, steps: int = 20,
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
        ranked = ranked_neurons(res.aggregate())
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


def score_atp(model, cfg, contexts: Sequence[str], axis: str, *, max_pairs: int = 12, seed: int = 0) -> list[dict]:
    """Attribution patching over all neurons (denoising): precision/recall@k of the planted neurons."""
    truth = truth_sets(cfg)
    rows = []
    for c in contexts:
        pairs = make_pairs(model, c, axis, templates="selection", names="selection", max_pairs=max_pairs, seed=seed)
        atp = attribution_patch(model, pairs, components=("neurons",))
        est = torch.nanmean(atp.estimates["neurons"], 0)
        ranked = ranked_neurons(est.abs())
        pr = precision_recall(ranked, truth[c])
        rows.append({"method": "AtP (neurons)", "context": c, **pr,
                     **{f"random_{k}": v for k, v in random_baseline(pr["k"], len(truth[c]),
                                                                    model.cfg.n_layers * model.cfg.d_mlp).items()}})
    return rows


def score_pruning(model, cfg, contexts: Sequence[str], axis: str, prune_cfg) -> list[dict]:
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


def score_gradiend(model, cfg, res) -> dict:
    """Share of the GRADIEND decoder update on the planted neurons vs their share of the parameters."""
    truth = truth_sets(cfg)
    neurons = sorted(set().union(*truth.values()))
    share = decoder_share(res, neurons)
    return {"method": "GRADIEND decoder", "context": res.context, "share": share["share"],
            "share_of_parameters": share["share_of_parameters"],
            "enrichment": share["share"] / max(share["share_of_parameters"], 1e-12),
            "feature_sign_accuracy": res.evaluation.get("sign_accuracy"),
            "feature_auc": res.evaluation.get("auc"),
            "feature_pearson": res.evaluation.get("pearson")}
