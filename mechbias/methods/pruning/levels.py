"""Generalization levels (L0 / L1 / L2) and pruning curves, evaluated with the transfer engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ...core.results import Result, make_meta
from ...data.contexts import load_context
from ...data.neutral import neutral_texts
from ...eval.cells import Capability, EvalSet, TransferConfig, evaluate, random_controls
from ...eval.stats import benjamini_hochberg, crossed_estimate
from ...viz.plotting import plot_curves, plot_levels
from .ranking import PruneConfig, candidates

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


@dataclass
class LevelsResult(Result):
    """Bias removed at generalization levels L0, L1, L2 per context, on the same prompts, and the tests
    between levels (``tests``: L0 - L1, L0 - L2, L1 - L2 with CIs, BH-adjusted p and detectable differences)."""

    unit: str
    axis: str
    rows: list[dict]
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    tests: list[dict] = field(default_factory=list)
    result_type = "pruning_levels"

    def plot(self, ax=None):
        return plot_levels(self, ax=ax)


def _row(cell, **extra) -> dict:
    rnd = cell.controls.get("random")
    return {**extra, "n_components": cell.n_components, "gap_before": cell.gap_before, "gap_change": cell.gap_change,
            "ci_low": cell.ci_low, "ci_high": cell.ci_high, "gap_removed": cell.gap_removed,
            "reduction": cell.reduction, "reduction_ci_low": cell.reduction_ci_low,
            "reduction_ci_high": cell.reduction_ci_high,
            "random_gap_change": rnd.gap_change if rnd else None, "random_gap_removed": rnd.gap_removed if rnd else None,
            "random_reduction": rnd.reduction if rnd else None}


def generalization_levels(
    model: TransformerBridge,
    contexts: Sequence[str],
    axis: str,
    cfg: PruneConfig,
    *,
    n_random: int = 2,
    n_boot: int = 1000,
    max_l0_templates: int | None = 3,
    transfer=None,
    progress: bool = False,
) -> LevelsResult:
    """L0, L1 and L2 selections evaluated **on the same prompts**: each selection template ``t`` with held-out
    names. L0 is selected on ``t`` alone, L1 on all of the context's selection templates, L2 on another
    context's. The differences L0 - L1 and L0 - L2 (bias removed, stacked over the templates) are tested with
    the design-respecting interval (:func:`~mechbias.eval.stats.crossed_estimate`), with their minimal
    detectable differences. ``transfer``: a transfer matrix of the same config supplies the L1/L2 interventions.
    """
    tc = TransferConfig(n_random=n_random, n_boot=n_boot, seed=cfg.seed, capability=False)
    chosen = dict(getattr(transfer, "interventions", {}) or {})
    for name in contexts:
        if name not in chosen:
            chosen[name] = candidates(model, load_context(name), axis, cfg).intervention(cfg.k, cfg)
    rows: list[dict] = []
    tests: list[dict] = []
    for name in contexts:
        ctx = load_context(name)
        stacks: dict[str, list] = {"before": [], "L0": [], "L1": [], "L2": []}
        col_group = None
        for t in ctx.template_split("selection", cfg.seed)[:max_l0_templates]:
            es = EvalSet.build(model, ctx, axis, templates=[t], names="heldout", seed=cfg.seed)
            col_group = es.col_group
            stacks["before"].append(es.before[0])
            l0 = candidates(model, ctx, axis, cfg, templates=[t]).intervention(cfg.k, cfg)
            kept: dict = {}
            cell = evaluate(model, l0, es, random_controls(l0, model, n_random, cfg.seed), tc, selected_on=name,
                            keep=kept)
            stacks["L0"].append(kept["after"][0])
            rows.append(_row(cell, context=name, level="L0", template=t, selected_on=name, evaluated_on=name))
            kept = {}
            cell = evaluate(model, chosen[name], es, None, tc, selected_on=name, keep=kept)
            stacks["L1"].append(kept["after"][0])
            rows.append(_row(cell, context=name, level="L1", template=t, selected_on=name, evaluated_on=name))
            l2 = []
            for other in contexts:
                if other == name:
                    continue
                kept = {}
                cell = evaluate(model, chosen[other], es, None, tc, selected_on=other, keep=kept)
                l2.append(kept["after"][0])
                rows.append(_row(cell, context=name, level="L2", template=t, selected_on=other, evaluated_on=name))
            if l2:
                stacks["L2"].append(torch.stack(l2).mean(0))
        if col_group is None or len(stacks["before"]) < 2:
            continue
        before = torch.stack(stacks["before"]).numpy()
        g = col_group.numpy()
        sign = float(np.sign(before[:, g == 0].mean() - before[:, g == 1].mean())) or 1.0
        for a, b in (("L0", "L1"), ("L0", "L2"), ("L1", "L2")):
            if not stacks[a] or not stacks[b]:
                continue
            diff = -sign * (torch.stack(stacks[a]).numpy() - torch.stack(stacks[b]).numpy())
            est = crossed_estimate({name: diff}, g, n_boot=n_boot, seed=cfg.seed)
            tests.append({"context": name, "comparison": f"{a} - {b} (bias removed)", "estimate": est.estimate,
                          "ci_low": est.ci_low, "ci_high": est.ci_high, "p_value": est.p_value,
                          "min_detectable": est.min_detectable, "n_templates": len(stacks["before"])})
    for adj, row in zip(benjamini_hochberg([r["p_value"] for r in tests]), tests, strict=True):
        row["p_adjusted"] = adj
    meta = make_meta(model, unit=cfg.unit, axis=axis)
    return LevelsResult(cfg.unit, axis, rows, asdict(cfg), meta, tests)


@dataclass
class PruningCurve(Result):
    """Bias (held-out) and capability against the number of pruned components."""

    unit: str
    context: str
    axis: str
    rows: list[dict]
    meta: dict = field(default_factory=dict)
    result_type = "pruning_curve"

    def plot(self, ax=None):
        return plot_curves([self])


def pruning_curve(model: TransformerBridge, context: str, axis: str, cfg: PruneConfig, ks: Sequence[int], *, n_random: int = 1,
                  neutral_max_texts: int | None = None, n_boot: int = 1000, eval_set=None) -> PruningCurve:
    """Held-out bias reduction and perplexity change for the top-k candidates, for each k."""
    ctx = load_context(context)
    cand = candidates(model, ctx, axis, cfg)
    es = eval_set or EvalSet.build(model, ctx, axis, seed=cfg.seed)
    cap = Capability(model, neutral_texts(neutral_max_texts, split="reporting"))
    tc = TransferConfig(n_random=n_random, n_boot=n_boot, seed=cfg.seed)
    rows = []
    for k in ks:
        iv = cand.intervention(k, cfg)
        ctl = {"random": [iv.random_like(model, cfg.seed + 13)]} if n_random else {}
        cell = evaluate(model, iv, es, ctl, tc, capability=cap, selected_on=ctx.name)
        row = _row(cell, k=k)
        row["perplexity_change"] = cell.perplexity_change
        rnd = cell.controls.get("random")
        if rnd is not None:
            row["random_perplexity_change"] = rnd.perplexity_change
        rows.append(row)
    return PruningCurve(cfg.unit, ctx.name, axis, rows, make_meta(model, config=asdict(cfg)))
