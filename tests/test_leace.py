"""LEACE (issue 35): the package's eraser equals a closed-form LEACE written here from the paper's formula; the
eraser leaves a linear probe at chance on held-out data; the intervention equals a plain hooked forward and
leaves the model bit-identical; the method runs through the CLI's transfer engine with its controls."""

import json

import numpy as np
import pytest
import torch

from mechbias.apps.cli import main
from mechbias.core.hooks import n_active_hooks
from mechbias.core.results import run_summary_json
from mechbias.methods.base import registered_methods
from mechbias.methods.leace import ErasureIntervention, Leace, LeaceConfig, fit_eraser


def closed_form_leace(x: torch.Tensor, z: torch.Tensor):
    """LEACE from the paper (Belrose et al., 2023, Theorem 4.3): r(x) = x - W+ P W (x - mean), W = Sigma_XX^(-1/2)
    on its support (pseudo-inverse), W+ = Sigma_XX^(1/2), P the orthogonal projection onto the column space of
    W Sigma_XZ. Returns the eraser as a function."""
    x = x.double()
    zc = torch.nn.functional.one_hot(z.long()).double()
    mu = x.mean(0)
    xc, zc = x - mu, zc - zc.mean(0)
    sxx = xc.T @ xc / len(x)
    sxz = xc.T @ zc / len(x)
    vals, vecs = torch.linalg.eigh(sxx)
    keep = vals > vals[-1] * len(vals) * torch.finfo(vals.dtype).eps
    w = vecs @ torch.diag(torch.where(keep, vals.clamp_min(0).rsqrt(), 0.0)) @ vecs.T
    w_inv = vecs @ torch.diag(torch.where(keep, vals.clamp_min(0).sqrt(), 0.0)) @ vecs.T
    u, s, _ = torch.linalg.svd(w @ sxz, full_matrices=False)
    u = u[:, s > 1e-2 * s.max()]
    proj = u @ u.T
    return lambda v: v.double() - (v.double() - mu) @ (w_inv @ proj @ w).T


def _data(n, d=24, seed=0, signal=1.0):
    """Activations with a binary concept along one direction, plus correlated noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 2, (n,), generator=g)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / d ** 0.5
    direction = torch.randn(d, generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g) \
        + signal * (z[:, None] - 0.5) * direction
    return x.float(), z


def test_package_eraser_equals_closed_form_leace():
    x, z = _data(600)
    held, _ = _data(200, seed=1)
    left, right, bias = fit_eraser(x, z, shrinkage=False, constrain_cov_trace=False)
    ours = ErasureIntervention(0, left, right, bias).apply_to(held.double())
    ref = closed_form_leace(x, z)(held)
    assert left.shape[1] == 1  # a binary concept: rank 1
    assert (ours - ref).abs().max() < 1e-5
    # not vacuous: the eraser changes the activations by far more than the tolerance
    assert (ref - held.double()).abs().max() > 0.1
    # and on the fitting data, the two class means become equal (the defining property)
    erased = ErasureIntervention(0, left, right, bias).apply_to(x.double())
    assert (erased[z == 0].mean(0) - erased[z == 1].mean(0)).abs().max() < 1e-6


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float((pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean())


def _probe_auc(train_x, train_z, test_x, test_z) -> float:
    """A logistic-regression probe (L2 1e-3, LBFGS) trained on one half, its AUC on the other."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = ((train_x - mu) / sd).double(), ((test_x - mu) / sd).double()
    w = torch.zeros(a.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)
    ya = train_z.double()

    def loss():
        opt.zero_grad()
        out = torch.nn.functional.binary_cross_entropy_with_logits(a @ w[:-1] + w[-1], ya) + 1e-3 * w[:-1].pow(2).sum()
        out.backward()
        return out

    opt.step(loss)
    return _auc((b @ w[:-1] + w[-1]).detach(), test_z)


def test_the_eraser_leaves_a_linear_probe_at_chance_on_held_out_data():
    """Fitted on 3000 activations; a probe trained and tested on fresh ones (1500 + 1500): AUC within
    0.45-0.55 after erasure (chance), above 0.9 before."""
    x, z = _data(3000, signal=2.0)
    left, right, bias = fit_eraser(x, z)
    iv = ErasureIntervention(0, left, right, bias)
    xa, za = _data(1500, seed=5, signal=2.0)
    xb, zb = _data(1500, seed=6, signal=2.0)
    assert _probe_auc(xa, za, xb, zb) > 0.9
    auc = _probe_auc(iv.apply_to(xa), za, iv.apply_to(xb), zb)
    assert 0.45 <= auc <= 0.55, auc
    # a random projection of the same rank leaves the concept readable (the control is not an eraser)
    rnd = iv.random_like(None, seed=3)
    assert _probe_auc(rnd.apply_to(xa), za, rnd.apply_to(xb), zb) > 0.85


def test_the_intervention_equals_a_plain_hooked_forward_and_restores_the_model(tiny):
    ids = tiny.to_tokens("The bank approved the loan for Emily . Answer :")
    d = tiny.cfg.d_model
    x, z = _data(400, d=d)
    left, right, bias = fit_eraser(x, z)
    for positions in ("all", "last"):
        iv = ErasureIntervention(1, left, right, bias, positions)
        with torch.no_grad():
            before = tiny(ids)
            with iv.apply(tiny):
                hooked = tiny(ids)
            after = tiny(ids)

        def plain(act, hook, positions=positions):
            out = act.clone()
            sl = slice(None) if positions == "all" else slice(-1, None)
            delta = act[:, sl].double() - bias.double()
            out[:, sl] = (act[:, sl].double() - delta @ right.double().T @ left.double().T).to(act.dtype)
            return out

        with torch.no_grad():
            ref = tiny.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_pre", plain)])
        assert (hooked - ref).abs().max() < 1e-4
        assert (hooked - before).abs().max() > 1e-3  # it did something
        assert torch.equal(before, after) and n_active_hooks(tiny) == 0


def test_erase_is_registered_and_runs_through_the_transfer_engine(tmp_path):
    assert registered_methods()["erase"] is Leace
    with pytest.raises(ValueError, match="position"):
        LeaceConfig(position="middle")
    rc = main(["erase", "--model", "tiny", "--select-on", "finance", "commerce", "--evaluate-on", "all",
               "--axis", "gender", "--random", "1", "--boot", "100", "--no-capability", "--out", str(tmp_path)])
    assert rc == 0
    data = run_summary_json(tmp_path)  # summary.json with the cells and test of transfer/result.json
    assert len(data["cells"]) == 2 * 6  # two rows x the six built-in contexts
    assert {"random", "shuffled_labels"} <= set(data["cells"][0]["controls"])
    assert data["transfer_test"]["columns"] == ["finance", "commerce"]
    ov = data["transfer_test"]["overlap"]["finance|commerce"]
    assert ov["measure"] == "subspace_cos2" and 0.0 <= ov["value"] <= 1.0 + 1e-9 and ov["same_layer"]
    assert isinstance(data["transfer_test"]["gated"], bool)
    summary = json.loads((tmp_path / "summary.json").read_text())
    sel = summary["selections"]["finance"]
    assert sel["rank"] == 1 and sel["class_mean_distance_after"] < 1e-3 * sel["class_mean_distance"]
    from mechbias.interventions.base import load_intervention

    iv = load_intervention(tmp_path / "interventions" / "finance")
    assert isinstance(iv, ErasureIntervention) and iv.n_components == 1
    assert np.isfinite(iv.proj_left.numpy()).all()
