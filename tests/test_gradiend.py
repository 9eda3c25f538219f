"""GRADIEND: gradient capture against plain autograd, the closed-form optimizer against torch's AdamW,
exact weight restoration, and a feature that separates the groups on held-out data."""


import pytest
import torch

from mechbias.methods.gradiend import (GradiendConfig, GradiendModel, GradiendResult, _AdamW, batch_gradient,
                               batch_gradient_pair, choose_edit, evaluate_feature, feature_texts, param_set,
                               train_gradiend)
from mechbias.core.weights import named_params


def _plain_grad(model, ps, texts, targets):
    """Reference: the Hugging Face model directly, mean cross-entropy, torch.autograd.grad."""
    hf = model.original_model
    params = dict(hf.named_parameters())
    live = named_params(model)
    # the same tensors under their Hugging Face names
    wanted = [next(p for n, p in params.items() if p is live[name]) for name in ps.names]
    loss = 0.0
    for t, y in zip(texts, targets):
        ids = model.to_tokens(t)
        lg = hf(ids).logits[0, -1]
        loss = loss + torch.nn.functional.cross_entropy(lg[None], torch.tensor([y]))
    grads = torch.autograd.grad(loss / len(texts), wanted)
    return torch.cat([g.reshape(-1) for g in grads])


def test_gradient_capture_matches_plain_autograd(tiny):
    ps = param_set(tiny, "mlp")
    data = feature_texts(tiny, "finance", "gender")[:5]
    texts, f, c = [d.text for d in data], [d.factual for d in data], [d.counterfactual for d in data]
    mine = batch_gradient(tiny, ps, texts, f)
    ref = _plain_grad(tiny, ps, texts, f)
    assert mine.shape == (ps.numel,) and float(ref.norm()) > 0
    assert torch.allclose(mine, ref, atol=1e-6, rtol=1e-4)
    gf, gt = batch_gradient_pair(tiny, ps, texts, f, c, out_f=torch.empty(ps.numel), out_t=torch.empty(ps.numel),
                                 max_tokens=40)
    assert torch.allclose(gf, ref, atol=1e-6, rtol=1e-4)
    assert torch.allclose(gt, ref - _plain_grad(tiny, ps, texts, c), atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in named_params(tiny).values())  # nothing left behind


def test_closed_form_adamw_matches_torch():
    torch.manual_seed(0)
    n = 50
    gm = GradiendModel(n, seed=3)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w_e = torch.nn.Parameter(gm.w_e.clone())
            self.b_e = torch.nn.Parameter(torch.tensor(gm.b_e))
            self.w_d = torch.nn.Parameter(gm.w_d.clone())
            self.b_d = torch.nn.Parameter(gm.b_d.clone())

        def forward(self, g):
            return torch.tanh(self.w_e @ g + self.b_e) * self.w_d + self.b_d

    net = Net()
    ref_opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-2)
    opt = _AdamW(gm, 1e-2, 1e-2, moment_dtype=torch.float32, chunk=7)
    for step in range(5):
        g, t = torch.randn(n), torch.randn(n)
        loss_ref = torch.nn.functional.mse_loss(net(g), t)
        ref_opt.zero_grad()
        loss_ref.backward()
        ref_opt.step()
        loss = opt.step(g, t)
        assert loss == pytest.approx(float(loss_ref.detach()), rel=1e-5)
    for name in ("w_e", "w_d", "b_d"):
        assert torch.allclose(getattr(gm, name), getattr(net, name).detach(), atol=1e-6), name
    assert gm.b_e == pytest.approx(float(net.b_e), abs=1e-6)


def test_flip_keeps_the_decoder_output_for_the_same_input():
    gm = GradiendModel(20, seed=1)
    g = torch.randn(20)
    before = gm.decode(gm.encode(g)).clone()
    h0 = gm.encode(g)
    gm.flip()
    assert gm.encode(g) == pytest.approx(-h0, abs=1e-7)
    assert torch.allclose(gm.decode(gm.encode(g)), before, atol=1e-6)


@pytest.fixture(scope="module")
def trained(tiny):
    cfg = GradiendConfig(params="mlp", steps=20, batch_texts=8, seeds=(0, 1), lr=1e-3, val_batches=4)
    return train_gradiend(tiny, "finance", "gender", cfg, progress=False)


def test_feature_separates_groups_on_held_out_data(tiny, trained):
    ev = evaluate_feature(tiny, trained, batch_texts=6, n_batches=4, n_neutral=3)
    assert ev["sign_accuracy"] >= 0.9 and ev["pearson"] > 0.8
    assert ev["stats"]["male"]["mean"] > 0 > ev["stats"]["female"]["mean"]  # normalized: group A positive
    assert abs(ev["stats"]["neutral"]["mean"]) < 0.5 * ev["stats"]["male"]["mean"]
    assert trained.plot().axes


def test_edit_is_theta_plus_alpha_dec_h_and_restores_exactly(tiny, trained, tmp_path):
    iv = trained.edit_for(0.5, 0.1)
    params = named_params(tiny)
    before = {n: p.detach().clone() for n, p in params.items()}
    dec = trained.model.decode(0.5)
    with iv.apply(tiny):
        name = trained.param_names[3]
        a, b = trained.param_set.offsets()[3][1:]
        assert torch.allclose(params[name] - before[name], 0.1 * dec[a:b].view(params[name].shape), atol=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    trained.save(tmp_path / "g")
    back = GradiendResult.load(tmp_path / "g")
    assert torch.equal(back.w_e, trained.w_e) and back.param_names == trained.param_names


def test_choose_edit_grid(tiny, trained):
    from mechbias.data.contexts import load_context
    from mechbias.eval.metrics import contrast_scores

    ch = choose_edit(tiny, trained, hs=(-1.0, 1.0), alphas=(-0.01, 0.01, 3.0), neutral_max_texts=2, n_names=8,
                     max_ppl_increase=0.02)
    assert len(ch["grid"]) == 6 and {"gap", "perplexity"} <= set(ch["grid"][0])
    ok = [p for p in ch["grid"] if p["perplexity"] <= ch["perplexity_before"] * 1.02]
    assert ok  # alpha 0.01 moves the model little: within the limit
    assert ch["chosen"] == min(ok, key=lambda p: abs(p["gap"]))  # the smallest |gap| among the allowed points
    none = choose_edit(tiny, trained, hs=(1.0,), alphas=(0.01,), neutral_max_texts=2, n_names=8, max_ppl_increase=-1.0)
    assert none["chosen"] is None  # no point can lower perplexity to 0: nothing is chosen
    # each grid point's gap is the selection prompts' gap under that edit (brute force for one point)
    ps = load_context("finance").prompts("gender", templates="selection", names="selection")
    keep = set(ps.names[:: max(1, len(ps.names) // 8)])
    ps = ps.subset([i for i, p in enumerate(ps) if p.person.name in keep])
    pt = ch["grid"][1]
    sc = contrast_scores(tiny, ps, intervention=trained.edit_for(pt["h"], pt["alpha"]))
    g = ps.groups
    assert pt["gap"] == pytest.approx(float(sc[g == 0].mean() - sc[g == 1].mean()), abs=1e-9)
