"""Cross-fitting and repeated splits of the transfer matrix.

One transfer matrix selects on one half of the templates and names (and of the neutral texts) and evaluates
on the other. Its intervals hold the selection fixed: they do not say how much the numbers would move had the
selection seen the other half. :func:`crossfit_matrix` runs the matrix twice per split, the second time with the
halves swapped (:func:`~mechbias.data.leakage.split_fold`: what a method asks for as ``selection`` is the first
fit's held-out half), and averages the two folds cell by cell. The folds select and evaluate on disjoint names
and templates, so their estimates are independent given the model and the cross-fitted standard error is
``sqrt(se_0^2 + se_1^2) / 2``. Repeated over ``splits`` random halvings, the cross-fitted estimates are
averaged and their spread between splits (how much the answer depends on which half the method saw) is
reported beside the interval, not folded into it: the splits share all their data, so their average is not
more precise than one split.

Each fold's standard error is read from its cell's 95% interval (width / 2 / 1.96), a normal approximation;
the folds' own intervals are t intervals over the crossed design (:class:`~mechbias.eval.cells.Effect`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
from scipy.stats import norm

from ..core.results import Result, make_meta
from ..data.contexts import Context, load_contexts
from ..data.leakage import split_fold
from .cells import TransferConfig
from .transfer import Selector, TransferMatrix, transfer_estimate, transfer_matrix

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

_LOG = logging.getLogger(__name__)
_Z = float(norm.ppf(0.975))


class CrossFitCell(TypedDict):
    """One cross-fitted cell: bias removed (log-odds) averaged over folds and splits."""

    selected_on: str
    evaluated_on: str
    gap_removed: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    between_split_sd: float | None
    folds: list[list[float]]  # per split: [fold 0, fold 1] bias removed


class FitSummary(TypedDict):
    """What one fit (a split and a fold) found: its within - cross test and its cells' bias removed."""

    split: int
    fold: int
    within_minus_cross: float | None
    ci_low: float | None
    ci_high: float | None
    removed: dict[str, float]  # "row|col" -> bias removed


def removed_and_se(tm: TransferMatrix, row: str, col: str) -> tuple[float, float]:
    """A cell's bias removed and its standard error, read from its 95% interval (normal approximation)."""
    c = tm.cell(row, col)
    return float(c.gap_removed), float(c.ci_high - c.ci_low) / (2 * _Z)


def combine_folds(values: Sequence[Sequence[tuple[float, float]]]) -> tuple[float, float, float | None]:
    """Cross-fitted estimate, its standard error and the spread between splits, from per split the two folds'
    ``(estimate, se)``: each split's estimate is the folds' mean with se ``sqrt(se_0^2 + se_1^2) / 2``; over
    splits the estimates and the standard errors are averaged and the SD of the estimates is the spread (None
    for one split)."""
    per = [((a + b) / 2, float(np.sqrt(sa**2 + sb**2)) / 2) for (a, sa), (b, sb) in values]
    est = float(np.mean([e for e, _ in per]))
    se = float(np.mean([s for _, s in per]))
    spread = float(np.std([e for e, _ in per], ddof=1)) if len(per) > 1 else None
    return est, se, spread


@dataclass
class CrossFit(Result):
    """Cross-fitted transfer matrix (:func:`crossfit_matrix`).

    Args:
        method: the method's label.
        axis: the axis.
        rows: contexts selected on.
        cols: contexts evaluated on.
        splits: how many random halvings (each run in both folds).
        cells: per (row, column) the cross-fitted bias removed with its interval and the folds' values.
        test: the cross-fitted within - cross difference (the matrices' column-wise test averaged the same way).
        fits: per split and fold, its test and cells.
        meta: versions and settings.
    """

    method: str
    axis: str
    rows: list[str]
    cols: list[str]
    splits: int
    cells: list[CrossFitCell]
    test: dict[str, Any]
    fits: list[FitSummary] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    result_type = "crossfit"

    def cell(self, row: str, col: str) -> CrossFitCell:
        for c in self.cells:
            if c["selected_on"] == row and c["evaluated_on"] == col:
                return c
        raise KeyError((row, col))

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in c.items() if k != "folds"} for c in self.cells])


def crossfit_matrix(model: TransformerBridge, make_selector: Callable[[], Selector],
                    select_on: Sequence[str | Context], axis: str, *, evaluate_on: Sequence[str | Context] | None = None,
                    splits: int = 1, config: TransferConfig | None = None, method: str = "") -> CrossFit:
    """The transfer matrix cross-fitted over two folds, for each of ``splits`` random halvings.

    Args:
        model: a model from :func:`~mechbias.load_model`.
        make_selector: returns a fresh selector (a method instance) for each fit, so no fit sees another's
            selections.
        select_on: the contexts to select on (rows).
        axis: the axis.
        evaluate_on: the contexts to evaluate on (default: the rows).
        splits: random halvings (split 0 is the package's fixed split); each runs in both folds.
        config: the transfer configuration of every fit.
        method: the label.

    Returns:
        A :class:`CrossFit`: per cell the folds' mean bias removed with ``se = sqrt(se_0^2 + se_1^2) / 2``
        (averaged over splits), a normal 95% interval and p-value, and the spread between splits beside it.
    """
    if splits < 1:
        raise ValueError(f"splits must be >= 1, not {splits}")
    rows = [c.name for c in load_contexts(select_on)]
    cols = [c.name for c in load_contexts(evaluate_on)] if evaluate_on is not None else rows
    fits: list[tuple[int, int, TransferMatrix]] = []
    for s in range(splits):
        for fold in (0, 1):
            _LOG.info(f"cross-fit: split {s}, fold {fold}")
            with split_fold(fold, s):
                tm = transfer_matrix(model, make_selector(), select_on, axis, evaluate_on=evaluate_on,
                                     config=config, method=method)
            fits.append((s, fold, tm))
    return crossfit_from_fits(fits, rows, cols, splits, method or fits[0][2].method, axis, make_meta(model))


def crossfit_from_fits(fits: Sequence[tuple[int, int, TransferMatrix]], rows: Sequence[str], cols: Sequence[str],
                       splits: int, method: str, axis: str, meta: dict) -> CrossFit:
    """The cross-fitted matrix from its fits ``(split, fold, matrix)``, one per split and fold (the study plans
    the fits as jobs; :func:`crossfit_matrix` runs them in-process)."""
    have = sorted((s, f) for s, f, _ in fits)
    if have != [(s, f) for s in range(splits) for f in (0, 1)]:
        raise ValueError(f"cross-fitting needs both folds of splits 0..{splits - 1}, got {have}")
    fits = sorted(fits, key=lambda x: (x[0], x[1]))  # fold 0 before fold 1 in every split
    cells: list[CrossFitCell] = []
    for r in rows:
        for c in cols:
            vals = [[removed_and_se(tm, r, c) for s2, _, tm in fits if s2 == s] for s in range(splits)]
            est, se, spread = combine_folds([(v[0], v[1]) for v in vals])
            p = float(2 * norm.sf(abs(est) / se)) if se > 0 else float("nan")
            cells.append({"selected_on": r, "evaluated_on": c, "gap_removed": est, "se": se,
                          "ci_low": est - _Z * se, "ci_high": est + _Z * se, "p_value": p,
                          "between_split_sd": spread, "folds": [[v[0][0], v[1][0]] for v in vals]})
    tests = [(s, tm.transfer_test) for s, _, tm in fits]
    test: dict[str, Any] = {"statistic": "within - cross (column-wise), cross-fitted"}
    if all(transfer_estimate(t) is not None for _, t in tests):
        per = [[(float(t["within_minus_cross"]), (float(t["ci_high"]) - float(t["ci_low"])) / (2 * _Z))
                for s2, t in tests if s2 == s] for s in range(splits)]
        est, se, spread = combine_folds([(v[0], v[1]) for v in per])
        test.update(within_minus_cross=est, se=se, ci_low=est - _Z * se, ci_high=est + _Z * se,
                    p_value=float(2 * norm.sf(abs(est) / se)) if se > 0 else float("nan"),
                    between_split_sd=spread)
    else:
        test["note"] = "no within - cross test (needs two rows and a column that is also a row)"
    summaries: list[FitSummary] = [
        {"split": s, "fold": f, "within_minus_cross": transfer_estimate(tm.transfer_test),
         "ci_low": tm.transfer_test.get("ci_low"), "ci_high": tm.transfer_test.get("ci_high"),
         "removed": {f"{r}|{c}": float(tm.cell(r, c).gap_removed) for r in rows for c in cols}}
        for s, f, tm in fits]
    meta = {**meta, "method": method, "axis": axis, "splits": splits, "folds": 2,
            "se": "sqrt(se_fold0^2 + se_fold1^2) / 2, averaged over splits; normal 95% interval"}
    return CrossFit(method, axis, list(rows), list(cols), splits, cells, test, summaries, meta)
