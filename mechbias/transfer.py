"""The cross-context transfer engine, shared by every method.

A *selector* maps a context to an intervention, using only that context's
selection split (selection templates and names). :func:`transfer_matrix`
applies each context's intervention to every context's **held-out** templates
and names and reports, per cell (row = selected on, column = evaluated on):

* ``reduction``: relative bias reduction ``1 - gap_after / gap_before`` with
  a 95% paired crossed bootstrap CI (names and templates resampled, the same
  draws before and after);
* the same for a **random control**: interventions of the same size and
  layer distribution (``n_random`` draws; the cell's control uses the mean
  score over draws, and every draw's reduction is kept);
* ``perplexity_change``: capability cost of the row's intervention on the
  neutral text set (the control's too).

The diagonal is the within-context (L1) result; off-diagonal cells are
cross-context (L2) transfer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .contexts import Context, PromptSet, load_axis, load_contexts
from .hooks import (Compose, HeadIntervention, Identity, Intervention, NeuronIntervention, WeightEdit,
                    WeightMask)
from .metrics import contrast_scores, neutral_texts, perplexity
from .results import Result, make_meta
from .stats import DEFAULT_BOOT, group_gap, paired_reduction

Selector = Callable[[object, Context, str], Intervention]


# ----------------------------------------------------------------------------
# random controls
# ----------------------------------------------------------------------------

def random_control(intervention: Intervention, model, seed: int) -> Intervention:
    """An intervention of the same kind and size with randomly chosen components.

    Neurons and heads: the same number per layer; weight masks: the same
    number of entries per matrix; weight edits: a random direction with the
    same norm per matrix.
    """
    rng = np.random.default_rng(seed)
    if isinstance(intervention, NeuronIntervention):
        out = {}
        for l, idx in intervention.neurons.items():
            pool = np.setdiff1d(np.arange(model.cfg.d_mlp), idx)
            out[l] = sorted(int(i) for i in rng.choice(pool, size=min(len(idx), len(pool)), replace=False))
        return NeuronIntervention(out, intervention.factor, intervention.positions, label="random neurons")
    if isinstance(intervention, HeadIntervention):
        out = {}
        for l, idx in intervention.heads.items():
            pool = np.setdiff1d(np.arange(model.cfg.n_heads), idx)
            if len(pool) < len(idx):
                pool = np.arange(model.cfg.n_heads)
            out[l] = sorted(int(i) for i in rng.choice(pool, size=len(idx), replace=False))
        return HeadIntervention(out, intervention.mode, intervention.factor, intervention.positions, label="random heads")
    if isinstance(intervention, WeightMask):
        from .models import named_params

        params = named_params(model)
        masks = {}
        for n, idx in intervention.masks.items():
            numel = params[n].numel()
            masks[n] = torch.from_numpy(rng.choice(numel, size=len(idx), replace=False)).long()
        return WeightMask(masks, label="random weights")
    if isinstance(intervention, WeightEdit):
        g = torch.Generator().manual_seed(int(seed))
        deltas = {}
        for n, d in intervention.deltas.items():
            r = torch.randn(d.shape, generator=g, dtype=torch.float32)
            deltas[n] = (r * (d.float().norm() / r.norm().clamp_min(1e-12))).to(d.dtype)
        return WeightEdit(deltas, intervention.scale, label="random direction, same norm")
    if isinstance(intervention, Compose):
        return Compose([random_control(p, model, seed + 7919 * i) for i, p in enumerate(intervention.parts)])
    if isinstance(intervention, Identity):
        return Identity()
    raise TypeError(f"no random control for {type(intervention).__name__}")


# ----------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------

@dataclass
class EvalSet:
    """The held-out prompts of one context, and its unmodified score grid."""

    context: str
    prompts: PromptSet
    before: Tensor  # [templates, names]
    col_group: Tensor

    @classmethod
    def build(cls, model, ctx: Context, axis: str, *, templates="heldout", names="heldout", seed: int = 0,
              progress: bool = False) -> "EvalSet":
        ps = ctx.prompts(axis, templates=templates, names=names, seed=seed)
        mat, _, _, col_group = ps.grid(contrast_scores(model, ps, progress=progress))
        return cls(ctx.name, ps, mat, col_group)

    def scores(self, model, intervention: Intervention | None) -> Tensor:
        mat, _, _, _ = self.prompts.grid(contrast_scores(model, self.prompts, intervention=intervention))
        return mat


@dataclass
class TransferMatrix(Result):
    """Cross-context transfer of a method (rows: selected on, columns: evaluated on)."""

    method: str
    axis: str
    rows: list[str]
    cols: list[str]
    cells: list[dict]
    row_info: list[dict] = field(default_factory=list)
    baseline: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    result_type = "transfer"

    def cell(self, row: str, col: str) -> dict:
        for c in self.cells:
            if c["selected_on"] == row and c["evaluated_on"] == col:
                return c
        raise KeyError((row, col))

    def matrix(self, key: str = "reduction") -> np.ndarray:
        return np.array([[self.cell(r, c)[key] for c in self.cols] for r in self.rows], dtype=float)

    def diagonal_vs_offdiagonal(self, key: str = "reduction") -> dict:
        m = self.matrix(key)
        diag = np.array([self.cell(r, r)[key] for r in self.rows if r in self.cols])
        off = np.array([self.cell(r, c)[key] for r in self.rows for c in self.cols if r != c])
        return {"diagonal_mean": float(np.nanmean(diag)) if len(diag) else float("nan"),
                "offdiagonal_mean": float(np.nanmean(off)) if len(off) else float("nan"), "n_cells": int(m.size)}

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.cells)

    def plot(self, title: str | None = None):
        from .plotting import plot_transfer

        return plot_transfer(self, title=title)


def transfer_matrix(
    model,
    selector: Selector,
    contexts: Sequence[str | Context] | None = None,
    axis: str = "race",
    *,
    method: str = "",
    eval_contexts: Sequence[str | Context] | None = None,
    n_random: int = 3,
    capability: bool = True,
    neutral_max_texts: int | None = 12,
    n_boot: int = DEFAULT_BOOT,
    seed: int = 0,
    eval_sets: dict[str, EvalSet] | None = None,
    generation: dict | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> TransferMatrix:
    """Select on each context of ``contexts`` and evaluate on each of ``eval_contexts`` (default: the same).

    ``selector(model, context, axis)`` returns the intervention chosen on the
    context's selection split. ``eval_sets`` lets several methods share the
    baseline evaluation. ``generation`` (e.g. ``{"n_samples": 8, "n_names": 8}``)
    adds, per row, the generation metric on the row context's numeric questions
    (held-out names): parse-failure rate, inlier ratio against the unmodified
    model's 5-95% band, and the SMD before and after.
    """
    rows = load_contexts(contexts)
    cols = load_contexts(eval_contexts) if eval_contexts is not None else rows
    load_axis(axis)
    say = log or (lambda s: None)
    eval_sets = dict(eval_sets or {})
    for c in cols:
        if c.name not in eval_sets:
            eval_sets[c.name] = EvalSet.build(model, c, axis, seed=seed, progress=progress)
    baseline = []
    for c in cols:
        g = group_gap(eval_sets[c.name].before, eval_sets[c.name].col_group, n_boot=n_boot, seed=seed)
        baseline.append({"context": c.name, **g.as_dict()})
    texts = neutral_texts(neutral_max_texts) if capability else []
    ppl0 = perplexity(model, texts) if capability else float("nan")
    cells, row_info = [], []
    for r in rows:
        say(f"select on {r.name}")
        iv = selector(model, r, axis)
        controls = [random_control(iv, model, seed + 101 * (k + 1)) for k in range(n_random)]
        info = {"context": r.name, "intervention": iv.describe(), "n_components": iv.n_components}
        if capability:
            p = perplexity(model, texts, intervention=iv)
            pr = [perplexity(model, texts, intervention=c) for c in controls]
            info.update(perplexity=p, perplexity_base=ppl0, perplexity_change=p - ppl0,
                        random_perplexity_change=float(np.mean(pr)) - ppl0 if pr else float("nan"))
        if generation:
            info["generation"] = _generation_cost(model, r, axis, iv, generation, seed)
        row_info.append(info)
        for c in cols:
            es = eval_sets[c.name]
            after = es.scores(model, iv)
            red = paired_reduction(es.before, after, es.col_group, n_boot=n_boot, seed=seed)
            cell = {"selected_on": r.name, "evaluated_on": c.name, "level": "L1" if r.name == c.name else "L2",
                    "reduction": red.reduction, "ci_low": red.ci_low, "ci_high": red.ci_high,
                    "gap_before": red.gap_before, "gap_after": red.gap_after,
                    "gap_after_ci": list(red.gap_after_ci), "n_components": iv.n_components}
            if controls:
                rand = [es.scores(model, ctl) for ctl in controls]
                mean_rand = torch.stack(rand).mean(0)
                rr = paired_reduction(es.before, mean_rand, es.col_group, n_boot=n_boot, seed=seed)
                draws = [paired_reduction(es.before, x, es.col_group, n_boot=50, seed=seed).reduction for x in rand]
                cell.update(random_reduction=rr.reduction, random_ci_low=rr.ci_low, random_ci_high=rr.ci_high,
                            random_draws=draws)
            if capability:
                cell.update(perplexity_change=info["perplexity_change"],
                            random_perplexity_change=info["random_perplexity_change"])
            cells.append(cell)
            say(f"  {r.name} -> {c.name}: reduction {cell['reduction']:+.2f} [{cell['ci_low']:+.2f}, "
                f"{cell['ci_high']:+.2f}]" + (f", random {cell['random_reduction']:+.2f}" if controls else ""))
    config = {"n_random": n_random, "capability": capability, "neutral_max_texts": neutral_max_texts,
              "n_boot": n_boot, "seed": seed, "templates": "heldout", "names": "heldout", "generation": generation}
    meta = make_meta(model, method=method, axis=axis, contexts=[r.name for r in rows])
    return TransferMatrix(method, axis, [r.name for r in rows], [c.name for c in cols], cells, row_info, baseline,
                          config, meta)


def _generation_cost(model, ctx: Context, axis: str, iv: Intervention, spec: dict, seed: int) -> dict:
    """Generation metric of an intervention on a context's numeric questions (held-out names)."""
    from .generation import generation_bias

    ps = ctx.numeric_prompts(axis, names="heldout", seed=seed)
    n_names = spec.get("n_names")
    if n_names:  # the same number of names from each group
        keep = set()
        for g in (0, 1):
            names = list(dict.fromkeys(p.person.name for p in ps if p.group == g))
            keep |= set(names[: max(1, n_names // 2)])
        ps = ps.subset([i for i, p in enumerate(ps) if p.person.name in keep])
    kw = dict(n_samples=spec.get("n_samples", 8), max_new_tokens=spec.get("max_new_tokens", 8),
              temperature=spec.get("temperature", 0.6), seed=seed)
    ref = generation_bias(model, ps, **kw)
    after = generation_bias(model, ps, intervention=iv, reference=ref, **kw)
    return {"parse_failure_before": ref.summary["parse_failure"], "parse_failure_after": after.summary["parse_failure"],
            "inlier_ratio": after.summary.get("inlier_ratio"), "smd_before": ref.summary["smd"],
            "smd_after": after.summary["smd"], "n_prompts": len(ps), **kw}
