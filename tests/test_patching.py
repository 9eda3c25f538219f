"""Exact patching equals TransformerLens' helpers; set patching and AtP behave as they must."""

import numpy as np
import pytest
import torch
from transformer_lens import patching as tlp

from mechbias.core.sites import Site
from mechbias.data.pairs import AlignmentError, PromptPairs, make_pairs
from mechbias.methods.patching import (
    PatchResult,
    atp_agreement,
    attribution_patch,
    patch_set,
    patch_sweep,
    prefilter_and_verify,
    run_variants,
)

TL = {"resid_pre": tlp.get_act_patch_resid_pre, "attn_out": tlp.get_act_patch_attn_out,
      "mlp_out": tlp.get_act_patch_mlp_out, "heads": tlp.get_act_patch_attn_head_out_all_pos,
      "heads_by_pos": tlp.get_act_patch_attn_head_out_by_pos, "k_heads": tlp.get_act_patch_attn_head_k_all_pos,
      "v_heads": tlp.get_act_patch_attn_head_v_all_pos}


def _equal_length_pairs(model, templates=(0, 1), n=4):
    pairs = make_pairs(model, "finance", "race", templates=list(templates), max_pairs=n)
    L = len(pairs.clean_tokens[0])
    idx = [i for i in range(len(pairs)) if len(pairs.clean_tokens[i]) == L]
    return PromptPairs(pairs.context, pairs.axis, pairs.positive, pairs.negative, [pairs.clean[i] for i in idx],
                       [pairs.corrupt[i] for i in idx], [pairs.clean_tokens[i] for i in idx],
                       [pairs.corrupt_tokens[i] for i in idx])


def _tl_reference(model, pairs, component, direction):
    clean, corr = torch.stack(pairs.clean_tokens), torch.stack(pairs.corrupt_tokens)
    y, n = model.to_single_token(pairs.positive), model.to_single_token(pairs.negative)
    metric = lambda lg: (lg[:, -1, y] - lg[:, -1, n]).mean()
    base, src = (corr, clean) if direction == "denoise" else (clean, corr)
    _, cache = model.run_with_cache(src)
    return TL[component](model, base, cache, metric).double()


@pytest.mark.parametrize("fixture", ["tiny", "tiny_native"])
@pytest.mark.parametrize("component", list(TL))
def test_sweeps_equal_transformer_lens_helpers(fixture, component, request):
    m = request.getfixturevalue(fixture)
    pairs = _equal_length_pairs(m)
    for direction in ("denoise", "noise"):
        ref = _tl_reference(m, pairs, component, direction)
        res = patch_sweep(m, pairs, component, direction=direction, max_rows=13)
        mine = torch.nanmean(res.values, 0)
        assert mine.shape == ref.shape
        assert (mine - ref).abs().max() < 1e-5, (direction, float((mine - ref).abs().max()))
        assert ref.std() > 0


def test_patching_the_whole_residual_restores_or_breaks_exactly(tiny):
    pairs = _equal_length_pairs(tiny)
    every = [Site(0, "resid_pre")]
    d = patch_set(tiny, pairs, every, direction="denoise")
    assert np.allclose(d.values, d.ld_clean, atol=1e-5) and d.normalized == pytest.approx(1.0, abs=1e-4)
    n = patch_set(tiny, pairs, every, direction="noise")
    assert np.allclose(n.values, n.ld_corrupt, atol=1e-5) and n.normalized == pytest.approx(0.0, abs=1e-4)


def test_set_patching_equals_a_plain_hooked_forward(tiny):
    pairs = _equal_length_pairs(tiny, n=2)
    patches = [Site(0, "z", (1,)), Site(1, "post", (3, 7, 50)), Site(1, "resid_pre", positions=(5,))]
    res = patch_set(tiny, pairs, patches)
    y, n = tiny.to_single_token(" Yes"), tiny.to_single_token(" No")
    for i in range(len(pairs)):
        clean, corr = pairs.clean_tokens[i][None], pairs.corrupt_tokens[i][None]
        _, cc = tiny.run_with_cache(clean)

        def z(a, hook, cc=cc):
            a = a.clone(); a[:, :, 1] = cc["blocks.0.attn.hook_z"][:, :, 1]; return a

        def post(a, hook, cc=cc):
            a = a.clone(); a[..., [3, 7, 50]] = cc["blocks.1.mlp.hook_post"][..., [3, 7, 50]]; return a

        def resid(a, hook, cc=cc):
            a = a.clone(); a[:, 5] = cc["blocks.1.hook_resid_pre"][:, 5]; return a

        with torch.no_grad(), tiny.hooks(fwd_hooks=[("blocks.0.attn.hook_z", z), ("blocks.1.mlp.hook_post", post),
                                                    ("blocks.1.hook_resid_pre", resid)]):
            lg = tiny(corr)
        assert res.values[i] == pytest.approx(float(lg[0, -1, y] - lg[0, -1, n]), abs=1e-5)


def test_unequal_lengths_are_refused(tiny):
    a = tiny.to_tokens("Should the bank approve the loan ? Answer :")[0]
    b = tiny.to_tokens("Should the bank approve the loan for Jamal ? Answer :")[0]
    with pytest.raises(AlignmentError, match="same token length"):
        run_variants(tiny, a, b, [(Site(0, "resid_pre", positions=(1,)),)], lambda lg: lg[:, 0])


def test_atp_matches_a_finite_difference_and_ranks_like_exact_patching(tiny):
    pairs = make_pairs(tiny, "finance", "race", templates=[0, 1, 2], max_pairs=6)
    atp = attribution_patch(tiny, pairs)
    i, l = 0, 1
    p = pairs.diff_positions(i)[-1]
    clean, corr = pairs.clean_tokens[i][None], pairs.corrupt_tokens[i][None]
    _, cc = tiny.run_with_cache(clean)
    _, rc = tiny.run_with_cache(corr)
    d = cc[f"blocks.{l}.hook_resid_pre"][0, p] - rc[f"blocks.{l}.hook_resid_pre"][0, p]
    y, n = tiny.to_single_token(" Yes"), tiny.to_single_token(" No")

    def f(eps):
        def hk(x, hook):
            x = x.clone(); x[0, p] = x[0, p] + eps * d; return x

        with torch.no_grad(), tiny.hooks(fwd_hooks=[(f"blocks.{l}.hook_resid_pre", hk)]):
            lg = tiny(corr).double()
        return float(lg[0, -1, y] - lg[0, -1, n])

    fd = (f(0.03) - f(-0.03)) / 0.06
    assert float(atp.estimates["resid_pre"][i, l, p]) == pytest.approx(fd, rel=0.03)
    for comp in ("resid_pre", "heads"):
        agree = atp_agreement(atp, patch_sweep(tiny, pairs, comp), comp)
        assert agree.spearman > 0.3 and agree.component == comp and 0 <= agree.recall[5] <= 1
        assert agree.as_dict()["recall@5"] == agree.recall[5]
    verified = prefilter_and_verify(tiny, pairs, atp, "heads", k=3)
    assert len(verified) == 3 and all("exact_effect" in v for v in verified)


def test_patch_result_roundtrip_and_figures(tiny, tmp_path):
    pairs = make_pairs(tiny, "finance", "race", templates=[0, 1], max_pairs=4)
    res = patch_sweep(tiny, pairs, "resid_pre")
    res.save(tmp_path / "p")
    back = PatchResult.load(tmp_path / "p")
    assert torch.allclose(back.values, res.values, equal_nan=True) and back.direction == "denoise"
    top = res.top(3)
    assert len(top) == 3 and {"layer", "pos", "effect", "ci_low", "ci_high"} <= set(top[0])
    assert res.plot().axes and patch_sweep(tiny, pairs, "heads").plot().axes
    atp = attribution_patch(tiny, pairs, components=("heads", "neurons"))
    atp.save(tmp_path / "a")
    assert torch.equal(type(atp).load(tmp_path / "a").estimates["heads"], atp.estimates["heads"])


@pytest.mark.real
def test_real_model_sweeps_equal_transformer_lens_helpers(real):
    pairs = make_pairs(real, "finance", "race", templates=[0], max_pairs=2)
    pairs = PromptPairs(pairs.context, pairs.axis, pairs.positive, pairs.negative, pairs.clean[:1], pairs.corrupt[:1],
                        pairs.clean_tokens[:1], pairs.corrupt_tokens[:1])
    for component in ("heads", "resid_pre"):
        ref = _tl_reference(real, pairs, component, "denoise")
        mine = torch.nanmean(patch_sweep(real, pairs, component).values, 0)
        assert (mine - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))
