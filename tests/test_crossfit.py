"""Cross-fitting (issue 34, item 4): the folds swap the halves exactly, repeated splits redraw them, the leakage
guard holds in each fold, and the cross-fitted cells are the folds' means with the stated standard error."""

import numpy as np
import pytest

from mechbias.core.testing import tiny_model
from mechbias.data.axes import load_axis
from mechbias.data.contexts import load_context
from mechbias.data.leakage import LeakageError, selection_phase, split_fold
from mechbias.data.neutral import neutral_texts
from mechbias.eval.cells import TransferConfig
from mechbias.eval.crossfit import combine_folds, crossfit_matrix, removed_and_se
from mechbias.eval.transfer import transfer_matrix
from mechbias.interventions.units import NeuronIntervention


def test_a_fold_swaps_the_halves_and_a_split_redraws_them():
    ctx, ax = load_context("finance"), load_axis("gender")
    sel, held = ctx.template_split("selection"), ctx.template_split("heldout")
    names_sel, names_held = ax.split_people("selection"), ax.split_people("heldout")
    texts_sel, texts_rep = neutral_texts(split="selection"), neutral_texts(split="reporting")
    with split_fold(1):
        assert ctx.template_split("selection") == held and ctx.template_split("heldout") == sel
        assert ax.split_people("selection") == names_held and ax.split_people("heldout") == names_sel
        assert neutral_texts(split="selection") == texts_rep and neutral_texts(split="reporting") == texts_sel
        with selection_phase("a fold-1 selection"), pytest.raises(LeakageError):
            ctx.template_split("heldout")  # the guard holds inside a fold
    assert ctx.template_split("selection") == sel  # back to the fixed split
    redrawn = []
    for s in range(1, 5):
        with split_fold(0, s):
            a, b = ctx.template_split("selection"), ctx.template_split("heldout")
            na, nb = ax.split_people("selection"), ax.split_people("heldout")
        assert sorted(a + b) == sorted(sel + held) and not set(a) & set(b)
        assert {p.name for p in na} | {p.name for p in nb} == {p.name for p in names_sel + names_held}
        assert not {p.name for p in na} & {p.name for p in nb} and len(na) == len(names_sel)
        redrawn.append(a != sel and {p.name for p in na} != {p.name for p in names_sel})
    assert sum(redrawn) >= 3  # another halving, not the fixed one again
    with pytest.raises(ValueError, match="fold must be 0 or 1"), split_fold(2):
        pass


def test_combine_folds_by_hand():
    est, se, spread = combine_folds([[(0.2, 0.03), (0.1, 0.04)]])
    assert est == pytest.approx(0.15) and se == pytest.approx(0.025) and spread is None
    est, se, spread = combine_folds([[(0.2, 0.03), (0.1, 0.04)], [(0.3, 0.06), (0.1, 0.08)]])
    assert est == pytest.approx((0.15 + 0.2) / 2) and se == pytest.approx((0.025 + 0.05) / 2)
    assert spread == pytest.approx(np.std([0.15, 0.2], ddof=1))


def test_crossfit_cells_are_the_folds_means_and_each_fold_selects_on_the_other_half():
    model = tiny_model(seed=1)
    cfg = TransferConfig(n_random=0, controls=(), capability=False, n_boot=200)
    seen: list[set[str]] = []

    def make_selector():
        def select(m, ctx, axis):  # chooses by what it saw: neurons keyed by its selection names
            ps = ctx.prompts(axis, templates="selection", names="selection")
            names = {p.person.name for p in ps}
            seen.append(names)
            return NeuronIntervention({1: sorted({hash(n) % 128 for n in names})[:6]})
        return select

    cf = crossfit_matrix(model, make_selector, ["finance", "commerce"], "gender", config=cfg, splits=1)
    manual = []
    for fold in (0, 1):
        with split_fold(fold):
            manual.append(transfer_matrix(model, make_selector(), ["finance", "commerce"], "gender", config=cfg))
            heldout = {p.name for p in load_axis("gender").split_people("heldout")}
        assert not seen[-1] & heldout  # each fold's selection saw none of the names it is evaluated on
    # seen: the cross-fit's fold 0 (finance, commerce) and fold 1, then the manual fold 0 and fold 1
    assert seen[0] == seen[4] and seen[0].isdisjoint(seen[2])  # fold 1 selects on fold 0's held-out names
    for r in ("finance", "commerce"):
        for c in ("finance", "commerce"):
            (a, sa), (b, sb) = removed_and_se(manual[0], r, c), removed_and_se(manual[1], r, c)
            cell = cf.cell(r, c)
            assert cell["gap_removed"] == pytest.approx((a + b) / 2, abs=1e-12)
            assert cell["se"] == pytest.approx(np.sqrt(sa**2 + sb**2) / 2, rel=1e-9)
            assert cell["ci_low"] < cell["gap_removed"] < cell["ci_high"] and cell["folds"] == [[a, b]]
    t0, t1 = (m.transfer_test["within_minus_cross"] for m in manual)
    assert cf.test["within_minus_cross"] == pytest.approx((t0 + t1) / 2, abs=1e-12)
    assert len(cf.fits) == 2 and {f["fold"] for f in cf.fits} == {0, 1}
    assert cf.to_dataframe().shape[0] == 4
