"""Every method recovers the planted bias of the tiny planted model well above chance."""


import pytest

from mechbias.groundtruth.recovery import (
    oracle_transfer,
    precision_recall,
    score_atp,
    score_gradiend,
    score_ig2,
    score_pruning,
    truth_sets,
)
from mechbias.methods.pruning import PruneConfig


def test_truth_sets_and_precision():
    cfg = {"shared": [[0, 1]], "only": {"finance": [[1, 2]]}, "contexts": ["finance", "hiring"]}
    t = truth_sets(cfg)
    assert t["finance"] == {(0, 1), (1, 2)} and t["hiring"] == {(0, 1)}
    assert precision_recall([(1, 2), (5, 5), (0, 1)], t["finance"]) == {"k": 2, "hits": 1, "precision": 0.5,
                                                                       "recall": 0.5}


def test_ig2_and_atp_find_planted_neurons(planted_tiny):
    model, cfg = planted_tiny
    n = model.cfg.n_layers * model.cfg.d_mlp
    for row in score_ig2(model, cfg, ["finance", "hiring"], "race", pairs_per_template=2, steps=8):
        # well above chance (random precision is k / 256 here); hiring's truth is only the 3 shared neurons
        assert row["precision"] >= max(1 / 3, 10 * row["random_precision"]), row
    for row in score_atp(model, cfg, ["finance", "commerce"], "race", max_pairs=8):
        assert row["precision"] >= max(1 / 3, 10 * row["random_precision"]), row
    assert n == 256


def test_pruning_candidates_and_oracle_transfer(planted_tiny):
    model, cfg = planted_tiny
    rows = score_pruning(model, cfg, ["finance"], "race",
                         PruneConfig(unit="neuron", k=None, score="signed_attribution", select="difference"))
    assert rows[0]["precision"] >= 0.5
    oracle = oracle_transfer(model, cfg, ["finance", "commerce"], "race", n_boot=200)
    cell = {(r["selected_on"], r["evaluated_on"]): r["oracle_reduction"] for r in oracle}
    # zeroing finance's planted neurons removes the finance bias more than the commerce bias
    assert cell[("finance", "finance")] > cell[("finance", "commerce")] > 0.2


def test_gradiend_feature_separates_planted_groups_and_its_decoder_share_is_exact(planted_tiny):
    from mechbias.methods.gradiend import GradiendConfig, evaluate_feature, train_gradiend

    model, cfg = planted_tiny
    res = train_gradiend(model, "finance", "race", GradiendConfig(params="mlp", steps=120, seeds=(0,)),
                         progress=False)
    evaluate_feature(model, res, n_neutral=2)
    s = score_gradiend(model, cfg, res)
    # the decoder's share on the planted rows and columns, by hand (the ground-truth page reports it is not enriched:
    # about 1x the planted entries' share of the parameters)
    dec = res.param_set.unflatten(res.model.decode(1.0))
    planted = set(cfg.shared) | {n for v in cfg.only.values() for n in v}
    hit = total = 0.0
    for name, v in dec.items():
        total += float((v.double() ** 2).sum())
        layer = int(name.split(".")[2])
        idx = [i for l, i in planted if l == layer]
        if idx:
            sub = v[:, idx] if "down_proj" in name else v[idx]
            hit += float((sub.double() ** 2).sum())
    assert s["share"] == pytest.approx(hit / total, rel=1e-9)
    # held out: one value per name; the groups encode near +1 and -1
    assert s["feature_auc"] == 1.0 and s["feature_pearson"] > 0.95
    st = res.evaluation["stats"]
    assert st["White"]["mean"] > 0.9 and st["Black"]["mean"] < -0.9
    # h sets the direction of the edit: +1 and -1 move the planted gap in opposite directions on held-out
    # prompts, each CI excluding 0 (alpha chosen on the selection prompts); h = 0 is reported beside them
    from mechbias.methods.gradiend import h_direction

    hd = h_direction(model, res, n_boot=500, neutral_max_texts=None)
    up, down = hd.heldout["+1"], hd.heldout["-1"]
    assert hd.opposite_signs and up["gap_change"] * down["gap_change"] < 0
    assert up["ci_low"] > 0 and down["ci_high"] < 0 and hd.both_exclude_zero
    assert set(hd.heldout) == {"+1", "-1", "+0"}
    # neutral text (trained with neutral batches) encodes near 0
    assert abs(st["neutral"]["mean"]) < 0.15


# ---------------------------------------------------------------------------
# ground truth v3: context-specific units of three kinds
# ---------------------------------------------------------------------------

def test_truth_units_by_kind_and_rank_recovery_by_hand():
    from mechbias.groundtruth.recovery import rank_recovery, truth_units

    manifest = {"contexts": ["finance", "commerce", "hiring"], "units": [
        {"role": "shared", "kind": "neuron", "position": "name", "layer": 0, "index": 1},
        {"role": "finance", "kind": "neuron", "position": "name", "layer": 1, "index": 2},
        {"role": "finance", "kind": "neuron", "position": "last", "layer": 2, "index": 3},
        {"role": "finance", "kind": "head", "position": "last", "layer": 1, "index": 0},
        {"role": "commerce", "kind": "neuron", "position": "last", "layer": 2, "index": 9}]}
    t = truth_units(manifest)
    assert t["finance"] == {"neuron@name": {(0, 1), (1, 2)}, "neuron@last": {(2, 3)}, "head@last": {(1, 0)}}
    assert t["hiring"] == {"neuron@name": {(0, 1)}, "neuron@last": set(), "head@last": set()}
    assert truth_sets(manifest)["commerce"] == {(0, 1), (2, 9)}
    kinds = {k: t["finance"][k] for k in ("neuron@name", "neuron@last")}
    r = rank_recovery([(2, 3), (5, 5), (0, 1), (1, 2)], kinds, n_units=100)
    # k = 3 planted neurons; the top 3 hold (2, 3) and (0, 1)
    assert (r.k, r.hits) == (3, 2) and r.precision == pytest.approx(2 / 3)
    assert r.recall_by_kind == {"neuron@name": 0.5, "neuron@last": 1.0}
    assert r.as_dict()["recall neuron@name"] == 0.5  # the tables' flat columns
    assert r.chance_precision == pytest.approx(0.03) and r.median_rank == 2.0  # ranks 0, 2, 3
    assert r.precision_ci is not None
    lo, hi = r.precision_ci
    assert lo < 2 / 3 < hi and 0.05 < lo < 0.2 and hi > 0.95  # Clopper-Pearson for 2 of 3


class _GridSet:
    """An evaluation set whose 'after' grids are given per selection (no model needed)."""

    def __init__(self, context, before, col_group, afters):
        self.context, self.before, self.col_group, self.afters = context, before, col_group, afters

    def scores(self, model, iv):
        return self.afters[iv.row]

    def scores_many(self, model, ivs):
        return {k: self.scores(model, iv) for k, iv in ivs.items()}


def _synthetic_matrix(removed: dict, seed: int, noise: float = 0.3, incomplete: bool = False):
    """A transfer matrix over simulated [templates x names] grids where the selection of row r removes
    ``removed[(r, c)]`` of context c's gap (gap 1.0 in finance and commerce, 0.3 in hiring). ``incomplete``:
    the incomplete crossed design, each name meeting two of the four templates (NaN elsewhere), in two blocks
    that each hold four names of each group."""
    import dataclasses

    import numpy as np
    import torch

    from mechbias.eval.cells import TransferConfig
    from mechbias.eval.transfer import transfer_matrix
    from mechbias.interventions.base import Identity

    @dataclasses.dataclass
    class Tagged(Identity):
        row: str = ""

    rng = np.random.default_rng(seed)
    g = torch.tensor([0] * 8 + [1] * 8)
    sign = np.where(g.numpy() == 0, 0.5, -0.5)
    gaps = {"finance": 1.0, "commerce": 1.0, "hiring": 0.3}
    sets = {}
    for c, gap in gaps.items():
        base = rng.normal(0, noise, (4, 16)) + rng.normal(0, noise, (4, 1)) + rng.normal(0, noise, (1, 16))
        if incomplete:  # names 0-3 and 8-11 meet templates 0-1, the others 2-3
            met = np.zeros((4, 16), dtype=bool)
            block = np.array([(j % 8) < 4 for j in range(16)])
            met[:2, block], met[2:, ~block] = True, True
            base = np.where(met, base, np.nan)
        before = torch.tensor(base + gap * sign)
        afters = {r: torch.tensor(base + (gap - removed[(r, c)]) * sign + rng.normal(0, 0.05, (4, 16)))
                  for r in ("finance", "commerce")}
        sets[c] = _GridSet(c, before, g, afters)
    return transfer_matrix(None, lambda m, ctx, a: Tagged(row=ctx.name), ["finance", "commerce"], "race",
                           evaluate_on=list(gaps), eval_sets=sets,
                           config=TransferConfig(n_random=0, controls=(), capability=False, n_boot=400))


def test_matrix_recovery_agrees_with_its_cells_and_detects_only_a_context_specific_matrix():
    import numpy as np

    from mechbias.groundtruth.recovery import matrix_recovery

    specific = {("finance", "finance"): 1.0, ("commerce", "commerce"): 1.0, ("finance", "commerce"): 0.1,
                ("commerce", "finance"): 0.1, ("finance", "hiring"): 0.3, ("commerce", "hiring"): 0.3}
    flat = {k: 0.5 for k in specific}
    oracle = _synthetic_matrix(specific, seed=0)
    good = _synthetic_matrix(specific, seed=1)
    shared = _synthetic_matrix(flat, seed=2)
    cells = [(r, c) for r in oracle.rows for c in oracle.cols]
    o = np.array([oracle.cell(r, c).gap_removed for r, c in cells])
    for tm, detects in ((good, True), (shared, False)):
        rec = matrix_recovery(tm, oracle, n_boot=400)
        m = np.array([tm.cell(r, c).gap_removed for r, c in cells])
        assert rec["pearson"] == pytest.approx(float(np.corrcoef(m, o)[0, 1]), abs=1e-9)
        assert rec["mae"] == pytest.approx(float(np.abs(m - o).mean()), abs=1e-9)
        assert rec["pearson_ci"][0] <= rec["pearson"] <= rec["pearson_ci"][1]
        assert rec["mae_ci"][0] <= rec["mae"] <= rec["mae_ci"][1]
        assert rec["detects"] is detects, rec
        diag = np.array([r == c for r, c in cells])  # sensitivity and leakage from the cells, by hand
        assert rec["sensitivity"] == pytest.approx(m[diag].mean() / o[diag].mean(), abs=1e-9)
        assert rec["leakage"] == pytest.approx(m[~diag].mean() - o[~diag].mean(), abs=1e-9)
        assert rec["sensitivity_ci"][0] <= rec["sensitivity"] <= rec["sensitivity_ci"][1]
        assert rec["leakage_ci"][0] <= rec["leakage"] <= rec["leakage_ci"][1]
    assert matrix_recovery(good, oracle, n_boot=400)["mae"] < 0.15 < matrix_recovery(shared, oracle, n_boot=400)["mae"]
    # the shared matrix removes half the diagonal and leaks about 0.27 into the off-diagonal cells
    flat_rec, good_rec = matrix_recovery(shared, oracle, n_boot=400), matrix_recovery(good, oracle, n_boot=400)
    assert flat_rec["sensitivity_ci"][1] < 0.8 and flat_rec["leakage_ci"][0] > 0.1
    assert good_rec["sensitivity_ci"][0] < 1.0 < good_rec["sensitivity_ci"][1] and good_rec["leakage_ci"][0] < 0 < good_rec["leakage_ci"][1]


def test_matrix_recovery_on_an_incomplete_design_agrees_with_its_cells():
    """The held-out sets follow the incomplete crossed design (NaN where a name did not meet a template): the
    recovery statistics are the cells' own, with finite intervals (planted v5's first run printed NaN for all)."""
    import numpy as np

    from mechbias.groundtruth.recovery import matrix_recovery

    specific = {("finance", "finance"): 1.0, ("commerce", "commerce"): 1.0, ("finance", "commerce"): 0.1,
                ("commerce", "finance"): 0.1, ("finance", "hiring"): 0.3, ("commerce", "hiring"): 0.3}
    oracle = _synthetic_matrix(specific, seed=0, incomplete=True)
    tm = _synthetic_matrix({k: 0.5 for k in specific}, seed=2, incomplete=True)
    assert np.isnan(np.asarray(tm.grids["before/finance"])).mean() == 0.5
    cells = [(r, c) for r in oracle.rows for c in oracle.cols]
    o = np.array([oracle.cell(r, c).gap_removed for r, c in cells])
    m = np.array([tm.cell(r, c).gap_removed for r, c in cells])
    assert np.isfinite(o).all() and np.isfinite(m).all()
    rec = matrix_recovery(tm, oracle, n_boot=400)
    diag = np.array([r == c for r, c in cells])
    assert rec["pearson"] == pytest.approx(float(np.corrcoef(m, o)[0, 1]), abs=1e-9)
    assert rec["mae"] == pytest.approx(float(np.abs(m - o).mean()), abs=1e-9)
    assert rec["sensitivity"] == pytest.approx(m[diag].mean() / o[diag].mean(), abs=1e-9)
    assert rec["leakage"] == pytest.approx(m[~diag].mean() - o[~diag].mean(), abs=1e-9)
    for k in ("pearson", "mae", "sensitivity", "leakage"):
        lo, hi = rec[f"{k}_ci"]
        assert np.isfinite([lo, hi]).all() and lo <= rec[k] <= hi, (k, rec[k], lo, hi)
    # a half-removing fix everywhere: sensitivity about 0.5, leakage about +0.27 (as on the full grid)
    assert rec["sensitivity_ci"][1] < 0.8 and rec["leakage_ci"][0] > 0.1


def test_a_ground_truth_without_unit_recovery_plots_its_transfer_cells():
    """A run with --no-recovery has transfer cells only: the figure has that one panel (it once raised and
    stopped a 70-minute run after its first method)."""
    from mechbias.groundtruth.recovery import GroundTruthResult

    cells = [{"method": m, "selected_on": r, "evaluated_on": c, "gap_removed": g, "oracle_gap_removed": o}
             for m, r, c, g, o in (("oracle", "finance", "finance", 0.06, 0.06), ("oracle", "finance", "commerce",
                                   0.01, 0.01), ("m", "finance", "finance", 0.03, 0.06),
                                   ("m", "finance", "commerce", 0.02, 0.01))]
    fig = GroundTruthResult([], cells, {"matrices": []}).plot()
    assert len(fig.axes) == 1 and fig.axes[0].get_ylabel() == "method: gap removed"
    assert len(fig.axes[0].collections) == 2  # the method's filled (same context) and hollow (other) points
    import pytest

    with pytest.raises(ValueError, match="neither unit recovery nor transfer"):
        GroundTruthResult([], [], {}).plot()
