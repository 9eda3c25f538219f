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
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.params import mlp_weights
from .linalg import centered_ridge
from .reads import Item

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

__all__ = ["and_gate", "fit_context_neuron", "pooled_inputs", "template_cv_read", "template_halves"]


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


def template_cv_read(F: Float[Tensor, "n d"], y: Float[Tensor, " n"], half: Tensor, grid: Sequence[float],
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


def and_gate(reads: Float[Tensor, "n k"], y: Float[Tensor, " n"], on: Float[Tensor, " n"], level: float
             ) -> tuple[Float[Tensor, " k"], dict]:
    """Coefficients of a gate that combines ``k`` scalar reads (the last one a constant 1): a balanced least
    squares fit of ``y`` (+1 where the gate must open, -1 elsewhere), scaled so that the rows ``on`` have a
    median pre-activation of ``level``."""
    from .linalg import balanced_weights

    X, yd = reads.double(), y.double()
    wt = balanced_weights(yd)
    coef = torch.linalg.lstsq(X * wt.sqrt()[:, None], yd * wt.sqrt()).solution
    pre = X @ coef
    coef = coef * level / float(pre[on].median())
    pre = X @ coef
    stats = {"on_median": float(pre[on].median()), "on_q05": float(pre[on].quantile(0.05)),
             "off_q95": float(pre[y <= 0].quantile(0.95)), "coefficients": [float(c) for c in coef]}
    return coef, stats


def template_halves(items: Sequence[Item]) -> Tensor:
    """0 / 1 per item: the parity of its template's rank among its context's templates (-1: no template)."""
    ranks: dict[str, list] = {}
    for it in items:
        if it.template >= 0:
            ranks.setdefault(it.context, []).append(it.template)
    order = {c: sorted(set(v)) for c, v in ranks.items()}
    return torch.tensor([order[it.context].index(it.template) % 2 if it.template >= 0 else -1 for it in items])


def fit_context_neuron(model: TransformerBridge, unit: tuple[int, int], feats: Sequence[Tensor], items: Sequence[Item],
                       context: str, fit_contexts: Sequence[str], ones_row: Float[Tensor, " d"], gate_on: float,
                       grid: Sequence[float]) -> dict:
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
    return {"w": w, "t": t, "read": read, "own": own, "other": other, "stats": stats}
