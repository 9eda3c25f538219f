"""Select fast, evaluate exact: the precision setting reaches the selection, never a reported number, and every
result says which precision made what."""

import numpy as np
import pytest
import torch

from mechbias.apps.study import StudyConfig, study_steps
from mechbias.core.precision import compute_precision
from mechbias.data.contexts import load_context
from mechbias.eval.cells import EvalSet
from mechbias.eval.metrics import contrast_scores
from mechbias.eval.transfer import transfer_matrix
from mechbias.interventions.units import NeuronIntervention
from mechbias.methods.pruning.ranking import PruneConfig
from mechbias.methods.steering import Steering, SteeringConfig


def test_fast_runs_matmuls_in_bfloat16_and_exact_turns_a_callers_autocast_off(tiny):
    x = torch.randn(3, tiny.cfg.d_model)
    w = torch.randn(tiny.cfg.d_model, 5)
    with compute_precision(tiny, "fast"):
        assert (x @ w).dtype == torch.bfloat16
        with compute_precision(tiny, "exact"):
            assert (x @ w).dtype == torch.float32
    with pytest.raises(ValueError, match="precision"), compute_precision(tiny, "half"):
        pass
    with pytest.raises(ValueError, match="precision"):
        PruneConfig(precision="bf16")


def test_reported_scores_ignore_a_callers_autocast(tiny):
    es = EvalSet.build(tiny, load_context("finance"), "race", templates_per_name=0)  # a full grid: no NaN
    iv = NeuronIntervention({1: [3, 4, 5]})
    exact = es.scores(tiny, iv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = es.scores(tiny, iv)
        before = EvalSet.build(tiny, load_context("finance"), "race", templates_per_name=0).before
        raw = contrast_scores(tiny, es.prompts, share_prefix=False)  # unguarded: bfloat16 moves the scores
    assert torch.equal(inside, exact) and torch.equal(before, es.before)
    assert float((es.prompts.grid(raw)[0] - es.before).abs().max()) > 1e-4


def test_a_fast_selection_is_recorded_and_its_cells_are_exact(tiny):
    kw = dict(n_random=1, n_boot=100, capability=False)
    fast = Steering(SteeringConfig(precision="fast"))
    tm = transfer_matrix(tiny, fast, ["finance"], "race", **kw)
    assert fast.selections["finance"].summary["precision"] == "fast"
    assert tm.meta["precision"] == {"selection": "fast", "evaluation": "exact"}
    # the cell of the fast selection, re-evaluated by hand at float32, is what the matrix reports
    es = EvalSet.build(tiny, load_context("finance"), "race")
    after = es.scores(tiny, tm.interventions["finance"])
    g = es.col_group.numpy()
    name_means = np.nanmean(after.numpy(), 0)  # the incomplete design: each name's mean over the templates it met
    gap = float(name_means[g == 0].mean() - name_means[g == 1].mean())
    assert tm.cell("finance", "finance").gap_after == pytest.approx(gap, abs=1e-9)


def test_the_study_selects_fast_only_where_measured():
    auto = {s.name: s.config.precision for s in study_steps(StudyConfig(quick=True, full=True))[1:]}
    assert {k for k, v in auto.items() if v == "fast"} == {"prune_neuron_paper", "leace"} and len(auto) >= 8
    forced = {s.config.precision for s in study_steps(StudyConfig(quick=True, precision="exact"))[1:]}
    assert forced == {"exact"}
    with pytest.raises(ValueError, match="precision"):
        StudyConfig(precision="half")
