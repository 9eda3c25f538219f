"""Linear algebra of the ground-truth construction (:mod:`mechbias.groundtruth.construct`): a scale-free
weighted ridge, its penalty by cross-validation over whole names, balanced weights, the directions that
carry a share of a gradient's energy, and the "quiet" direction a planted head writes along. Plain tensor
functions, each tested against a brute-force reference in ``tests/test_construct.py``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor


def ridge(X: Float[Tensor, "n d"], y: Float[Tensor, " n"], lam: float, weight: Float[Tensor, " n"] | None = None
          ) -> Float[Tensor, " d"]:
    """Weighted ridge regression through the origin: ``argmin_w sum_i weight_i (X_i w - y_i)^2 + lam' |w|^2``
    with ``lam' = lam * n * mean feature variance`` (scale-free). Solved in float64."""
    X, y = X.double(), y.double()
    wt = torch.ones(len(X), dtype=torch.float64) if weight is None else weight.double()
    Xw = X * wt[:, None]
    reg = lam * float(wt.sum()) * float((X ** 2).mean())
    A = X.T @ Xw + reg * torch.eye(X.shape[1], dtype=torch.float64)
    return torch.linalg.solve(A, Xw.T @ y)


def centered_ridge(X: Float[Tensor, "n d"], y: Float[Tensor, " n"], lam: float) -> tuple[Float[Tensor, " d"], float]:
    """Class-balanced ridge regression with an intercept: each distinct target gets the same total weight, the
    features and target are centred by their balanced means, and the penalty is ``lam`` times the mean balanced
    feature variance. Returns the weights and the threshold halfway between the two classes' mean reads (for
    targets of +1 and -1). Solved in float64."""
    X, y = X.double(), y.double()
    wt = balanced_weights(y)
    wt = wt / wt.sum()
    Xc = X - (X * wt[:, None]).sum(0)
    cov = Xc.T @ (Xc * wt[:, None])
    reg = lam * float(torch.diagonal(cov).mean())
    w = torch.linalg.solve(cov + reg * torch.eye(X.shape[1], dtype=torch.float64),
                           (Xc * wt[:, None]).T @ (y - float((y * wt).sum())))
    r = X @ w
    return w, float((r[y > 0].mean() + r[y <= 0].mean()) / 2)


def cv_ridge(X: Float[Tensor, "n d"], y: Float[Tensor, " n"], fold: Int[Tensor, " n"], grid: Sequence[float]
             ) -> tuple[float, float]:
    """The penalty in ``grid`` with the best 2-fold sign accuracy, folds given per row (whole names held out;
    ties: the larger penalty); returns it and its accuracy."""
    best = (-1.0, 0.0)
    for lam in sorted(grid, reverse=True):
        hit = 0.0
        for k in (0.0, 1.0):
            tr, te = fold != k, fold == k
            w = ridge(X[tr], y[tr], lam)
            hit += float(((X[te].double() @ w > 0) == (y[te] > 0)).double().sum())
        if hit / len(y) > best[0]:
            best = (hit / len(y), lam)
    return best[1], best[0]


def balanced_weights(y: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Weights that give each distinct target value the same total weight."""
    w = torch.zeros_like(y)
    for v in y.unique():
        m = y == v
        w[m] = 1.0 / m.sum()
    return w * len(y) / w.sum()


def energy_basis(G: Float[Tensor, "n d"], share: float, cap: int = 64) -> Float[Tensor, "k d"]:
    """Orthonormal directions (rows) carrying ``share`` of the second moment of the rows of ``G``."""
    ev, evec = torch.linalg.eigh(G.double().T @ G.double())
    ev, evec = ev.flip(0), evec.flip(1)
    r = min(cap, int((ev.cumsum(0) / ev.sum() < share).sum()) + 1)
    return evec[:, :r].T


def quiet_direction(C: Float[Tensor, "d d"], G: Float[Tensor, "d d"], avoid: Float[Tensor, "m d"] | None = None,
                    k: int = 32) -> tuple[Float[Tensor, " d"], dict]:
    """A unit direction p with little native variance at the reader (``C``) and little effect on the answer
    score downstream (``G``, second moment of score gradients): within the span of the ``k`` lowest-variance
    directions of ``C`` (so the write that reaches a given signal-to-noise ratio stays small), the minimiser of
    sqrt(p'Cp) * sqrt(p'Gp), searched over the lowest eigenvectors of C / tr C + mu G / tr G on a grid of mu
    (mu = 0: the lowest-variance direction itself). ``avoid`` (rows) are projected out first."""
    d = C.shape[0]
    P, free = torch.eye(d, dtype=torch.float64), d
    if avoid is not None and len(avoid):
        Q, _ = torch.linalg.qr(avoid.double().T)
        P, free = P - Q @ Q.T, d - Q.shape[1]
    _, evec = torch.linalg.eigh(P @ C @ P + (torch.eye(d, dtype=torch.float64) - P) * 1e6 * C.trace())
    V = evec[:, : min(k, free)]                                                   # the allowed low-variance span
    Cs, Gs = V.T @ C @ V, V.T @ G @ V
    best: tuple = (float("inf"), None, None)
    for mu in [0.0, *torch.logspace(-3, 3, 13).tolist()]:
        _, e = torch.linalg.eigh(Cs / Cs.trace() + mu * Gs / Gs.trace().clamp(min=1e-300))
        p = V @ e[:, 0]
        obj = float((p @ C @ p).clamp(min=0).sqrt() * (p @ G @ p).clamp(min=0).sqrt())
        if obj < best[0]:
            best = (obj, p, mu)
    p, low = best[1], evec[:, 0]
    return p, {"mu": best[2], "native_var": float(p @ C @ p), "grad_second_moment": float(p @ G @ p),
               "grad_second_moment_lowest_variance": float(low @ G @ low), "lowest_native_var": float(low @ C @ low)}


def slow_rotary_dims(d_head: int, keep: int = 12) -> Int[Tensor, " dims"]:
    """The head dimensions that rotary embeddings turn least (the last ``keep`` frequency pairs, in the
    rotate-half layout: dimensions i and i + d_head / 2 share frequency i, which falls with i)."""
    half = d_head // 2
    keep = min(keep, half // 2)
    idx = list(range(half - keep, half)) + list(range(d_head - keep, d_head))
    return torch.tensor(idx)


def calibrate_scales(measure: Callable[[dict[str, float]], dict[str, float]], scales: dict[str, float],
                     target: float, rounds: int, tol: float) -> tuple[dict[str, float], list[dict]]:
    """Rescale per-key output scales until ``measure(scales)[key]`` is within ``tol`` (relative) of ``target``.

    The first step is the secant through the origin (``scale *= target / measured``: no output, no effect);
    later steps are the secant through the last two measurements of each key, which also handles an effect that
    does not vanish at scale 0 (another key's output acting on this key's prompts) and converges on a curved
    response where a one-shot extrapolation from another scale does not. Stops after ``rounds`` measurements,
    or once every key is within ``tol``; returns the scales and one record per round (``scales`` measured,
    ``measured``), the last record measured at the returned scales when it converged."""
    scales, history = dict(scales), []
    for _ in range(rounds):
        got = measure(dict(scales))
        history.append({"scales": dict(scales), "measured": dict(got)})
        if all(abs(got[k] - target) <= tol * abs(target) for k in scales):
            break
        for k in scales:
            if len(history) > 1:
                s0, f0 = history[-2]["scales"][k], history[-2]["measured"][k]
                if f0 != got[k] and s0 != scales[k]:
                    scales[k] += (target - got[k]) * (scales[k] - s0) / (got[k] - f0)
                    continue
            if got[k] == 0 or (got[k] > 0) != (target > 0):
                raise RuntimeError(f"{k}: the measured effect {got[k]:+.3g} has no usable sign (target {target:+.3g})")
            scales[k] *= target / got[k]
    return scales, history
