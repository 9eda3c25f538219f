"""Activation steering: the direction is the groups' mean difference, the intervention equals a plain hooked
forward, restores the model bit for bit, owns its control, and the method reaches the CLI and the study."""


import pytest
import torch

from mechbias.apps.cli import main
from mechbias.apps.study import StudyConfig, study_steps
from mechbias.core.hooks import n_active_hooks
from mechbias.core.results import run_summary_json
from mechbias.data.contexts import load_context
from mechbias.eval.metrics import contrast_scores
from mechbias.interventions.base import load_intervention
from mechbias.methods.base import get_method
from mechbias.methods.steering import DirectionIntervention, Steering, SteeringConfig, group_mean_difference

TEXT = "A bank is reviewing a car loan application from Jamal . Should the bank approve the loan ? Answer :"


def _logits(m, text=TEXT):
    with torch.no_grad():
        return m(m.to_tokens(text))


def test_direction_is_the_brute_force_mean_difference(tiny):
    ps = load_context("finance").prompts("race", templates="selection", names="selection")
    d = group_mean_difference(tiny, ps, 1, "last")
    sums = {0: torch.zeros(tiny.cfg.d_model, dtype=torch.float64), 1: torch.zeros(tiny.cfg.d_model, dtype=torch.float64)}
    counts = {0: 0, 1: 0}
    for p in ps:  # one prompt at a time, read from the plain cache
        _, cache = tiny.run_with_cache(tiny.to_tokens(p.text), names_filter="blocks.1.hook_resid_pre")
        sums[p.group] += cache["blocks.1.hook_resid_pre"][0, -1].double()
        counts[p.group] += 1
    ref = sums[0] / counts[0] - sums[1] / counts[1]
    assert torch.allclose(d.double(), ref, atol=1e-5) and ref.norm() > 0


@pytest.mark.parametrize("mode", ["ablate", "add"])
def test_intervention_equals_a_plain_hooked_forward(tiny, mode):
    g = torch.Generator().manual_seed(0)
    d = torch.randn(tiny.cfg.d_model, generator=g)
    iv = DirectionIntervention(1, d, mode=mode, alpha=-0.7)
    u = d / d.norm()

    def by_hand(x, hook):
        return x - (x @ u)[..., None] * u if mode == "ablate" else x + (-0.7) * d

    with tiny.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", by_hand)]):
        ref = _logits(tiny)
    with iv.apply(tiny):
        got = _logits(tiny)
        if mode == "ablate":  # nothing of the direction is left in the residual stream
            _, cache = tiny.run_with_cache(tiny.to_tokens(TEXT), names_filter="blocks.1.hook_resid_pre")
            assert float((cache["blocks.1.hook_resid_pre"][0] @ u).abs().max()) < 1e-5
    assert torch.allclose(got, ref, atol=1e-5)
    assert not torch.allclose(got, _logits(tiny), atol=1e-4)  # it changed something


def test_last_position_steering_survives_prefix_sharing(tiny):
    ps = load_context("finance").prompts("race", templates=[0, 2], names="heldout")
    iv = DirectionIntervention(1, torch.ones(tiny.cfg.d_model), mode="add", alpha=0.5, positions="last")
    shared = contrast_scores(tiny, ps, intervention=iv, share_prefix=True)
    plain = contrast_scores(tiny, ps, intervention=iv, share_prefix=False)
    assert (shared - plain).abs().max() < 1e-5 and (shared - contrast_scores(tiny, ps)).abs().max() > 1e-3


def test_restores_the_model_bit_for_bit(tiny):
    before, n0 = _logits(tiny), n_active_hooks(tiny)
    iv = DirectionIntervention(0, torch.randn(tiny.cfg.d_model), mode="add", alpha=3.0)
    with pytest.raises(RuntimeError, match="inside"), iv.apply(tiny):
        assert n_active_hooks(tiny) > n0
        raise RuntimeError("failure inside the block")
    assert n_active_hooks(tiny) == n0 and torch.equal(_logits(tiny), before)


def test_random_control_saving_and_validation(tiny, tmp_path):
    d = torch.randn(tiny.cfg.d_model)
    iv = DirectionIntervention(1, d, mode="ablate", positions="last")
    rnd = iv.random_like(tiny, seed=3)
    assert rnd.layer == 1 and rnd.mode == "ablate" and rnd.positions == "last"
    assert float(rnd.direction.norm()) == pytest.approx(float(d.norm()), rel=1e-5)
    assert abs(float(torch.nn.functional.cosine_similarity(rnd.direction, d, dim=0))) < 0.5
    assert torch.equal(iv.random_like(tiny, seed=3).direction, rnd.direction)  # seeded
    iv.save(tmp_path / "iv")
    back = load_intervention(tmp_path / "iv")
    assert isinstance(back, DirectionIntervention) and torch.equal(back.direction, iv.direction)
    with iv.apply(tiny):
        a = _logits(tiny)
    with back.apply(tiny):
        b = _logits(tiny)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="outside"), DirectionIntervention(9, d).apply(tiny):
        pass
    with pytest.raises(ValueError, match="non-zero"):
        DirectionIntervention(0, torch.zeros(tiny.cfg.d_model))
    with pytest.raises(ValueError, match="mode"):
        SteeringConfig(mode="rotate")


def test_method_is_registered_and_its_ablation_removes_the_group_difference(tiny):
    assert get_method("steer") is Steering
    m = Steering(SteeringConfig(layer=1, apply_positions="all"))
    iv = m(tiny, "finance", "race")
    assert m.selections["finance"].summary["layer"] == 1 and iv.layer == 1
    ps = load_context("finance").prompts("race", templates="selection", names="selection")
    before = group_mean_difference(tiny, ps, 1, "last")
    with iv.apply(tiny):  # the direction is the mean difference, so projecting it out leaves no difference there
        after = group_mean_difference(tiny, ps, 1, "last")
    assert float(after.norm()) < 1e-4 * float(before.norm()) and float(before.norm()) > 0


def test_steer_command_and_study_row(tmp_path):
    rc = main(["steer", "--model", "tiny", "--select-on", "finance", "--evaluate-on", "finance", "commerce",
               "--axis", "race", "--layer", "1", "--random", "1", "--boot", "100", "--out", str(tmp_path)])
    assert rc == 0
    data = run_summary_json(tmp_path)
    assert data["selections"]["finance"]["layer"] == 1 and len(data["cells"]) == 2
    assert isinstance(load_intervention(tmp_path / "interventions" / "finance"), DirectionIntervention)
    cell = data["cells"][0]
    assert cell["controls"]["random"]["n_draws"] == 1
    assert "steering" in [s.name for s in study_steps(StudyConfig(quick=True, full=True))]
    assert "steering" not in [s.name for s in study_steps(StudyConfig(quick=True))]  # not one of the default four
