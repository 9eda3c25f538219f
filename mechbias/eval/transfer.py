"""The cross-context transfer engine, shared by every method.

A *selector* maps a context to an intervention, using only that context's
selection split (selection templates and names). :func:`~mechbias.eval.cells.evaluate`
measures one intervention on one evaluation set against its controls and returns a typed
:class:`~mechbias.eval.cells.Cell`; :func:`transfer_matrix` applies each context's intervention to
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

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from jaxtyping import Float
from torch import Tensor

from ..core.results import Result, make_meta
from ..data.axes import load_axis
from ..data.contexts import Context, load_contexts
from ..data.leakage import selection_phase
from ..data.neutral import neutral_texts
from ..interventions.base import Intervention, load_intervention
from ..interventions.profile import UnitProfile, unit_profile
from ..viz.html import fmt, matrix_groups, matrix_html
from ..viz.plotting import plot_transfer
from .cells import Capability, Cell, EvalSet, TransferConfig, evaluate
from .generation import generation_cost
from .records import Contrast, ControlTest, RatioTest, RowInfo, TransferTest
from .rows import EMPTY_ROW, baseline_rows, make_row_info
from .stats import DEFAULT_BOOT, benjamini_hochberg, crossed_estimate, grid_gap, mdd, student_t, tost

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_LOG = logging.getLogger(__name__)

Selector = Callable[[Any, Context, str], Intervention]


# ----------------------------------------------------------------------------
# transfer matrices
# ----------------------------------------------------------------------------

@dataclass
class TransferMatrix(Result):
    """Cross-context transfer of a method (rows: selected on, columns: evaluated on).

    Args:
        method: the method's label.
        axis: the axis.
        rows: the contexts selected on.
        cols: the contexts evaluated on.
        cells: one :class:`~mechbias.Cell` per (row, column).
        row_info: per row, what the method selected (sizes, overlap with other rows).
        baseline: per column, the gap before any intervention.
        config: the :class:`~mechbias.TransferConfig` as a dict.
        meta: versions, precisions and settings of the run.
        transfer_test: the within- vs cross-context test and each selection-vs-control test.
        grids: the score grids behind the cells (for contrasts across cells).
        interventions: the selected interventions, by row.
    """

    method: str
    axis: str
    rows: list[str]
    cols: list[str]
    cells: list[Cell]
    row_info: list[RowInfo] = field(default_factory=list)
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
                 seed: int | None = None) -> Contrast:
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
            sign = float(np.sign(grid_gap(before, g))) or 1.0
            combined[c] = combined.get(c, 0.0) + coef * (-sign) * (after - before)
            estimate += coef * self._removed(which, r, c)
        cfg = self.config
        est = crossed_estimate(combined, g, n_boot=n_boot or int(cfg.get("n_boot", DEFAULT_BOOT)),
                               seed=int(cfg.get("seed", 0)) if seed is None else seed)
        return Contrast(est.estimate, estimate, est.ci_low, est.ci_high, est.p_value, est.se, est.df, est.min_detectable)

    def diagonal_cells(self) -> list[tuple[str, str]]:
        return [(r, r) for r in self.rows if r in self.cols]

    def offdiagonal_cells(self) -> list[tuple[str, str]]:
        return [(r, c) for r in self.rows for c in self.cols if r != c]

    def within_columns(self) -> list[str]:
        """Evaluation contexts that are also selection rows and have another row: the columns the transfer test
        compares within."""
        return [c for c in self.cols if c in self.rows and len(self.rows) > 1]

    def test_transfer(self, which: str = "after", *, n_boot: int | None = None, seed: int | None = None,
                      family_size: int = 1, margin: float | None = None) -> TransferTest:
        """Within-context minus cross-context effect, compared **within columns**: for each evaluation context
        ``c`` that is also a selection row, ``removed(c, c)`` minus the mean over the other rows ``r`` of
        ``removed(r, c)``, averaged over those columns (:meth:`contrast`). Every comparison is between cells of
        one column (the same prompts and gap), so unequal gaps between columns cannot produce a difference: the
        same intervention applied on every row gives exactly 0. (The earlier statistic, the mean of the
        diagonal minus the mean of everything off it, compared columns with each other and "detected" a fix
        that transfers perfectly; it is kept as ``pooled_diagonal_minus_offdiagonal`` for reference).

        ``family_size``: the number of tests read together (e.g. methods in a study); ``min_detectable_bh`` is
        the detectable difference at the Benjamini-Hochberg-consistent level 0.05 / family_size (the level the
        smallest p-value of the family must pass). ``margin``: an equivalence margin fixed before the run; if
        given, ``tost`` holds the two one-sided tests of ``|within - cross| < margin`` (equivalent when the 90% CI
        lies inside +-margin). ``which``: ``"after"`` or ``"control/<name>"``."""
        cols = self.within_columns()
        out: TransferTest = {"statistic": "mean over columns c (also rows) of removed(c, c) - mean_{r != c} "
                                          "removed(r, c)", "which": which, "columns": cols, "n_rows": len(self.rows)}
        if not cols or "col_group" not in self.grids:
            return {**out, "within_minus_cross": None, "ci_low": None, "ci_high": None, "p_value": None,
                    "min_detectable": None, "note": "needs at least two rows and a column that is also a row"}
        k = len(cols)
        terms: list[tuple[str, str, str, float]] = []
        for c in cols:
            others = [r for r in self.rows if r != c]
            terms.append((which, c, c, 1.0 / k))
            terms += [(which, r, c, -1.0 / (k * len(others))) for r in others]
        est = self.contrast(terms, n_boot=n_boot, seed=seed)
        within = float(np.mean([self._removed(which, c, c) for c in cols]))
        cross = float(np.mean([np.mean([self._removed(which, r, c) for r in self.rows if r != c]) for c in cols]))
        alpha_bh = 0.05 / max(int(family_size), 1)
        res: TransferTest = {**out, "within_mean": within, "cross_mean": cross, "within_minus_cross": est.estimate,
                             "ci_low": est.ci_low, "ci_high": est.ci_high, "p_value": est.p_value, "se": est.se,
                             "df": est.df, "min_detectable": est.min_detectable, "family_size": int(family_size),
                             "alpha_bh": alpha_bh, "min_detectable_bh": mdd(est.se, est.df, alpha_bh)}
        if margin is not None:
            res["tost"] = tost(est.estimate, est.se, est.df, float(margin)).as_dict()
        res["ratio"] = self._ratio(which, cols, n_boot=n_boot, seed=seed)
        res["within_ci"] = res["ratio"]["within_ci"]
        cross_est = self.contrast([(which, r, c, 1.0 / (k * (len(self.rows) - 1))) for c in cols for r in self.rows
                                   if r != c], n_boot=n_boot, seed=seed)
        res["cross_ci"] = [cross_est.ci_low, cross_est.ci_high]
        # gatekeeping: transfer is a question only where the fix works in its own context. Here the within
        # effect's own p-value; a study replaces it by Benjamini-Hochberg over its methods
        res["within_p_value"] = res["ratio"]["within_p_value"]
        res["gated"] = bool(res["within_p_value"] < 0.05)
        if not res["gated"]:
            res["gate_note"] = "no within-context effect to transfer (within-context removal not significant)"
        diag, off = self.diagonal_cells(), self.offdiagonal_cells()
        if diag and off:
            res["pooled_diagonal_minus_offdiagonal"] = float(
                np.mean([self._removed(which, r, c) for r, c in diag])
                - np.mean([self._removed(which, r, c) for r, c in off]))
        return res

    def test_against_control(self, name: str, *, n_boot: int | None = None, seed: int | None = None
                             ) -> ControlTest:
        """Is the selection better than its control ``name`` where it was selected? The mean over the diagonal
        cells of ``removed(selected) - removed(control)``, with a t interval whose variance adds the control's
        draw-to-draw variance (the sample variance over draws of their diagonal removal, / draws) to the
        prompts' (:meth:`contrast`, paired on the same prompts), with Satterthwaite's degrees of freedom; and
        ``rank_p``: the share of draws that removed at least as much as the selection, (1 + count) / (1 +
        draws) (a Monte-Carlo test of "no better than these units drawn at random"; its smallest value is
        1 / (1 + draws), so it needs 19 draws to reach 0.05)."""
        diag = self.diagonal_cells()
        cells = [self.cell(r, c) for r, c in diag]
        if not diag or any(name not in c.controls for c in cells):
            return {"control": name, "difference": None, "note": f"no {name} control on the diagonal"}
        k = len(diag)
        est = self.contrast([t for r, c in diag for t in (("after", r, c, 1.0 / k), (f"control/{name}", r, c, -1.0 / k))],
                            n_boot=n_boot, seed=seed)
        draws = [np.asarray(c.controls[name].draws, dtype=np.float64) * -(np.sign(c.gap_before) or 1.0) for c in cells]
        n_draws = min(len(d) for d in draws)
        per_draw = np.mean([d[:n_draws] for d in draws], axis=0)  # each draw's mean diagonal removal
        selected = float(np.mean([c.gap_removed for c in cells]))
        out: ControlTest = {
               "control": name, "statistic": "mean over the diagonal of removed(selected) - removed(control)",
               "difference": est.estimate, "n_draws": n_draws, "selected_removed": selected,
               "draws_removed": [float(x) for x in per_draw],
               "rank_p": float((1 + np.sum(per_draw >= selected)) / (1 + n_draws))}
        var_p, df_p = est.se ** 2, est.df
        var_d = float(np.var(per_draw, ddof=1)) / n_draws if n_draws > 1 else float("nan")
        if not np.isfinite(var_d):  # one draw: its variance is unknown, and so is the test's
            return {**out, "ci_low": None, "ci_high": None, "p_value": None, "se": None,
                    "note": "one draw per control: the draw-to-draw variance is unknown"}
        var = var_p + var_d
        denom = (var_p ** 2 / df_p if df_p > 0 else 0.0) + var_d ** 2 / (n_draws - 1)
        df = var ** 2 / denom if denom > 0 else float("inf")
        se = float(np.sqrt(var))
        q = float(student_t.ppf(0.975, df))
        p = float(2 * student_t.sf(abs(est.estimate) / se, df)) if se > 0 else float("nan")
        return {**out, "ci_low": est.estimate - q * se, "ci_high": est.estimate + q * se, "p_value": p,
                "se": se, "df": df, "se_prompts": est.se, "se_draws": float(np.sqrt(var_d)),
                "min_detectable": mdd(se, df, 0.05)}

    def _ratio(self, which: str, cols: list[str], *, n_boot: int | None, seed: int | None) -> RatioTest:
        """cross / within (the share of the within-context removal that transfers), with a Fieller 95% interval:
        the ratios R whose contrast cross - R * within is not rejected. Reported only where the within
        estimate's CI excludes 0 (a ratio of a denominator that may be 0 has no finite interval)."""
        k = len(cols)
        within_terms = [(which, c, c, 1.0 / k) for c in cols]
        cross_terms = [(which, r, c, 1.0 / (k * (len(self.rows) - 1))) for c in cols for r in self.rows if r != c]
        w = self.contrast(within_terms, n_boot=n_boot, seed=seed)
        out: RatioTest = {"statistic": "cross / within", "within": w.estimate, "within_ci": [w.ci_low, w.ci_high],
                          "within_p_value": w.p_value}
        if not (w.ci_low > 0 or w.ci_high < 0):
            return {**out, "ratio": None, "ci_low": None, "ci_high": None,
                    "note": "not reported: the within-context removal's CI includes 0"}
        cross = sum(coef * self._removed(wh, r, c) for wh, r, c, coef in cross_terms)
        ratio = cross / w.estimate

        def rejected(r0: float) -> bool:
            e = self.contrast(cross_terms + [(wh, r, c, -r0 * coef) for wh, r, c, coef in within_terms],
                              n_boot=n_boot, seed=seed)
            return not (e.ci_low <= 0 <= e.ci_high)

        def edge(inside: float, outside: float) -> float:
            for _ in range(40):  # bisection to 1e-12 of the bracket
                mid = (inside + outside) / 2
                inside, outside = (inside, mid) if rejected(mid) else (mid, outside)
            return inside

        span = max(10.0, 10 * abs(ratio))
        lo = edge(ratio, ratio - span) if rejected(ratio - span) else float("-inf")
        hi = edge(ratio, ratio + span) if rejected(ratio + span) else float("inf")
        return {**out, "ratio": float(ratio), "ci_low": float(lo), "ci_high": float(hi), "method": "Fieller"}

    def save(self, path, *, interventions: bool = True) -> Path:
        """Write the matrix to folder ``path`` and, with ``interventions``, each row's intervention under
        ``path/interventions/<row>`` (a method run keeps them beside the matrix instead: ``MethodRun``)."""
        path = super().save(path)
        for r, iv in (self.interventions.items() if interventions else ()):
            iv.save(Path(path) / "interventions" / r)
        return path

    @classmethod
    def load(cls, path) -> TransferMatrix:
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

    def matrix(self, key: str = "reduction") -> Float[np.ndarray, "rows cols"]:
        """One cell statistic as a ``[rows, cols]`` array (NaN where a cell has none)."""
        return np.array([[_num(self.cell(r, c).get(key)) for c in self.cols] for r in self.rows], dtype=float)

    def _repr_html_(self) -> str:
        """The matrix in Jupyter: cells coloured by bias removed, hover for CIs, tests, controls and costs."""
        parts = [f"<b>{self.method}</b>, axis {self.axis}: bias removed on held-out prompts (hover a cell)"]
        parts += [matrix_html(group, title=f"{self.method} {name}")
                  for name, group in matrix_groups([c.as_dict() for c in self.cells])]
        tt = self.transfer_test or {}
        if transfer_estimate(tt) is not None:
            parts.append(f"<div>within - cross (within columns): {fmt(transfer_estimate(tt))} [{fmt(tt.get('ci_low'))}, "
                         f"{fmt(tt.get('ci_high'))}], minimal detectable difference "
                         f"{fmt(tt.get('min_detectable'), signed=False)}</div>")
        return "".join(parts)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in c.as_dict().items() if k != "controls"} for c in self.cells])

    def records(self) -> list[dict]:
        """Every cell as a flat dict (what ``result.json`` holds under ``cells``)."""
        return [c.as_dict() for c in self.cells]

    def plot(self, title: str | None = None):
        return plot_transfer(self, title=title)


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def transfer_matrix(
    model: TransformerBridge,
    selector: Selector,
    select_on: Sequence[str | Context] | None = None,
    axis: str | None = None,
    *,
    method: str = "",
    evaluate_on: Sequence[str | Context] | None = None,
    config: TransferConfig | None = None,
    eval_sets: dict[str, EvalSet] | None = None,
    profile: UnitProfile | None = None,
    progress: bool = False,
    **overrides,
) -> TransferMatrix:
    """Select on each context of ``select_on`` and evaluate on each of ``evaluate_on`` (default: the same).

    ``selector(model, context, axis)`` returns the intervention chosen on the context's selection split;
    every cell evaluates it on the held-out names and templates of one evaluation context, beside its
    controls. A selector that keeps its selections (a :class:`~mechbias.methods.base.Method`) may add
    controls of its own (``Selection.controls``, e.g. GRADIEND's h = 0 edit).

    Args:
        model: a model from :func:`~mechbias.load_model`.
        selector: a method instance or any callable ``(model, context, axis) -> Intervention``.
        select_on: the contexts to select on (rows).
        axis: ``"race"`` or ``"gender"`` (optionally ``@roster``); required (there is no default axis).
        method: the label the matrix carries in tables and figures.
        evaluate_on: the contexts to evaluate on (columns); default the same as ``select_on``.
        config: a :class:`~mechbias.TransferConfig` (controls, draws, bootstrap, capability texts).
        eval_sets: precomputed baseline evaluations to share between methods (context -> EvalSet).
        profile: the unit sizes and ablation costs matched controls are drawn from (measured on the
            selection neutral texts when needed).
        progress: show a progress bar (each row and cell is also logged to ``mechbias.eval.transfer``).
        **overrides: fields of ``config`` to override (e.g. ``n_random=0``).

    Returns:
        A :class:`~mechbias.TransferMatrix`; ``.test_transfer()`` is the within- vs cross-context test.

    Example:
        >>> tm = transfer_matrix(model, get_method("ig2")(), ["finance", "commerce"], "gender")  # doctest: +SKIP
        >>> tm.test_transfer(margin=0.05)["within_minus_cross"]                               # doctest: +SKIP
    """
    renamed = {"contexts": "select_on", "eval_contexts": "evaluate_on"}
    if old := [k for k in overrides if k in renamed]:
        raise TypeError(f"transfer_matrix: {', '.join(f'{k}= is now {renamed[k]}=' for k in old)} (the CLI's "
                        "--select-on / --evaluate-on)")
    if axis is None:
        raise ValueError("transfer_matrix needs the axis: 'race' or 'gender' (there is no default, so a matrix "
                         "never silently measures another axis than the one its caller studies)")
    cfg = config if config is not None else TransferConfig(**overrides)
    if config is not None and overrides:
        raise ValueError("pass either config or keyword overrides, not both")
    if select_on is None:
        raise ValueError("transfer_matrix needs the contexts to select on (select_on)")
    rows = load_contexts(select_on)
    cols = load_contexts(evaluate_on) if evaluate_on is not None else rows
    load_axis(axis)
    say = _LOG.info
    eval_sets = dict(eval_sets or {})
    for c in cols:
        if c.name not in eval_sets:
            eval_sets[c.name] = EvalSet.build(model, c, axis, seed=cfg.seed, templates_per_name=cfg.templates_per_name,
                                              progress=progress)
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
    meta = make_meta(model, method=method, axis=axis, contexts=[r.name for r in rows],
                     precision={"selection": getattr(getattr(selector, "config", None), "precision", "as called"),
                                "evaluation": "exact"})
    return finish_matrix(method, axis, [r.name for r in rows], [c.name for c in cols], eval_sets, cells, row_info,
                         baseline, cfg, meta, grids, chosen)


def transfer_estimate(test: Mapping[str, Any]) -> float | None:
    """The within - cross estimate of a saved transfer test: the column-wise statistic, or, in a result saved
    before it existed, the superseded pooled diagonal - off-diagonal one (as saved)."""
    if not isinstance(test, Mapping):
        return None
    return test.get("within_minus_cross", test.get("diagonal_minus_offdiagonal"))


def finish_matrix(method: str, axis: str, rows: list[str], cols: list[str], eval_sets: Mapping[str, EvalSet],
                  cells: list[Cell], row_info: list[RowInfo], baseline: list[dict], cfg: TransferConfig, meta: dict,
                  grids: dict[str, Tensor], chosen: dict[str, Intervention]) -> TransferMatrix:
    """Benjamini-Hochberg over the cells, the within- vs cross-context tests, and the result object."""
    grids = {"col_group": next(iter(eval_sets.values())).col_group.clone(),
             **{f"before/{c}": eval_sets[c].before for c in cols}, **grids}
    _adjust(cells, baseline)
    config_d = {**asdict(cfg), "templates": "heldout", "names": "heldout"}
    tm = TransferMatrix(method, axis, rows, cols, cells, row_info, baseline, config_d, meta, grids=grids,
                        interventions=dict(chosen))
    tm.transfer_test = dict(tm.test_transfer(margin=cfg.equivalence_margin))
    empty = [i["context"] for i in row_info if i.get("note") == EMPTY_ROW]
    if empty:  # within = cross = 0 on such rows says nothing about transfer
        tm.transfer_test["empty_rows"] = empty
        tm.transfer_test["empty_note"] = f"{EMPTY_ROW} (rows {empty})"
    # how alike the rows' selections are (identical interventions give within = cross by construction)
    overlaps = {f"{a}|{b}": chosen[a].overlap(chosen[b]) for i, a in enumerate(rows) for b in rows[i + 1:]
                if a in chosen and b in chosen}
    tm.transfer_test["overlap"] = {k: o.as_dict() if o is not None else None for k, o in overlaps.items()}
    for name in control_names(cells):
        # a control some rows lack (the selection's unmatched units alone, where a row has none) has no
        # column-wise test: its transfer test would need the control on every row
        on = [r for r in rows if all(name in c.controls for c in cells if c.selected_on == r)]
        tm.transfer_test[f"control_{name}"] = (tm.test_transfer(f"control/{name}") if len(on) == len(rows) else
                                              {"which": f"control/{name}", "within_minus_cross": None,
                                               "note": f"the control exists on rows {on} only"})
        tm.transfer_test[f"vs_{name}"] = tm.test_against_control(name)
    return tm


def control_names(cells: Sequence[Cell]) -> list[str]:
    """Every control name in any of ``cells``, in order of first appearance."""
    return list(dict.fromkeys(name for c in cells for name in c.controls))


def _adjust(cells: list[Cell], baseline: list[dict]) -> None:
    """Benjamini-Hochberg within each family: the matrix's cells, each control's cells, the baselines."""
    for adj, c in zip(benjamini_hochberg([c.p_value for c in cells]), cells, strict=True):
        c.effect.p_adjusted = adj
    for name in control_names(cells):
        effs = [c.controls[name] for c in cells if name in c.controls]
        for adj, e in zip(benjamini_hochberg([e.p_value for e in effs]), effs, strict=True):
            e.p_adjusted = adj
    for adj, b in zip(benjamini_hochberg([b["p_value"] for b in baseline]), baseline, strict=True):
        b["p_adjusted"] = adj
