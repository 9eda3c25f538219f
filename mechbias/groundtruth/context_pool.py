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

__all__ = ["ContextRead", "and_gate", "blind_row", "fit_context_neuron", "pool_value_read", "pooled_gate", "pooled_inputs",
           "position_read", "ramp", "ramp_gate", "ramp_window", "scale_pooling_head", "template_cv_read", "template_halves", "template_oof",
           "write_context_marker", "write_eraser", "write_pooling_head"]


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


def template_oof(F: Float[Tensor, "n d"], y: Float[Tensor, " n"], half: Int[Tensor, " n"], lam: float,
                 blind: Float[Tensor, " d"] | None = None) -> Float[Tensor, " n"]:
    """Out-of-fold reads: each half read by the centred ridge read (penalty ``lam``) fitted on the other half, and
    standardised by that fit's own training rows (median of the negatives 0, of the positives 1). This is what a
    read fitted on these templates gives on templates it has not seen, in the units a gate uses."""
    F = F.double()
    if blind is not None:
        b = blind.double() / blind.double().norm()
        F = F - (F @ b)[:, None] * b
    out = torch.full((len(F),), float("nan"), dtype=torch.float64)
    for k in (0, 1):
        tr, te = half != k, half == k
        w, _ = centered_ridge(F[tr], y[tr], lam)
        r = F[tr] @ w
        m0, m1 = float(r[y[tr] <= 0].median()), float(r[y[tr] > 0].median())
        out[te] = (F[te] @ w - m0) / (m1 - m0)
    return out


def ramp(x: Float[Tensor, " n"], t1: float, t2: float) -> Float[Tensor, " n"]:
    """0 below ``t1``, 1 above ``t2``, linear between: the output of a :func:`ramp_gate` pair, per unit."""
    return ((x - t1) / (t2 - t1)).clamp(0.0, 1.0)


def ramp_window(own: Float[Tensor, " n"], other: Float[Tensor, " m"], quantiles: Sequence[float] = (0.5, 0.75, 0.9, 0.95),
                widths: Sequence[float] = (0.1, 0.2, 0.3, 0.5), max_other: float = 0.1,
                groups: Int[Tensor, " m"] | None = None) -> tuple[float, float, dict]:
    """The ramp's window ``(t1, t2)`` from standardised reads of the context's own prompts (``own``) and the other
    fitting contexts' (``other``), both out of fold (:func:`template_oof`): ``t1`` a quantile of ``other``, ``t2 = t1
    + width``; the pair with the largest mean ramp on ``own`` minus that on ``other``, among those whose mean ramp on
    ``other`` is at most ``max_other`` (none: the one with the least on ``other``). With ``groups`` (which other
    context each row of ``other`` is), the bound and the "least" hold for the most opened other context. Returns
    ``t1``, ``t2`` and the table of every pair."""
    gs = torch.zeros(len(other), dtype=torch.long) if groups is None else groups
    table = []
    for q in quantiles:
        t1 = float(other.quantile(q))
        for wd in widths:
            r = ramp(other, t1, t1 + wd)
            a, b = float(ramp(own, t1, t1 + wd).mean()), float(r.mean())
            worst = max(float(r[gs == k].mean()) for k in gs.unique())
            table.append({"quantile": q, "t1": t1, "t2": t1 + wd, "own": a, "other": b, "worst_other": worst})
    ok = [r for r in table if r["worst_other"] <= max_other]
    best = (max(ok, key=lambda r: r["own"] - r["other"]) if ok else min(table, key=lambda r: r["worst_other"]))
    return best["t1"], best["t2"], {"chosen": best, "table": table}


def blind_row(row: Float[Tensor, " d"], g2: Float[Tensor, " d"], writes: Sequence[Tensor]) -> Float[Tensor, " d"]:
    """A row of an MLP input (``g2 * x / rms``) made blind to the residual directions ``writes``: the row reads
    ``(row * g2) . x / rms``, so ``row * g2`` is projected off their span."""
    Q, _ = torch.linalg.qr(torch.stack([w.double() for w in writes]).T)
    v = row.double() * g2.double()
    return (v - Q @ (Q.T @ v)) / g2.double()


def position_read(f: list, items: list[Item], penalty: float, g2: Float[Tensor, " d"], writes: Sequence[Tensor]
                  ) -> tuple[Float[Tensor, "n d"], Float[Tensor, " n"], Float[Tensor, " d"]]:
    """A context-free read of the prediction position (+1 there, -1 at neutral text and every third other position;
    a balanced ridge fit, penalty ``penalty``), made blind to ``writes`` (:func:`blind_row`). Returns its fitting
    rows, their targets and the read."""
    Xl, yl = stack_rows(f, items, lambda it, p: 1.0 if at_last(it, p) else (-1.0 if it.context == "neutral" or p % 3 == 0
                                                                          else None))
    return Xl, yl, blind_row(ridge(Xl, yl, penalty, balanced_weights(yl)), g2, writes)


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
    oof: Float[Tensor, " n"] | None = None       # out-of-fold standardised reads (template_oof), NaN off the fit


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
    oof = torch.full((len(items),), float("nan"), dtype=torch.float64)
    oof[rows] = template_oof(F, y, half, cv["penalty"], blind=bos)
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
    return ContextRead(w, t, read, own, other, stats, oof)


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
    _, _, lr = position_read(f, items, penalty, g2, ps + [pools[o]["r"] for o in pools])
    u_r = pools[c]["u"]
    reads = torch.stack([Xg.double() @ u_r, Xg.double() @ lr, Xg.double() @ ones_row], 1)
    coef, st = and_gate(reads, yg, yg > 0, level)
    return float(coef[0]) * u_r + float(coef[1]) * lr + float(coef[2]) * ones_row, st


def ramp_gate(ps: list[Tensor], pools: dict, c: str, f: list, items: list[Item], g2: Float[Tensor, " d"],
              ones_row: Float[Tensor, " d"], penalty: float, level: float, pooled: ContextRead, max_other: float
              ) -> tuple[Float[Tensor, "2 d"], dict]:
    """Two gate rows (A, B) of context ``c``'s prediction neurons that together make a saturating ramp: a pair of
    SiLU neurons with the same up row, one adding and one subtracting, gives ``silu(A) - silu(B)``, which rises
    from 0 where the standardised context read ``c_hat`` passes ``t1`` to ``level`` where it passes ``t2`` and
    stays there (a single SiLU keeps rising, so a gate fitted to the fitting templates' read gives new templates,
    where the read is weaker, a fraction of it). ``A = K (c_hat - t1) + M (p_hat - 1)``, ``B`` the same with ``t2``,
    ``K = level / (t2 - t1)``; ``p_hat`` is a context-free read of the prediction position (1 there, 0 elsewhere), and
    ``M`` closes both rows at every other position. ``c_hat`` is the pooling head's ``r_c`` at the last position,
    standardised (other fitting contexts' median 0, own 1); the window is chosen by :func:`ramp_window` on the
    context read's out-of-fold values (templates it was not fitted on), bounding the most opened other context.
    Every row is blind to every chain's ``p``
    and ``r`` (:func:`blind_row`). ``f``: the MLP input per item."""
    writes = ps + [pools[o]["r"] for o in pools]
    Xl, yl, lr = position_read(f, items, penalty, g2, writes)
    one = blind_row(ones_row, g2, writes)
    u_r = pools[c]["u"]
    last_c = stack_rows(f, items, lambda it, p: 1.0 if at_last(it, p) and it.context == c else
                        (-1.0 if at_last(it, p) else None))
    Xc, yc = last_c
    rc, on1 = Xc.double() @ u_r, Xc.double() @ one
    pl, nl = Xl.double() @ lr, Xl.double() @ one
    # c_hat = (u_r . x - m0 * one . x) / (m1 - m0): the constant through the "reads about 1" row, as every constant here
    m0, m1 = float((rc / on1)[yc <= 0].median()), float((rc / on1)[yc > 0].median())
    c_row = (u_r - m0 * one) / (m1 - m0)
    s0, s1 = float((pl / nl)[yl <= 0].median()), float((pl / nl)[yl > 0].median())
    p_row = (lr - s0 * one) / (s1 - s0)
    ok = pooled.own | pooled.other
    assert pooled.oof is not None
    names = sorted({it.context for it, o in zip(items, pooled.other.tolist(), strict=True) if o})
    groups = torch.tensor([names.index(it.context) for it, o in zip(items, pooled.other.tolist(), strict=True) if o])
    t1, t2, window = ramp_window(pooled.oof[pooled.own], pooled.oof[pooled.other], max_other=max_other, groups=groups)
    K = level / (t2 - t1)
    X_all, _ = stack_rows(f, items, lambda it, p: 1.0)
    ch_all, ph_all = X_all.double() @ c_row, X_all.double() @ p_row
    nonlast = torch.tensor([not at_last(it, p) for it in items for p in range(1, len(it.tokens))])
    # M: every non-prediction position's A at most -4 (silu(-4) = -0.07), the 99.9th percentile of K (c_hat - t1)
    # there against the median of M (1 - p_hat)
    need = (K * (ch_all[nonlast] - t1) + 4.0) / (1 - ph_all[nonlast]).clamp(min=0.05)
    M = max(float(need.quantile(0.999)), 0.0)
    rows = torch.stack([K * c_row + M * p_row - (K * t1 + M) * one, K * c_row + M * p_row - (K * t2 + M) * one])
    ch, ph = Xc.double() @ c_row, Xc.double() @ p_row
    pre = Xc.double() @ rows.T
    out = torch.nn.functional.silu(pre[:, 0]) - torch.nn.functional.silu(pre[:, 1])
    pre_n = X_all[nonlast].double() @ rows.T
    out_n = torch.nn.functional.silu(pre_n[:, 0]) - torch.nn.functional.silu(pre_n[:, 1])
    stats = {"t1": t1, "t2": t2, "K": K, "M": M, "window": window["chosen"], "window_table": window["table"],
             "oof_own_median": float(pooled.oof[pooled.own].median()),
             "oof_other_q95": float(pooled.oof[pooled.other].quantile(0.95)),
             "c_hat_own_q05": float(ch[yc > 0].quantile(0.05)), "c_hat_other_q95": float(ch[yc <= 0].quantile(0.95)),
             "p_hat_last_q01": float(ph.quantile(0.01)), "one_read_last_sd": float(on1.std() / on1.mean()),
             "ramp_own_mean": float(out[yc > 0].mean() / level), "ramp_other_mean": float(out[yc <= 0].mean() / level),
             "ramp_nonlast_abs_q999": float(out_n.abs().quantile(0.999) / level), "fit_rows": int(ok.sum())}
    return rows, stats


def write_eraser(model: TransformerBridge, unit: tuple[int, int], p: Float[Tensor, " d"], feats: Sequence[Tensor],
                 resid: Sequence[Tensor], items: Sequence[Item], writes: Sequence[Tensor], level: float) -> dict[str, float]:
    """An MLP neuron in the group head's layer that removes what the head wrote along ``p`` at the prediction
    position once the prediction neurons of the same MLP have read it, so the layers above do not see it there:
    gate = ``level`` times a row that reads about 1 at the prediction position (blind to ``writes``), up = ``alpha p / g2 + gamma`` (that row),
    output = ``-p``. ``alpha`` and ``gamma`` are the least-squares fit of ``p . x - mu`` at the prediction positions
    of every fitting prompt (``x`` the residual stream before the MLP; ``mu`` its median at the prediction position of
    the prompts without a name, where the head writes nothing). The neuron reads ``x`` after the layer norm, so it
    erases in proportion to ``1 / rms(x)``: exact only where the stream's size is the one fitted, which the prompts'
    shared ending ("Answer:") makes nearly so at the prediction position and not elsewhere. ``feats``: the MLP input
    per item, ``resid``: the residual stream there. Returns the standard deviation of ``p . x - mu`` at the prediction
    positions of named prompts before and after (and at their other positions), and the fit."""
    l, i = unit
    g2 = model.blocks[l].ln2.original_component.weight.detach().double()
    keep = [k for k, it in enumerate(items) if it.context != "neutral"]
    X = torch.stack([feats[k][-1] for k in keep]).double()
    mean_in = X.mean(0)                                   # the prediction position's mean input: reads about 1 there
    one = blind_row(mean_in / mean_in.norm() ** 2, g2, writes)
    u_p = p.double() / g2
    t = torch.stack([resid[k][-1] for k in keep]).double() @ p.double()
    named = torch.tensor([items[k].sign != 0 for k in keep])
    mu = float(t[~named].median())
    s = torch.nn.functional.silu(level * (X @ one))
    A = torch.stack([s * (X @ u_p), s * (X @ one)], 1)
    coef = torch.linalg.lstsq(A, (t - mu)[:, None]).solution[:, 0]
    left = t - mu - A @ coef
    Xo = torch.cat([feats[k][1:-1] for k in keep if items[k].sign != 0]).double()
    to = torch.cat([resid[k][1:-1] for k in keep if items[k].sign != 0]).double() @ p.double() - mu
    so = torch.nn.functional.silu(level * (Xo @ one))
    lo = to - torch.stack([so * (Xo @ u_p), so * (Xo @ one)], 1) @ coef
    with torch.no_grad():
        g, u, o = mlp_weights(model, l)
        g[i] = (level * one).to(g)
        u[i] = (float(coef[0]) * u_p + float(coef[1]) * one).to(u)
        o[:, i] = (-p.double()).to(o)
    return {"sd_last_before": float((t - mu)[named].std()), "sd_last_after": float(left[named].std()),
            "sd_other_positions_before": float(to.std()), "sd_other_positions_after": float(lo.std()),
            "gate_read_last_sd": float((X @ one).std()), "alpha": float(coef[0]), "gamma": float(coef[1]), "mu": mu}
