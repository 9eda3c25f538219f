"""The planted construction's pooled context read (``ConstructConfig(context_pool=True)``): each piece against a
brute-force reference or a planted answer, and the pooling circuit in a built tiny model."""

import pytest
import torch

from mechbias.core.hooks import hooked
from mechbias.core.sites import hook_name
from mechbias.groundtruth.context_pool import and_gate, pooled_inputs, template_cv_read
from mechbias.groundtruth.linalg import balanced_weights, centered_ridge


def test_centered_ridge_equals_least_squares_with_an_unpenalised_intercept():
    g = torch.Generator().manual_seed(1)
    n, d = 300, 10
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, d, dtype=torch.float64) + 3.0
    y = torch.where(X[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) > 3.0, 1.0, -1.0)
    y[:40] = 1.0                                                   # unbalanced classes: the weights matter
    wt = balanced_weights(y)
    wt = wt / wt.sum()
    for lam in (0.0, 0.1, 10.0):
        w, t = centered_ridge(X, y, lam)
        Xc = X - (X * wt[:, None]).sum(0)
        reg = lam * float((Xc ** 2 * wt[:, None]).sum(0).mean())
        # brute force: minimise sum_i wt_i (X_i w + b - y_i)^2 + reg |w|^2 with b free, one stacked problem
        A = torch.cat([torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1) * wt.sqrt()[:, None],
                       torch.cat([reg ** 0.5 * torch.eye(d, dtype=torch.float64), torch.zeros(d, 1, dtype=torch.float64)], 1)])
        b = torch.cat([y * wt.sqrt(), torch.zeros(d, dtype=torch.float64)])
        ref = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
        assert torch.allclose(w, ref[:d], atol=1e-8), lam
        r = X @ w
        assert t == pytest.approx(float((r[y > 0].mean() + r[y < 0].mean()) / 2))


def test_pooled_inputs_equal_the_uniform_average_of_a_gated_neuron():
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(n, 8, generator=g) for n in (3, 7, 12)]
    gate_row = torch.randn(8, generator=g, dtype=torch.float64)
    w = torch.randn(8, generator=g, dtype=torch.float64)
    F = pooled_inputs(feats, gate_row)
    for x, f in zip(feats, F, strict=True):
        # a head attending uniformly over all n positions (BOS included, where the neuron writes nothing)
        acts = [0.0] + [float(torch.nn.functional.silu(x[j].double() @ gate_row) * (x[j].double() @ w))
                        for j in range(1, len(x))]
        assert float(f @ w) == pytest.approx(sum(acts) / len(x), rel=1e-9, abs=1e-12)


def _templated(n_templates: int, seed: int, d: int = 12, per: int = 6):
    """Prompts of two contexts, each template a large random offset (shared by its prompts; smaller along the
    context's direction), the context a small signal along that direction."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.zeros(d, dtype=torch.float64)
    signal[0] = 1.0
    F, y, tpl = [], [], []
    for t in range(n_templates):
        lab = 1.0 if t % 2 == 0 else -1.0
        off = 3.0 * torch.randn(d, generator=g, dtype=torch.float64)
        off[0] = 0.2 * off[0] / 3.0
        for _ in range(per):
            F.append(off + lab * signal + 0.1 * torch.randn(d, generator=g, dtype=torch.float64))
            y.append(lab)
            tpl.append(t)
    return torch.stack(F), torch.tensor(y, dtype=torch.float64), torch.tensor(tpl)


def test_template_cross_validation_picks_a_read_that_carries_to_new_templates():
    """With few templates a weakly penalised read fits the templates' offsets; the penalty chosen by 2-fold
    cross-validation over whole templates must read the context on templates it has never seen."""
    F, y, tpl = _templated(48, seed=3)
    half = (tpl // 2) % 2                                          # whole templates, both labels in each half
    grid = (1e-4, 1e-2, 1.0, 100.0)
    w, t, info = template_cv_read(F, y, half, grid)
    Fn, yn, _ = _templated(60, seed=4)
    acc = float(((Fn @ w > t) == (yn > 0)).double().mean())
    assert acc >= 0.9, info
    assert info["cv_balanced_accuracy"][info["penalty"]] == max(info["cv_balanced_accuracy"].values())
    # on new templates the chosen penalty is (close to) the best of the grid, and the strongest penalty, which
    # reads the raw difference of means, is worse: the templates' offsets dominate it
    new = {lam: float(((Fn @ centered_ridge(F, y, lam)[0] > centered_ridge(F, y, lam)[1]) == (yn > 0)).double().mean())
           for lam in grid}
    assert acc >= max(new.values()) - 0.05, new
    assert new[100.0] < acc - 0.1, new
    # a direction the read must not see
    wb, _, _ = template_cv_read(F, y, half, (1.0,), blind=torch.eye(12, dtype=torch.float64)[1])
    assert abs(float(wb[1])) < 1e-9


def test_and_gate_opens_only_where_both_reads_are_on():
    g = torch.Generator().manual_seed(5)
    ctx = torch.randint(0, 2, (4000,), generator=g).double()
    pos = torch.randint(0, 2, (4000,), generator=g).double()
    reads = torch.stack([ctx + 0.1 * torch.randn(4000, generator=g, dtype=torch.float64),
                         3.0 * pos + 0.1 * torch.randn(4000, generator=g, dtype=torch.float64),
                         torch.ones(4000, dtype=torch.float64)], 1)
    y = torch.where((ctx == 1) & (pos == 1), 1.0, -1.0)
    coef, st = and_gate(reads, y, y > 0, 12.0)
    pre = reads @ coef
    assert st["on_median"] == pytest.approx(12.0)
    for c in (0, 1):
        for p in (0, 1):
            cell = pre[(ctx == c) & (pos == p)]
            assert (float(cell.quantile(0.95)) < 0) if (c, p) != (1, 1) else (float(cell.quantile(0.05)) > 6), (c, p)


def test_a_built_pooling_circuit_pools_the_context_marker():
    """Build the pooled v4 layout into a tiny model: each pooling head attends uniformly from the last position,
    each context neuron writes nothing at BOS, and each chain's units include its context neuron and pooling head."""
    from mechbias.core.testing import tiny_model
    from mechbias.groundtruth.construct import ConstructConfig, construct_planted

    model = tiny_model(arch="llama", seed=0)                       # its own copy: the build writes into it
    cfg = ConstructConfig(axis="gender@extended", favoured="female", templates="selection", names_per_cell=2,
                          head_layers=(1,), shift=0.1, context_pool=True)
    _, plant, stats = construct_planted(model, cfg)
    for c in cfg.planted:
        assert stats[f"pool_{c}"]["uniform_attention_max_deviation"] < 1e-6
        assert len(plant.only[c]) == cfg.n_name + 2 and len(plant.heads[c]) == 2
    ctx_units = {c: plant.only[c][-1] for c in cfg.planted}
    assert len(set(ctx_units.values())) == 2
    ids = model.to_tokens(["The client asked the bank for a loan.", "A shop sold a coat."])
    seen = {}
    with hooked(model, [(hook_name("post", 0), lambda a, hook: seen.__setitem__("post", a.detach()))]):
        model(ids)
    for _l, i in ctx_units.values():
        assert float(seen["post"][:, 0, i].abs().max()) < 1e-5      # BOS: the context read is blind to it
        assert float(seen["post"][:, 1:, i].abs().max()) > 1e-3


def test_out_of_fold_reads_are_fitted_on_the_other_half_and_standardised():
    """template_oof against a hand-written two-fold loop: each half read by the centred ridge fitted on the other
    half, standardised by that fit's training medians; on a planted signal, unseen halves keep their sign."""
    from mechbias.groundtruth.context_pool import template_oof
    from mechbias.groundtruth.linalg import centered_ridge

    g = torch.Generator().manual_seed(3)
    n, d = 240, 12
    y = torch.where(torch.arange(n) % 3 == 0, 1.0, -1.0).double()
    F = torch.randn(n, d, generator=g, dtype=torch.float64) + 1.5 * y[:, None] * torch.eye(d, dtype=torch.float64)[0]
    half = (torch.arange(n) // 10) % 2
    oof = template_oof(F, y, half, 1.0)
    for k in (0, 1):
        w, _ = centered_ridge(F[half != k], y[half != k], 1.0)
        r = F[half != k] @ w
        m0, m1 = r[y[half != k] < 0].median(), r[y[half != k] > 0].median()
        torch.testing.assert_close(oof[half == k], (F[half == k] @ w - m0) / (m1 - m0))
    assert 0.6 < float(oof[y > 0].median()) < 1.1 and abs(float(oof[y < 0].median())) < 0.25


def test_ramp_window_picks_the_best_opening_within_the_leak_bound():
    """ramp_window on known distributions: the chosen pair respects the bound on the other contexts' mean opening,
    and no pair of its grid that respects it separates more; with no pair inside the bound it takes the least leaky."""
    from mechbias.groundtruth.context_pool import ramp, ramp_window

    own = torch.linspace(0.2, 1.4, 101, dtype=torch.float64)
    other = torch.linspace(-0.4, 0.4, 101, dtype=torch.float64)
    t1, t2, info = ramp_window(own, other, max_other=0.05)
    assert float(ramp(other, t1, t2).mean()) <= 0.05
    best = float(ramp(own, t1, t2).mean() - ramp(other, t1, t2).mean())
    for r in info["table"]:
        if r["other"] <= 0.05:
            assert r["own"] - r["other"] <= best + 1e-12
    assert float(ramp(torch.tensor([t1 - 1e-9, (t1 + t2) / 2, t2 + 1.0]), t1, t2).sub(torch.tensor([0.0, 0.5, 1.0]))
                 .abs().max()) < 1e-6
    _, _, info = ramp_window(own, other + 10.0, max_other=0.05)
    assert info["chosen"]["other"] == min(r["other"] for r in info["table"])
    # per context: one other context sits higher; the bound holds for it, not just for the pooled mean
    groups = (torch.arange(101) % 2)
    shifted = torch.where(groups == 1, other + 0.3, other)
    t1, t2, info = ramp_window(own, shifted, max_other=0.05, groups=groups)
    assert float(ramp(shifted[groups == 1], t1, t2).mean()) <= 0.05 + 1e-12
    t1p, t2p, _ = ramp_window(own, shifted, max_other=0.05)
    assert float(ramp(shifted[groups == 1], t1p, t2p).mean()) > 0.05      # the pooled bound alone lets it open


def test_blind_row_reads_nothing_of_the_written_directions():
    """A row made blind to written residual directions reads 0 of any combination of them through the layer norm's
    gain, and keeps its read of what is orthogonal to them."""
    from mechbias.groundtruth.context_pool import blind_row

    g = torch.Generator().manual_seed(5)
    d = 16
    g2 = 0.5 + torch.rand(d, generator=g, dtype=torch.float64)
    writes = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(3)]
    row = torch.randn(d, generator=g, dtype=torch.float64)
    b = blind_row(row, g2, writes)
    for w in writes:
        assert abs(float((b * g2) @ w)) < 1e-12                  # the MLP reads (row * g2) . x / rms
    Q, _ = torch.linalg.qr(torch.stack(writes).T)
    z = torch.randn(d, generator=g, dtype=torch.float64)
    z = z - Q @ (Q.T @ z)
    assert float((b * g2) @ z) == pytest.approx(float((row * g2) @ z), rel=1e-10)


def test_a_built_ramp_gate_saturates_and_is_blind_to_other_chains():
    """Build the ramp-gated pooled layout into a tiny model: each chain's two prediction neurons share one up row
    with opposite signs, their gate rows and up rows read nothing of any chain's written directions, and the pair's
    output on the fitting prompts is a ramp: at most 1 (in units of its level) on the context's own prompts."""
    from mechbias.core.params import mlp_weights
    from mechbias.core.testing import tiny_model
    from mechbias.groundtruth.construct import ConstructConfig, construct_planted

    model = tiny_model(arch="llama", seed=0)
    with pytest.raises(ValueError, match="n_last=2"):
        construct_planted(model, ConstructConfig(context_pool=True, ramp_gate=True))
    with pytest.raises(ValueError, match="pool_ridge_grid"):
        construct_planted(model, ConstructConfig(context_pool=True, pool_ridge_grid=()))
    cfg = ConstructConfig(axis="gender@extended", favoured="female", templates="selection", names_per_cell=2,
                          head_layers=(1,), shift=0.1, context_pool=True, ramp_gate=True, n_last=2)
    _, plant, stats = construct_planted(model, cfg)
    l = 1
    g2 = model.blocks[l].ln2.original_component.weight.detach().double()
    o = model.blocks[l].attn.o.original_component.weight.detach().double()
    dh = model.cfg.d_head
    def written(c, kind):      # a planted head's output direction: the group head writes p, the pooling head r
        _, h = plant.heads[c][0 if kind == "p" else 1]
        return o[:, h * dh:(h + 1) * dh]

    for c in cfg.planted:
        st = stats[f"last_{c}_L{l}"]
        assert st["t1"] < st["t2"] and st["ramp_own_mean"] <= 1.0 + 1e-6
        (_, ia), (_, ib) = plant.only_last[c]
        g, u, _ = mlp_weights(model, l)
        torch.testing.assert_close(u[ia].double(), -u[ib].double())
        other = next(x for x in cfg.planted if x != c)
        reads = [(g[ia], ["p", "p", "r"], [c, other, other], written(c, "r")), (g[ib], ["p", "p", "r"], [c, other, other],
                 written(c, "r")), (u[ia], ["p", "r", "r"], [other, c, other], written(c, "p"))]
        for row, kinds, owners, own in reads:
            v = row.detach().double() * g2
            for kind, who in zip(kinds, owners, strict=True):
                w = written(who, kind)
                assert float((v @ w).abs().max()) < 1e-6 * float(v.norm() * w.norm()), (c, kind, who)
            assert float((v @ own).abs().max()) > 1e-3 * float(v.norm() * own.norm())   # and it reads its own


def test_a_built_eraser_removes_the_group_heads_write_from_the_layers_above():
    """Build the ramp-gated layout with erasers into a tiny model. In forward passes over held-out finance prompts,
    at the prediction position, the group head's write along p_c (the stream before the MLP with the head against
    without it) reaches the layers above (the same difference after the MLP) with less than 0.4 of its spread;
    without the eraser all of it does. Each eraser sits in its head's layer and is one of its chain's units."""
    from mechbias.core.params import attn_weights, head_rows, mlp_weights
    from mechbias.core.testing import tiny_model
    from mechbias.data.axes import load_axis
    from mechbias.data.contexts import load_context
    from mechbias.groundtruth.construct import ConstructConfig, construct_planted

    model = tiny_model(arch="llama", seed=0)
    # marker_snr 0.5: in the tiny model a head writing 8 native standard deviations dominates the stream's size
    # there, and the eraser, reading after the layer norm, is exact only where that size is steady (the real model:
    # the planted writes are a small part of it)
    cfg = ConstructConfig(axis="gender@extended", favoured="female", templates="selection", names_per_cell=2,
                          head_layers=(1,), shift=0.1, context_pool=True, ramp_gate=True, n_last=2,
                          erase_head_output=True, marker_snr=0.5)
    _, plant, stats = construct_planted(model, cfg)
    l = 1
    o = model.blocks[l].attn.o.original_component.weight.detach().double()
    dh = model.cfg.d_head
    ax = load_axis("gender@extended")
    ids = [model.to_tokens(t) for t in load_context("finance").prompts(ax, templates="heldout",
                                                                       names=ax.split_people("heldout", 0)[:12]).texts]
    seen: dict = {}
    hooks = [(hook_name(pt, l), lambda a, hook, pt=pt: seen.__setitem__(pt, a.detach().double()[0, -1]))
             for pt in ("resid_mid", "resid_post")]

    def last(p):
        out = []
        for x in ids:
            with hooked(model, hooks):
                model(x)
            out.append([float(seen["resid_mid"] @ p), float(seen["resid_post"] @ p)])
        return torch.tensor(out, dtype=torch.float64)

    for c in cfg.planted:
        assert stats[f"erase_{c}"]["sd_last_after"] < 0.35 * stats[f"erase_{c}"]["sd_last_before"]
        _, h = plant.heads[c][0]
        rows = head_rows(torch.tensor([h]), dh)
        p = torch.linalg.svd(o[:, rows]).U[:, 0]                           # the group head writes along p only
        eraser = next(u for u in plant.only[c] if u[0] == l)               # the eraser sits in the head's layer
        full = last(p)
        with torch.no_grad():
            keep_o = attn_weights(model, l)[1][:, rows].clone()
            attn_weights(model, l)[1][:, rows] = 0.0
            no_head = last(p)
            keep_e = mlp_weights(model, l)[2][:, eraser[1]].clone()
            mlp_weights(model, l)[2][:, eraser[1]] = 0.0
            neither = last(p)
            attn_weights(model, l)[1][:, rows] = keep_o
            no_eraser = last(p)
            mlp_weights(model, l)[2][:, eraser[1]] = keep_e
        written = full[:, 0] - no_head[:, 0]                              # the head's write, before the MLP
        passed = full[:, 1] - no_head[:, 1]                               # what of it is left after the MLP
        assert float(written.std()) > 1e-3
        assert float(passed.std()) < 0.4 * float(written.std()), (c, written, passed)
        # without the eraser most of it passes (the layer's other neurons respond to the write a little)
        assert float((no_eraser[:, 1] - neither[:, 1]).std()) > 0.7 * float(written.std())
