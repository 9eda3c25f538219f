"""Ground truth v3 by construction: the pieces that can be checked without the embedded model."""

import pytest
import torch

from mechbias.core.testing import tiny_model
from mechbias.groundtruth.construct import ConstructConfig, construct_planted
from mechbias.groundtruth.linalg import ridge


def test_ridge_equals_the_augmented_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 12, dtype=torch.float64)
    true = torch.randn(12, generator=g, dtype=torch.float64)
    y = X @ true + 0.3 * torch.randn(200, generator=g, dtype=torch.float64)
    wt = torch.rand(200, generator=g, dtype=torch.float64) + 0.5
    for lam in (0.0, 1e-2, 1.0):
        got = ridge(X, y, lam, wt)
        reg = lam * float(wt.sum()) * float((X ** 2).mean())
        # brute force: minimise ||sqrt(wt) (X w - y)||^2 + reg ||w||^2 as one stacked least-squares problem
        A = torch.cat([X * wt.sqrt()[:, None], reg ** 0.5 * torch.eye(12, dtype=torch.float64)])
        b = torch.cat([y * wt.sqrt(), torch.zeros(12, dtype=torch.float64)])
        ref = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
        assert torch.allclose(got, ref, atol=1e-9), lam
    # without a penalty and with exact data the fit recovers the coefficients
    assert torch.allclose(ridge(X, X @ true, 0.0), true, atol=1e-9)


def test_layers_and_contexts_are_checked_before_any_forward_pass():
    model = tiny_model(arch="llama", n_layers=2, d_model=64, d_mlp=128)
    with pytest.raises(ValueError, match="head layers must lie"):      # no layer below layer 0 for the name neurons
        construct_planted(model, ConstructConfig(head_layers=(0, 1)))
    with pytest.raises(ValueError, match="head layers must lie"):
        construct_planted(model, ConstructConfig(head_layers=(1, 2)))
    with pytest.raises(ValueError, match="fitting contexts"):
        construct_planted(model, ConstructConfig(planted=("housing",)))


def test_score_gradients_match_finite_differences():
    """The gradient of the answer score with respect to a residual activation against central differences
    of the same score with a perturbation added at one position."""
    from mechbias.core.hooks import hooked
    from mechbias.core.sites import hook_name
    from mechbias.groundtruth.reads import score_gradients

    model = tiny_model(arch="llama", n_layers=2, d_model=64, d_mlp=128)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(5, 200, (7,), generator=g) for _ in range(2)] + [torch.randint(5, 200, (9,), generator=g)]

    class It:
        def __init__(self, t):
            self.tokens = t
    items = [It(t) for t in seqs]
    pos_id, neg_id = 11, 42
    grads = score_gradients(model, items, [("resid_mid", 1), ("resid_pre", 1)], pos_id, neg_id)
    assert all(p.requires_grad for p in model.parameters())          # restored

    def score(t, point, pos, vec):
        with torch.no_grad(), hooked(model, [(hook_name(point, 1), lambda a, hook: a + _at(a, pos, vec))]):
            lg = model(t[None])
        return float(lg[0, -1, pos_id] - lg[0, -1, neg_id])

    def _at(a, pos, vec):
        d = torch.zeros_like(a)
        d[0, pos] = vec
        return d
    eps = 1e-2
    for k, it in enumerate(items):
        for point, pos in (("resid_mid", len(it.tokens) - 1), ("resid_pre", 2)):
            v = torch.randn(64, generator=g)
            v = v / v.norm()
            fd = (score(it.tokens, point, pos, eps * v) - score(it.tokens, point, pos, -eps * v)) / (2 * eps)
            an = float(grads[(point, 1)][k][pos] @ v)
            assert abs(fd - an) <= 2e-3 + 2e-2 * abs(an), (k, point, fd, an)


def test_energy_basis_spans_a_planted_low_rank_gradient():
    from mechbias.groundtruth.linalg import energy_basis

    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(32, 3, generator=g, dtype=torch.float64))[0]      # 3 true directions
    G = torch.randn(400, 3, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64) @ basis.T
    G = G + 0.01 * torch.randn(400, 32, generator=g, dtype=torch.float64)
    B = energy_basis(G, 0.99)
    assert B.shape[0] == 3
    # the found rows span the planted directions: projecting them onto the span loses (almost) nothing
    assert torch.allclose((B @ basis) @ (B @ basis).T, torch.eye(3, dtype=torch.float64), atol=1e-3)
    assert energy_basis(G, 0.5).shape[0] == 1                        # 25 / 38 of the energy is in the first


def test_quiet_direction_beats_both_single_criteria():
    """Against brute force over the two criteria separately: the chosen direction's product objective is no
    worse than the lowest-variance direction's or the lowest-gradient direction's, and it avoids what it
    is told to avoid."""
    from mechbias.groundtruth.linalg import quiet_direction

    g = torch.Generator().manual_seed(3)
    for trial in range(5):
        A = torch.randn(24, 24, generator=g, dtype=torch.float64)
        C = A @ A.T / 24 + 1e-3 * torch.eye(24, dtype=torch.float64)
        B = torch.randn(24, 6, generator=g, dtype=torch.float64)
        G = B @ B.T + 1e-4 * torch.eye(24, dtype=torch.float64)
        avoid = torch.randn(2, 24, generator=g, dtype=torch.float64)
        p, info = quiet_direction(C, G, avoid)
        obj = lambda q, C=C, G=G: float((q @ C @ q).sqrt() * (q @ G @ q).sqrt())
        assert abs(float(p.norm()) - 1) < 1e-9
        assert float((avoid @ p).abs().max()) < 1e-6
        Q = torch.linalg.qr(avoid.T)[0]
        P = torch.eye(24, dtype=torch.float64) - Q @ Q.T
        ev, evec = torch.linalg.eigh(P @ C @ P + (torch.eye(24, dtype=torch.float64) - P) * 1e6)
        assert obj(p) <= obj(evec[:, 0]) + 1e-12, trial                 # no worse than the lowest-variance one
        # restricted to the 8 lowest-variance directions, its native variance stays below the 8th eigenvalue
        p8, _ = quiet_direction(C, G, avoid, k=8)
        assert float(p8 @ C @ p8) <= float(ev[7]) + 1e-9
        assert float((avoid @ p8).abs().max()) < 1e-6
        assert info["native_var"] == pytest.approx(float(p @ C @ p))
        # and no better than a random search over 20,000 directions in the allowed subspace
        R = torch.randn(20000, 24, generator=g, dtype=torch.float64) @ P
        R = R / R.norm(dim=1, keepdim=True)
        rand = ((R @ C * R).sum(1).sqrt() * (R @ G * R).sum(1).sqrt()).min()
        assert obj(p) <= float(rand), trial


def test_v4_construction_reads_selection_templates_and_names_only(tiny):
    """Planted v4 is built from selection templates and a few selection names per cell: no held-out template or
    name reaches the construction (issue 33)."""
    from mechbias.data.axes import load_axis
    from mechbias.data.contexts import load_context
    from mechbias.groundtruth.reads import construction_items

    cfg = ConstructConfig(axis="gender@extended", favoured="female", templates="selection", names_per_cell=3)
    items = construction_items(tiny, cfg.axis, cfg.favoured, ("finance", "hiring"), templates=cfg.templates,
                               names_per_cell=cfg.names_per_cell)
    named = [it for it in items if it.sign != 0]
    ax = load_axis("gender@extended")
    selection = {p.name for p in ax.split_people("selection")}
    assert {it.name for it in named} <= selection
    per_cell: dict = {}
    for p in ax.people:
        if p.name in {it.name for it in named}:
            per_cell[(p.race, p.gender)] = per_cell.get((p.race, p.gender), 0) + 1
    assert per_cell == {cell: 3 for cell in {(p.race, p.gender) for p in ax.people}}
    for c in ("finance", "hiring"):
        n_sel = len(load_context(c).template_split("selection"))
        assert sum(it.context == c for it in named) == n_sel * 12
    assert {it.sign for it in named} == {1.0, -1.0}
    # every prompt, the neutral-reference ones (no name) included, is of a selection template
    for c in ("finance", "hiring"):
        sel = set(load_context(c).template_split("selection"))
        refs = [it for it in items if it.context == c and it.sign == 0]
        assert refs and {it.template for it in refs} == sel
        assert {it.template for it in named if it.context == c} == sel
    fav = {it.name for it in named if it.sign > 0}
    assert all(p.gender == "female" for p in ax.people if p.name in fav)


def test_output_scale_calibration_reaches_the_target_where_extrapolation_from_unit_output_does_not():
    """v3's and v4's planted gap was set by extrapolating the effect of unit output linearly; the later layers do
    not respond linearly (in the 2026-12-07 v4 attempt the extrapolation fell 7-15%
    short on the fitting prompts). The calibration measures at
    the scale it sets."""
    from mechbias.groundtruth.linalg import calibrate_scales

    curve = {"finance": (1.0, 1.3), "commerce": (0.6, 2.0)}          # effect(s) = a s + b s^3: convex

    def effect(c: str, s: float) -> float:
        a, b = curve[c]
        return a * s + b * s ** 3

    calls = []

    def measure(scales):
        calls.append(scales)
        return {c: effect(c, s) for c, s in scales.items()}

    target = 0.2
    one_shot = {c: target / effect(c, 1.0) for c in curve}            # the v3 rule: unit output, then linear
    assert all(effect(c, s) < 0.7 * target for c, s in one_shot.items())
    scales, history = calibrate_scales(measure, one_shot, target, rounds=8, tol=0.01)
    for c, s in scales.items():
        assert abs(effect(c, s) - target) <= 0.01 * target, c
    assert history[-1]["scales"] == scales                            # converged: the last round measured these
    assert len(history) == len(calls) < 8
    # an effect that does not vanish at scale 0 (the other chain acting on this context's prompts): the secant
    # through the origin alone oscillates (commerce: 10.2, -0.03, -0.20, 0.10, 0.37, ...); through the last two
    # measurements it converges
    offset = {"finance": 0.12, "commerce": -0.05}
    scales, history = calibrate_scales(lambda sc: {c: offset[c] + effect(c, s) for c, s in sc.items()},
                                       {"finance": 0.1, "commerce": 0.1}, target, rounds=10, tol=0.01)
    assert all(abs(offset[c] + effect(c, s) - target) <= 0.01 * target for c, s in scales.items())
    assert len(history) < 10
    # no usable sign: a loud error, not a scale that flips the planted direction
    with pytest.raises(RuntimeError, match="no usable sign"):
        calibrate_scales(lambda s: {"finance": -0.1}, {"finance": 1.0}, target, rounds=3, tol=0.01)
