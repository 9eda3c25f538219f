"""Attribution patching (AtP): a first-order estimate of every patching effect at once.

``(a_other - a_run) · ∂LD/∂a`` on the run being patched (denoising: the
corrupted run, with clean activations as ``a_other``; noising the reverse), for
every head, MLP output, residual position and neuron: two forwards and one
backward per batch of equal-length pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ...core.families import require_causal
from ...core.hooks import canonical_name, hooked, run_with_cache
from ...core.params import frozen
from ...core.results import Result, make_meta
from ...core.sites import Site, hook_name
from ...data.pairs import PromptPairs
from ...eval.describe import spearman
from ...viz.method_figures import plot_grid
from .engine import PatchResult, ld_metric, patch_set

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge


@dataclass
class AtPResult(Result):
    """Attribution-patching estimates of the patching effect, per pair.

    ``estimates``: component -> ``[n_pairs, *grid]`` (NaN beyond a pair's length).
    """

    direction: str
    estimates: dict
    axes: dict
    meta: dict = field(default_factory=dict)
    result_type = "atp"

    def mean(self, component: str) -> Float[Tensor, ...]:
        """The estimate of ``component``'s cells averaged over pairs (NaN-aware)."""
        return torch.nanmean(self.estimates[component], 0)

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for comp, est in self.estimates.items():
            m = torch.nanmean(est, 0)
            for i in range(m.numel()):
                cell = np.unravel_index(i, m.shape)
                rows.append({"component": comp, **{a: int(c) for a, c in zip(self.axes[comp], cell, strict=True)},
                             "estimate": float(m.flatten()[i])})
        return pd.DataFrame(rows)

    def plot(self, component: str = "heads"):
        return plot_grid(self.mean(component), self.axes[component], f"AtP estimate ({component}, {self.direction})")


ATP_COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "heads", "heads_by_pos", "neurons")


def attribution_patch(model: TransformerBridge, pairs: PromptPairs, *, direction: str = "denoise",
                      components: Sequence[str] = ATP_COMPONENTS) -> AtPResult:
    """AtP estimates for every component at once (two forwards and one backward per length bucket)."""
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    require_causal(model, "attribution patching (last-position logit difference)")
    metric = ld_metric(model, pairs)
    L = model.cfg.n_layers
    kinds = set()
    for c in components:
        kinds.add({"resid_pre": "resid_pre", "attn_out": "attn_out", "mlp_out": "mlp_out", "heads": "z",
                   "heads_by_pos": "z", "neurons": "post"}[c])
    names = [hook_name(k, l) for k in sorted(kinds) for l in range(L)]
    max_len = max(len(t) for t in pairs.clean_tokens)
    H, d_mlp = model.cfg.n_heads, model.cfg.d_mlp
    grids = {"resid_pre": (L, max_len), "attn_out": (L, max_len), "mlp_out": (L, max_len), "heads": (L, H),
             "heads_by_pos": (L, max_len, H), "neurons": (L, d_mlp)}
    axes = {"resid_pre": ["layer", "pos"], "attn_out": ["layer", "pos"], "mlp_out": ["layer", "pos"],
            "heads": ["layer", "head"], "heads_by_pos": ["layer", "pos", "head"], "neurons": ["layer", "neuron"]}
    est = {c: torch.full((len(pairs),) + grids[c], float("nan"), dtype=torch.float32) for c in components}
    # pairs of equal length run together
    by_len: dict[int, list[int]] = {}
    for i, t in enumerate(pairs.clean_tokens):
        by_len.setdefault(len(t), []).append(i)
    device = model.cfg.device
    with frozen(model):
        for P, idx in by_len.items():
            clean = torch.stack([pairs.clean_tokens[i] for i in idx]).to(device)
            corr = torch.stack([pairs.corrupt_tokens[i] for i in idx]).to(device)
            grad_run, other_run = (corr, clean) if direction == "denoise" else (clean, corr)
            with torch.no_grad():
                _, other_cache = run_with_cache(model, other_run, names)
            acts: dict[str, Tensor] = {}
            grads: dict[str, Tensor] = {}

            def save_act(x, hook, acts=acts):
                acts[hook.name] = x.detach()

            def save_grad(g, hook, grads=grads):
                grads[hook.name] = g.detach()

            def leaf(x, hook):
                return x.detach().requires_grad_(True)

            fwd = [(hook_name("embed"), leaf)] + [(n, save_act) for n in names]
            bwd = [(n, save_grad) for n in names]
            with hooked(model, fwd, bwd):
                logits = model(grad_run)
                metric(logits[:, -1].float()).sum().backward()
            canon = {n: canonical_name(model, n) for n in names}
            for c in components:
                k = {"resid_pre": "resid_pre", "attn_out": "attn_out", "mlp_out": "mlp_out", "heads": "z",
                     "heads_by_pos": "z", "neurons": "post"}[c]
                for l in range(L):
                    n = hook_name(k, l)
                    a_run, g = acts[canon[n]], grads[canon[n]]
                    a_other = other_cache[n]
                    g = g.reshape(a_run.shape)
                    delta = (a_other - a_run) * g  # first-order change moving to the other run's value
                    if c in ("resid_pre", "attn_out", "mlp_out"):
                        est[c][idx, l, :P] = delta.sum(-1).float().cpu()
                    elif c == "heads":
                        est[c][idx, l] = delta.sum((1, 3)).float().cpu()
                    elif c == "heads_by_pos":
                        est[c][idx, l, :P] = delta.sum(-1).float().cpu()
                    elif c == "neurons":
                        est[c][idx, l] = delta.sum(1).float().cpu()
    meta = make_meta(model, context=pairs.context, axis=pairs.axis.name, direction=direction)
    return AtPResult(direction, est, {c: axes[c] for c in components}, meta)


@dataclass
class AtpAgreement:
    """How well attribution patching ranks what exact patching measures, for one component.

    Args:
        component: the swept component (``heads``, ``resid_pre``, ...).
        spearman: Spearman correlation of the AtP estimates with the exact effects (means over pairs).
        n_cells: cells patching can change (finite, non-zero exact effect).
        recall: k -> the share of the exact top-k cells (by absolute effect) in the AtP top-k.
    """

    component: str
    spearman: float
    n_cells: int
    recall: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The flat record the study summary and the report tables use (``recall@k`` keys)."""
        return {"component": self.component, "spearman": self.spearman, "n_cells": self.n_cells,
                **{f"recall@{k}": v for k, v in self.recall.items()}}


def atp_agreement(atp: AtPResult, exact: PatchResult, component: str, ks: Sequence[int] = (5, 10, 20)
                  ) -> AtpAgreement:
    """Spearman correlation of AtP with exact patching (mean over pairs), and recall of the exact top-k."""
    a = torch.nanmean(atp.estimates[component], 0).flatten().numpy()
    e = exact.mean_effect().flatten().numpy()
    ok = np.isfinite(a) & np.isfinite(e) & (e != 0)  # cells that patching can change
    a, e = a[ok], e[ok]
    recall = {k: len(set(np.argsort(-np.abs(e))[:k]) & set(np.argsort(-np.abs(a))[:k])) / k for k in ks
              if k <= len(e)}
    return AtpAgreement(component, spearman(a, e), int(ok.sum()), recall)


def prefilter_and_verify(model: TransformerBridge, pairs: PromptPairs, atp: AtPResult, component: str = "heads", k: int = 10,
                         direction: str | None = None) -> list[dict]:
    """AtP to prefilter, exact patching to verify: patch the AtP top-k cells exactly, one at a time."""
    direction = direction or atp.direction
    m = torch.nanmean(atp.estimates[component], 0)
    order = m.flatten().nan_to_num(0).abs().argsort(descending=True)[:k]
    cells = [np.unravel_index(int(i), m.shape) for i in order]
    out = []
    for cell in cells:
        if component == "heads":
            patch = Site(int(cell[0]), "z", (int(cell[1]),))
        elif component == "neurons":
            patch = Site(int(cell[0]), "post", (int(cell[1]),))
        else:
            kind = {"resid_pre": "resid_pre", "attn_out": "attn_out", "mlp_out": "mlp_out"}[component]
            patch = Site(int(cell[0]), kind, positions=(int(cell[1]),))
        res = patch_set(model, pairs, [patch], direction=direction)
        out.append({"cell": [int(c) for c in cell], "atp": float(m[cell]), "exact_effect": res.effect,
                    "ci_low": res.ci_low, "ci_high": res.ci_high})
    return out
