"""Hooks are always removed; interventions do what they claim and restore the model exactly."""

import pytest
import torch

from mechbias.core.hooks import hooked, n_active_hooks
from mechbias.core.params import named_params
from mechbias.data.contexts import load_context
from mechbias.eval.metrics import contrast_scores
from mechbias.interventions.base import Compose, load_intervention
from mechbias.interventions.units import HeadIntervention, NeuronIntervention
from mechbias.interventions.weights import WeightEdit, WeightMask

TEXT = "A bank is reviewing a car loan application from Jamal . Should the bank approve the loan ? Answer :"


def _logits(m):
    with torch.no_grad():
        return m(m.to_tokens(TEXT))


@pytest.mark.parametrize("fixture", ["tiny", "tiny_native"])
def test_exception_inside_hooks_leaves_no_hook_and_identical_logits(fixture, request):
    m = request.getfixturevalue(fixture)
    before = _logits(m)
    n0 = n_active_hooks(m)

    def boom(act, hook):
        return act * 0

    with pytest.raises(RuntimeError, match="inside"), hooked(m, [("blocks.0.mlp.hook_post", boom)], [("blocks.1.hook_resid_pre", lambda g, hook: None)]):
        assert n_active_hooks(m) > n0
        raise RuntimeError("failure inside the block")
    assert n_active_hooks(m) == n0
    assert torch.equal(_logits(m), before)
    with pytest.raises(RuntimeError), NeuronIntervention({0: [1, 2]}).apply(m):
        raise RuntimeError("again")
    assert n_active_hooks(m) == n0 and torch.equal(_logits(m), before)


def test_neuron_zeroing_equals_zeroing_down_proj_columns(tiny):
    iv = NeuronIntervention({1: [3, 17, 40]})
    with iv.apply(tiny):
        hooked_logits = _logits(tiny)
    w = named_params(tiny)["model.layers.1.mlp.down_proj.weight"]
    mask = torch.zeros(w.numel(), dtype=torch.bool).view_as(w)
    mask[:, [3, 17, 40]] = True
    with WeightMask({"model.layers.1.mlp.down_proj.weight": mask.flatten().nonzero()[:, 0]}).apply(tiny):
        weight_logits = _logits(tiny)
    assert not torch.equal(hooked_logits, _logits(tiny))
    assert torch.allclose(hooked_logits, weight_logits, atol=1e-6)


def test_head_z_ablation_equals_zeroing_o_proj_columns(tiny):
    d_head = tiny.cfg.d_head
    with HeadIntervention({0: [2]}, mode="z").apply(tiny):
        hooked_logits = _logits(tiny)
    w = named_params(tiny)["model.layers.0.self_attn.o_proj.weight"]
    idx = torch.zeros_like(w, dtype=torch.bool)
    idx[:, 2 * d_head:3 * d_head] = True
    with WeightMask({"model.layers.0.self_attn.o_proj.weight": idx.flatten().nonzero()[:, 0]}).apply(tiny):
        weight_logits = _logits(tiny)
    assert torch.allclose(hooked_logits, weight_logits, atol=1e-6)


def test_head_q_zeroing_gives_uniform_attention(tiny):
    ids = tiny.to_tokens(TEXT)
    with HeadIntervention({1: [3]}, mode="q").apply(tiny):
        _, cache = tiny.run_with_cache(ids, names_filter="blocks.1.attn.hook_pattern")
    pat = cache["blocks.1.attn.hook_pattern"][0, 3]  # [q, k]
    n = pat.shape[0]
    expected = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    assert torch.allclose(pat, expected, atol=1e-6)
    other = cache["blocks.1.attn.hook_pattern"][0, 0]
    assert not torch.allclose(other, expected, atol=1e-3)


def test_weight_interventions_restore_bit_for_bit(tiny):
    params = named_params(tiny)
    before = {n: p.detach().clone() for n, p in params.items()}
    name = "model.layers.0.mlp.up_proj.weight"
    delta = torch.randn_like(params[name]) * 0.1
    with pytest.raises(ValueError), WeightEdit({name: delta}, scale=0.7).apply(tiny):
        assert not torch.equal(params[name], before[name])
        raise ValueError("boom")
    with WeightMask({name: torch.arange(0, 500, 3)}).apply(tiny):
        assert (params[name].view(-1)[torch.arange(0, 500, 3)] == 0).all()
    assert all(torch.equal(p, before[n]) for n, p in params.items())


def test_last_position_interventions_survive_prefix_sharing(tiny):
    ps = load_context("finance").prompts("race", templates=[0, 2], names="heldout")
    iv = NeuronIntervention({0: list(range(0, 128, 2)), 1: list(range(1, 128, 3))}, factor=0.0, positions="last")
    shared = contrast_scores(tiny, ps, intervention=iv, share_prefix=True)
    plain = contrast_scores(tiny, ps, intervention=iv, share_prefix=False)
    base = contrast_scores(tiny, ps)
    assert (shared - plain).abs().max() < 1e-5
    assert (shared - base).abs().max() > 1e-3  # the intervention did something


def test_last_position_hook_touches_only_the_last_position(tiny):
    ids = tiny.to_tokens(TEXT)
    iv = NeuronIntervention({0: [5, 6]}, factor=0.0, positions="last")
    with iv.apply(tiny):
        _, cache = tiny.run_with_cache(ids, names_filter="blocks.0.mlp.hook_post")
    act = cache["blocks.0.mlp.hook_post"][0]
    # the hook fires before the cache hook, so the cache sees the modified values
    assert (act[-1, [5, 6]] == 0).all() and (act[:-1, [5, 6]] != 0).all()


def test_interventions_save_and_load(tmp_path, tiny):
    ivs = [NeuronIntervention({0: [1, 2], 1: [5]}, factor=2.0, positions="last"),
           HeadIntervention([(0, 1), (1, 3)], mode="q"),
           WeightMask({"model.layers.0.mlp.up_proj.weight": torch.tensor([1, 5, 9])}),
           WeightEdit({"model.layers.1.mlp.down_proj.weight": torch.ones(64, 128)}, scale=0.01)]
    ivs.append(Compose(list(ivs)))
    for i, iv in enumerate(ivs):
        iv.save(tmp_path / str(i))
        back = load_intervention(tmp_path / str(i))
        assert type(back) is type(iv) and back.describe() == iv.describe()
        with iv.apply(tiny):
            a = _logits(tiny)
        with back.apply(tiny):
            b = _logits(tiny)
        assert torch.equal(a, b)


def test_bad_interventions_are_refused(tiny):
    with pytest.raises(ValueError, match="outside"), NeuronIntervention({7: [0]}).apply(tiny):
        pass
    with pytest.raises(ValueError, match="out of range"), HeadIntervention({0: [99]}).apply(tiny):
        pass
    with pytest.raises(ValueError, match="no parameter"), WeightMask({"not.a.param": torch.tensor([0])}).apply(tiny):
        pass
    with pytest.raises(FileNotFoundError):
        load_intervention("/nonexistent/intervention")


def test_result_load_works_without_importing_the_defining_module(tmp_path, tiny):
    """Result.load in a fresh process finds the class of any saved result."""
    import subprocess
    import sys

    from mechbias.data.pairs import make_pairs
    from mechbias.methods.patching import attribution_patch

    pairs = make_pairs(tiny, "finance", "race", templates=[0], max_pairs=2)
    attribution_patch(tiny, pairs, components=("heads",)).save(tmp_path / "atp")
    code = ("import mechbias as mb, sys; r = mb.Result.load(sys.argv[1]); "
            "print(type(r).__name__, tuple(r.estimates['heads'].shape))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "atp")], capture_output=True, text=True)
    assert out.stdout.split()[0] == "AtPResult", out.stderr[-500:]


@pytest.mark.parametrize("fixture", ["tiny", "tiny_native"])
def test_a_misspelled_hook_raises_and_names_the_closest(fixture, request):
    """TransformerLens 4's bridge skips unknown hook names silently; hooked() refuses them."""
    from mechbias.core.hooks import HookNameError, run_with_cache
    from mechbias.core.sites import Site

    m = request.getfixturevalue(fixture)
    n0 = n_active_hooks(m)
    with pytest.raises(HookNameError, match=r"blocks\.0\.mlp\.hook_post"), hooked(m, [("blocks.0.mlp.hook_pots", lambda a, hook: a)]):
        pass
    with pytest.raises(HookNameError, match="no hook point"):
        run_with_cache(m, m.to_tokens(TEXT), ["blocks.7.hook_resid_pre"])
    # a layer the model does not have, through an intervention
    with (pytest.raises(HookNameError), NeuronIntervention({0: [1]}).apply(m),
          hooked(m, [(Site(5, "post"), lambda a, hook: a)])):
        pass
    assert n_active_hooks(m) == n0
    with pytest.raises(ValueError, match="unknown site point"):
        Site(0, "mlp_post")
