"""The pooled context read of the planted construction (``ConstructConfig(context_pool=True)``).

Planted v4 gates each chain's prediction-position neurons with a probe of the prediction position alone; on
selection templates that the probe was not fitted on it keeps about 40% of its fitted activation and fires
on other contexts at half that (``analyses/planted_v4_gate.py``, docs/groundtruth.md). A read of the prompt's
**mean** carries to new templates with the other contexts near 0. With ``context_pool`` each chain gets:

1. a **context neuron** in its name layer (``L - 1``): gate = a constant (``gate_on`` times a row that reads
   about 1 on every token), up = a ridge read of context ``c`` fitted on the prompt's mean input (with an
   intercept, its penalty chosen by 2-fold cross-validation over whole templates), made blind to the BOS
   token so the first position writes nothing; its output is a *context marker* that only the pooling head's
   value direction reads (solved with the chains' other markers);
2. a **pooling head** in the head layer ``L``: query 0, so it attends uniformly over the prompt; its output
   writes the pooled marker along ``r_c``, a quiet residual direction beside the group head's ``p_c``;
3. the prediction-position neurons' gate becomes a fitted combination of three reads: ``r_c`` (the context),
   a context-free read of "the prediction position" (fitted like v4's gate, every fitting context on one side)
   and a constant, so it opens where both are on.

Everything here reads selection templates and names only, like the rest of the construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..core.params import attn_weights, head_rows, mlp_weights
from .linalg import balanced_weights, centered_ridge, energy_basis, quiet_direction, ridge
from .reads import Item, at_last, stack_rows

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

__all__ = ["ContextRead", "and_gate", "fit_context_neuron", "pool_value_read", "pooled_gate", "pooled_inputs", "scale_pooling_head",
           "template_cv_read", "template_halves", "write_context_marker", "write_pooling_head"]


def pooled_inputs(feats: Sequence[Tensor], gate_row: Float[Tensor, " d"]) -> Float[Tensor, "n d"]:
    """Per item: what a head that attends uniformly from the last position sees of a neuron with gate row
    ``gate_row`` and an (unknown) up row ``w``, as a vector ``F`` with ``F . w`` = that pooled read:
    ``(1 / n) sum_{j >= 1} silu(gate_row . x_j) x_j`` over the item's ``n`` positions (BOS, position 0, is
    counted in ``n`` but writes nothing: the up row is blind to it)."""
    out = []
    for x in feats:
        xd = x.double()
        s = torch.nn.functional.silu(xd[1:] @ gate_row.double())
        out.append((s[:, None] * xd[1:]).sum(0) / len(xd))
    return torch.stack(out)


def template_cv_read(F: Float[Tensor, "n d"], y: Float[Tensor, " n"], half: Int[Tensor, " n"], grid: Sequence[float],
                     blind: Float[Tensor, " d"] | None = None) -> tuple[Float[Tensor, " d"], float, dict]:
    """A centred ridge read of ``y`` (+1 / -1) from ``F``, its penalty chosen by 2-fold cross-validation over
    ``half`` (0 / 1 per row: whole templates), by balanced sign accuracy at the midpoint threshold (ties: the
    larger penalty). ``blind``: a direction the read must not see (projected out of ``F`` first).
    Returns the read fitted on every row, its threshold and the cross-validation per penalty."""
    F = F.double()
    if blind is not None:
        b = blind.double() / blind.double().norm()
        F = F - (F @ b)[:, None] * b
    cv = {}
    for lam in sorted(grid, reverse=True):
        hit = 0.0
        for k in (0, 1):
            tr, te = half != k, half == k
            w, t = centered_ridge(F[tr], y[tr], lam)
            pred = F[te] @ w > t
            pos, neg = y[te] > 0, y[te] <= 0
            hit += 0.5 * (float(pred[pos].double().mean()) + float((~pred[neg]).double().mean()))
        cv[lam] = hit / 2
    lam = max(cv, key=lambda k: (cv[k], k))
    w, t = centered_ridge(F, y, lam)
    return w, t, {"penalty": lam, "cv_balanced_accuracy": cv}


@dataclass
class ContextRead:
    """A context neuron's read (:func:`fit_context_neuron`): weights ``w`` and threshold ``t``, the pooled read of
    every item (``read``; NaN for neutral text), which items are the context's own and which another fitting
    context's, and the fit's statistics."""
    w: Float[Tensor, " d"]
    t: float
    read: Float[Tensor, " n"]
    own: Bool[Tensor, " n"]
    other: Bool[Tensor, " n"]
    stats: dict[str, Any]


def and_gate(reads: Float[Tensor, "n k"], y: Float[Tensor, " n"], on: Float[Tensor, " n"], level: float
             ) -> tuple[Float[Tensor, " k"], dict]:
    """Coefficients of a gate that combines ``k`` scalar reads (the last one a constant 1): a balanced least
    squares fit of ``y`` (+1 where the gate must open, -1 elsewhere), scaled so that the rows ``on`` have a
    median pre-activation of ``level``."""
    X, yd = reads.double(), y.double()
    wt = balanced_weights(yd)
    coef = torch.linalg.lstsq(X * wt.sqrt()[:, None], yd * wt.sqrt()).solution
    pre = X @ coef
    coef = coef * level / float(pre[on].median())
    pre = X @ coef
    stats = {"on_median": float(pre[on].median()), "on_q05": float(pre[on].quantile(0.05)),
             "off_q95": float(pre[y <= 0].quantile(0.95)), "coefficients": [float(c) for c in coef]}
    return coef, stats


def template_halves(items: Sequence[Item]) -> Int[Tensor, " n"]:
    """0 / 1 per item: the parity of its template's rank among its context's templates (-1: no template)."""
    ranks: dict[str, list] = {}
    for it in items:
        if it.template >= 0:
            ranks.setdefault(it.context, []).append(it.template)
    order = {c: sorted(set(v)) for c, v in ranks.items()}
    return torch.tensor([order[it.context].index(it.template) % 2 if it.template >= 0 else -1 for it in items])


def fit_context_neuron(model: TransformerBridge, unit: tuple[int, int], feats: Sequence[Tensor], items: Sequence[Item],
                       context: str, fit_contexts: Sequence[str], ones_row: Float[Tensor, " d"], gate_on: float,
                       grid: Sequence[float]) -> ContextRead:
    """Write context ``context``'s context neuron's gate and up rows (its output column is the marker, written
    later): gate = ``gate_on * ones_row`` (about ``gate_on`` on every token), up = :func:`template_cv_read` of
    the context from :func:`pooled_inputs` of the fitting contexts' prompts (named and neutral-reference;
    +1 for ``context``), blind to the BOS token's input. ``feats``: the neuron's MLP input per item.

    Returns the read (``w``, threshold ``t``), the pooled read ``F @ w`` of every prompt (``read``, NaN for
    neutral text), which prompts are the context's own (``own``) or another fitting context's (``other``), and
    the statistics."""
    gate_row = gate_on * ones_row.double()
    rows = [k for k, it in enumerate(items) if it.context in fit_contexts]
    F = pooled_inputs([feats[k] for k in rows], gate_row)
    y = torch.tensor([1.0 if items[k].context == context else -1.0 for k in rows], dtype=torch.float64)
    half = template_halves([items[k] for k in rows])
    bos = feats[rows[0]][0].double()
    w, t, cv = template_cv_read(F, y, half, grid, blind=bos)
    b = bos / bos.norm()
    w = w - (w @ b) * b                                   # already orthogonal up to rounding; exactly blind to BOS
    read = torch.full((len(items),), float("nan"), dtype=torch.float64)
    read[rows] = F @ w
    own = torch.tensor([it.context == context for it in items])
    other = torch.tensor([it.context in fit_contexts and it.context != context for it in items])
    l, i = unit
    with torch.no_grad():
        g, u, _ = mlp_weights(model, l)
        g[i] = gate_row.to(g)
        u[i] = w.to(u)
    r = read[own | other]
    on = r[(own[own | other])]
    off = r[(other[own | other])]
    stats = {**cv, "separation": float(on.mean() - off.mean()), "own_q05": float(on.quantile(0.05)),
             "others_q95": float(off.quantile(0.95))}
    return ContextRead(w, t, read, own, other, stats)


def pool_value_read(model: TransformerBridge, unit: tuple[int, int], feats: Sequence[Tensor], used: dict, group_size: int,
                    fit_rows: Bool[Tensor, " n"]) -> tuple[dict, Float[Tensor, " d"]]:
    """The pooling head's value direction ``e`` (the next lowest-variance one of its key-value head, counted in
    ``used``) and its read of the residual stream (a constraint row of the markers). ``feats``: the head's
    normalised input per item; ``sd``: the native standard deviation of the uniformly pooled value along ``e``
    over the fitting prompts ``fit_rows``."""
    l, h = unit
    dh = model.cfg.d_head
    kv = h // group_size
    w_v = model.blocks[l].attn.v.original_component.weight.detach().double()[kv * dh:(kv + 1) * dh]
    gamma = model.blocks[l].ln1.original_component.weight.detach().double()
    Xn = torch.cat(list(feats)).double()
    _, evec = torch.linalg.eigh(torch.cov((Xn @ w_v.T).T))
    k_used = used.setdefault((l, kv), 0)
    used[(l, kv)] = k_used + 1
    e = evec[:, k_used]
    native = torch.stack([(x.double() @ w_v.T @ e).mean() for x in feats])
    return {"e": e, "sd": float(native[fit_rows].std())}, (e @ w_v) * gamma


def write_context_marker(model: TransformerBridge, unit: tuple[int, int], grads: Sequence[Tensor], resid: Sequence[Tensor],
                         reads: Float[Tensor, "k d"], col: int, pooled: ContextRead, pk: dict, marker_snr: float,
                         side_effect: float) -> None:
    """The context neuron's output column: a marker written at every position, read 1 by the pooling head's value
    (constraint row ``col`` of ``reads``), 0 by every other planted read, and away from the directions that carry
    ``side_effect`` of the answer score's gradient energy at every position (``grads``); sized so the pooled
    separation of the context from the others is ``marker_snr`` native standard deviations of the pooled value.
    ``resid``: the residual stream at the pooling head's layer per item (for its typical norm)."""
    G = torch.cat([g[1:] for g in grads]).double()
    m = torch.linalg.pinv(torch.cat([reads, energy_basis(G, side_effect)]))[:, col]
    rms_all = float(torch.cat([x[1:] for x in resid]).pow(2).mean(-1).sqrt().median())
    sep = float(pooled.read[pooled.own].mean() - pooled.read[pooled.other].mean())
    a = marker_snr * pk["sd"] * rms_all / sep
    lc, ic = unit
    with torch.no_grad():
        mlp_weights(model, lc)[2][:, ic] = (a * m).to(mlp_weights(model, lc)[2])
    pk["marker_norm"] = float(a * m.norm())


def write_pooling_head(model: TransformerBridge, unit: tuple[int, int], feats: Sequence[Tensor], grads: Sequence[Tensor],
                       taken: list[Tensor], pk: dict) -> None:
    """The pooling head at unit scale: query 0 (uniform attention), output reading its value direction ``pk["e"]``
    and writing ``r``, the direction of the normalised MLP input (``feats``) with little native variance and little
    effect on the score (``grads``: its gradient at the last position after attention), beside ``taken``."""
    l, h = unit
    g2 = model.blocks[l].ln2.original_component.weight.detach().double()
    xhat = torch.cat([x[1:] for x in feats]).double() / g2
    Gl = torch.stack([g[-1] for g in grads]).double()
    r_dir, info = quiet_direction(torch.cov(xhat.T), Gl.T @ Gl / len(Gl), torch.stack(taken))
    pk |= {"r": r_dir, "u": r_dir / g2, "native_r": info["native_var"] ** 0.5}
    with torch.no_grad():
        q_w, o = attn_weights(model, l)
        rows = head_rows(torch.tensor([h]), model.cfg.d_head)
        q_w[rows] = 0.0
        o[:, rows] = torch.outer(r_dir, pk["e"]).to(o)


def scale_pooling_head(model: TransformerBridge, unit: tuple[int, int], feats: Sequence[Tensor], patterns: Sequence[Tensor],
                       items: Sequence[Item], pk: dict, pooled: ContextRead, marker_snr: float) -> dict[str, float]:
    """Scale the pooling head's output so that the context's prompts and the other fitting contexts' differ by
    ``2 * marker_snr`` native standard deviations along ``r`` at the last position (``feats``: the MLP input of
    its layer at unit scale). Returns the statistics, with the largest deviation of its attention from uniform."""
    l, h = unit
    proj = torch.tensor([float(x[-1].double() @ pk["u"]) for x in feats], dtype=torch.float64)
    diff = float(proj[pooled.own].mean() - proj[pooled.other].mean()) / 2
    if diff < 1e-4:
        raise RuntimeError(f"the pooling head L{l}H{h} carries no context signal to the last position (read {diff:.2e})")
    beta = marker_snr * pk["native_r"] / diff
    with torch.no_grad():
        attn_weights(model, l)[1][:, head_rows(torch.tensor([h]), model.cfg.d_head)] *= beta
    dev = max(float((x[h, -1, : len(it.tokens)] - 1 / len(it.tokens)).abs().max())
              for x, it in zip(patterns, items, strict=True))
    return {"scale": beta, "read_per_unit_scale": diff, "native_sd": pk["native_r"], "uniform_attention_max_deviation": dev}


def pooled_gate(ps: list[Tensor], pools: dict, c: str, f: list, items: list[Item], Xg: Float[Tensor, "n d"],
                yg: Float[Tensor, " n"], g2: Float[Tensor, " d"], ones_row: Float[Tensor, " d"], penalty: float,
                level: float) -> tuple[Float[Tensor, " d"], dict]:
    """The prediction-position gate row of context ``c``: a context-free read of the prediction position (blind to
    every chain's p (``ps``) and r (``pools``)), the pooling head's r_c and a constant, combined by
    :func:`and_gate` on the gate's rows ``Xg``, ``yg`` so it opens where both are on. Returns the row (of the
    MLP input) and the gate's statistics."""
    Xl, yl = stack_rows(f, items, lambda it, p: 1.0 if at_last(it, p) else (-1.0 if it.context == "neutral" or p % 3 == 0
                                                                          else None))
    lr = ridge(Xl, yl, penalty, balanced_weights(yl)) * g2
    Q, _ = torch.linalg.qr(torch.stack(ps + [pools[o]["r"] for o in pools]).T)
    lr = (lr - Q @ (Q.T @ lr)) / g2
    u_r = pools[c]["u"]
    reads = torch.stack([Xg.double() @ u_r, Xg.double() @ lr, Xg.double() @ ones_row], 1)
    coef, st = and_gate(reads, yg, yg > 0, level)
    return float(coef[0]) * u_r + float(coef[1]) * lr + float(coef[2]) * ones_row, st
