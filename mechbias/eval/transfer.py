"""The cross-context transfer engine, shared by every method.

A *selector* maps a context to an intervention, using only that context's
selection split (selection templates and names). :func:`evaluate` measures one
intervention on one evaluation set against its controls and returns a typed
:class:`Cell`; :func:`transfer_matrix` applies each context's intervention to
every context's **held-out** templates and names. Per cell (row = selected on,
column = evaluated on):

* ``gap_change``: the change of the group gap (after - before) with a 95%
  paired crossed bootstrap CI (names and templates resampled, the same draws
  before and after); ``reduction``: the relative reduction
  ``1 - gap_after / gap_before`` with its CI;
* ``controls``: the same statistics for each control (by default the
  intervention's own random control, ``n_random`` draws; the control's cell
  uses the mean score over draws, and every draw's reduction is kept);
* ``perplexity_change``: capability cost of the intervention on the neutral
  text set (each control's too).

The diagonal is the within-context (L1) result; off-diagonal cells are
cross-context (L2) transfer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, cast

import numpy as np
import torch
from torch import Tensor

from ..core.results import Result, make_meta
from ..data.axes import load_axis
from ..data.prompts import PromptSet
from ..data.contexts import Context, load_contexts
from ..data.texts import neutral_texts, selection_phase
from ..interventions.base import Intervention, load_intervention
from ..interventions.profile import UnitProfile, unit_profile
from ..viz.html import fmt, matrix_groups, matrix_html
from ..viz.plotting import plot_transfer
from .generation import generation_bias
from .metrics import contrast_scores, perplexity
from .stats import DEFAULT_BOOT, benjamini_hochberg, crossed_estimate, group_gap, paired_reduction

Selector = Callable[[Any, Context, str], Intervention]


# ----------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------

@dataclass
class TransferConfig:
    """How a transfer matrix is evaluated (every field is a command-line flag of every method command)."""

    n_random: int = field(default=3, metadata={"flag": "--random", "help": "draws per control and cell (0: no controls)"})
    controls: tuple[str, ...] = field(default=("random", "matched"), metadata={
        "help": "controls: random (same count per layer/matrix), matched (same size: neuron magnitude, head "
                "output norm, weight score quantiles), matched_cost (neurons: same single-unit ablation cost)",
        "choices": ("random", "matched", "matched_cost")})
    capability: bool = field(default=True, metadata={"help": "measure the perplexity change on neutral text"})
    neutral_max_texts: int | None = field(default=None, metadata={
        "flag": "--neutral-texts", "help": "reporting-half neutral paragraphs for the perplexity change (none: all 14)"})
    n_boot: int = field(default=DEFAULT_BOOT, metadata={"flag": "--boot", "help": "bootstrap replicates"})
    seed: int = field(default=0, metadata={"help": "seed for splits, bootstrap and sampling"})
    generation: int = field(default=0, metadata={"help": "also sample N numeric answers per prompt of each row "
                                                         "context (parse failures, inlier ratio); 0 = off"})
    generation_names: int = field(default=8, metadata={"help": "names (half per group) for the generation metric"})
    generation_tokens: int = field(default=8, metadata={"help": "tokens sampled per answer (generation metric)"})

    def __post_init__(self):
        bad = [c for c in self.controls if c not in ("random", "matched", "matched_cost")]
        if bad:
            raise ValueError(f"unknown controls {bad}; choose from random, matched, matched_cost")
        if self.n_random < 0:
            raise ValueError(f"n_random must be >= 0, not {self.n_random}")
        if self.n_boot < 10:
            raise ValueError(f"n_boot must be >= 10, not {self.n_boot}")
        if self.neutral_max_texts is not None and self.neutral_max_texts < 1:
            raise ValueError(f"neutral_max_texts must be >= 1, not {self.neutral_max_texts}")
        if self.generation < 0 or self.generation_names < 2:
            raise ValueError("generation must be >= 0 and generation_names >= 2")


# ----------------------------------------------------------------------------
# evaluation sets and capability
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


class Capability:
    """Perplexity on a fixed set of neutral texts; each intervention is measured once (memoised)."""

    def __init__(self, model, texts: Sequence[str]):
        if not texts:
            raise ValueError("capability needs at least one text")
        self.model, self.texts = model, list(texts)
        self.base = perplexity(model, self.texts)
        self._memo: dict[int, tuple[Intervention, float]] = {}

    def change(self, intervention: Intervention) -> float:
        hit = self._memo.get(id(intervention))
        if hit is None or hit[0] is not intervention:
            hit = (intervention, perplexity(self.model, self.texts, intervention=intervention) - self.base)
            self._memo[id(intervention)] = hit
        return hit[1]


# ----------------------------------------------------------------------------
# cells
# ----------------------------------------------------------------------------

@dataclass
class Effect:
    """The effect of one intervention (or of the mean over a control's draws) on one evaluation set.

    Absolute first: ``gap_change`` = gap after - gap before (log-odds units), its
    95% CI (``ci_low``, ``ci_high``: a t interval whose variance respects the
    templates x names design), ``p_value`` (and ``p_adjusted``, Benjamini-Hochberg
    over the matrix's cells) and ``min_detectable`` (the change detected with
    power 0.8). ``gap_removed`` = ``-sign(gap_before) * gap_change``: positive when
    the bias shrank, whatever its direction. ``reduction`` = 1 - after / before
    only when the gap before is clearly away from 0 (its CI excludes 0);
    otherwise None (not estimable).
    """

    gap_before: float
    gap_after: float
    gap_change: float
    ci_low: float
    ci_high: float
    p_value: float
    min_detectable: float
    gap_removed: float
    reduction: float | None
    reduction_ci_low: float | None
    reduction_ci_high: float | None
    gap_before_ci: list = field(default_factory=list)
    gap_after_ci: list = field(default_factory=list)
    p_adjusted: float | None = None
    perplexity_change: float | None = None
    n_draws: int = 1
    draws: list = field(default_factory=list)  # per-draw gap change (controls)
    draws_perplexity_change: list = field(default_factory=list)

    @property
    def estimable(self) -> bool:
        return self.reduction is not None


_FLAT_SKIP = ("n_draws", "draws", "draws_perplexity_change")


@dataclass
class Cell:
    """One transfer-matrix cell: the intervention selected on ``selected_on``, evaluated on ``evaluated_on``."""

    selected_on: str
    evaluated_on: str
    level: str
    n_components: int
    effect: Effect
    controls: dict[str, Effect] = field(default_factory=dict)

    # the headline numbers as attributes
    def __getattr__(self, name):
        if name in ("effect", "controls"):
            raise AttributeError(name)
        eff = self.__dict__.get("effect")
        if eff is not None and (name in {f.name for f in fields(Effect)} or name == "estimable"):
            return getattr(eff, name)
        raise AttributeError(f"Cell has no attribute {name!r}")

    def as_dict(self) -> dict:
        """A flat dict: the effect's fields, ``random_*`` for the random control, and every control."""
        d = {"selected_on": self.selected_on, "evaluated_on": self.evaluated_on, "level": self.level,
             "n_components": self.n_components}
        d.update({k: v for k, v in asdict(self.effect).items() if k not in _FLAT_SKIP})
        rnd = self.controls.get("random")
        if rnd is not None:
            d.update(random_gap_change=rnd.gap_change, random_ci_low=rnd.ci_low, random_ci_high=rnd.ci_high,
                     random_gap_removed=rnd.gap_removed, random_reduction=rnd.reduction,
                     random_draws=rnd.draws, random_perplexity_change=rnd.perplexity_change)
        d["controls"] = {k: asdict(v) for k, v in self.controls.items()}
        return d

    # dict-style access, for scripts written against the earlier dict cells
    def __getitem__(self, key):
        return self.as_dict()[key]

    def get(self, key, default=None):
        return self.as_dict().get(key, default)

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        eff_keys = {f.name for f in fields(Effect)}
        effect = Effect(**{k: v for k, v in d.items() if k in eff_keys})
        controls = {k: Effect(**v) for k, v in (d.get("controls") or {}).items()}
        return cls(d["selected_on"], d["evaluated_on"], d.get("level", ""), d.get("n_components", 0), effect, controls)


def _effect(es: EvalSet, after: Tensor, cfg: TransferConfig, ppl: float | None) -> Effect:
    red = paired_reduction(es.before, after, es.col_group, n_boot=cfg.n_boot, seed=cfg.seed)
    sign = float(np.sign(red.gap_before)) or 1.0
    est = red.estimable
    return Effect(red.gap_before, red.gap_after, red.gap_change, red.gap_change_ci[0], red.gap_change_ci[1],
                  red.gap_change_p, red.min_detectable, -sign * red.gap_change,
                  red.reduction if est else None, red.ci_low if est else None, red.ci_high if est else None,
                  list(red.gap_before_ci), list(red.gap_after_ci), None, ppl)


def evaluate(model, intervention: Intervention, eval_set: EvalSet,
             controls: Mapping[str, Sequence[Intervention]] | None = None,
             config: TransferConfig | None = None, *, capability: Capability | None = None,
             selected_on: str = "", keep: dict | None = None) -> Cell:
    """Measure ``intervention`` on ``eval_set``, and each group of ``controls`` (name -> draws) beside it.

    A control with several draws is evaluated on the mean score over its draws
    (each draw's gap change is kept). ``capability`` adds perplexity changes.
    ``keep``, if given, receives the score grids (``"after"`` and
    ``"control/<name>"``) for statistics across cells.
    """
    cfg = config or TransferConfig()
    es = eval_set
    ppl = capability.change(intervention) if capability is not None else None
    after = es.scores(model, intervention)
    grids: dict[str, list[Tensor]] = {}
    ppls: dict[str, list[float]] = {}
    for name, draws in (controls or {}).items():
        draws = list(draws)
        if not draws:
            continue
        grids[name] = [es.scores(model, d) for d in draws]
        ppls[name] = [capability.change(d) for d in draws] if capability is not None else []
    return cell_from_grids(es, after, intervention.n_components, cfg, selected_on=selected_on, ppl=ppl,
                           control_grids=grids, control_ppl=ppls, keep=keep)


def cell_from_grids(es: EvalSet, after: Tensor, n_components: int, config: TransferConfig, *, selected_on: str = "",
                    ppl: float | None = None, control_grids: Mapping[str, Sequence[Tensor]] | None = None,
                    control_ppl: Mapping[str, Sequence[float]] | None = None, keep: dict | None = None) -> Cell:
    """The statistics of one cell from its score grids (what :func:`evaluate` measures; the study's jobs
    compute the grids on workers and call this in the driver). A control with several draws is evaluated
    on the mean score over its draws; each draw's gap change is kept."""
    cfg = config
    cell = Cell(selected_on, es.context, "L1" if selected_on == es.context else "L2", n_components,
                _effect(es, after, cfg, ppl))
    if keep is not None:
        keep["after"] = after
    for name, scores in (control_grids or {}).items():
        scores = list(scores)
        if not scores:
            continue
        pc = list((control_ppl or {}).get(name, []))
        mean = torch.stack(scores).mean(0)
        eff = _effect(es, mean, cfg, float(np.mean(pc)) if pc else None)
        eff.n_draws = len(scores)
        g = np.asarray(es.col_group)
        eff.draws = [float((x.numpy()[:, g == 0].mean() - x.numpy()[:, g == 1].mean()) - eff.gap_before)
                     for x in scores]
        eff.draws_perplexity_change = [float(x) for x in pc]
        cell.controls[name] = eff
        if keep is not None:
            keep[f"control/{name}"] = mean
    return cell


def random_controls(intervention: Intervention, model, n: int, seed: int) -> dict[str, list[Intervention]]:
    """``n`` draws of the intervention's own random control."""
    return {"random": [intervention.random_like(model, seed + 101 * (k + 1)) for k in range(n)]} if n else {}


# ----------------------------------------------------------------------------
# transfer matrices
# ----------------------------------------------------------------------------

@dataclass
class TransferMatrix(Result):
    """Cross-context transfer of a method (rows: selected on, columns: evaluated on)."""

    method: str
    axis: str
    rows: list[str]
    cols: list[str]
    cells: list[Cell]
    row_info: list[dict] = field(default_factory=list)
    baseline: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    transfer_test: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)  # score grids: before/<col>, after/<row>/<col>, control/<name>/<row>/<col>
    interventions: dict = field(default_factory=dict)  # row context -> Intervention (saved beside the result)
    result_type = "transfer"
    _not_saved = ("interventions",)

    def _after_load(self) -> None:
        self.cells = [c if isinstance(c, Cell) else Cell.from_dict(c) for c in self.cells]

    def _removed(self, which: str, r: str, c: str) -> float:
        cell = self.cell(r, c)
        return cell.gap_removed if which == "after" else cell.controls[which.split("/", 1)[1]].gap_removed

    def contrast(self, terms: Sequence[tuple[str, str, str, float]], *, n_boot: int | None = None,
                 seed: int | None = None) -> dict:
        """A linear combination of cells' ``gap_removed``, ``sum(coef * removed(which, row, col))``, with a t
        interval from one resampling of the whole matrix (names shared by every evaluation context, templates
        per context) and its minimal detectable difference (power 0.8).

        ``terms``: ``(which, row, col, coef)``; ``which`` is ``"after"`` for the selected intervention or
        ``"control/<name>"`` for a control (e.g. the diagonal's mean minus its matched control's)."""
        if "col_group" not in self.grids:
            raise ValueError("this matrix holds no score grids (saved without them?); contrasts need them")
        g = np.asarray(self.grids["col_group"])
        combined: dict[str, np.ndarray] = {}
        estimate = 0.0
        for which, r, c, coef in terms:
            key = f"{which}/{r}/{c}"
            if key not in self.grids:
                known = sorted({k.rsplit("/", 2)[0] for k in self.grids if k.count("/") >= 2})
                raise KeyError(f"no grid {key!r}; known: {known}")
            before = np.asarray(self.grids[f"before/{c}"], dtype=np.float64)
            after = np.asarray(self.grids[key], dtype=np.float64)
            sign = float(np.sign(before[:, g == 0].mean() - before[:, g == 1].mean())) or 1.0
            combined[c] = combined.get(c, 0.0) + coef * (-sign) * (after - before)
            estimate += coef * self._removed(which, r, c)
        cfg = self.config
        est = crossed_estimate(combined, g, n_boot=n_boot or int(cfg.get("n_boot", DEFAULT_BOOT)),
                               seed=int(cfg.get("seed", 0)) if seed is None else seed)
        return {"estimate": est.estimate, "cells_estimate": estimate, "ci_low": est.ci_low, "ci_high": est.ci_high,
                "p_value": est.p_value, "se": est.se, "df": est.df, "min_detectable": est.min_detectable}

    def diagonal_cells(self) -> list[tuple[str, str]]:
        return [(r, r) for r in self.rows if r in self.cols]

    def offdiagonal_cells(self) -> list[tuple[str, str]]:
        return [(r, c) for r in self.rows for c in self.cols if r != c]

    def test_transfer(self, which: str = "after", *, n_boot: int | None = None, seed: int | None = None) -> dict:
        """Within-context minus cross-context effect: mean ``gap_removed`` on the diagonal minus its mean off
        the diagonal (:meth:`contrast` of the two means).

        ``which``: ``"after"`` for the selected interventions, ``"control/<name>"`` for a control."""
        diag, off = self.diagonal_cells(), self.offdiagonal_cells()
        out: dict = {"statistic": "mean gap_removed on the diagonal - mean off the diagonal", "which": which,
                     "n_diagonal": len(diag), "n_offdiagonal": len(off)}
        if not diag or not off or "col_group" not in self.grids:
            return {**out, "diagonal_minus_offdiagonal": None, "ci_low": None, "ci_high": None, "p_value": None,
                    "min_detectable": None, "note": "needs diagonal and off-diagonal cells"}
        est = self.contrast([(which, r, c, 1.0 / len(diag)) for r, c in diag]
                            + [(which, r, c, -1.0 / len(off)) for r, c in off], n_boot=n_boot, seed=seed)
        return {**out, "diagonal_mean": float(np.mean([self._removed(which, r, c) for r, c in diag])),
                "offdiagonal_mean": float(np.mean([self._removed(which, r, c) for r, c in off])),
                "diagonal_minus_offdiagonal": est["estimate"], "ci_low": est["ci_low"], "ci_high": est["ci_high"],
                "p_value": est["p_value"], "se": est["se"], "df": est["df"], "min_detectable": est["min_detectable"]}

    def save(self, path) -> Path:
        path = super().save(path)
        for r, iv in self.interventions.items():
            iv.save(Path(path) / "interventions" / r)
        return path

    @classmethod
    def load(cls, path) -> "TransferMatrix":
        tm = cast(TransferMatrix, cls._load_fields(Path(path)))
        folder = Path(path) / "interventions"
        if folder.is_dir():
            tm.interventions = {p.name: load_intervention(p) for p in sorted(folder.iterdir())
                                if (p / "intervention.json").exists()}
        return tm  # type: ignore[return-value]

    def cell(self, row: str, col: str) -> Cell:
        for c in self.cells:
            if c.selected_on == row and c.evaluated_on == col:
                return c
        raise KeyError((row, col))

    def matrix(self, key: str = "reduction") -> np.ndarray:
        return np.array([[_num(self.cell(r, c).get(key)) for c in self.cols] for r in self.rows], dtype=float)

    def diagonal_vs_offdiagonal(self, key: str = "reduction") -> dict:
        m = self.matrix(key)
        diag = np.array([_num(self.cell(r, r).get(key)) for r in self.rows if r in self.cols])
        off = np.array([_num(self.cell(r, c).get(key)) for r in self.rows for c in self.cols if r != c])
        return {"diagonal_mean": float(np.nanmean(diag)) if len(diag) else float("nan"),
                "offdiagonal_mean": float(np.nanmean(off)) if len(off) else float("nan"), "n_cells": int(m.size)}

    def _repr_html_(self) -> str:
        """The matrix in Jupyter: cells coloured by bias removed, hover for CIs, tests, controls and costs."""
        parts = [f"<b>{self.method}</b>, axis {self.axis}: bias removed on held-out prompts (hover a cell)"]
        parts += [matrix_html(group, title=f"{self.method} {name}")
                  for name, group in matrix_groups([c.as_dict() for c in self.cells])]
        tt = self.transfer_test or {}
        if "diagonal_minus_offdiagonal" in tt:
            parts.append(f"<div>within - cross: {fmt(tt['diagonal_minus_offdiagonal'])} [{fmt(tt.get('ci_low'))}, "
                         f"{fmt(tt.get('ci_high'))}], minimal detectable difference "
                         f"{fmt(tt.get('min_detectable'), signed=False)}</div>")
        return "".join(parts)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in c.as_dict().items() if k != "controls"} for c in self.cells])

    def records(self) -> list[dict]:
        """Every cell as a flat dict (what ``transfer.json`` holds)."""
        return [c.as_dict() for c in self.cells]

    def plot(self, title: str | None = None):
        return plot_transfer(self, title=title)


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def transfer_matrix(
    model,
    selector: Selector,
    contexts: Sequence[str | Context] | None = None,
    axis: str = "race",
    *,
    method: str = "",
    eval_contexts: Sequence[str | Context] | None = None,
    config: TransferConfig | None = None,
    eval_sets: dict[str, EvalSet] | None = None,
    profile: UnitProfile | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    **overrides,
) -> TransferMatrix:
    """Select on each context of ``contexts`` and evaluate on each of ``eval_contexts`` (default: the same).

    ``selector(model, context, axis)`` returns the intervention chosen on the
    context's selection split. ``config`` (or keyword overrides of its fields,
    e.g. ``n_random=0``) sets the controls, bootstrap and capability texts;
    ``eval_sets`` lets several methods share the baseline evaluation, ``profile`` the unit sizes and
    ablation costs matched controls are drawn from (measured on the selection neutral texts when needed).
    A selector that keeps its selections (a :class:`~mechbias.methods.base.Method`) may add controls of
    its own (``Selection.controls``, e.g. GRADIEND's h = 0 edit).
    """
    cfg = config if config is not None else TransferConfig(**overrides)
    if config is not None and overrides:
        raise ValueError("pass either config or keyword overrides, not both")
    rows = load_contexts(contexts)
    cols = load_contexts(eval_contexts) if eval_contexts is not None else rows
    load_axis(axis)
    say = log or (lambda s: None)
    eval_sets = dict(eval_sets or {})
    for c in cols:
        if c.name not in eval_sets:
            eval_sets[c.name] = EvalSet.build(model, c, axis, seed=cfg.seed, progress=progress)
    baseline = baseline_rows(eval_sets, [c.name for c in cols], cfg)
    cap = Capability(model, neutral_texts(cfg.neutral_max_texts, split="reporting")) if cfg.capability else None
    if profile is None and cfg.n_random > 0 and any(k != "random" for k in cfg.controls):
        profile = unit_profile(model)
    cells, row_info, chosen = [], [], {}
    grids: dict[str, Tensor] = {}
    for r in rows:
        say(f"select on {r.name}")
        with selection_phase(f"selection on {r.name}"):
            iv = selector(model, r, axis)
        chosen[r.name] = iv
        controls = iv.controls(model, cfg.n_random, cfg.seed, profile=profile, kinds=cfg.controls)
        own = getattr(getattr(selector, "selections", {}).get(r.name), "controls", None)
        if own and cfg.n_random > 0:
            controls.update(own)
        gen = (generation_cost(model, r, axis, iv, n_samples=cfg.generation, n_names=cfg.generation_names,
                               max_new_tokens=cfg.generation_tokens, seed=cfg.seed) if cfg.generation else None)
        row_info.append(make_row_info(r.name, iv, controls, cap.base if cap else None,
                                      cap.change(iv) if cap else None,
                                      {k: [cap.change(d) for d in v] for k, v in controls.items()} if cap else None,
                                      gen))
        for c in cols:
            kept: dict[str, Tensor] = {}
            cell = evaluate(model, iv, eval_sets[c.name], controls, cfg, capability=cap, selected_on=r.name,
                            keep=kept)
            for k, v in kept.items():
                grids[f"{k}/{r.name}/{c.name}"] = v
            cells.append(cell)
            rnd = cell.controls.get("random")
            say(f"  {r.name} -> {c.name}: gap change {cell.gap_change:+.3f} [{cell.ci_low:+.3f}, {cell.ci_high:+.3f}]"
                + (f"; random {rnd.gap_change:+.3f}" if rnd else ""))
    meta = make_meta(model, method=method, axis=axis, contexts=[r.name for r in rows])
    return finish_matrix(method, axis, [r.name for r in rows], [c.name for c in cols], eval_sets, cells, row_info,
                         baseline, cfg, meta, grids, chosen)


def baseline_rows(eval_sets: Mapping[str, EvalSet], cols: Sequence[str], cfg: TransferConfig) -> list[dict]:
    """The unmodified gap of each evaluation context (held-out prompts) with its CI."""
    out = []
    for c in cols:
        g = group_gap(eval_sets[c].before, eval_sets[c].col_group, n_boot=cfg.n_boot, seed=cfg.seed)
        out.append({"context": c, **g.as_dict()})
    return out


def make_row_info(context: str, iv: Intervention, controls: Mapping[str, Sequence[Intervention]],
                  perplexity_base: float | None, perplexity_change: float | None,
                  control_ppl: Mapping[str, Sequence[float]] | None, generation: dict | None) -> dict:
    """What a transfer matrix records about one row's intervention and its controls."""
    info: dict[str, Any] = {"context": context, "intervention": iv.describe(), "n_components": iv.n_components,
                            "controls": {k: v[0].describe() for k, v in controls.items() if len(v)}}
    if perplexity_base is not None:
        info.update(perplexity_base=perplexity_base, perplexity_change=perplexity_change)
        for name, pc in (control_ppl or {}).items():
            if len(pc):
                info[f"{name}_perplexity_change"] = float(np.mean(pc))
    if generation is not None:
        info["generation"] = generation
    return info


def finish_matrix(method: str, axis: str, rows: list[str], cols: list[str], eval_sets: Mapping[str, EvalSet],
                  cells: list[Cell], row_info: list[dict], baseline: list[dict], cfg: TransferConfig, meta: dict,
                  grids: dict[str, Tensor], chosen: dict[str, Intervention]) -> TransferMatrix:
    """Benjamini-Hochberg over the cells, the within- vs cross-context tests, and the result object."""
    grids = {"col_group": next(iter(eval_sets.values())).col_group.clone(),
             **{f"before/{c}": eval_sets[c].before for c in cols}, **grids}
    _adjust(cells, baseline)
    config_d = {**asdict(cfg), "templates": "heldout", "names": "heldout"}
    tm = TransferMatrix(method, axis, rows, cols, cells, row_info, baseline, config_d, meta, grids=grids,
                        interventions=dict(chosen))
    tm.transfer_test = tm.test_transfer()
    for name in (cells[0].controls if cells else {}):
        tm.transfer_test[f"control_{name}"] = tm.test_transfer(f"control/{name}")
    return tm


def _adjust(cells: list[Cell], baseline: list[dict]) -> None:
    """Benjamini-Hochberg within each family: the matrix's cells, each control's cells, the baselines."""
    for adj, c in zip(benjamini_hochberg([c.p_value for c in cells]), cells):
        c.effect.p_adjusted = adj
    for name in (cells[0].controls if cells else {}):
        effs = [c.controls[name] for c in cells if name in c.controls]
        for adj, e in zip(benjamini_hochberg([e.p_value for e in effs]), effs):
            e.p_adjusted = adj
    for adj, b in zip(benjamini_hochberg([b["p_value"] for b in baseline]), baseline):
        b["p_adjusted"] = adj


def generation_cost(model, ctx: Context, axis: str, iv: Intervention, *, n_samples: int = 8, n_names: int = 8,
                    max_new_tokens: int = 8, temperature: float = 0.6, seed: int = 0) -> dict:
    """Generation metric of an intervention on a context's numeric questions (held-out names)."""
    ps = ctx.numeric_prompts(axis, names="heldout", seed=seed)
    keep = set()
    for g in (0, 1):  # the same number of names from each group
        names = list(dict.fromkeys(p.person.name for p in ps if p.group == g))
        keep |= set(names[: max(1, n_names // 2)])
    ps = ps.subset([i for i, p in enumerate(ps) if p.person.name in keep])
    kw: dict[str, Any] = dict(n_samples=n_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed)
    ref = generation_bias(model, ps, **kw)
    after = generation_bias(model, ps, intervention=iv, reference=ref, **kw)
    return {"parse_failure_before": ref.summary["parse_failure"], "parse_failure_after": after.summary["parse_failure"],
            "inlier_ratio": after.summary.get("inlier_ratio"), "smd_before": ref.summary["smd"],
            "smd_after": after.summary["smd"], "n_prompts": len(ps), **kw}
