"""IG²: fast path vs. the plain loop, completeness, selection logic, BNS."""

import pytest
import torch

from mechbias.methods.ig2 import (
    IG2Result,
    NeuronSelection,
    contrast_units,
    demographic_units,
    ig2_prompt,
    integration_points,
    run_ig2,
    select_neurons,
    verify,
)

TEXT = "The bank approved the loan application . Was the applicant White or Black ? The applicant was"


def _ids(m):
    return m.to_tokens(TEXT)[0], m.to_single_token(" White"), m.to_single_token(" Black")


@pytest.mark.parametrize("fixture", ["tiny", "tiny_native"])
@pytest.mark.parametrize("rule", ["left", "middle", "trapezoid", "gauss"])
def test_fast_path_matches_the_plain_loop(fixture, rule, request):
    m = request.getfixturevalue(fixture)
    toks, d1, d2 = _ids(m)
    for kind in ("prob", "logit"):
        ref = ig2_prompt(m, toks, d1, d2, rule=rule, kind=kind, method="reference")
        for cap in (None, 7):
            fast = ig2_prompt(m, toks, d1, d2, rule=rule, kind=kind, method="fast", internal_batch_size=cap)
            rel = (fast.attr - ref.attr).abs().max() / ref.attr.abs().max()
            assert rel < 1e-5, (kind, cap, float(rel))
            assert torch.allclose(fast.g0, ref.g0, rtol=1e-4, atol=1e-6)
            assert fast.g1 == pytest.approx(ref.g1, rel=1e-5)
        assert ref.attr.abs().max() > 0


@pytest.mark.parametrize("fixture", ["tiny", "tiny_native"])
def test_all_positions_variant_matches_its_plain_loop_and_is_complete(fixture, request):
    m = request.getfixturevalue(fixture)
    toks, d1, d2 = _ids(m)
    ref = ig2_prompt(m, toks, d1, d2, kind="logit", method="reference", position="all")
    for cap in (None, 7):
        fast = ig2_prompt(m, toks, d1, d2, kind="logit", method="fast", internal_batch_size=cap, position="all")
        assert float((fast.attr - ref.attr).abs().max() / ref.attr.abs().max()) < 1e-5
        assert torch.allclose(fast.g0, ref.g0, rtol=1e-4, atol=1e-6)
    last = ig2_prompt(m, toks, d1, d2, kind="logit")
    assert not torch.allclose(ref.attr, last.attr)  # it attributes something the last position does not
    fine = ig2_prompt(m, toks, d1, d2, kind="logit", steps=256, position="all")
    delta = fine.g1 - fine.g0
    assert float(((fine.attr.sum(1) - delta).abs() / delta.abs()).max()) < 0.01
    with pytest.raises(ValueError, match="position"):
        ig2_prompt(m, toks, d1, d2, position="first")


def test_completeness_error_shrinks_with_steps(tiny):
    toks, d1, d2 = _ids(tiny)
    errs = []
    for m in (4, 32, 256):
        r = ig2_prompt(tiny, toks, d1, d2, steps=m, kind="logit")
        delta = r.g1 - r.g0
        errs.append(float(((r.attr.sum(1) - delta).abs() / delta.abs()).max()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.01


def test_integration_rules_weights_sum_to_one():
    for rule in ("left", "right", "middle", "trapezoid", "gauss"):
        a, w = integration_points(10, rule)
        assert float(w.sum()) == pytest.approx(1.0) and len(a) == 10
    a, _ = integration_points(20, "left")
    assert a[0] == 0 and a[-1] == pytest.approx(0.95)  # the authors' left Riemann sum
    with pytest.raises(ValueError):
        integration_points(5, "simpson")


def test_gauss_legendre_is_exact_to_degree_2n_minus_1_where_the_authors_rule_is_not():
    a, w = integration_points(5, "gauss")
    assert bool(((a > 0) & (a < 1)).all())
    for deg in range(10):  # the integral of a^deg over [0, 1] is 1 / (deg + 1)
        assert float((w * a**deg).sum()) == pytest.approx(1 / (deg + 1), abs=1e-12), deg
    assert float((w * a**10).sum()) != pytest.approx(1 / 11, abs=1e-6)  # degree 2n is no longer exact
    a, w = integration_points(20, "left")
    assert abs(float((w * a**2).sum()) - 1 / 3) > 0.02  # the left sum's O(1/m) error on a^2


def test_gauss_legendre_makes_ig2_complete_with_fewer_points(tiny):
    toks, d1, d2 = _ids(tiny)

    def worst(rule, m):
        r = ig2_prompt(tiny, toks, d1, d2, steps=m, rule=rule, kind="logit")
        delta = r.g1 - r.g0
        return float(((r.attr.sum(1) - delta).abs() / delta.abs()).max())

    left20, gauss6 = worst("left", 20), worst("gauss", 6)
    assert gauss6 < left20 / 10, (gauss6, left20)
    assert gauss6 < 1e-3


def test_units_and_run_ig2(tiny, tmp_path):
    units = contrast_units("finance", "race", favoured=0, pairs_per_template=2)
    assert all(u.weights == [1.0, -1.0] and u.d1 == " Yes" for u in units)
    res = run_ig2(tiny, units, steps=8)
    assert res.attributions.shape == (len(units), tiny.cfg.n_layers, tiny.cfg.d_mlp)
    # a pair's attribution is the difference of its two prompts' attributions
    toks = [tiny.to_tokens(t)[0] for t in units[0].texts]
    y, n = tiny.to_single_token(" Yes"), tiny.to_single_token(" No")
    a = ig2_prompt(tiny, toks[0], y, n, steps=8).attr - ig2_prompt(tiny, toks[1], y, n, steps=8).attr
    assert torch.allclose(res.attributions[0].double(), a, atol=1e-6)
    res.save(tmp_path / "ig2")
    back = IG2Result.load(tmp_path / "ig2")
    assert torch.equal(back.attributions, res.attributions) and back.units[0]["bag"] == units[0].bag
    assert res.completeness_error().shape == (tiny.cfg.n_layers,)
    fig = res.plot(select_neurons(res))
    assert len(fig.axes) >= 2


def test_demographic_units_pairing_and_splits():
    sel = demographic_units("finance", "race", favoured=0, outcomes="selection")
    held = demographic_units("finance", "race", favoured=0, outcomes="heldout")
    assert {u.bag for u in sel}.isdisjoint({u.bag for u in held})
    assert all(u.weights == [1.0, -1.0] and u.d1 == " White" for u in sel)
    single = demographic_units("finance", "gender", favoured=1, paired=False, outcomes="all")
    assert {u.d1 for u in single} == {" she"} and {tuple(u.weights) for u in single} == {(1.0,), (-1.0,)}


def _fake_result(attrs, bags):
    units = [{"bag": b, "texts": [], "weights": []} for b in bags]
    return IG2Result(torch.tensor(attrs, dtype=torch.float32), torch.zeros(len(bags), 1, 2), units)


def test_selection_follows_the_three_thresholds():
    # 1 layer x 6 neurons; bags A (3 prompts) and B (3 prompts)
    attrs = [
        [[10, 3, 1, 0, 0, 0]],   # A: {0, 1}   (>= 0.2 * 10)
        [[10, 0, 5, 0, 0, 0]],   # A: {0, 2}
        [[10, 4, 0, 0, 0, -50]], # A: {0, 1}; a large negative value never counts
        [[0, 0, 0, 8, 2, 0]],    # B: {3, 4}
        [[0, 0, 0, 8, 0, 0]],    # B: {3}
        [[1, 0, 0, 8, 0, 0]],    # B: {3}
    ]
    res = _fake_result(attrs, ["A"] * 3 + ["B"] * 3)
    sel = select_neurons(res, per_bag=0.6, per_relation=0.5, adapt=False, min_per_bag=1)
    # bag A keeps neurons in >= 2 of 3 prompts: {0, 1}; bag B: {3}; relation: in >= 1 of 2 bags
    assert sel.as_pairs() == [(0, 0), (0, 1), (0, 3)]
    # the authors' minimum of 3 prompts per bag (default): neuron 1 is in only 2 of A's prompts
    paper = select_neurons(res, per_bag=0.6, per_relation=0.5, adapt=False)
    assert paper.as_pairs() == [(0, 0), (0, 3)] and paper.thresholds["min_per_bag"] == 3
    # a bag of 2 prompts selects nothing under the minimum, however often a neuron appears in it
    two = _fake_result(attrs[:2] + attrs[3:5], ["A"] * 2 + ["B"] * 2)
    assert select_neurons(two, per_bag=0.5, per_relation=0.5, adapt=False).as_pairs() == []
    assert select_neurons(two, per_bag=0.5, per_relation=0.5, adapt=False, min_per_bag=1).as_pairs() == [
        (0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]
    strict = select_neurons(res, per_bag=0.6, per_relation=1.0, adapt=False)
    assert strict.as_pairs() == []  # no neuron is in both bags
    # adaptation raises the bag threshold when bags hold too many neurons
    adapted = select_neurons(res, per_bag=0.3, target_per_bag=(1, 1.5), per_relation=0.5, min_per_bag=1)
    assert adapted.thresholds["per_bag_final"] > 0.3


def test_bns_intervention_and_random_control(tiny):
    sel = NeuronSelection([[0, 3], [1, 7], [1, 9]], n_layers=2, d_mlp=tiny.cfg.d_mlp)
    iv = sel.intervention(factor=0.0, positions="last")
    assert iv.n_components == 3 and iv.positions == "last"
    rnd = iv.random_like(tiny, seed=1).as_pairs()
    assert sorted(l for l, _ in rnd) == [0, 1, 1] and not set(rnd) & set(sel.as_pairs())


def test_verification_values_equal_a_brute_force_recomputation(tiny):
    """Every verification row (selected, and the random control's mean over draws) equals the change of the
    mean unit value recomputed by hand with the same interventions; "minus random" is the difference of the
    two; the relative change is reported exactly when the gap before has a CI excluding 0; the factors are
    the units' templates and names."""
    from scipy.stats import t as t_dist

    from mechbias.eval.factors import factor_estimate, weighted_mean
    from mechbias.eval.stats import mdd
    from mechbias.interventions.units import NeuronIntervention
    from mechbias.methods.ig2 import unit_factors, unit_values

    units = contrast_units("finance", "race", favoured=0, pairs_per_template=3)
    res = run_ig2(tiny, units, steps=8, kind="logit")
    sel = select_neurons(res)
    assert len(sel) > 0
    held = contrast_units("finance", "race", favoured=0, templates="heldout", names="heldout", pairs_per_template=3)
    fac = unit_factors(held)
    assert set(fac) == {"template", "name_a", "name_b"}
    assert [f[0] for f in fac["template"]] == [u.info["template"] for u in held]
    v = verify(tiny, sel, held, kind="logit", n_random=2, seed=0, n_boot=500)
    base = unit_values(tiny, held, kind="logit")
    before = factor_estimate(weighted_mean(base.numpy()), fac, n_boot=500, seed=0)
    for op, factor in (("suppress", 0.0), ("amplify", 2.0)):
        mine = unit_values(tiny, held, kind="logit", intervention=NeuronIntervention(sel.as_pairs(), factor))
        row = next(r for r in v.rows if r["neurons"] == "IG2" and r["operation"] == op)
        assert row["change"] == pytest.approx(float(mine.mean() - base.mean()), abs=1e-9)
        assert row["ci_low"] < row["change"] < row["ci_high"]
        # the interval's se and df are recorded, so a detectable change at another alpha needs no recovery
        assert row["min_detectable"] == pytest.approx(mdd(row["se"], row["df"], 0.05), rel=1e-9)
        assert row["ci_high"] - row["change"] == pytest.approx(t_dist.ppf(0.975, row["df"]) * row["se"], rel=1e-9)
        assert row["gap_before_ci"] == pytest.approx([before.ci_low, before.ci_high])
        if before.ci_low > 0 or before.ci_high < 0:
            assert row["relative_change"] == pytest.approx(float((mine.mean() - base.mean()) / abs(base.mean())),
                                                           rel=1e-9)
        else:
            assert row["relative_change"] is None
        draws = [sel.intervention().random_like(tiny, 1000 + r).as_pairs() for r in range(2)]
        rnd = torch.stack([unit_values(tiny, held, kind="logit", intervention=NeuronIntervention(d, factor))
                           for d in draws]).mean(0)
        rrow = next(r for r in v.rows if r["neurons"].startswith("random") and r["operation"] == op)
        assert rrow["change"] == pytest.approx(float(rnd.mean() - base.mean()), abs=1e-9)
        assert row["minus_random"]["estimate"] == pytest.approx(float(mine.mean() - rnd.mean()), abs=1e-9)


@pytest.mark.real
def test_fast_path_matches_the_plain_loop_on_the_embedded_model(real):
    toks = real.to_tokens("The bank approved the loan application. Was the applicant White or Black? "
                          "The applicant was")[0]
    d1, d2 = real.to_single_token(" White"), real.to_single_token(" Black")
    layers = [3, 29]
    ref = ig2_prompt(real, toks, d1, d2, layers=layers, method="reference")
    fast = ig2_prompt(real, toks, d1, d2, layers=layers, method="fast")
    for l in layers:
        rel = (fast.attr[l] - ref.attr[l]).abs().max() / ref.attr[l].abs().max()
        assert rel < 1e-5, (l, float(rel))


def test_capability_guard_drops_costly_neurons(tiny):
    from mechbias.methods.ig2 import capability_guard, neuron_costs

    sel = NeuronSelection([[0, 1], [1, 2], [1, 3]], n_layers=tiny.cfg.n_layers, d_mlp=tiny.cfg.d_mlp)
    texts = ["the bank opened early today and the staff were ready"]
    costs = neuron_costs(tiny, sel, texts=texts)
    assert set(costs) == {(0, 1), (1, 2), (1, 3)}
    worst = max(costs, key=costs.get)
    cut = sorted(costs.values())[-1] - 1e-9  # only the most costly neuron is above the cut
    kept = capability_guard(tiny, sel, max_ppl_increase=cut, texts=texts)
    assert worst not in kept.as_pairs() and len(kept) == 2
    assert any(k.startswith("capability_guard") for k in kept.thresholds)


def test_bns_guard_analysis_drops_costly_neurons_and_pairs_both_selections(tmp_path):
    """analyses/bns_guard.py: the guarded selection is the IG² selection minus exactly the neurons whose own
    cost exceeds the threshold; the unguarded control in each cell equals an independent evaluation of
    the unguarded neurons; the guarded-minus-unguarded contrast is the difference of the cells' means."""
    import importlib.util
    import json
    from pathlib import Path

    from mechbias.core.models import load_model
    from mechbias.data.contexts import load_context
    from mechbias.eval.cells import EvalSet, evaluate
    from mechbias.eval.transfer import TransferMatrix
    from mechbias.interventions.units import NeuronIntervention

    spec = importlib.util.spec_from_file_location("bns_guard", Path(__file__).parents[1] / "analyses" / "bns_guard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--model", "tiny", "--out", str(tmp_path), "--random", "1", "--boot", "200", "--max-ppl", "1.0"])
    saved = json.loads((tmp_path / "bns_guard.json").read_text())
    tm = TransferMatrix.load(tmp_path / "transfer")
    model = load_model("tiny")
    n_dropped = 0
    for ctx, s in saved["selections"].items():
        costs = {(l, i): v for l, i, v in s["costs"]}
        assert set(costs) == {tuple(n) for n in s["selected"]}
        assert {tuple(n) for n in s["dropped"]} == {n for n, v in costs.items() if v > 1.0}
        n_dropped += len(s["dropped"])
        es = EvalSet.build(model, load_context("commerce"), "gender")
        ref = evaluate(model, NeuronIntervention([tuple(n) for n in s["selected"]]), es)
        assert tm.cell(ctx, "commerce").controls["unguarded"].gap_removed == pytest.approx(ref.gap_removed, abs=1e-9)
    assert 0 < n_dropped < sum(len(s["selected"]) for s in saved["selections"].values())  # the guard did something
    cells = tm.cells
    mean = sum(c.gap_removed - c.controls["unguarded"].gap_removed for c in cells) / len(cells)
    assert saved["contrasts"]["guarded - unguarded, all cells"]["estimate"] == pytest.approx(mean, abs=1e-9)


def test_pooled_verification_rebuilds_the_method_units_and_pools_them(tiny, tmp_path):
    """analyses/ig2_verification_pooled.py: from saved selections it rebuilds each context's held-out units
    exactly as IG2.analyze does (its per-context change equals verify()'s), and the pooled change is the mean
    over all units (the unit-weighted mean of the per-context changes)."""
    import importlib.util
    import json
    from pathlib import Path

    from mechbias.methods.ig2.method import IG2, IG2Config

    method = IG2(IG2Config(pairs=3, steps=4, plain_ig=False, verify_random=1, kind="logit"))
    for c in ("finance", "commerce"):
        method(tiny, c, "gender")
        method.selections[c].save(tmp_path / f"{c}_gender")
    analysis = method.analyze(tiny, "gender", tmp_path / "gender")
    spec = importlib.util.spec_from_file_location(
        "pooled", Path(__file__).parents[1] / "analyses" / "ig2_verification_pooled.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--ig2", str(tmp_path), "--contexts", "finance", "commerce", "--boot", "200", "--model", "tiny"])
    out = json.loads((tmp_path / "pooled_gender" / "pooled.json").read_text())
    changes, sizes = [], []
    for row in out["rows"]:
        ref = next(r for r in analysis["verification"] if r["context"] == row["context"]
                   and r["neurons"] == "IG2" and r["operation"] == "suppress")
        assert row["change"] == pytest.approx(ref["change"], abs=1e-9)
        assert abs(ref["change"]) > 1e-4  # a value that could have disagreed
        changes.append(ref["change"]), sizes.append(row["units"])
    pooled = out["pooled"]["IG² suppress: change"]["estimate"]
    assert pooled == pytest.approx(sum(c * n for c, n in zip(changes, sizes, strict=True)) / sum(sizes), abs=1e-9)


@pytest.mark.parametrize("df", [4.0, 17.5, 240.0])
def test_verification_table_restates_the_detectable_change_at_the_bh_level(df):
    """analyses/ig2_verification_table.py recovers df from a stored interval and its 0.05-level detectable
    change, and restates the latter at a smaller α exactly as mechbias.eval.stats.mdd computes it."""
    import importlib.util
    from pathlib import Path

    from scipy.stats import t as student_t

    from mechbias.eval.stats import mdd

    spec = importlib.util.spec_from_file_location(
        "verification_table", Path(__file__).parents[1] / "analyses" / "ig2_verification_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    se = 0.0031
    half = float(student_t.ppf(0.975, df)) * se
    got = mod.mdd_at(half, mdd(se, df), 0.05 / 8)
    assert got == pytest.approx(mdd(se, df, 0.05 / 8), rel=1e-6)
    assert got > 1.2 * mdd(se, df)
