"""Activation patching and attribution patching with a demographic counterfactual.

Clean and corrupted prompts differ only in the demographic slot (symmetric
token replacement: a group-B name of the same token length and the same other
attribute, see :func:`mechbias.contexts.make_pairs`). The metric is the
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

**Attribution patching (AtP).** ``(a_clean - a_corrupted) · ∂LD/∂a`` on the
corrupted run (denoising; noising uses the clean run and the opposite
difference), for every head, MLP output, residual position and neuron at once:
two forwards and one backward per batch of pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .contexts import AlignmentError, PromptPairs, load_context, make_pairs, single_token
from .models import frozen, supports_kv_cache
from .results import Result, make_meta
from .runner import _FROZEN, _frozen_layer_class, last_position_unembed
from .stats import bootstrap_mean, spearman

HOOKS = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "z": "blocks.{l}.attn.hook_z",
    "k": "blocks.{l}.attn.hook_k",
    "v": "blocks.{l}.attn.hook_v",
    "post": "blocks.{l}.mlp.hook_post",
}
SWEEPS = ("resid_pre", "attn_out", "mlp_out", "heads", "heads_by_pos", "k_heads", "v_heads")


@dataclass(frozen=True)
class Patch:
    """Copy the source activation into the base run at ``hook`` of ``layer``.

    ``positions``: absolute positions (None = all); ``index``: indices on the
    axis after the position axis (a head for ``z``/``k``/``v``, neurons for
    ``post``; None = the whole vector).
    """

    layer: int
    kind: str
    positions: tuple[int, ...] | None = None
    index: tuple[int, ...] | None = None

    @property
    def hook(self) -> str:
        return HOOKS[self.kind].format(l=self.layer)


Variant = tuple[Patch, ...]


# ----------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------

def _sel(p: Patch, positions: Tensor | slice):
    idx = slice(None) if p.index is None else torch.tensor(p.index, dtype=torch.long)
    return positions, idx


def _differs(p: Patch, src: Tensor, base: Tensor) -> list[int]:
    """Absolute positions at which patch ``p`` would change the base activation."""
    pos = range(src.shape[0]) if p.positions is None else p.positions
    out = []
    for q in pos:
        a, b = src[q], base[q]
        if p.index is not None:
            a, b = a[list(p.index)], b[list(p.index)]
        if not torch.equal(a, b):
            out.append(q)
    return out


def _slice_cache(cache, s: int):
    """A frozen copy of a base-run KV cache holding the first ``s`` positions."""
    import copy

    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        lay = copy.copy(layer)
        lay.keys = layer.keys[..., :s, :]
        lay.values = layer.values[..., :s, :]
        cls = type(layer).__mro__[1] if type(layer).__name__ == "FrozenPrefixLayer" else type(layer)
        if cls not in _FROZEN:
            _FROZEN[cls] = _frozen_layer_class(cls)
        lay.__class__ = _FROZEN[cls]
        new.layers.append(lay)
    return new


def run_variants(
    model,
    base_tokens: Tensor,
    src_tokens: Tensor,
    variants: Sequence[Variant],
    metric: Callable[[Tensor], Tensor],
    *,
    max_rows: int = 96,
    use_kv: bool | None = None,
) -> tuple[Tensor, float]:
    """Metric of the base run with each variant's patches applied (one value per variant).

    Returns the values and the unpatched base metric. ``metric`` maps
    last-position logits ``[rows, vocab]`` to ``[rows]``.
    """
    if base_tokens.shape != src_tokens.shape:
        raise AlignmentError(
            f"clean and corrupted prompts must have the same token length for patching, got "
            f"{tuple(src_tokens.shape)} and {tuple(base_tokens.shape)}"
        )
    device = model.cfg.device
    P = len(base_tokens)
    hooks_needed = sorted({p.hook for v in variants for p in v})
    use_kv = supports_kv_cache(model) if use_kv is None else use_kv
    with torch.no_grad():
        _, src_cache = model.run_with_cache(src_tokens[None].to(device), names_filter=hooks_needed)
        if use_kv:
            base_logits, kv = model(base_tokens[None].to(device), return_type="logits_and_cache", use_cache=True)
        else:
            base_logits, kv = model(base_tokens[None].to(device)), None
        _, base_cache = model.run_with_cache(base_tokens[None].to(device), names_filter=hooks_needed)
    base_value = float(metric(base_logits[:, -1].float())[0])
    src = {h: src_cache[h][0] for h in hooks_needed}
    base = {h: base_cache[h][0] for h in hooks_needed}

    values = torch.full((len(variants),), base_value, dtype=torch.float64)
    # start position of each variant; variants that change nothing keep the base value
    starts: dict[int, list[int]] = {}
    for i, v in enumerate(variants):
        first = [min(d) for p in v if (d := _differs(p, src[p.hook], base[p.hook]))]
        if first:
            s = min(first) if use_kv else 0
            s = min(s, P - 1)
            starts.setdefault(s, []).append(i)
    for s, idx in sorted(starts.items()):
        cache = _slice_cache(kv, s) if (use_kv and s > 0) else None
        inp = base_tokens[s:][None].to(device)
        order = sorted(idx, key=lambda i: min(p.layer for p in variants[i]))
        for c in range(0, len(order), max_rows - 1):
            chunk = order[c : c + max_rows - 1]
            vals = _run_chunk(model, inp, cache, s, [variants[i] for i in chunk], src, metric)
            values[chunk] = vals.double().cpu()
    return values, base_value


def _run_chunk(model, inp, cache, s, variants, src, metric) -> Tensor:
    """One forward: row 0 unpatched, row k the k-th variant (sorted by first layer)."""
    first_layer = [min(p.layer for p in v) for v in variants]
    rows_at: dict[int, int] = {}
    for l in first_layer:
        rows_at[l] = rows_at.get(l, 0) + 1
    by_hook: dict[str, list[tuple[int, Patch]]] = {}
    for r, v in enumerate(variants, start=1):
        for p in v:
            by_hook.setdefault(p.hook, []).append((r, p))
    hook_fns = {}
    for l, n in rows_at.items():
        name = HOOKS["resid_pre"].format(l=l)
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
                        pos = range(s, s + out.shape[1]) if p.positions is None else \
                            [q for q in p.positions if s <= q < s + out.shape[1]]
                        pos = list(pos)
                        if not pos:
                            continue
                        local = torch.tensor(pos) - s
                        srcv = src[p.hook][torch.tensor(pos)]
                        if p.index is None:
                            out[r, local] = srcv.to(out.dtype)
                        else:
                            ix = torch.tensor(p.index, dtype=torch.long)
                            out[r, local[:, None], ix[None, :]] = srcv[:, ix].to(out.dtype)
            return out

        return fn

    # grow must run before patch at the same hook point: ops are listed in that order
    fwd = [(name, make(sorted(ops, key=lambda o: o[0] != "grow"))) for name, ops in hook_fns.items()]
    from .runner import forward_window

    total = s + inp.shape[1]
    with torch.no_grad(), model.hooks(fwd_hooks=fwd), last_position_unembed(model, 1), forward_window(s, total):
        logits = model(inp, past_key_values=cache) if cache is not None else model(inp)
    return metric(logits[:, -1].float())[1:]


# ----------------------------------------------------------------------------
# sweeps
# ----------------------------------------------------------------------------

def sweep_variants(model, component: str, seq_len: int, neurons: Sequence[tuple[int, int]] | None = None
                   ) -> tuple[list[Variant], tuple[int, ...], list[str]]:
    """Variants of a sweep, the grid shape they fill, and the axis names."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    KV = getattr(model.cfg, "n_key_value_heads", None) or H
    if component in ("resid_pre", "attn_out", "mlp_out"):
        vs = [(Patch(l, component, (p,)),) for l in range(L) for p in range(seq_len)]
        return vs, (L, seq_len), ["layer", "pos"]
    if component == "heads":
        return [(Patch(l, "z", None, (h,)),) for l in range(L) for h in range(H)], (L, H), ["layer", "head"]
    if component == "heads_by_pos":
        vs = [(Patch(l, "z", (p,), (h,)),) for l in range(L) for p in range(seq_len) for h in range(H)]
        return vs, (L, seq_len, H), ["layer", "pos", "head"]
    if component in ("k_heads", "v_heads"):
        kind = component[0]
        return [(Patch(l, kind, None, (h,)),) for l in range(L) for h in range(KV)], (L, KV), ["layer", "kv_head"]
    if component == "neurons":
        if not neurons:
            raise ValueError("the neuron sweep needs a list of (layer, neuron) pairs")
        return [(Patch(int(l), "post", None, (int(i),)),) for l, i in neurons], (len(neurons),), ["neuron"]
    raise ValueError(f"unknown component {component!r}; choose from {SWEEPS + ('neurons',)}")


def _ld_metric(model, pairs: PromptPairs):
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
    def ld_base(self) -> Tensor:
        return self.ld_corrupt if self.direction == "denoise" else self.ld_clean

    def effect(self) -> Tensor:
        """Patched minus unpatched metric, per pair and cell (log-odds units)."""
        shape = (-1,) + (1,) * (self.values.dim() - 1)
        return self.values - self.ld_base.view(shape)

    def normalized(self) -> Tensor:
        """Mean over pairs, normalized: 0 = corrupted, 1 = clean."""
        denom = float(self.ld_clean.mean() - self.ld_corrupt.mean())
        return (torch.nanmean(self.values, 0) - float(self.ld_corrupt.mean())) / denom

    def mean_effect(self) -> Tensor:
        return torch.nanmean(self.effect(), 0)

    def top(self, k: int = 10, n_boot: int = 1000, seed: int = 0) -> list[dict]:
        """The k cells with the largest |mean effect|, with a bootstrap CI over pairs."""
        eff = self.effect()
        m = torch.nanmean(eff, 0)
        flat = m.flatten().nan_to_num(0.0)
        order = flat.abs().argsort(descending=True)[:k]
        norm = self.normalized().flatten()
        out = []
        for i in order.tolist():
            cell = np.unravel_index(i, m.shape)
            mean, lo, hi = bootstrap_mean(eff.reshape(eff.shape[0], -1)[:, i].numpy(), n_boot=n_boot, seed=seed)
            out.append({**{a: int(c) for a, c in zip(self.axes, cell)}, "effect": mean, "ci_low": lo,
                        "ci_high": hi, "normalized": float(norm[i])})
        return out

    def layer_profile(self) -> Tensor:
        """Per layer: the largest |mean effect| over the other axes (signed)."""
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
            rows.append({**{a: int(c) for a, c in zip(self.axes, cell)}, "effect": float(m.flatten()[i]),
                         "normalized": float(norm.flatten()[i])})
        return pd.DataFrame(rows)

    def plot(self, template: int | None = None):
        from .plotting import plot_patching

        return plot_patching(self, template=template)


def patch_sweep(
    model,
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
    metric = _ld_metric(model, pairs)
    max_len = max(len(t) for t in pairs.clean_tokens)
    _, grid, axes = sweep_variants(model, component, max_len, neurons)
    values = torch.full((len(pairs),) + grid, float("nan"), dtype=torch.float64)
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
            for k, (c, r) in enumerate(zip(pairs.clean, pairs.corrupt))]
    meta = make_meta(model, context=pairs.context, axis=pairs.axis.name, component=component, direction=direction,
                     clean_group=pairs.axis.groups[pairs.clean[0].group] if pairs.clean else None)
    return PatchResult(component, direction, axes, values, ld_clean, ld_corr, info, meta)


def patch_set(model, pairs: PromptPairs, patches: Sequence[Patch], *, direction: str = "denoise") -> dict:
    """Patch a set of components together (e.g. the top heads of a sweep, or IG² neurons).

    Returns the per-pair metric and the mean effect / normalized value with a bootstrap CI.
    """
    metric = _ld_metric(model, pairs)
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
    v, b, o = np.array(vals), np.array(base_vals), np.array(other_vals)
    clean_ld, corr_ld = (o, b) if direction == "denoise" else (b, o)
    eff, lo, hi = bootstrap_mean(v - b)
    return {"direction": direction, "n_patches": len(patches), "n_pairs": len(pairs), "effect": eff, "ci_low": lo,
            "ci_high": hi, "normalized": float((v.mean() - corr_ld.mean()) / (clean_ld.mean() - corr_ld.mean())),
            "values": v.tolist(), "ld_clean": clean_ld.tolist(), "ld_corrupt": corr_ld.tolist()}


# ----------------------------------------------------------------------------
# attribution patching
# ----------------------------------------------------------------------------

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

    def save(self, path):  # dict of tensors: flatten into the tensor file
        from pathlib import Path

        from .results import atomic_save_tensors, atomic_write_json

        path = Path(path)
        atomic_save_tensors({k: v for k, v in self.estimates.items()}, path / "tensors.safetensors")
        atomic_write_json({"result_type": self.result_type, "direction": self.direction, "axes": self.axes,
                           "meta": self.meta}, path / "result.json")
        return path

    @classmethod
    def load(cls, path):
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        d = json.loads((Path(path) / "result.json").read_text())
        return cls(d["direction"], load_file(str(Path(path) / "tensors.safetensors")), d["axes"], d.get("meta", {}))

    def mean(self, component: str) -> Tensor:
        return torch.nanmean(self.estimates[component], 0)

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for comp, est in self.estimates.items():
            m = torch.nanmean(est, 0)
            for i in range(m.numel()):
                cell = np.unravel_index(i, m.shape)
                rows.append({"component": comp, **{a: int(c) for a, c in zip(self.axes[comp], cell)},
                             "estimate": float(m.flatten()[i])})
        return pd.DataFrame(rows)

    def plot(self, component: str = "heads"):
        from .plotting import plot_grid

        return plot_grid(self.mean(component), self.axes[component], f"AtP estimate ({component}, {self.direction})")


ATP_COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "heads", "heads_by_pos", "neurons")


def attribution_patch(model, pairs: PromptPairs, *, direction: str = "denoise",
                      components: Sequence[str] = ATP_COMPONENTS) -> AtPResult:
    """AtP estimates for every component at once (two forwards and one backward per length bucket)."""
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    metric = _ld_metric(model, pairs)
    L = model.cfg.n_layers
    kinds = set()
    for c in components:
        kinds.add({"resid_pre": "resid_pre", "attn_out": "attn_out", "mlp_out": "mlp_out", "heads": "z",
                   "heads_by_pos": "z", "neurons": "post"}[c])
    names = [HOOKS[k].format(l=l) for k in sorted(kinds) for l in range(L)]
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
                _, other_cache = model.run_with_cache(other_run, names_filter=names)
            acts, grads = {}, {}

            def save_act(x, hook):
                acts[hook.name] = x.detach()

            def save_grad(g, hook):
                grads[hook.name] = g.detach()

            def leaf(x, hook):
                return x.detach().requires_grad_(True)

            fwd = [("hook_embed", leaf)] + [(n, save_act) for n in names]
            bwd = [(n, save_grad) for n in names]
            with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
                logits = model(grad_run)
                metric(logits[:, -1].float()).sum().backward()
            canon = {n: _canonical(model, n) for n in names}
            for c in components:
                k = {"resid_pre": "resid_pre", "attn_out": "attn_out", "mlp_out": "mlp_out", "heads": "z",
                     "heads_by_pos": "z", "neurons": "post"}[c]
                for l in range(L):
                    n = HOOKS[k].format(l=l)
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


def _canonical(model, name: str) -> str:
    """The name a hook point reports for itself (aliases resolve to a canonical name)."""
    hp = model.hook_dict[name]
    return hp.name or name


def atp_agreement(atp: AtPResult, exact: PatchResult, component: str, ks: Sequence[int] = (5, 10, 20)) -> dict:
    """Spearman correlation of AtP with exact patching (mean over pairs), and recall of the exact top-k."""
    a = torch.nanmean(atp.estimates[component], 0).flatten().numpy()
    e = exact.mean_effect().flatten().numpy()
    ok = np.isfinite(a) & np.isfinite(e) & (e != 0)  # cells that patching can change
    a, e = a[ok], e[ok]
    out = {"component": component, "spearman": spearman(a, e), "n_cells": int(ok.sum())}
    for k in ks:
        if k > len(e):
            continue
        top_e = set(np.argsort(-np.abs(e))[:k])
        top_a = set(np.argsort(-np.abs(a))[:k])
        out[f"recall@{k}"] = len(top_e & top_a) / k
    return out


def prefilter_and_verify(model, pairs: PromptPairs, atp: AtPResult, component: str = "heads", k: int = 10,
                         direction: str | None = None) -> list[dict]:
    """AtP to prefilter, exact patching to verify: patch the AtP top-k cells exactly, one at a time."""
    direction = direction or atp.direction
    m = torch.nanmean(atp.estimates[component], 0)
    order = m.flatten().nan_to_num(0).abs().argsort(descending=True)[:k]
    cells = [np.unravel_index(int(i), m.shape) for i in order]
    out = []
    for cell in cells:
        if component == "heads":
            patch = Patch(int(cell[0]), "z", None, (int(cell[1]),))
        elif component == "neurons":
            patch = Patch(int(cell[0]), "post", None, (int(cell[1]),))
        else:
            kind = {"resid_pre": "resid_pre", "attn_out": "attn_out", "mlp_out": "mlp_out"}[component]
            patch = Patch(int(cell[0]), kind, (int(cell[1]),))
        res = patch_set(model, pairs, [patch], direction=direction)
        out.append({"cell": [int(c) for c in cell], "atp": float(m[cell]), "exact_effect": res["effect"],
                    "ci_low": res["ci_low"], "ci_high": res["ci_high"]})
    return out


def patching_pairs(model, context: str, axis: str, *, templates="all", names="all", max_pairs: int | None = None,
                   seed: int = 0) -> PromptPairs:
    """Equal-token-length pairs for a context (clean = group A, corrupted = group B)."""
    return make_pairs(model, load_context(context), axis, templates=templates, names=names, seed=seed,
                      max_pairs=max_pairs)


# ----------------------------------------------------------------------------
# one context: sweeps, AtP, set patching
# ----------------------------------------------------------------------------

@dataclass
class PatchingExperiment:
    context: str
    axis: str
    direction: str
    sweeps: dict
    atp: AtPResult
    agreement: list
    set_patching: list
    config: dict

    def summary(self, k: int = 10) -> dict:
        return {
            "context": self.context, "axis": self.axis, "direction": self.direction, "config": self.config,
            "n_pairs": int(next(iter(self.sweeps.values())).values.shape[0]),
            "clean_group": next(iter(self.sweeps.values())).meta.get("clean_group"),
            "ld_clean_mean": float(next(iter(self.sweeps.values())).ld_clean.mean()),
            "ld_corrupt_mean": float(next(iter(self.sweeps.values())).ld_corrupt.mean()),
            "top": {c: r.top(k) for c, r in self.sweeps.items()},
            "layer_profile": {c: [float(x) for x in r.layer_profile()] for c, r in self.sweeps.items()},
            "atp_agreement": self.agreement,
            "set_patching": self.set_patching,
        }

    def save(self, path) -> None:
        from pathlib import Path

        from .results import atomic_write_json

        path = Path(path)
        for c, r in self.sweeps.items():
            r.save(path / f"sweep_{c}")
        self.atp.save(path / "atp")
        atomic_write_json(self.summary(), path / "patch.json")


def patching_experiment(
    model,
    context: str,
    axis: str,
    *,
    direction: str = "denoise",
    components: Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "heads", "k_heads", "v_heads"),
    max_pairs: int | None = 8,
    top_k_heads: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> PatchingExperiment:
    """Sweeps, AtP (with its agreement to exact patching) and set patching of the top heads, in both
    directions for the set."""
    pairs = patching_pairs(model, context, axis, max_pairs=max_pairs, seed=seed)
    sweeps = {c: patch_sweep(model, pairs, c, direction=direction, progress=progress) for c in components}
    atp_comps = [c for c in ("resid_pre", "attn_out", "mlp_out", "heads") if c in components] + ["neurons"]
    atp = attribution_patch(model, pairs, direction=direction, components=atp_comps)
    agreement = [atp_agreement(atp, sweeps[c], c) for c in atp_comps if c in sweeps]
    sets = []
    if "heads" in sweeps:
        top = sweeps["heads"].top(top_k_heads)
        patches = [Patch(t["layer"], "z", None, (t["head"],)) for t in top]
        for d in ("denoise", "noise"):
            r = patch_set(model, pairs, patches, direction=d)
            sets.append({"set": f"top {top_k_heads} heads of the {direction} sweep",
                         "heads": [[t["layer"], t["head"]] for t in top], **{k: v for k, v in r.items()
                                                                             if k not in ("values", "ld_clean", "ld_corrupt")}})
    config = {"components": list(components), "max_pairs": max_pairs, "top_k_heads": top_k_heads, "seed": seed}
    return PatchingExperiment(pairs.context, pairs.axis.name, direction, sweeps, atp, agreement, sets, config)


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
