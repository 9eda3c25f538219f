"""Ground truth v3 by construction: the pieces that can be checked without the embedded model."""

import pytest
import torch

from mechbias.core.models import tiny_model
from mechbias.groundtruth.construct import ConstructConfig, construct_planted, ridge


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


def test_layer_order_and_contexts_are_checked_before_any_forward_pass():
    model = tiny_model(arch="llama", n_layers=2, d_model=64, d_mlp=128)
    with pytest.raises(ValueError, match="ordered"):
        construct_planted(model, ConstructConfig(name_layers=(1,), head_layers=(0,), last_layers=(1,)))
    with pytest.raises(ValueError, match="fitting contexts"):
        construct_planted(model, ConstructConfig(planted=("housing",)))
