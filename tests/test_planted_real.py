"""The shipped planted-bias model (real tier): its bias is where the manifest says, and methods find it."""

import pytest

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def planted():
    from mechbias.core.models import load_model
    from mechbias.groundtruth.planted import planted_manifest

    model = load_model("planted")
    return model, planted_manifest(model)


def test_planted_model_loads_offline_with_large_planted_gaps(planted):
    from mechbias.eval.metrics import measure_bias

    model, manifest = planted
    assert manifest["favoured"] == "White" and len(manifest["shared"]) == 8
    res = measure_bias(model, ["finance", "hiring"], "race", templates="heldout", names="heldout", n_boot=500)
    for row in res.rows:
        assert row["ci_low"] > 0.3, row  # original gaps are <= 0.17 with CIs touching 0


def test_zeroing_the_planted_neurons_removes_the_planted_gap(planted):
    from mechbias.eval.metrics import measure_bias
    from mechbias.interventions.units import NeuronIntervention

    model, manifest = planted
    every = [tuple(n) for n in manifest["shared"]] + [tuple(n) for v in manifest["only"].values() for n in v]
    kw = dict(templates="heldout", names="heldout", n_boot=300)
    before = measure_bias(model, ["finance"], "race", **kw).rows[0]["gap"]
    after = measure_bias(model, ["finance"], "race", intervention=NeuronIntervention(every), **kw).rows[0]["gap"]
    assert after < 0.4 * before


def test_methods_recover_planted_neurons_well_above_chance(planted):
    from mechbias.groundtruth.recovery import score_atp, score_pruning
    from mechbias.methods.pruning import PruneConfig

    model, manifest = planted
    for row in score_atp(model, manifest, ["finance"], "race", max_pairs=8):
        assert row["precision"] >= 50 * row["random_precision"], row
    pc = PruneConfig(unit="neuron", k=None, score="signed_attribution", select="difference")
    for row in score_pruning(model, manifest, ["finance"], "race", pc):
        assert row["precision"] >= 50 * row["random_precision"], row


def test_planted_neurons_leave_name_free_prompts_alone(planted, real):
    """No planted effect on prompts without a name, with references never seen in training."""
    from mechbias.data.contexts import YES_NO_CONTEXTS
    from mechbias.eval.metrics import contrast_scores
    from mechbias.groundtruth.planted import HELDOUT_NEUTRAL_REFERENCES, neutral_prompts

    model, manifest = planted
    texts = [t for c in YES_NO_CONTEXTS for t in neutral_prompts(c, HELDOUT_NEUTRAL_REFERENCES)]
    shift = contrast_scores(model, texts, " Yes", " No") - contrast_scores(real, texts, " Yes", " No")
    planted_gap = min(r["gap"] for r in manifest["gaps_planted_heldout"])
    # the shift of name-free prompts is small next to the smallest planted gap between names
    assert abs(float(shift.mean())) < 0.25 * planted_gap, float(shift.mean())
