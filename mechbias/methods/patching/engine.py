"""Activation patching and attribution patching with a demographic counterfactual.

Clean and corrupted prompts differ only in the demographic slot (symmetric
token replacement: a group-B name of the same token length and the same other
attribute, see :func:`mechbias.data.pairs.make_pairs`). The metric is the
context's contrast score ``LD = logit(positive) - logit(negative)`` at the
last position (= the log-probability difference for single-token answers), per
pair, and its normalized form ``(LD - LD_corrupted) / (LD_clean - LD_corrupted)``
(0 = corrupted, 1 = clean), computed from means over pairs.

**Directions.** ``denoise``: run the corrupted prompt, patch in clean
activations (does this component suffice to restore the clean behaviour?).
``noise``: run the clean prompt, patch in corrupted activations (is it
necessary?). Every result says which.

**Exact patching, batched.** A *variant* is a set of atomic patches (layer,
hook, positions, head/neuron index). All variants of a sweep run as rows of a
few forward passes: a variant's row is created inside the pass at
``hook_resid_pre`` of its first patched layer (a copy of the unpatched row),
so it only runs the layers it can change. Positions where the source and base
activations are identical (everything before the name) are never patched: the
effect there is exactly 0. Rows whose first real difference is at position
``s`` reuse the base run's keys and values for positions ``< s`` (a frozen KV
cache) and run only the remaining tokens. Values equal TransformerLens'
``transformer_lens.patching`` helpers (tested to 1e-5).

Attribution patching lives in :mod:`mechbias.methods.patching.atp`; a
patch is a :class:`~mechbias.core.sites.Site` (layer, point, index, positions).
"""


from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ...core.families import require_causal
from ...core.fastpath import last_position_unembed, slice_cache, use_kv_cache
from ...core.hooks import hooked, run_with_cache
from ...core.params import frozen
from ...core.results import Record, Result, make_meta
from ...core.sites import Site, hook_name
from ...core.window import forward_window
from ...data.pairs import AlignmentError, PromptPairs
from ...data.prompts import single_token
from ...eval.describe import spearman
from ...eval.factors import factor_mean
from ...viz.method_figures import plot_patching

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

Sweep = Literal["resid_pre", "attn_out", "mlp_out", "heads", "heads_by_pos", "k_heads", "v_heads"]
SWEEPS: tuple[str, ...] = get_args(Sweep)

Variant = tuple[Site, ...]


# ----------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------

def _positions(p: Site, length: int) -> list[int]:
    if p.positions == "all":
        return list(range(length))
    if p.positions == "last":
        return [length - 1]
    return [q if q >= 0 else length + q for q in p.positions]


def _differs(p: Site, src: Tensor, base: Tensor) -> list[int]:
    """Absolute positions at which patch ``p`` would change the base activation."""
    pos = _positions(p, src.shape[0])
    out = []
    for q in pos:
        a, b = src[q], base[q]
        if p.index is not None:
            a, b = a[list(p.index)], b[list(p.index)]
        if not torch.equal(a, b):
            out.append(q)
    return out



def run_variants(
    model: TransformerBridge,
    base_tokens: Int[Tensor, " p"],
    src_tokens: Int[Tensor, " p"],
    variants: Sequence[Variant],
    metric: Callable[[Tensor], Tensor],
    *,
    max_rows: int = 96,
    use_kv: bool | None = None,
) -> tuple[Float[Tensor, " variants"], float]:
    """Metric of the base run with each variant's patches applied (one value per variant).

    Returns the values and the unpatched base metric. ``metric`` maps
    last-position logits ``[rows, vocab]`` to ``[rows]``.
    """
    if base_tokens.shape != src_tokens.shape:
        raise AlignmentError(
            f"clean and corrupted prompts must have the same token length for patching, got "
            f"{tuple(src_tokens.shape)} and {tuple(base_tokens.shape)}"
        )
    require_causal(model, "activation patching (last-position logit difference)")
    device = model.cfg.device
    P = len(base_tokens)
    hooks_needed = sorted({p.hook_name for v in variants for p in v})
    use_kv = use_kv_cache(model) if use_kv is None else use_kv
    with torch.no_grad():
        _, src_cache = run_with_cache(model, src_tokens[None].to(device), hooks_needed)
        if use_kv:
            base_logits, kv = model(base_tokens[None].to(device), return_type="logits_and_cache", use_cache=True)
        else:
            base_logits, kv = model(base_tokens[None].to(device)), None
        _, base_cache = run_with_cache(model, base_tokens[None].to(device), hooks_needed)
    base_value = float(metric(base_logits[:, -1].float())[0])
    src = {h: src_cache[h][0] for h in hooks_needed}
    base = {h: base_cache[h][0] for h in hooks_needed}

    values = torch.full((len(variants),), base_value, dtype=torch.float64)
    # start position of each variant; variants that change nothing keep the base value
    starts: dict[int, list[int]] = {}
    for i, v in enumerate(variants):
        first = [min(d) for p in v if (d := _differs(p, src[p.hook_name], base[p.hook_name]))]
        if first:
            s = min(first) if use_kv else 0
            s = min(s, P - 1)
            starts.setdefault(s, []).append(i)
    for s, idx in sorted(starts.items()):
        cache = slice_cache(kv, s) if (use_kv and s > 0) else None
        inp = base_tokens[s:][None].to(device)
        order = sorted(idx, key=lambda i: min(int(p.layer or 0) for p in variants[i]))
        for c in range(0, len(order), max_rows - 1):
            chunk = order[c : c + max_rows - 1]
            vals = _run_chunk(model, inp, cache, s, [variants[i] for i in chunk], src, metric)
            values[chunk] = vals.double().cpu()
    return values, base_value


def _run_chunk(model: TransformerBridge, inp, cache, s, variants, src, metric) -> Tensor:
    """One forward: row 0 unpatched, row k the k-th variant (sorted by first layer)."""
    first_layer = [min(p.layer for p in v) for v in variants]
    rows_at: dict[int, int] = {}
    for l in first_layer:
        rows_at[l] = rows_at.get(l, 0) + 1
    by_hook: dict[str, list[tuple[int, Site]]] = {}
    for r, v in enumerate(variants, start=1):
        for p in v:
            by_hook.setdefault(p.hook_name, []).append((r, p))
    hook_fns: dict[str, list] = {}
    for l, n in rows_at.items():
        name = hook_name("resid_pre", l)
        hook_fns.setdefault(name, []).append(("grow", n))
    for name, items in by_hook.items():
        hook_fns.setdefault(name, []).append(("patch", items))

    def make(ops):
        def fn(act, hook):
            out = act
            for op, arg in ops:
                if op == "grow":
                    out = torch.cat([out, out[:1].expand(arg, *out.shape[1:])], dim=0)
                else:
                    out = out.clone()
                    for r, p in arg:
                        pos = [q for q in _positions(p, s + out.shape[1]) if s <= q < s + out.shape[1]]
                        if not pos:
                            continue
                        local = torch.tensor(pos) - s
                        srcv = src[p.hook_name][torch.tensor(pos)]
                        if p.index is None:
                            out[r, local] = srcv.to(out.dtype)
                        else:
                            ix = torch.tensor(p.index, dtype=torch.long)
                            out[r, local[:, None], ix[None, :]] = srcv[:, ix].to(out.dtype)
            return out

        return fn

    # grow must run before patch at the same hook point: ops are listed in that order
    fwd = [(name, make(sorted(ops, key=lambda o: o[0] != "grow"))) for name, ops in hook_fns.items()]
    total = s + inp.shape[1]
    with torch.no_grad(), hooked(model, fwd), last_position_unembed(model, 1), forward_window(s, total):
        logits = model(inp, past_key_values=cache) if cache is not None else model(inp)
    return metric(logits[:, -1].float())[1:]


# ----------------------------------------------------------------------------
# sweeps
# ----------------------------------------------------------------------------

def sweep_variants(model: TransformerBridge, component: str, seq_len: int, neurons: Sequence[tuple[int, int]] | None = None
                   ) -> tuple[list, tuple, list[str]]:
    """Variants of a sweep, the grid shape they fill, and the axis names."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    KV = getattr(model.cfg, "n_key_value_heads", None) or H
    if component in ("resid_pre", "attn_out", "mlp_out"):
        vs = [(Site(l, component, positions=(p,)),) for l in range(L) for p in range(seq_len)]
        return vs, (L, seq_len), ["layer", "pos"]
    if component == "heads":
        return [(Site(l, "z", (h,)),) for l in range(L) for h in range(H)], (L, H), ["layer", "head"]
    if component == "heads_by_pos":
        vs = [(Site(l, "z", (h,), (p,)),) for l in range(L) for p in range(seq_len) for h in range(H)]
        return vs, (L, seq_len, H), ["layer", "pos", "head"]
    if component in ("k_heads", "v_heads"):
        kind = component[0]
        return [(Site(l, kind, (h,)),) for l in range(L) for h in range(KV)], (L, KV), ["layer", "kv_head"]
    if component == "neurons":
        if not neurons:
            raise ValueError("the neuron sweep needs a list of (layer, neuron) pairs")
        return [(Site(int(l), "post", (int(i),)),) for l, i in neurons], (len(neurons),), ["neuron"]
    raise ValueError(f"unknown component {component!r}; choose from {(*SWEEPS, 'neurons')}")


def ld_metric(model: TransformerBridge, pairs: PromptPairs):
    """The logit difference of the pairs' answers, as a function of the final logits."""
    pos = single_token(model, pairs.positive, "positive answer (patching needs single-token answers)")
    neg = single_token(model, pairs.negative, "negative answer (patching needs single-token answers)")
    return lambda lg: lg[:, pos] - lg[:, neg]


@dataclass
class PatchResult(Result):
    """Exact activation-patching results for one component type and direction.

    ``values``: ``[n_pairs, *grid]`` metric with the patch (NaN where a pair
    has no such cell, e.g. positions beyond a shorter prompt); ``ld_clean``,
    ``ld_corrupt``: unpatched metric per pair; ``axes``: grid axis names.
    """

    component: str
    direction: str
    axes: list[str]
    values: Tensor
    ld_clean: Tensor
    ld_corrupt: Tensor
    pairs: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    result_type = "patching"

    @property
    def ld_base(self) -> Float[Tensor, " pairs"]:
        """The unpatched run's logit difference, per pair."""
        return self.ld_corrupt if self.direction == "denoise" else self.ld_clean

    def effect(self) -> Float[Tensor, "pairs ..."]:
        """Patched minus unpatched metric, per pair and cell (log-odds units)."""
        shape = (-1,) + (1,) * (self.values.dim() - 1)
        return self.values - self.ld_base.view(shape)

    def normalized(self) -> Float[Tensor, ...]:
        """Mean over pairs, normalized: 0 = corrupted, 1 = clean."""
        denom = float(self.ld_clean.mean() - self.ld_corrupt.mean())
        return (torch.nanmean(self.values, 0) - float(self.ld_corrupt.mean())) / denom

    def mean_effect(self) -> Float[Tensor, ...]:
        """The mean over pairs of :meth:`effect`, per cell."""
        return torch.nanmean(self.effect(), 0)

    def top(self, k: int = 10, n_boot: int = 1000, seed: int = 0) -> list[dict]:
        """The k cells with the largest absolute mean effect, with a 95% CI over the pairs' templates and names."""
        eff = self.effect()
        m = torch.nanmean(eff, 0)
        flat = m.flatten().nan_to_num(0.0)
        order = flat.abs().argsort(descending=True)[:k]
        norm = self.normalized().flatten()
        out = []
        for i in order.tolist():
            cell = np.unravel_index(i, m.shape)
            mean, lo, hi = factor_mean(eff.reshape(eff.shape[0], -1)[:, i].numpy(), pair_factors(self.pairs),
                                       n_boot=n_boot, seed=seed)
            out.append({**{a: int(c) for a, c in zip(self.axes, cell, strict=True)}, "effect": mean, "ci_low": lo,
                        "ci_high": hi, "normalized": float(norm[i])})
        return out

    def layer_profile(self) -> Float[Tensor, " layer"]:
        """Per layer: the largest absolute mean effect over the other axes (signed)."""
        m = self.mean_effect().nan_to_num(0.0)
        flat = m.reshape(m.shape[0], -1)
        idx = flat.abs().argmax(1)
        return flat.gather(1, idx[:, None])[:, 0]

    def to_dataframe(self):
        import pandas as pd

        m, norm = self.mean_effect(), self.normalized()
        rows = []
        for i in range(m.numel()):
            cell = np.unravel_index(i, m.shape)
            rows.append({**{a: int(c) for a, c in zip(self.axes, cell, strict=True)}, "effect": float(m.flatten()[i]),
                         "normalized": float(norm.flatten()[i])})
        return pd.DataFrame(rows)

    def plot(self, template: int | None = None):
        return plot_patching(self, template=template)


def patch_sweep(
    model: TransformerBridge,
    pairs: PromptPairs,
    component: str = "resid_pre",
    *,
    direction: str = "denoise",
    neurons: Sequence[tuple[int, int]] | None = None,
    max_rows: int = 96,
    progress: bool = False,
) -> PatchResult:
    """Exact patching sweep over ``component`` (see :data:`SWEEPS`, or ``"neurons"``) for every pair."""
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    metric = ld_metric(model, pairs)
    max_len = max(len(t) for t in pairs.clean_tokens)
    _, grid, axes = sweep_variants(model, component, max_len, neurons)
    values = torch.full((len(pairs), *grid), float("nan"), dtype=torch.float64)
    ld_clean = torch.zeros(len(pairs), dtype=torch.float64)
    ld_corr = torch.zeros(len(pairs), dtype=torch.float64)
    it = range(len(pairs))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"patching {component}", disable=None)
    with frozen(model):
        for i in it:
            clean, corr = pairs.clean_tokens[i], pairs.corrupt_tokens[i]
            base, src = (corr, clean) if direction == "denoise" else (clean, corr)
            variants, g, _ = sweep_variants(model, component, len(clean), neurons)
            vals, base_value = run_variants(model, base, src, variants, metric, max_rows=max_rows)
            with torch.no_grad():
                other = float(metric(model(src[None].to(model.cfg.device))[:, -1].float())[0])
            ld_corr[i], ld_clean[i] = (base_value, other) if direction == "denoise" else (other, base_value)
            view = values[i]
            if len(g) == len(grid) and g == grid:
                view.copy_(vals.view(grid))
            else:  # shorter prompt: fill the leading positions
                sub = vals.view(g)
                view[tuple(slice(0, n) for n in g)] = sub
    info = [{"template": c.template, "clean": c.person.name, "corrupt": r.person.name,
             "tokens": model.to_str_tokens(pairs.clean_tokens[k]), "diff": pairs.diff_positions(k)}
            for k, (c, r) in enumerate(zip(pairs.clean, pairs.corrupt, strict=True))]
    meta = make_meta(model, context=pairs.context, axis=pairs.axis.name, component=component, direction=direction,
                     clean_group=pairs.axis.groups[pairs.clean[0].group] if pairs.clean else None)
    return PatchResult(component, direction, axes, values, ld_clean, ld_corr, info, meta)


def pair_factors(infos: Sequence[dict]) -> dict[str, list[list]]:
    """The crossed factors of prompt pairs (template, clean name, corrupted name) for intervals that resample
    templates and names rather than pairs."""
    return {"template": [[i["template"]] for i in infos], "name_a": [[i["clean"]] for i in infos],
            "name_b": [[i["corrupt"]] for i in infos]}


@dataclass
class SetPatch(Record):
    """Components patched together (:func:`patch_set`).

    Args:
        direction: ``"denoise"`` (clean activations into the corrupted run) or ``"noise"``.
        n_patches, n_pairs: the components and prompt pairs.
        effect: the mean change of the logit difference, with ``ci_low``/``ci_high`` (95%, templates and names
            resampled).
        normalized: the patched logit difference between the corrupted (0) and clean (1) runs' means.
        values: per pair, the patched logit difference.
        ld_clean, ld_corrupt: per pair, the clean and corrupted runs' logit differences.
    """

    direction: str
    n_patches: int
    n_pairs: int
    effect: float
    ci_low: float
    ci_high: float
    normalized: float
    values: list[float]
    ld_clean: list[float]
    ld_corrupt: list[float]

    def summary(self) -> dict[str, Any]:
        """The fields without the per-pair lists."""
        return {k: v for k, v in self.as_dict().items() if k not in ("values", "ld_clean", "ld_corrupt")}


def patch_set(model: TransformerBridge, pairs: PromptPairs, patches: Sequence[Site], *, direction: str = "denoise") -> SetPatch:
    """Patch a set of components together (e.g. the top heads of a sweep, or IG² neurons).

    Returns the per-pair metric and the mean effect / normalized value with a 95% CI over the pairs'
    templates and names (:func:`~mechbias.eval.factors.factor_mean`).
    """
    metric = ld_metric(model, pairs)
    vals, base_vals, other_vals = [], [], []
    with frozen(model):
        for i in range(len(pairs)):
            clean, corr = pairs.clean_tokens[i], pairs.corrupt_tokens[i]
            base, src = (corr, clean) if direction == "denoise" else (clean, corr)
            v, b = run_variants(model, base, src, [tuple(patches)], metric)
            with torch.no_grad():
                o = float(metric(model(src[None].to(model.cfg.device))[:, -1].float())[0])
            vals.append(float(v[0]))
            base_vals.append(b)
            other_vals.append(o)
    va, ba, oa = np.array(vals), np.array(base_vals), np.array(other_vals)
    clean_ld, corr_ld = (oa, ba) if direction == "denoise" else (ba, oa)
    eff, lo, hi = factor_mean(va - ba, pair_factors([{"template": c.template, "clean": c.person.name,
                                                     "corrupt": r.person.name} for c, r in zip(pairs.clean,
                                                                                               pairs.corrupt, strict=True)]))
    return SetPatch(direction, len(patches), len(pairs), eff, lo, hi,
                    float((va.mean() - corr_ld.mean()) / (clean_ld.mean() - corr_ld.mean())), va.tolist(),
                    clean_ld.tolist(), corr_ld.tolist())


# ----------------------------------------------------------------------------
# attribution patching
# ----------------------------------------------------------------------------



def compare_contexts(results: dict[str, PatchResult]):
    """Rank correlation (Spearman) of the mean effects of a component between contexts."""
    import pandas as pd

    names = list(results)
    rows = []
    for a in names:
        for b in names:
            ea = results[a].mean_effect().flatten().numpy()
            eb = results[b].mean_effect().flatten().numpy()
            ok = np.isfinite(ea) & np.isfinite(eb)
            rows.append({"a": a, "b": b, "spearman": spearman(ea[ok], eb[ok]) if a != b else 1.0})
    return pd.DataFrame(rows)
