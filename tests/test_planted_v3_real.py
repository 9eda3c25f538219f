"""The shipped v3 planted model (real tier): each planted context's bias sits in its own private chain."""

import pytest

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def v3():
    from mechbias.core.models import load_model
    from mechbias.data.contexts import load_context
    from mechbias.eval.cells import EvalSet
    from mechbias.groundtruth.delta import planted_manifest

    model = load_model("planted-v3")
    # v3 was built and measured on the contexts' first ten templates: their held-out five, the full grid
    first_ten = {c: [t for t in load_context(c).template_split("heldout") if t < 10] for c in ("finance", "commerce")}
    sets = {c: EvalSet.build(model, load_context(c), "race", templates=first_ten[c], templates_per_name=0)
            for c in ("finance", "commerce")}
    return model, planted_manifest(model), sets


def test_manifest_lists_three_kinds_per_planted_context_and_two_heads(v3):
    from mechbias.groundtruth.recovery import truth_units

    _, manifest, _ = v3
    truth = truth_units(manifest)
    for c in ("finance", "commerce"):
        assert len(truth[c]["neuron@name"]) == 4 and len(truth[c]["neuron@last"]) == 3, truth[c]
        assert len(truth[c]["head@last"]) == 1
    assert truth["finance"]["head@last"] != truth["commerce"]["head@last"]
    assert not any(truth[c][k] for c in ("hiring", "housing") for k in truth[c])       # no shared units


def test_zeroing_a_chain_removes_its_context_gap_and_leaves_the_other_planted_context(v3):
    """The oracle matrix's planted cells, re-measured on the held-out split: diagonal reduction >= 0.7,
    the other planted context's change within a quarter of it (the manifest: 0.87 / 0.83 and 0.015 / -0.031)."""
    from mechbias.eval.cells import TransferConfig, evaluate
    from mechbias.groundtruth.recovery import oracle_intervention

    model, manifest, sets = v3
    tc = TransferConfig(n_random=0, controls=(), capability=False, n_boot=300)
    for own, other in (("finance", "commerce"), ("commerce", "finance")):
        iv = oracle_intervention(manifest, own)
        mine = evaluate(model, iv, sets[own], None, tc, selected_on=own)
        theirs = evaluate(model, iv, sets[other], None, tc, selected_on=own)
        assert mine.gap_before > 0.7 and mine.ci_high < 0, (own, mine.gap_before, mine.ci_high)
        assert mine.reduction >= 0.7, (own, mine.reduction)
        assert abs(theirs.gap_change) <= 0.25 * abs(mine.gap_change), (own, theirs.gap_change, mine.gap_change)
