"""Statistics: interval coverage over many simulated data sets, Benjamini-Hochberg, the transfer test."""

import numpy as np
import pytest
import torch

from mechbias.eval.cells import Cell, Effect
from mechbias.eval.factors import factor_estimate, factor_mean, weighted_mean
from mechbias.eval.stats import (
    CrossedBootstrap,
    benjamini_hochberg,
    crossed_estimate,
    grid_gap,
    group_gap,
    paired_reduction,
)
from mechbias.eval.transfer import TransferMatrix


def _grid(rng, T=5, n=16, gap=0.15, sd_tg=0.15, sd_n=0.3, sd_t=0.5, sd_e=0.2, names=None):
    """Scores of T templates x 2n names: template, template x group, name and residual effects."""
    g = np.r_[np.zeros(n), np.ones(n)].astype(int)
    b = rng.normal(0, sd_n, 2 * n) if names is None else names
    return (np.where(g == 0, gap, 0.0)[None, :] + rng.normal(0, sd_t, T)[:, None]
            + rng.normal(0, sd_tg, (T, 2))[:, g] + b[None, :] + rng.normal(0, sd_e, (T, 2 * n))), g


@pytest.mark.parametrize("sd_tg", [0.05, 0.3])
def test_gap_interval_covers_at_the_nominal_rate(sd_tg):
    """600 simulated data sets with 5 templates (the held-out split): coverage of the true gap must lie in
    [0.925, 0.975]. A percentile crossed bootstrap gives about 0.89 at sd_tg = 0.3, so this can fail."""
    rng = np.random.default_rng(7)
    hits = 0
    for i in range(600):
        m, g = _grid(rng, sd_tg=sd_tg)
        e = crossed_estimate({"c": m}, g, n_boot=400, seed=i)
        hits += e.ci_low <= 0.15 <= e.ci_high
    assert 0.925 <= hits / 600 <= 0.975, hits / 600


def test_paired_change_and_shared_names_contrast_cover():
    """A paired change on one grid and a contrast of two grids that share their names (the transfer test's
    shape): both cover the true value at the nominal rate over 500 data sets."""
    rng = np.random.default_rng(11)
    hit_change = hit_contrast = 0
    for i in range(500):
        before, g = _grid(rng)
        after = before + np.where(g == 0, -0.1, 0.0)[None, :] + rng.normal(0, 0.1, (1, 32)) \
            + rng.normal(0, 0.08, (5, 2))[:, g]  # true change -0.1, with name and template x group noise
        e = crossed_estimate({"c": after - before}, g, n_boot=400, seed=i)
        hit_change += e.ci_low <= -0.1 <= e.ci_high
        names = rng.normal(0, 0.3, 32)  # the same people in both contexts
        a, _ = _grid(rng, gap=0.3, names=names)
        b, _ = _grid(rng, gap=0.1, names=names)
        c = crossed_estimate({"A": a, "B": -b}, g, n_boot=400, seed=i)  # gap(A) - gap(B), true 0.2
        hit_contrast += c.ci_low <= 0.2 <= c.ci_high
    assert 0.925 <= hit_change / 500 <= 0.975, hit_change / 500
    assert 0.925 <= hit_contrast / 500 <= 0.98, hit_contrast / 500


def _pair_units(rng, T=5, per_template=6, n=16, delta=0.2, sd_t=0.3, sd_n=0.3, sd_e=0.2):
    """IG² verification units: per template, ``per_template`` pairs of a group-A and a group-B name drawn
    from ``n`` + ``n`` names; a unit's value = delta + template + name A - name B + residual."""
    ta, na, nb = rng.normal(0, sd_t, T), rng.normal(0, sd_n, n), rng.normal(0, sd_n, n)
    vals, fac = [], {"template": [], "name_a": [], "name_b": []}
    for t in range(T):
        for a, b in zip(rng.choice(n, per_template, replace=False), rng.choice(n, per_template, replace=False), strict=True):
            vals.append(delta + ta[t] + na[a] - nb[b] + rng.normal(0, sd_e))
            fac["template"].append([t]), fac["name_a"].append([a]), fac["name_b"].append([b])
    return np.array(vals), fac


def test_factor_interval_covers_units_that_share_templates_and_names():
    """500 simulated verification data sets (5 templates x 6 name pairs from 16 + 16 names): the interval
    over templates and names covers the true mean change in [0.92, 0.98]; resampling units as if independent
    (the earlier verification) covers far less, so the test can tell the two apart."""
    rng = np.random.default_rng(5)
    hits = naive = 0
    for i in range(500):
        v, fac = _pair_units(rng)
        e = factor_estimate(weighted_mean(v), fac, n_boot=300, seed=i)
        hits += e.ci_low <= 0.2 <= e.ci_high
        u = factor_estimate(weighted_mean(v), {"unit": [[k] for k in range(len(v))]}, n_boot=300, seed=i)
        naive += u.ci_low <= 0.2 <= u.ci_high
    assert 0.92 <= hits / 500 <= 0.98, hits / 500
    assert naive / 500 < 0.85, naive / 500


def test_factor_interval_counts_the_residual_once_covers_and_has_its_power():
    """Units that share templates and names with a dominant residual (10 templates x 8 pairs from 40 + 40
    names): over 1,500 simulated data sets the moment interval covers the true change in [0.93, 0.97], where
    the earlier per-factor bootstrap (which counts the residual once per factor) over-covers (> 0.975). A
    second design with a true change of 0 covers in the same window, and a true change equal to its median
    detectable difference is detected (p < 0.05) in [0.75, 0.85] of 1,000 data sets."""
    rng = np.random.default_rng(3)
    new = old = 0
    for i in range(1500):
        v, fac = _pair_units(rng, T=10, per_template=8, n=40, sd_t=0.3, sd_n=0.1, sd_e=0.6)
        new += _covers(factor_estimate(weighted_mean(v), fac), 0.2)
        old += _covers(factor_estimate(weighted_mean(v), fac, n_boot=200, seed=i, estimator="bootstrap"), 0.2)
    assert 0.93 <= new / 1500 <= 0.97, new / 1500
    assert old / 1500 > 0.975, old / 1500
    design = dict(T=12, per_template=6, n=30, sd_t=0.2, sd_n=0.2, sd_e=0.4)
    hits, mdds = 0, []
    for _ in range(1000):
        v, fac = _pair_units(rng, delta=0.0, **design)
        e = factor_estimate(weighted_mean(v), fac)
        hits += _covers(e, 0.0)
        mdds.append(e.min_detectable)
    assert 0.93 <= hits / 1000 <= 0.97, hits / 1000
    effect = float(np.median(mdds))
    found = sum(factor_estimate(weighted_mean(v), fac).p_value < 0.05
                for v, fac in (_pair_units(rng, delta=effect, **design) for _ in range(1000)))
    assert 0.75 <= found / 1000 <= 0.85, found / 1000


def _covers(e, truth: float) -> bool:
    return bool(e.ci_low <= truth <= e.ci_high)


def test_factor_moments_of_a_ratio_use_its_influence_values():
    """A ratio of weighted means (the verification's relative change): its influence values are the delta
    method's, so the moment variance equals the one of the linearised values ``(a - r b) / mean(b)``."""
    rng = np.random.default_rng(4)
    a, fac = _pair_units(rng)
    b = 1.0 + 0.1 * rng.normal(size=len(a))
    r = a.mean() / b.mean()

    def ratio(w):
        return (w @ a) / (w @ b)

    got = factor_estimate(ratio, fac)
    lin = factor_estimate(weighted_mean((a - r * b) / b.mean()), fac)
    assert got.estimate == pytest.approx(r, abs=1e-12)
    assert got.se == pytest.approx(lin.se, rel=1e-5)
    assert got.df == pytest.approx(lin.df, rel=1e-5)


def test_factor_mean_leaves_out_units_without_a_value():
    """Patching cells can be NaN for a pair (a shorter prompt); those units and their factor entries are
    left out, and the rest give exactly the interval of the finite units alone."""
    rng = np.random.default_rng(9)
    v, fac = _pair_units(rng)
    w = v.copy()
    w[[0, 7, 20]] = np.nan
    keep = [i for i in range(len(v)) if i not in (0, 7, 20)]
    got = factor_mean(w, fac, n_boot=300, seed=4)
    ref = factor_estimate(weighted_mean(v[keep]), {k: [f[i] for i in keep] for k, f in fac.items()}, n_boot=300,
                          seed=4)
    assert got == pytest.approx((ref.estimate, ref.ci_low, ref.ci_high), abs=1e-12)
    assert got[0] != pytest.approx(float(v.mean()), abs=1e-6)


def test_factor_estimate_of_one_template_factor_equals_the_crossed_estimate_variance():
    """Units = the cells of one templates x names grid with only a template factor: the same variance as the
    template part of :func:`crossed_estimate` up to Monte Carlo error, and the mean is exact."""
    rng = np.random.default_rng(2)
    m, g = _grid(rng, T=8)
    diff = m[:, g == 0].mean(1) - m[:, g == 1].mean(1)  # per-template gap: the units
    e = factor_estimate(weighted_mean(diff), {"template": [[t] for t in range(8)]}, n_boot=20000, seed=0)
    assert e.estimate == pytest.approx(diff.mean(), abs=1e-12)
    assert e.se == pytest.approx(diff.std(ddof=1) / np.sqrt(8), rel=0.03)  # the textbook SE of a mean
    assert e.df == pytest.approx(7)


def test_minimal_detectable_difference_has_its_power():
    """A true effect equal to the stated minimal detectable difference (its median over 100 data sets of the
    design) is detected 75-85% of the time (nominal 80%)."""
    rng = np.random.default_rng(3)
    mdds = []
    for i in range(100):
        m0, g = _grid(rng, gap=0.0)
        mdds.append(crossed_estimate({"c": m0}, g, n_boot=400, seed=i).min_detectable)
    mdd = float(np.median(mdds))
    detected = 0
    for i in range(400):
        m, _ = _grid(rng, gap=mdd)
        detected += crossed_estimate({"c": m}, g, n_boot=400, seed=i).p_value < 0.05
    assert 0.75 <= detected / 400 <= 0.85, (mdd, detected / 400)


def test_group_gap_and_paired_reduction_values():
    col_group = torch.tensor([0] * 20 + [1] * 20)
    rng = np.random.default_rng(1)
    before = rng.normal(0, 0.2, (6, 40)) + np.where(col_group.numpy() == 0, 1.0, 0.0)
    after = before.copy()
    after[:, col_group.numpy() == 0] -= 0.5  # every group-A prompt moves by exactly -0.5
    gb = before[:, :20].mean() - before[:, 20:].mean()
    r = paired_reduction(before, after, col_group)
    assert r.gap_change == pytest.approx(-0.5, abs=1e-12)
    assert r.gap_change_ci[0] == pytest.approx(-0.5, abs=1e-9) and r.gap_change_ci[1] == pytest.approx(-0.5, abs=1e-9)
    assert r.reduction == pytest.approx(0.5 / gb, abs=1e-12) and r.estimable
    g = group_gap(before, col_group)
    assert g.gap == pytest.approx(gb, abs=1e-12) and g.ci_low < gb < g.ci_high and g.p_value < 1e-6
    null = paired_reduction(rng.normal(0, 1, (6, 40)), rng.normal(0, 1, (6, 40)), col_group)
    assert not null.estimable  # no clear gap before: the ratio is not reported


def test_benjamini_hochberg_matches_its_definition():
    p = [0.01, 0.04, 0.03, 0.20, float("nan"), 0.005]
    adj = benjamini_hochberg(p)
    finite = [(x, i) for i, x in enumerate(p) if np.isfinite(x)]
    m = len(finite)
    ranked = sorted(finite)
    for r, (_x, i) in enumerate(ranked, start=1):  # adj_(r) = min over j >= r of p_(j) m / j
        expected = min(1.0, min(ranked[j - 1][0] * m / j for j in range(r, m + 1)))
        assert adj[i] == pytest.approx(expected)
    assert np.isnan(adj[4])
    assert adj == pytest.approx([0.025, 0.05, 0.05, 0.2, float("nan"), 0.025], nan_ok=True)


def _matrix(rng, diag_effect: float, off_effect: float, ctxs=("a", "b", "c"), cols=None, gaps=None,
            same_fix=None) -> TransferMatrix:
    """A transfer matrix from simulated grids: selecting on a context removes ``diag_effect`` of its gap and
    ``off_effect`` of the others'. ``cols``: evaluation contexts (default the rows; may add columns that are
    not rows: non-square); ``gaps``: each column's gap before; ``same_fix``: every row applies the same
    intervention, which removes ``same_fix[c]`` in column ``c`` (the answer of the transfer test must be 0)."""
    cols = list(cols or ctxs)
    names = rng.normal(0, 0.3, 32)
    g = np.r_[np.zeros(16), np.ones(16)].astype(int)
    grids: dict = {"col_group": torch.tensor(g)}
    cells = []
    for c in cols:
        before, _ = _grid(rng, gap=(gaps or {}).get(c, 0.4), names=names)
        grids[f"before/{c}"] = torch.tensor(before)
        fixed = rng.normal(0, 0.05, (5, 2))[:, g]  # one intervention: the same grid change for every row
        for r in ctxs:
            if same_fix is not None:
                after = before - np.where(g == 0, same_fix[c], 0.0)[None, :] + fixed
            else:
                eff = diag_effect if r == c else off_effect
                after = before - np.where(g == 0, eff, 0.0)[None, :] + rng.normal(0, 0.05, (5, 2))[:, g]
            grids[f"after/{r}/{c}"] = torch.tensor(after)
            red = paired_reduction(before, after, torch.tensor(g), n_boot=200)
            cells.append(Cell(r, c, "L1" if r == c else "L2", 1,
                              Effect(red.gap_before, red.gap_after, red.gap_change, red.gap_change_ci[0],
                                     red.gap_change_ci[1], red.gap_change_p, red.min_detectable, -red.gap_change,
                                     None, None, None)))
    return TransferMatrix("sim", "race", list(ctxs), cols, cells, config={"n_boot": 400, "seed": 0},
                          grids=grids)


def test_transfer_test_detects_a_difference_and_covers_under_the_null():
    rng = np.random.default_rng(5)
    t = _matrix(rng, 0.3, 0.05).test_transfer()
    assert t["within_minus_cross"] == pytest.approx(0.25, abs=0.08) and t["ci_low"] > 0
    assert t["min_detectable"] > 0
    assert t["within_minus_cross"] == pytest.approx(t["within_mean"] - t["cross_mean"], abs=1e-9)
    hits = 0
    for i in range(200):  # no difference between within- and cross-context effects
        t = _matrix(rng, 0.2, 0.2).test_transfer(seed=i)
        hits += t["ci_low"] <= 0 <= t["ci_high"]
    assert 0.91 <= hits / 200 <= 0.99, hits / 200


def test_the_same_fix_on_every_row_gives_zero_whatever_the_column_gaps():
    """Issue 33: a 2 x 4 matrix whose columns have unequal gaps (1.15, 1.09, 0.125, 0.53 as planted v3) and whose
    rows all apply the same intervention. The column-wise test is exactly 0 and never significant; the old
    pooled statistic (diagonal mean - off-diagonal mean) is far from 0 and "detects" a difference."""
    rng = np.random.default_rng(21)
    gaps = {"finance": 1.15, "commerce": 1.09, "hiring": 0.125, "housing": 0.53}
    fix = {c: 0.9 * gap for c, gap in gaps.items()}  # removes 90% of each column's gap, on every row
    tm = _matrix(rng, 0, 0, ctxs=("finance", "commerce"), cols=list(gaps), gaps=gaps, same_fix=fix)
    t = tm.test_transfer()
    assert t["columns"] == ["finance", "commerce"]
    assert t["within_minus_cross"] == pytest.approx(0.0, abs=1e-12)
    assert t["ci_low"] <= 0 <= t["ci_high"] and t["p_value"] > 0.5
    assert t["pooled_diagonal_minus_offdiagonal"] > 0.3  # the old statistic: an artefact of the column gaps
    old = tm.contrast([("after", r, r, 0.5) for r in tm.rows]
                      + [("after", r, c, -1 / 6) for r in tm.rows for c in tm.cols if c != r])
    assert old.ci_low > 0  # ... which the old test called significant


def test_non_square_matrix_with_unequal_gaps_detects_and_covers():
    """Rows a, b; columns a, b, x, y with unequal gaps. The statistic uses columns a and b only, detects a
    within-context advantage, and covers its true value (0.2) at the nominal rate."""
    rng = np.random.default_rng(8)
    gaps = {"a": 0.8, "b": 0.3, "x": 0.1, "y": 0.6}
    hits = 0
    for i in range(150):
        tm = _matrix(rng, 0.3, 0.1, ctxs=("a", "b"), cols=["a", "b", "x", "y"], gaps=gaps)
        t = tm.test_transfer(seed=i)
        assert t["columns"] == ["a", "b"]
        hits += t["ci_low"] <= 0.2 <= t["ci_high"]
    assert 0.91 <= hits / 150 <= 0.99, hits / 150
    t = _matrix(rng, 0.3, 0.1, ctxs=("a", "b"), cols=["a", "b", "x", "y"], gaps=gaps).test_transfer()
    assert t["ci_low"] > 0


def test_tost_ratio_and_the_detectable_difference_at_the_bh_level():
    rng = np.random.default_rng(13)
    tm = _matrix(rng, 0.3, 0.3)  # transfers fully: cross / within = 1
    t = tm.test_transfer(margin=0.15, family_size=8)
    assert t["tost"]["margin"] == 0.15
    assert t["tost"]["equivalent"] == (t["tost"]["ci_low_90"] > -0.15 and t["tost"]["ci_high_90"] < 0.15)
    assert t["min_detectable_bh"] > t["min_detectable"]  # at 0.05 / 8 more is needed to be seen
    assert t["alpha_bh"] == pytest.approx(0.05 / 8)
    r = t["ratio"]
    assert r["ratio"] == pytest.approx(t["cross_mean"] / t["within_mean"], abs=1e-9)
    assert r["ci_low"] < 1.0 < r["ci_high"] and r["ci_high"] - r["ci_low"] < 1.0
    # a tiny margin cannot be met; a within effect of ~0 gets no ratio
    assert not tm.test_transfer(margin=1e-4)["tost"]["equivalent"]
    assert _matrix(rng, 0.0, 0.0).test_transfer()["ratio"]["ratio"] is None


def test_crossed_interval_counts_the_residual_once():
    """Issue 33: each one-factor bootstrap carries the residual (template x name) variance, so adding them
    counted it twice. With a residual term, unequal groups and non-square grids, the interval now covers in
    [0.93, 0.97]; the old estimator over-covers (> 0.97) in the residual-dominated designs."""
    def grid(rng, T, na, nb, sd_tg, sd_n, sd_e):
        g = np.r_[np.zeros(na), np.ones(nb)].astype(int)
        return (np.where(g == 0, 0.15, 0.0)[None, :] + rng.normal(0, 0.5, T)[:, None]
                + rng.normal(0, sd_tg, (T, 2))[:, g] + rng.normal(0, sd_n, na + nb)[None, :]
                + rng.normal(0, sd_e, (T, na + nb))), g

    for design in [(8, 12, 20, 0.1, 0.2, 0.4), (6, 20, 14, 0.05, 0.15, 0.5)]:
        rng = np.random.default_rng(2)
        new = old = 0
        n = 800
        var_new, var_old, ests = [], [], []
        for i in range(n):
            m, g = grid(rng, *design)
            e = crossed_estimate({"c": m}, g, n_boot=200, seed=i)
            o = crossed_estimate({"c": m}, g, n_boot=200, seed=i, residual_once=False)
            new += e.ci_low <= 0.15 <= e.ci_high
            old += o.ci_low <= 0.15 <= o.ci_high
            var_new.append(e.se ** 2), var_old.append(o.se ** 2), ests.append(e.estimate)
            assert e.var_residual > 0
        assert 0.93 <= new / n <= 0.97, (design, new / n)
        assert old / n > 0.97, (design, old / n)
        true = np.var(ests)
        assert np.mean(var_new) / true < 1.15 < np.mean(var_old) / true, (np.mean(var_new) / true,
                                                                         np.mean(var_old) / true)


def test_contrast_of_the_diagonal_equals_its_cells_and_covers_the_planted_effect():
    rng = np.random.default_rng(11)
    tm = _matrix(rng, 0.3, 0.1)
    diag = [("after", r, c, 1.0 / len(tm.rows)) for r, c in tm.diagonal_cells()]
    est = tm.contrast(diag)
    assert est.estimate == pytest.approx(np.mean([tm.cell(r, r).gap_removed for r in tm.rows]), abs=1e-9)
    assert est.estimate == pytest.approx(est.cells_estimate, abs=1e-9)
    t = tm.test_transfer()  # square: the column-wise test is the contrast of the two means
    off = [("after", r, c, -1.0 / len(tm.offdiagonal_cells())) for r, c in tm.offdiagonal_cells()]
    assert tm.contrast(diag + off).ci_low == pytest.approx(t["ci_low"], abs=1e-12)
    with pytest.raises(KeyError, match="control/nope"):
        tm.contrast([("control/nope", tm.rows[0], tm.rows[0], 1.0)])
    hits = 0
    for i in range(200):  # the diagonal's mean removal is 0.3 by construction
        m = _matrix(rng, 0.3, 0.1)
        e = m.contrast([("after", r, c, 1.0 / len(m.rows)) for r, c in m.diagonal_cells()], seed=i)
        hits += e.ci_low <= 0.3 <= e.ci_high
    assert 0.91 <= hits / 200 <= 0.99, hits / 200


def test_selection_overlap_between_rows_is_what_it_says():
    """Issue 33: identical interventions give within = cross by construction, so each transfer result carries
    how alike the rows' selections are: Jaccard for units, |cosine| for directions and edits."""
    from mechbias.interventions.units import HeadIntervention, NeuronIntervention
    from mechbias.interventions.weights import WeightEdit, WeightMask
    from mechbias.methods.steering import DirectionIntervention

    a = NeuronIntervention({28: [1095, 3], 5: [7]})
    b = NeuronIntervention({28: [1095], 6: [7, 8]})
    o = a.overlap(b)
    assert o is not None and o.measure == "jaccard" and o.value == pytest.approx(1 / 5) and o.shared == 1
    assert a.overlap(a).value == 1.0 and a.overlap(HeadIntervention({0: [1]})) is None
    assert HeadIntervention({18: [6, 7]}).overlap(HeadIntervention({18: [7]})).value == pytest.approx(0.5)
    m1 = WeightMask({"w": torch.tensor([1, 2, 3])})
    assert m1.overlap(WeightMask({"w": torch.tensor([3, 4])})).value == pytest.approx(1 / 4)
    d = torch.tensor([1.0, 0.0, 1.0])
    assert DirectionIntervention(3, d).overlap(DirectionIntervention(3, -2 * d)).value == pytest.approx(1.0)
    same = DirectionIntervention(3, d).overlap(DirectionIntervention(3, torch.tensor([1.0, 1.0, -1.0])))
    assert same.value == pytest.approx(0.0, abs=1e-12) and same.same_layer
    e1, e2 = WeightEdit({"w": torch.tensor([1.0, 2.0])}), WeightEdit({"w": torch.tensor([2.0, -1.0])})
    assert e1.overlap(e2).value == pytest.approx(0.0, abs=1e-12) and e1.overlap(e1).value == pytest.approx(1)


def test_gating_reads_the_within_context_effect():
    rng = np.random.default_rng(17)
    strong = _matrix(rng, 0.3, 0.1).test_transfer()
    assert strong["gated"] and strong["within_p_value"] < 0.05
    none = _matrix(rng, 0.0, 0.0).test_transfer()
    assert not none["gated"] and "no within-context effect" in none["gate_note"]


def _simulated_matrix(rng, *, n_draws: int, lift: float, n_boot: int = 200):
    """One evaluation context (5 templates x 16 + 16 names) and an intervention with ``n_draws`` random-control
    draws: each intervention moves group A's scores by its own effect (draws: N(0, 0.05^2); the selection:
    the same plus ``lift``), plus a per-name response shared by all and prompt-level noise."""
    from mechbias.eval.cells import EvalSet, TransferConfig, cell_from_grids
    from mechbias.eval.transfer import finish_matrix

    T, N = 5, 32
    g = torch.tensor([0] * 16 + [1] * 16)
    before = torch.tensor(rng.normal(0, 0.3, (T, 1)) + rng.normal(0, 0.3, (1, N)) + rng.normal(0, 0.2, (T, N))
                          + 0.5 * (g.numpy() == 0))  # group A favoured: a positive gap, so removal = -change
    response = rng.normal(0, 0.05, N) * (g.numpy() == 0)

    def change(effect):
        return torch.tensor((effect * (g.numpy() == 0) + response)[None, :] + rng.normal(0, 0.02, (T, N)))

    es = EvalSet("a", None, before, g)
    cfg = TransferConfig(n_random=n_draws, n_boot=n_boot, capability=False)
    own = rng.normal(0, 0.05) - lift  # the selection's true change; the draws' true mean change is 0
    after = before + change(own)
    draws = [before + change(rng.normal(0, 0.05)) for _ in range(n_draws)]
    kept: dict = {}
    cell = cell_from_grids(es, after, 1, cfg, selected_on="a", control_grids={"random": draws}, keep=kept)
    grids = {f"{k}/a/a": v for k, v in kept.items()}
    tm = finish_matrix("sim", "race", ["a"], ["a"], {"a": es}, [cell], [{}], [], cfg, {}, grids, {})
    return tm, own  # removal = -sign(gap) * change, and the gap is group A - group B: the truth has that sign


def test_selection_against_its_control_covers_and_detects():
    """The selection-vs-control test adds the draws' variance: its 95% interval covers the true difference
    (the selection's effect minus the mean effect of random draws) about 95% of the time over 200 simulated
    data sets, where an interval from the prompts alone (ignoring which units were drawn) covers far less; the
    rank p-value is uniform when the selection is one more draw; a real lift is detected."""
    rng = np.random.default_rng(0)
    covered, covered_prompts_only, rank_small = 0, 0, 0
    for _ in range(200):
        tm, own = _simulated_matrix(rng, n_draws=10, lift=0.0)
        t = tm.transfer_test["vs_random"]
        truth = -np.sign(tm.cells[0].gap_before) * own
        covered += t["ci_low"] <= truth <= t["ci_high"]
        covered_prompts_only += abs(t["difference"] - truth) <= 1.96 * t["se_prompts"]
        rank_small += t["rank_p"] <= 0.1
    assert 0.91 <= covered / 200 <= 0.99
    assert covered_prompts_only / 200 < 0.8  # the draws' variance matters: leaving it out under-covers
    assert 0.04 <= rank_small / 200 <= 0.16  # P(rank p <= 0.1) = 1/11 when the selection is one more draw
    hits = 0
    for _ in range(20):
        tm, _ = _simulated_matrix(rng, n_draws=10, lift=0.3)
        hits += tm.transfer_test["vs_random"]["p_value"] < 0.05 and tm.transfer_test["vs_random"]["rank_p"] < 0.1
    assert hits >= 18
    one = _simulated_matrix(rng, n_draws=1, lift=0.0)[0].transfer_test["vs_random"]
    assert one["p_value"] is None and "one draw" in one["note"]


def test_bootstrap_p_is_the_monte_carlo_p_value():
    from mechbias.eval.stats import bootstrap_p

    # 999 replicates, 24 at or below 0: (1 + 24) / 1000, doubled
    boots = np.concatenate([np.full(24, -1.0), np.full(975, 1.0)])
    assert bootstrap_p(boots) == pytest.approx(2 * 25 / 1000)
    assert bootstrap_p(np.ones(99)) == pytest.approx(2 / 100)  # never 0 with finitely many replicates
    assert bootstrap_p(np.zeros(50)) == 1.0 and np.isnan(bootstrap_p(np.array([np.nan, np.inf])))
    # under the null (replicates symmetric about 0) it is uniform: P(p <= 0.05) near 0.05
    rng = np.random.default_rng(0)
    ps = [bootstrap_p(rng.normal(rng.normal(), 1.0, 199)) for _ in range(2000)]
    assert 0.035 <= np.mean(np.array(ps) <= 0.05) <= 0.065


def _incomplete(rng, T=10, per_cell=20, blocks=2, gap=0.15, sd_t=0.5, sd_tg=0.1, sd_n=0.3, sd_e=0.3):
    """A T x (4 * per_cell) grid (two cells per group) in the incomplete crossed design: names are dealt into
    blocks within each cell and template j meets block j mod blocks; the other cells are NaN."""
    n = 4 * per_cell
    g = np.repeat([0, 0, 1, 1], per_cell)
    block = np.tile(np.arange(per_cell) % blocks, 4)
    m = (np.where(g == 0, gap, 0.0)[None, :] + rng.normal(0, sd_t, T)[:, None]
         + rng.normal(0, sd_tg, (T, 2))[:, g] + rng.normal(0, sd_n, n)[None, :] + rng.normal(0, sd_e, (T, n)))
    met = (np.arange(T)[:, None] % blocks) == block[None, :]
    return np.where(met, m, np.nan), g


def test_residual_variance_of_an_incomplete_grid_equals_least_squares():
    from mechbias.eval.stats import residual_variance

    rng = np.random.default_rng(5)
    m, g = _incomplete(rng, T=6, per_cell=6, blocks=3)
    s2, df = residual_variance(m, g)
    ss, dof = 0.0, 0
    for grp in (0, 1):  # brute force: least squares on template and name dummies, per group
        x = m[:, g == grp]
        rows, cols = np.nonzero(np.isfinite(x))
        X = np.zeros((len(rows), x.shape[0] + x.shape[1]))
        X[np.arange(len(rows)), rows] = 1
        X[np.arange(len(rows)), x.shape[0] + cols] = 1
        y = x[rows, cols]
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        ss += float(((y - X @ beta) ** 2).sum())
        dof += len(y) - np.linalg.matrix_rank(X)
    assert df == dof and s2 == pytest.approx(ss / dof, rel=1e-8)


@pytest.mark.parametrize("T, blocks, low", [(10, 2, 0.93), (5, 2, 0.92)])
def test_incomplete_crossed_design_interval_covers(T, blocks, low):
    """The incomplete crossed design (each template meets half of the names; with 5 templates, blocks of 3 and 2):
    over 600 simulated data sets the 95% interval covers the true gap in [low, 0.97] (5 templates: the same
    floor as the full grid's test at 5) and the estimated variance is the true one within 15%."""
    rng = np.random.default_rng(3)
    hits, var_est, ests = 0, [], []
    for i in range(600):
        m, g = _incomplete(rng, T=T, per_cell=20 if T == 10 else 24, blocks=blocks)
        assert 0.4 <= np.isnan(m).mean() <= 0.6
        e = crossed_estimate({"c": m}, g, n_boot=200, seed=i)
        hits += e.ci_low <= 0.15 <= e.ci_high
        var_est.append(e.se ** 2), ests.append(e.estimate)
    assert low <= hits / 600 <= 0.97, hits / 600
    ratio = np.mean(var_est) / np.var(ests)
    assert 0.85 <= ratio <= 1.15, ratio
    assert abs(np.mean(ests) - 0.15) < 3 * np.std(ests) / np.sqrt(600)  # unbiased: template effects cancel


def test_a_full_grid_gives_the_same_interval_as_before_the_incomplete_design():
    rng = np.random.default_rng(9)
    m, g = _grid(rng)
    e = crossed_estimate({"c": m}, g, n_boot=300, seed=1)
    # the full-grid formulas written out: per-name means over all templates and s2 / T per name
    from mechbias.eval.stats import residual_variance
    s2, _ = residual_variance(m, g)
    assert e.estimate == pytest.approx(m[:, g == 0].mean() - m[:, g == 1].mean(), abs=1e-12)
    assert e.var_residual == pytest.approx(s2 / m.shape[0] * (1 / 16 + 1 / 16), rel=1e-12)


def test_incomplete_grids_give_the_name_mean_gap_everywhere():
    """On a grid with unmet cells (the incomplete crossed design of every evaluation set), the cell's gaps, the
    draws' gaps and the bootstrap replicates are the per-name means over the templates each name met, checked
    against sums written out by hand; a full grid gives the plain group means."""
    rng = np.random.default_rng(3)
    T, n = 6, 12
    g = np.array([0, 1] * (n // 2))
    seen = np.array([[t % 3 == (j // 2) % 3 for j in range(n)] for t in range(T)])  # 3 blocks: 2 templates per name
    before = np.where(seen, rng.normal(size=(T, n)), np.nan)
    after = np.where(seen, before + rng.normal(0.1, 0.2, size=(T, n)), np.nan)

    def by_hand(m):
        means = [sum(m[t, j] for t in range(T) if seen[t, j]) / seen[:, j].sum() for j in range(n)]
        return (np.mean([means[j] for j in range(n) if g[j] == 0]) - np.mean([means[j] for j in range(n) if g[j] == 1]))

    assert grid_gap(before, g) == pytest.approx(by_hand(before), abs=1e-12)
    red = paired_reduction(before, after, torch.as_tensor(g), n_boot=200)
    assert red.gap_before == pytest.approx(by_hand(before), abs=1e-12)
    assert red.gap_change == pytest.approx(by_hand(after) - by_hand(before), abs=1e-12)
    assert np.isfinite(red.ci_low) and np.isfinite(red.gap_change_ci[0])
    boot = CrossedBootstrap(T, torch.as_tensor(g), 50, seed=1)
    reps = boot.gaps(before)
    assert np.isfinite(reps).all()
    a, b = np.flatnonzero(g == 0), np.flatnonzero(g == 1)
    for k in (0, 17):  # replicate k by hand: weighted mean over the observed cells of each group
        num = {grp: sum(boot.wt[k, t] * w[k, i] * before[t, c] for i, c in enumerate(cols) for t in range(T)
                        if seen[t, c]) for grp, cols, w in ((0, a, boot.wa), (1, b, boot.wb))}
        den = {grp: sum(boot.wt[k, t] * w[k, i] for i, c in enumerate(cols) for t in range(T) if seen[t, c])
               for grp, cols, w in ((0, a, boot.wa), (1, b, boot.wb))}
        assert reps[k] == pytest.approx(num[0] / den[0] - num[1] / den[1], abs=1e-12)
    full = rng.normal(size=(T, n))
    assert grid_gap(full, g) == pytest.approx(full[:, g == 0].mean() - full[:, g == 1].mean(), abs=1e-12)


def test_a_control_on_some_rows_only_is_reported_not_tested():
    """The selection's unmatched units alone are a control only on rows that have unmatched units. The matrix
    still finishes: that control's column-wise test says on which rows it exists instead of failing, a control on
    every row is tested, and Benjamini-Hochberg covers the partial control's cells too."""
    from mechbias.eval.cells import EvalSet, TransferConfig
    from mechbias.eval.transfer import finish_matrix

    rng = np.random.default_rng(8)
    tm0 = _matrix(rng, 0.3, 0.1, ctxs=("a", "b"))
    g = tm0.grids["col_group"]
    eval_sets = {c: EvalSet(c, None, tm0.grids[f"before/{c}"], g) for c in tm0.cols}
    grids = {k: v for k, v in tm0.grids.items() if k.startswith("after/")}
    for cell in tm0.cells:
        r, c = cell.selected_on, cell.evaluated_on
        kinds = ("random", "unmatched_only") if r == "a" else ("random",)
        for k in kinds:
            before = tm0.grids[f"before/{c}"].numpy()
            after = before + rng.normal(0, 0.05, before.shape)
            grids[f"control/{k}/{r}/{c}"] = torch.tensor(after)
            red = paired_reduction(before, after, g, n_boot=200)
            cell.controls[k] = Effect(red.gap_before, red.gap_after, red.gap_change, red.gap_change_ci[0],
                                      red.gap_change_ci[1], red.gap_change_p, red.min_detectable, -red.gap_change,
                                      None, None, None)
    tm = finish_matrix("sim", "race", ["a", "b"], ["a", "b"], eval_sets, tm0.cells, [], [],
                       TransferConfig(n_boot=200), {}, grids, {})
    part = tm.transfer_test["control_unmatched_only"]
    assert part["within_minus_cross"] is None and "['a']" in part["note"]
    assert isinstance(tm.transfer_test["control_random"]["within_minus_cross"], float)
    assert tm.transfer_test["vs_unmatched_only"]["difference"] is None
    assert all(c.controls["unmatched_only"].p_adjusted is not None for c in tm.cells if c.selected_on == "a")


def test_a_row_that_selected_nothing_says_so(caplog):
    """A selection rule may choose no unit (neuron pruning's paper rule on 15 selection templates does): the row
    records it and a warning is logged, so a row of exact zeros is never read as a measured null effect."""
    import logging

    from mechbias.eval.rows import EMPTY_ROW, make_row_info
    from mechbias.interventions.units import NeuronIntervention

    with caplog.at_level(logging.WARNING, logger="mechbias"):
        info = make_row_info("finance", NeuronIntervention({}), {}, None, None, None, None)
    assert info["note"] == EMPTY_ROW and info["n_components"] == 0
    assert any("chose no unit" in r.getMessage() for r in caplog.records)
    assert "note" not in make_row_info("finance", NeuronIntervention({3: [1]}), {}, None, None, None, None)
