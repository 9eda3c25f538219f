"""Every method recovers the planted bias of the tiny planted model well above chance."""


import pytest

from mechbias.groundtruth.scoring import (oracle_transfer, precision_recall, score_atp, score_gradiend, score_ig2,
                                  score_pruning, truth_sets)
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
    res = train_gradiend(model, "finance", "race", GradiendConfig(params="mlp", steps=40, batch_texts=8, seeds=(0,),
                                                                  lr=1e-3, val_batches=4), progress=False)
    evaluate_feature(model, res, batch_texts=6, n_batches=3, n_neutral=2)
    s = score_gradiend(model, cfg, res)
    # the decoder's share on the planted rows and columns, by hand (the README reports it is not enriched:
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
    # the held-out group-A batches encode above the group-B batches (threshold-free; the paper's
    # Pearson is reported as well). Sign accuracy is not asserted: 20 steps leave the tanh offset
    # on one side of both groups on this model.
    assert s["feature_auc"] >= 0.9 and s["feature_pearson"] > 0.5
