"""The shipped planted v5 (real tier): each planted context's chain carries its own held-out gap and no other's.

v5 is the v4 construction (gender, built on selection templates and names only) with a pooled context read,
ramp-gated prediction neurons and erasers (docs/groundtruth.md). Its ship criteria were fixed before its build:
on held-out templates and names, zeroing a context's chain removes at least 0.10 log-odds of that context's gap
and moves every other context's gap by at most 0.05.
"""

import math

import pytest

pytestmark = pytest.mark.real

OWN_MIN, OTHER_MAX = 0.10, 0.05


@pytest.fixture(scope="module")
def v5():
    from mechbias.core.models import load_model
    from mechbias.groundtruth.delta import planted_manifest

    model = load_model("planted-v5")
    return model, planted_manifest(model)


def test_manifest_oracle_meets_the_ship_criteria_and_the_transfer_test_tells_the_planted_difference(v5):
    """The build's own held-out verification, as committed: the oracle's diagonal and off-diagonal cells, and the
    column-wise transfer test on the oracle (detects) and on the same fix on every row (does not)."""
    _, manifest = v5
    assert manifest["axis"] == "gender@extended" and manifest["favoured"] == "female"
    assert set(manifest["only"]) == {"finance", "commerce"}
    for row, cells in manifest["oracle"].items():
        for col, cell in cells.items():
            removed = -math.copysign(1.0, cell["gap_before"]) * cell["gap_change"]  # the engine's gap_removed
            if col == row:
                assert removed >= OWN_MIN and removed <= 0.3, (row, col, cell)
            else:
                assert abs(cell["gap_change"]) <= OTHER_MAX, (row, col, cell)
    val = manifest["transfer_test_validation"]
    assert val["oracle"]["ci_low"] > 0, val["oracle"]
    same = val["same_fix_every_row"]  # identical interventions on every row: each column compares equals
    assert abs(same["within_minus_cross"]) < 1e-9 and same["p_value"] > 0.05, same


def test_the_loaded_model_reproduces_the_manifest_oracle_cells(v5):
    """The shipped delta, loaded, gives the committed oracle cell again on the held-out prompts (finance's chain,
    evaluated in finance; one cell, to keep the real tier short): what the manifest says is what the files carry."""
    from mechbias.data.contexts import load_context
    from mechbias.eval.cells import EvalSet, TransferConfig, evaluate
    from mechbias.groundtruth.recovery import oracle_intervention

    model, manifest = v5
    tc = TransferConfig(n_random=0, controls=(), capability=False, n_boot=200)
    iv = oracle_intervention(manifest, "finance")
    for col in ("finance",):
        es = EvalSet.build(model, load_context(col), manifest["axis"])
        got = evaluate(model, iv, es, None, tc, selected_on="finance")
        want = manifest["oracle"]["finance"][col]
        assert got.gap_before == pytest.approx(want["gap_before"], abs=1e-4), col
        assert got.gap_change == pytest.approx(want["gap_change"], abs=1e-4), col
