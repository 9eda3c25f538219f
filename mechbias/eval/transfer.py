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
from ..data.contexts import Context, PromptSet, load_axis, load_contexts
from ..data.texts import neutral_texts
from ..interventions.base import Intervention, load_intervention
from ..viz.plotting import plot_transfer
from .generation import generation_bias
from .metrics import contrast_scores, perplexity
from .stats import DEFAULT_BOOT, group_gap, paired_reduction

Selector = Callable[[Any, Context, str], Intervention]


# ----------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------

@dataclass
class TransferConfig:
    """How a transfer matrix is evaluated (every field is a command-line flag of every method command)."""

    n_random: int = field(default=3, metadata={"flag": "--random", "help": "random-control draws per cell (0: none)"})
    capability: bool = field(default=True, metadata={"help": "measure the perplexity change on neutral text"})
    neutral_max_texts: int = field(default=12, metadata={"flag": "--neutral-texts",
                                                         "help": "neutral paragraphs for the perplexity change"})
    n_boot: int = field(default=DEFAULT_BOOT, metadata={"flag": "--boot", "help": "bootstrap replicates"})
    seed: int = field(default=0, metadata={"help": "seed for splits, bootstrap and sampling"})
    generation: int = field(default=0, metadata={"help": "also sample N numeric answers per prompt of each row "
                                                         "context (parse failures, inlier ratio); 0 = off"})
    generation_names: int = field(default=8, metadata={"help": "names (half per group) for the generation metric"})
    generation_tokens: int = field(default=8, metadata={"help": "tokens sampled per answer (generation metric)"})

    def __post_init__(self):
        if self.n_random < 0:
            raise ValueError(f"n_random must be >= 0, not {self.n_random}")
        if self.n_boot < 10:
            raise ValueError(f"n_boot must be >= 10, not {self.n_boot}")
        if self.neutral_max_texts < 1:
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
    """The effect of one intervention (or of the mean over a control's draws) on one evaluation set."""

    gap_before: float
    gap_after: float
    gap_change: float
    gap_change_ci_low: float
    gap_change_ci_high: float
    reduction: float
    ci_low: float
    ci_high: float
    gap_after_ci: list = field(default_factory=list)
    perplexity_change: float | None = None
    n_draws: int = 1
    draws: list = field(default_factory=list)  # per-draw reduction (controls)
    draws_perplexity_change: list = field(default_factory=list)


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
        if eff is not None and name in {f.name for f in fields(Effect)}:
            return getattr(eff, name)
        raise AttributeError(f"Cell has no attribute {name!r}")

    def as_dict(self) -> dict:
        """A flat dict: the effect's fields, ``random_*`` for the random control, and every control."""
        d = {"selected_on": self.selected_on, "evaluated_on": self.evaluated_on, "level": self.level,
             "n_components": self.n_components}
        d.update({k: v for k, v in asdict(self.effect).items() if k not in ("n_draws", "draws",
                                                                             "draws_perplexity_change")})
        rnd = self.controls.get("random")
        if rnd is not None:
            d.update(random_reduction=rnd.reduction, random_ci_low=rnd.ci_low, random_ci_high=rnd.ci_high,
                     random_gap_change=rnd.gap_change, random_draws=rnd.draws,
                     random_perplexity_change=rnd.perplexity_change)
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
    return Effect(red.gap_before, red.gap_after, red.gap_change, red.gap_change_ci[0], red.gap_change_ci[1],
                  red.reduction, red.ci_low, red.ci_high, list(red.gap_after_ci), ppl)


def evaluate(model, intervention: Intervention, eval_set: EvalSet,
             controls: Mapping[str, Sequence[Intervention]] | None = None,
             config: TransferConfig | None = None, *, capability: Capability | None = None,
             selected_on: str = "") -> Cell:
    """Measure ``intervention`` on ``eval_set``, and each group of ``controls`` (name -> draws) beside it.

    A control with several draws is evaluated on the mean score over its draws
    (its per-draw reductions are kept). ``capability`` adds perplexity changes.
    """
    cfg = config or TransferConfig()
    es = eval_set
    ppl = capability.change(intervention) if capability is not None else None
    cell = Cell(selected_on, es.context, "L1" if selected_on == es.context else "L2", intervention.n_components,
                _effect(es, es.scores(model, intervention), cfg, ppl))
    for name, draws in (controls or {}).items():
        draws = list(draws)
        if not draws:
            continue
        scores = [es.scores(model, d) for d in draws]
        pc = [capability.change(d) for d in draws] if capability is not None else []
        eff = _effect(es, torch.stack(scores).mean(0), cfg, float(np.mean(pc)) if pc else None)
        eff.n_draws = len(draws)
        eff.draws = [paired_reduction(es.before, x, es.col_group, n_boot=50, seed=cfg.seed).reduction
                     for x in scores]
        eff.draws_perplexity_change = pc
        cell.controls[name] = eff
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
    interventions: dict = field(default_factory=dict)  # row context -> Intervention (saved beside the result)
    result_type = "transfer"
    _not_saved = ("interventions",)

    def _after_load(self) -> None:
        self.cells = [c if isinstance(c, Cell) else Cell.from_dict(c) for c in self.cells]

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
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    **overrides,
) -> TransferMatrix:
    """Select on each context of ``contexts`` and evaluate on each of ``eval_contexts`` (default: the same).

    ``selector(model, context, axis)`` returns the intervention chosen on the
    context's selection split. ``config`` (or keyword overrides of its fields,
    e.g. ``n_random=0``) sets the controls, bootstrap and capability texts;
    ``eval_sets`` lets several methods share the baseline evaluation.
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
    baseline = []
    for c in cols:
        g = group_gap(eval_sets[c.name].before, eval_sets[c.name].col_group, n_boot=cfg.n_boot, seed=cfg.seed)
        baseline.append({"context": c.name, **g.as_dict()})
    cap = Capability(model, neutral_texts(cfg.neutral_max_texts)) if cfg.capability else None
    cells, row_info, chosen = [], [], {}
    for r in rows:
        say(f"select on {r.name}")
        iv = selector(model, r, axis)
        chosen[r.name] = iv
        controls = random_controls(iv, model, cfg.n_random, cfg.seed)
        info = {"context": r.name, "intervention": iv.describe(), "n_components": iv.n_components}
        if cap is not None:
            info.update(perplexity_base=cap.base, perplexity_change=cap.change(iv))
            for name, draws in controls.items():
                info[f"{name}_perplexity_change"] = float(np.mean([cap.change(d) for d in draws]))
        if cfg.generation:
            info["generation"] = generation_cost(model, r, axis, iv, n_samples=cfg.generation,
                                                 n_names=cfg.generation_names,
                                                 max_new_tokens=cfg.generation_tokens, seed=cfg.seed)
        row_info.append(info)
        for c in cols:
            cell = evaluate(model, iv, eval_sets[c.name], controls, cfg, capability=cap, selected_on=r.name)
            cells.append(cell)
            rnd = cell.controls.get("random")
            say(f"  {r.name} -> {c.name}: gap change {cell.gap_change:+.3f} [{cell.gap_change_ci_low:+.3f}, "
                f"{cell.gap_change_ci_high:+.3f}], reduction {cell.reduction:+.2f}"
                + (f"; random {rnd.gap_change:+.3f}" if rnd else ""))
    config_d = {**asdict(cfg), "templates": "heldout", "names": "heldout"}
    meta = make_meta(model, method=method, axis=axis, contexts=[r.name for r in rows])
    return TransferMatrix(method, axis, [r.name for r in rows], [c.name for c in cols], cells, row_info, baseline,
                          config_d, meta, interventions=chosen)


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
