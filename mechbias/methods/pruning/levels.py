"""Generalization levels (L0 / L1 / L2) and pruning curves, evaluated with the transfer engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from ...core.results import Result, make_meta
from ...data.contexts import load_context
from ...data.texts import neutral_texts
from ...eval.transfer import Capability, EvalSet, TransferConfig, evaluate, random_controls
from ...viz.plotting import plot_curves, plot_levels
from .selection import PruneConfig, candidates


@dataclass
class LevelsResult(Result):
    """Bias reduction at generalization levels L0, L1, L2 per context (with random controls)."""

    unit: str
    axis: str
    rows: list[dict]
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    result_type = "pruning_levels"

    def plot(self, ax=None):
        return plot_levels(self, ax=ax)


def _row(cell, **extra) -> dict:
    rnd = cell.controls.get("random")
    return {**extra, "n_components": cell.n_components, "gap_change": cell.gap_change,
            "gap_change_ci_low": cell.gap_change_ci_low, "gap_change_ci_high": cell.gap_change_ci_high,
            "reduction": cell.reduction, "ci_low": cell.ci_low, "ci_high": cell.ci_high,
            "gap_before": cell.gap_before, "random_reduction": rnd.reduction if rnd else float("nan")}


def generalization_levels(
    model,
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
    """L0 (one selection template, held-out names), L1 (held-out templates) and L2 (other contexts).

    ``transfer``: an existing :class:`~mechbias.eval.transfer.TransferMatrix` for the same unit and
    config provides L1 (its diagonal) and L2 (its off-diagonal cells).
    """
    tc = TransferConfig(n_random=n_random, n_boot=n_boot, seed=cfg.seed, capability=False)
    rows = []
    for name in contexts:
        ctx = load_context(name)
        for t in ctx.template_split("selection", cfg.seed)[:max_l0_templates]:
            iv = candidates(model, ctx, axis, cfg, templates=[t]).intervention(cfg.k, cfg)
            es = EvalSet.build(model, ctx, axis, templates=[t], names="heldout", seed=cfg.seed)
            cell = evaluate(model, iv, es, random_controls(iv, model, n_random, cfg.seed), tc, selected_on=ctx.name)
            rows.append(_row(cell, context=ctx.name, level="L0", template=t, evaluated_on=ctx.name))
        if transfer is not None:
            for c in transfer.cells:
                if c.selected_on == ctx.name:
                    rows.append(_row(c, context=ctx.name, level=c.level, template=None, evaluated_on=c.evaluated_on))
    meta = make_meta(model, unit=cfg.unit, axis=axis)
    return LevelsResult(cfg.unit, axis, rows, asdict(cfg), meta)


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


def pruning_curve(model, context: str, axis: str, cfg: PruneConfig, ks: Sequence[int], *, n_random: int = 1,
                  neutral_max_texts: int | None = 12, n_boot: int = 1000, eval_set=None) -> PruningCurve:
    """Held-out bias reduction and perplexity change for the top-k candidates, for each k."""
    ctx = load_context(context)
    cand = candidates(model, ctx, axis, cfg)
    es = eval_set or EvalSet.build(model, ctx, axis, seed=cfg.seed)
    cap = Capability(model, neutral_texts(neutral_max_texts))
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
