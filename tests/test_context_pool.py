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
